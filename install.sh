#!/usr/bin/env bash
# Sets up everything Tabby needs on a Debian 12 machine (run as root): the Debian packages and
# a virtualenv in ./.venv with Tabby installed. Idempotent; silent when everything is in place.
#
# ./install.sh --node [cni-install options]   also makes this machine a Tabby node: runs
# cni-install (tabby + tabby-ipam into /opt/cni/bin, 10-tabby.conflist, /etc/tabby) and, where
# systemd runs, installs and enables the tabby-node unit.
set -euo pipefail
cd "$(dirname "$0")"

node=0
if [ "${1:-}" = "--node" ]; then node=1; shift; fi

PACKAGES=(etcd-server etcd-client iptables ipset iproute2 openssl python3-venv containernetworking-plugins bird2)
# for the tests only (a real container runtime driving the plugin), not on nodes
TEST_PACKAGES=(podman runc busybox-static)
if [ "$node" = 0 ]; then PACKAGES+=("${TEST_PACKAGES[@]}"); fi

say() { echo "install.sh: $*"; }

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    say "needs root to install: ${missing[*]}"; exit 1
  fi
  say "installing Debian packages: ${missing[*]}"
  # Keep package scripts from starting a system-wide etcd on :2379 or a BIRD; Tabby starts its own.
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  if [ "$had_policy" = 0 ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$had_policy" = 0 ]; then rm -f /usr/sbin/policy-rc.d; fi
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    systemctl disable --now etcd bird >/dev/null 2>&1 || true
  fi
fi

PY=${PYTHON:-python3}
stamp=.venv/.tabby-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "creating the virtualenv .venv"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  log=.venv/pip-install.log
  if ! .venv/bin/python -m pip install -q -e '.[test]' >"$log" 2>&1; then
    grep -v '^WARNING: Location' "$log" | tail -20; say "pip install failed (full log: $log)"; exit 1
  fi
  .venv/bin/python -c 'import aetcd, click, yaml' || { say "venv install failed"; exit 1; }
  echo "$want" > "$stamp"
fi

if [ "$node" = 1 ]; then
  if [ "$(id -u)" -ne 0 ]; then say "--node needs root"; exit 1; fi
  .venv/bin/cni-install "$@"
  unit=/etc/systemd/system/tabby-node.service
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    tmp=$(mktemp)
    sed -e "s#@TABBY_NODE@#$PWD/.venv/bin/tabby-node#" -e "s#@TABBY_DIR@#$PWD#" \
      conf/tabby-node.service > "$tmp"
    if ! cmp -s "$tmp" "$unit"; then
      install -m 0644 "$tmp" "$unit"
      systemctl daemon-reload
      systemctl try-restart tabby-node.service
      say "installed $unit"
    fi
    rm -f "$tmp"
    if ! systemctl is-enabled --quiet tabby-node.service; then
      systemctl enable --now tabby-node.service >/dev/null 2>&1
      say "enabled and started tabby-node (journalctl -u tabby-node)"
    fi
  else
    say "no systemd here: run $PWD/.venv/bin/tabby-node yourself (log: /var/log/tabby/tabby-node.log)"
  fi
fi

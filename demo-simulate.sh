#!/usr/bin/env bash
# The offline demo (no network namespaces): a private etcd, the user's seed policies applied with
# tabbyctl, decisions explained against the live store, then the seed walkthroughs simulated.
# Leaves nothing behind: its etcd is stopped (by pid) and its data removed on exit.
set -euo pipefail
cd "$(dirname "$0")"
TABBYCTL=.venv/bin/tabbyctl
[ -x "$TABBYCTL" ] || { echo "run ./install.sh first" >&2; exit 1; }

work=$(mktemp -d /tmp/tabby-demo.XXXXXX)
etcd_pid=""
cleanup() {
  if [ -n "$etcd_pid" ]; then kill "$etcd_pid" 2>/dev/null || true; wait "$etcd_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
client=$(free_port); peer=$(free_port)
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

step "starting a private etcd on 127.0.0.1:$client"
etcd --name demo --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
  --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
  --initial-cluster "demo=http://127.0.0.1:$peer" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
export ETCD_ENDPOINTS="http://127.0.0.1:$client"
for _ in $(seq 50); do
  ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done

step "namespaces and pods, as kubectl users write them"
cat > "$work/cluster.yaml" <<'YAML'
apiVersion: v1
kind: Namespace
metadata: {name: dev-linuxea}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod-linuxea}
---
apiVersion: v1
kind: Pod
metadata: {name: pod-linuxea-1, namespace: dev-linuxea, labels: {app: linuxea.com}}
spec: {nodeName: node2, containers: [{name: linuxeaapp, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 172.16.4.8}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: prod-linuxea, labels: {app: client}}
spec: {nodeName: node3, containers: [{name: client}]}
status: {podIP: 172.16.3.46}
YAML
run $TABBYCTL apply -f "$work/cluster.yaml"
run $TABBYCTL get pods -A

step "seed 001: deny all ingress in dev-linuxea, then allow TCP 80/81 from 172.16.0.0/16 except 172.16.8.0/24"
run $TABBYCTL apply -n dev-linuxea -f conf/examples/001-deny-ingress.yaml
run $TABBYCTL policy explain --from prod-linuxea/client --to dev-linuxea/pod-linuxea-1 --port 80/TCP
run $TABBYCTL apply -n dev-linuxea -f conf/examples/001-allow-ipblock-80-81.yaml
run $TABBYCTL policy explain --from prod-linuxea/client --to dev-linuxea/pod-linuxea-1 --port 81/TCP
run $TABBYCTL get networkpolicy -n dev-linuxea -o wide
run $TABBYCTL get networkpolicy.networking.k8s.io allow-ingress -n dev-linuxea -o yaml

step "seed 003: the GlobalNetworkPolicy set"
run $TABBYCTL apply -f conf/examples/003-global-policies.yaml
run $TABBYCTL get globalnetworkpolicy -o wide

step "a bad manifest is refused with one line, and nothing is written"
printf 'apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: broken}\nspec:\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [70000]}}]\n' > "$work/bad.yaml"
run $TABBYCTL apply -f "$work/bad.yaml" || true
run $TABBYCTL get globalnetworkpolicy broken || true

step "what etcdctl shows: Calico's key layout"
ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" get --prefix /calico/resources/v3/ --keys-only | sed '/^$/d'

for scenario in tests/scenarios/seed-001-walkthrough.yaml tests/scenarios/seed-003-global-policies.yaml \
                tests/scenarios/seed-004-test-network-policy.yaml; do
  step "simulated: $scenario (the seed manifests from conf/examples/, step by step)"
  run $TABBYCTL policy simulate --check "$scenario"
done

step "done: the demo etcd is stopped and its data removed"

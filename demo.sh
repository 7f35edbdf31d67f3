#!/usr/bin/env bash
# The main job: a 3-node Tabby cluster in network namespaces on an etcd it starts itself, the
# user's seed walkthroughs run with real packets (connectivity matrix before and after each
# policy, checked against the expected verdicts and the simulator), then a few pods left running
# across the nodes to explore. Everything lives in namespaces named tabby-lab-demo-*; nothing
# touches the host's own network. Tear it down with: .venv/bin/tabbyctl lab down --name demo
set -euo pipefail
cd "$(dirname "$0")"
TABBYCTL=.venv/bin/tabbyctl
[ -x "$TABBYCTL" ] || { echo "run ./install.sh first" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "the lab needs root (network namespaces)" >&2; exit 1; }
LAB=(--name demo)
NODES=${TABBY_DEMO_NODES:-3}

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
etcd_ns=tabby-lab-demo-etcd
# tabbyctl against the lab's etcd: only the lab's namespaces can reach it
ctl() { printf '\033[2m$ tabbyctl %s\033[0m\n' "$*"; ip netns exec "$etcd_ns" env ETCD_ENDPOINTS=http://198.18.0.2:2379 "$TABBYCTL" "$@"; }

if "$TABBYCTL" lab status "${LAB[@]}" >/dev/null 2>&1; then
  step "an earlier demo lab is still up: taking it down first"
  run "$TABBYCTL" lab down "${LAB[@]}" >/dev/null
fi

step "1/6 a $NODES-node cluster: underlay bridge, etcd, nodes running tabby-node (CNI service, felix, exabgp)"
run "$TABBYCTL" lab up --nodes "$NODES" "${LAB[@]}"

step "2/6 the nodes peer over BGP (full mesh, AS 64512) — calicoctl node status, per node"
for _ in $(seq 150); do  # until every session is up (a few seconds)
  peers=$("$TABBYCTL" lab bgp "${LAB[@]}" 2>/dev/null || true)
  grep -q "| up " <<<"$peers" && ! grep -q "| start \|no routing status\|is not" <<<"$peers" && break
  sleep 0.2
done
run "$TABBYCTL" lab bgp node1 "${LAB[@]}"

for scenario in tests/scenarios/seed-001-walkthrough.yaml tests/scenarios/seed-003-global-policies.yaml \
                tests/scenarios/seed-004-test-network-policy.yaml; do
  case "$scenario" in
    *001*) n=3; what="seed 001: kubectl NetworkPolicy walkthrough (deny all, allow all, ipBlock with except, ports)";;
    *003*) n=4; what="seed 003: the GlobalNetworkPolicy set (tiers of order, namespaceSelector, deny-by-default)";;
    *) n=5; what="seed 004: test-network-policy (podSelector + namespaceSelector + ipBlock, egress)";;
  esac
  step "$n/6 $what — pods spread over the nodes, every pair probed after each step"
  run "$TABBYCTL" lab run "$scenario" --check --simulate "${LAB[@]}"
done

step "6/6 pods left running on different nodes for you to explore"
run "$TABBYCTL" lab pod add shop/web --node node1 --labels app=web --port http:8080/TCP "${LAB[@]}"
run "$TABBYCTL" lab pod add shop/db --node node2 --labels app=db --port pg:5432/TCP "${LAB[@]}"
run "$TABBYCTL" lab pod add shop/client --node "node$NODES" --labels app=client "${LAB[@]}"
cat > /tmp/tabby-demo-policy.yaml <<'YAML'
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: app == 'db'
  types: [Ingress]
  ingress:
    - {action: Allow, protocol: TCP, source: {selector: app == 'web'}, destination: {ports: [5432]}}
YAML
ctl apply -f /tmp/tabby-demo-policy.yaml
rm -f /tmp/tabby-demo-policy.yaml
ctl policy explain --from shop/web --to shop/db --port 5432/TCP
ctl policy explain --from shop/client --to shop/db --port 5432/TCP || true
run "$TABBYCTL" lab status "${LAB[@]}"
printf '\n\033[2m$ ip netns exec tabby-lab-demo-node1 ip route   # other nodes'"'"' blocks learned over BGP (proto 81)\033[0m\n'
ip netns exec tabby-lab-demo-node1 ip route

cat <<'TXT'

== explore
  .venv/bin/tabbyctl lab status --name demo                 nodes, pods, addresses, endpoints
  .venv/bin/tabbyctl lab bgp --name demo                    BGP peers of every node
  .venv/bin/tabbyctl lab exec shop/client --name demo -- python3 -c \
      "import socket; socket.create_connection(('<db ip>', 5432), timeout=2)"   # denied: not app=web
  .venv/bin/tabbyctl lab run tests/scenarios/calico-tiers-and-order.yaml --check --name demo
  ip netns exec tabby-lab-demo-etcd env ETCD_ENDPOINTS=http://198.18.0.2:2379 \
      .venv/bin/tabbyctl get networkpolicy -A -o wide        tabbyctl against the lab's etcd
  ip netns exec tabby-lab-demo-node1 iptables-save | grep cali-   Felix's chains on node1
== tear down
  .venv/bin/tabbyctl lab down --name demo
TXT

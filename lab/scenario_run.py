"""`tabbyctl lab run FILE`: a scenario (felix/scenario.py's format) with real packets in the lab.

The run, in order (everything inside the lab's namespaces):

1. The scenario is walked once offline first (it is validated before the lab is touched, and the
   ports every step probes are collected). If the lab does not exist it is brought up with
   `--nodes 3` and taken down again at the end; an existing lab stays up.
2. An IPPool (natOutgoing false, blockSize 26) is added for each pod address outside every
   existing pool: the /16 around it, or a smaller prefix when the /16 would overlap a pool.
3. Namespaces and service accounts are applied with their labels; each pod is created through
   the node's real CNI conflist with its exact address (`lab pod add --ip`), on the node the
   scenario names or else on the lab's nodes in turn, then its Pod is re-applied with its
   service account (the store relabels the CNI-written WorkloadEndpoint). The underlay gets a /32
   route per pod (lab/underlay.py); externals become namespaces on the underlay.
   Each pod and external runs a responder (`python -m lab.probe serve`) on every TCP and UDP port
   any step probes, plus the pod's own ports. Then the run waits (at most ROUTE_WAIT s) until
   every node can forward to every IPv4 pod address: a node blackholes its own blocks until it
   has learned, over BGP, the /32 of an address another node borrowed from one of them.
4. Per step: the difference from the previous step is written through the store (deleted
   manifests, applied manifests, relabelled Namespaces, ServiceAccounts and Pods); then the step
   is probed. Convergence rule: read etcd's revision after the writes and poll every node's felix
   agent metrics (127.0.0.1:9091 in the node namespace) until each reports felix_in_sync 1 and
   felix_datastore_revision >= that revision (at most AGENT_WAIT s), then AGENT_SETTLE s; when a
   node has no agent metrics, a fixed SETTLE s instead. Then probe every pair of every probe of
   the step in parallel, and repeat until two consecutive rounds give the same verdict for every
   pair (at most MAX_ROUNDS rounds; a step that never stabilises is reported in `convergence`).
5. Output as `policy simulate`: the JSON (plus `notProbed`, `convergence` and, with
   `--simulate`, `disagreements`), the text matrices, `--check`. SCTP pairs are not probed (this
   kernel has no SCTP sockets): they are listed, never counted as passed or failed.
6. Cleanup, also on failure: responders, pods, routes, externals, the manifests the run applied,
   the Namespaces/ServiceAccounts it created (pre-existing ones get their labels back), the pools
   it added, and the lab if the run brought it up.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import json
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from felix import scenario as sc
from felix.simulate import Verdict
from lab import LabError, cluster, netns, pods, probe, tools, underlay
from lab.state import Lab, State

SETTLE = 0.5  # seconds after a step's writes before the first probe round (no agent metrics)
AGENT_SETTLE = 0.05  # the same once every node's felix agent reported the step's revision
AGENT_WAIT = 10.0  # at most this long for the agents to report it
AGENT_METRICS_PORT = 9091  # felix.metrics.DEFAULT_PORT, on 127.0.0.1 in each node namespace
MAX_ROUNDS = 6
ROUTE_WAIT = 30.0  # at most this long for every node to route every pod (before step 1)
WORKERS = 128
NEW_NODES = 3  # nodes of a lab the run brings up itself
POOL_PREFIXES = {4: (16, 20, 24, 26), 6: (64, 96, 112, 122)}
POOL_BLOCK = {4: 26, 6: 122}
POOL_PREFIX_NAME = "tabby-lab-run-"
READY_TIMEOUT = 15.0

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# ---- pure planning ---------------------------------------------------------------------------

def pools_for(existing: Iterable[str], ips: Iterable[str]) -> list[str]:
    """CIDRs of the pools to add so every address is inside a pool: the /16 (/64) around it, or
    the first of /20, /24, /26 that overlaps no pool, existing or added."""
    pools = [ipaddress.ip_network(c, strict=False) for c in existing]
    added: list[str] = []
    for text in ips:
        ip = ipaddress.ip_address(text)
        if any(ip in p for p in pools if p.version == ip.version):
            continue
        for prefix in POOL_PREFIXES[ip.version]:
            net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
            if not any(net.overlaps(p) for p in pools if p.version == net.version):
                pools.append(net)
                added.append(str(net))
                break
        else:
            raise LabError(f"no pool can hold {ip}: every prefix around it overlaps a pool")
    return added


def pool_name(cidr: str) -> str:
    return POOL_PREFIX_NAME + cidr.replace(".", "-").replace(":", "-").replace("/", "-")


def pool_object(cidr: str) -> dict[str, Any]:
    version = ipaddress.ip_network(cidr).version
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
            "metadata": {"name": pool_name(cidr)},
            "spec": {"cidr": cidr, "blockSize": POOL_BLOCK[version], "ipipMode": "Never",
                     "vxlanMode": "Never", "natOutgoing": False, "nodeSelector": "all()"}}


def place(pod_nodes: dict[str, str], nodes: Sequence[str]) -> dict[str, str]:
    """Pod -> lab node: the scenario's `node:` when it names a lab node, else the nodes in turn."""
    out: dict[str, str] = {}
    turn = 0
    for key, wanted in pod_nodes.items():
        if wanted in nodes:
            out[key] = wanted
            continue
        out[key] = nodes[turn % len(nodes)]
        turn += 1
    return out


def listen_ports(probes: Iterable[sc.Probe], pods_: Iterable[sc.Pod]) -> tuple[list[int],
                                                                              list[int]]:
    """TCP and UDP ports every responder serves: every probed port and every pod's own."""
    tcp: set[int] = set()
    udp: set[int] = set()
    for p in probes:
        if p.port is not None and p.protocol.upper() in ("TCP", "UDP"):
            (tcp if p.protocol.upper() == "TCP" else udp).add(int(p.port))
    for pod in pods_:
        for port in pod.ports:
            proto = str(port.get("protocol", "TCP")).upper()
            if proto in ("TCP", "UDP"):
                (tcp if proto == "TCP" else udp).add(int(port["port"]))
    return sorted(tcp), sorted(udp)


def namespace_object(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels)}}


def account_object(key: str, labels: dict[str, str]) -> dict[str, Any]:
    ns, name = key.split("/")
    return {"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": ns, "labels": dict(labels)}}


def accounts_of(state: sc.State) -> dict[str, dict[str, str]]:
    """Service accounts as the simulator sees them: declared ones and every pod's own."""
    out = dict(state.service_accounts)
    for pod in state.pods.values():
        out.setdefault(f"{pod.namespace}/{pod.service_account}", {})
    return out


def lab_pod_manifest(pod: sc.Pod, node: str) -> dict[str, Any]:
    manifest = sc.pod_manifest(replace(pod, node=node))
    manifest["spec"]["containers"][0]["image"] = "tabby-lab"
    return manifest


def delete_op(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    op = {"op": "delete", "kind": obj["kind"], "apiVersion": obj["apiVersion"],
          "name": meta["name"]}
    if meta.get("namespace"):
        op["namespace"] = meta["namespace"]
    return op


def step_ops(prev: sc.State, cur: sc.State, placement: dict[str, str]) -> list[dict[str, Any]]:
    """Store writes that turn the world of `prev` into `cur`: manifest deletes, then Namespace,
    ServiceAccount and manifest applies, then Pod relabels."""
    ops: list[dict[str, Any]] = []
    for key, obj in prev.manifests.items():
        if key not in cur.manifests:
            ops.append(delete_op(obj))
    objects: list[dict[str, Any]] = []
    for ns, labels in cur.namespaces.items():
        if prev.namespaces.get(ns) != labels:
            objects.append(namespace_object(ns, labels))
    before = accounts_of(prev)
    for key, labels in accounts_of(cur).items():
        if before.get(key) != labels:
            objects.append(account_object(key, labels))
    for key, obj in cur.manifests.items():
        if prev.manifests.get(key) != obj:
            objects.append(copy.deepcopy(obj))
    for key, pod in cur.pods.items():
        old = prev.pods.get(key)
        if old is None or (old.labels, old.service_account) != (pod.labels, pod.service_account):
            objects.append(lab_pod_manifest(pod, placement[key]))
    if objects:
        ops.append({"op": "apply", "objects": objects})
    return ops


@dataclass(frozen=True)
class Task:
    """One probe of one pair: where the packet starts, where it goes, how."""

    index: int  # the probe's position in the step
    src: str
    dst: str
    protocol: str
    port: int | None
    icmp_type: int | None
    icmp_code: int | None
    src_ns: str
    dst_ns: str
    dst_ip: str
    skip: str | None = None  # why it is not probed


@dataclass
class Where:
    """Lab namespaces: pod/external key -> namespace, pod -> node namespace; addresses."""

    ns: dict[str, str]
    node_ns: dict[str, str]
    ip: dict[str, str]


def plan(probes: Sequence[sc.Probe], state: sc.State, where: Where) -> list[Task]:
    tasks: list[Task] = []
    for i, p in enumerate(probes):
        proto = p.protocol.upper()
        for src, dst in sc.pairs(state, p):
            src_ns = where.node_ns[dst] if src == sc.HOST else where.ns[src]
            skip = None
            if proto == "SCTP":
                skip = probe.NOT_PROBED_SCTP
            elif proto not in ("TCP", "UDP", "ICMP"):
                skip = f"not probed: no {p.protocol} probe"
            tasks.append(Task(i, src, dst, proto, p.port, p.icmp_type, p.icmp_code, src_ns,
                              where.ns[dst], where.ip[dst], skip))
    return tasks


def run_task(t: Task, timeout: float = probe.TIMEOUT) -> probe.Outcome:
    if t.skip:
        return probe.Outcome(False, t.skip)
    if t.protocol == "TCP":
        return probe.tcp(t.src_ns, t.dst_ip, int(t.port or 0), timeout)
    if t.protocol == "UDP":
        return probe.udp(t.src_ns, t.dst_ip, int(t.port or 0), timeout)
    return probe.icmp(t.src_ns, t.dst_ns, t.dst_ip, t.icmp_type, t.icmp_code, timeout)


@dataclass
class StepOutcome:
    results: list[sc.ProbeResult]
    not_probed: list[dict[str, Any]]
    rounds: int
    stable: bool
    flapped: list[str] = field(default_factory=list)  # pairs that changed between rounds


def assemble(probes: Sequence[sc.Probe], tasks: Sequence[Task],
             outcomes: Sequence[probe.Outcome]) -> tuple[list[sc.ProbeResult],
                                                         list[dict[str, Any]]]:
    """ProbeResults (matrix and verdicts of the probed pairs) and the not-probed pairs."""
    results = [sc.ProbeResult(p, {}, {}) for p in probes]
    skipped: list[dict[str, Any]] = []
    for t, o in zip(tasks, outcomes, strict=True):
        r = results[t.index]
        if t.skip:
            skipped.append({"step": r.probe.step, "protocol": r.probe.protocol,
                            "port": r.probe.port, "source": t.src, "destination": t.dst,
                            "reason": t.skip})
            continue
        r.matrix.setdefault(t.src, {})[t.dst] = "allow" if o.allowed else "deny"
        r.verdicts[(t.src, t.dst)] = Verdict(o.allowed, o.reason)
    return results, skipped


def _signature(outcomes: Sequence[probe.Outcome]) -> list[bool]:
    return [o.allowed for o in outcomes]


# ---- convergence -----------------------------------------------------------------------------

def store_revision(state: State) -> int:
    """etcd's current revision (its JSON gateway, from inside the etcd namespace)."""
    url = f"{cluster.etcd_endpoint(state)}/v3/kv/range"
    body = json.dumps({"key": "L3RhYmJ5LWxhYi1ydW4="}).encode()  # "/tabby-lab-run": absent

    def get() -> int:
        req = urllib.request.Request(url, data=body, method="POST")
        with urllib.request.urlopen(req, timeout=2) as r:
            return int(json.loads(r.read())["header"]["revision"])

    return netns.call_in(state["etcd"]["ns"], get)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def agent_metrics(node_ns: str, port: int = AGENT_METRICS_PORT) -> dict[str, float] | None:
    """The felix agent's metrics in a node namespace; None when no agent answers."""
    def get() -> dict[str, float] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as r:
                return parse_metrics(r.read().decode())
        except (OSError, urllib.error.URLError, ValueError):
            return None

    return netns.call_in(node_ns, get)


def agents_caught_up(metrics: Sequence[dict[str, float] | None], revision: int) -> bool:
    return all(m is not None and m.get("felix_in_sync") == 1
               and m.get("felix_datastore_revision", 0) >= revision for m in metrics)


def wait_for_agents(state: State, revision: int, timeout: float = AGENT_WAIT) -> str:
    """Wait until every node's agent has applied `revision` and is in sync. Returns how the
    wait ended: "agents", "timeout" or "no-agent" (some node has no agent metrics)."""
    node_ns = [n["ns"] for n in state["nodes"].values()]
    deadline = time.monotonic() + timeout
    while True:
        metrics = [agent_metrics(ns) for ns in node_ns]
        if any(m is None for m in metrics):
            return "no-agent"
        if agents_caught_up(metrics, revision):
            return "agents"
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(0.02)


def unrouted(state: State, ips: list[str]) -> list[str]:
    """`node -> ip` for each pod address a node cannot forward to yet: a node's own block is
    blackholed until the routing agent has learned a /32 borrowed from it by another node."""
    return [f"{name} -> {ip}" for name, node in state["nodes"].items() for ip in ips
            if netns.ip(node["ns"], "-o", "route", "get", ip, check=False).returncode != 0]


def wait_for_routes(state: State, ips: list[str], timeout: float = ROUTE_WAIT) -> list[str]:
    """Wait until every node forwards to every pod address (BGP sessions of a lab just brought
    up take a few seconds); returns what is still unrouted when the wait ends."""
    deadline = time.monotonic() + timeout
    while (missing := unrouted(state, ips)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return missing


# ---- reporting -------------------------------------------------------------------------------

@dataclass
class LabReport:
    result: sc.ScenarioResult
    not_probed: list[dict[str, Any]]
    convergence: list[dict[str, Any]]
    simulated: list[sc.ProbeResult] | None = None  # same order as result.results


def disagreements(report: LabReport) -> list[dict[str, Any]]:
    """Every probed pair where the kernel and the simulator (same state) disagree."""
    out: list[dict[str, Any]] = []
    for kernel, sim in zip(report.result.results, report.simulated or [], strict=True):
        for src, row in kernel.matrix.items():
            for dst, got in row.items():
                want = sim.matrix.get(src, {}).get(dst)
                if want is None or want == got:
                    continue
                out.append({"step": kernel.probe.step, "probe": kernel.probe.label,
                            "protocol": kernel.probe.protocol, "port": kernel.probe.port,
                            "source": src, "destination": dst, "kernel": got,
                            "kernelReason": kernel.verdicts[(src, dst)].reason,
                            "simulator": want, "simulatorReason": sim.verdicts[(src, dst)].reason})
    return out


def to_json(report: LabReport) -> dict[str, Any]:
    out = sc.to_json(report.result)
    out["notProbed"] = report.not_probed
    out["convergence"] = report.convergence
    if report.simulated is not None:
        out["disagreements"] = disagreements(report)
    return out


@dataclass
class LabCheck:
    report: sc.CheckReport
    not_probed: list[str]  # expectations that were not probed (neither passed nor failed)


def check(report: LabReport) -> LabCheck:
    skipped = {(n["step"], n["protocol"], n["port"], n["source"], n["destination"]): n["reason"]
               for n in report.not_probed}
    kept: list[sc.ProbeResult] = []
    lines: list[str] = []
    for r in report.result.results:
        expect: dict[str, dict[str, str]] = {}
        for src, row in r.probe.expect.items():
            for dst, want in row.items():
                why = skipped.get((r.probe.step, r.probe.protocol, r.probe.port, src, dst))
                if why is not None and src != dst:
                    lines.append(f"step {r.probe.step} {r.probe.label}: {src} -> {dst}: "
                                 f"expected {want}, {why}")
                    continue
                expect.setdefault(src, {})[dst] = want
        kept.append(replace(r, probe=replace(r.probe, expect=expect)))
    return LabCheck(sc.check(replace(report.result, results=kept)), lines)


def format_check(c: LabCheck) -> str:
    text = sc.format_check(c.report)
    if not c.not_probed:
        return text
    *mismatches, last = text.split("\n")
    return "\n".join([*mismatches, *c.not_probed, f"{last}, {len(c.not_probed)} not probed"])


def format_disagreements(found: list[dict[str, Any]]) -> str:
    if not found:
        return "kernel and simulator agree on every probed pair"
    lines = [f"{len(found)} disagreement(s) between the kernel and the simulator:"]
    for d in found:
        lines.append(f"step {d['step']} {d['probe']}: {d['source']} -> {d['destination']}: "
                     f"kernel {d['kernel']} ({d['kernelReason']}), simulator {d['simulator']} "
                     f"({d['simulatorReason']})")
    return "\n".join(lines)


def format_text(report: LabReport) -> str:
    out = [sc.format_text(report.result)]
    if report.not_probed:
        groups: dict[tuple[int, str, str], int] = {}
        for n in report.not_probed:
            key = (n["step"], f"{n['protocol']}/{n['port']}", n["reason"])
            groups[key] = groups.get(key, 0) + 1
        out += ["", "not probed (shown as '.'):"]
        out += [f"  step {step} {label}: {count} pair(s), {why}"
                for (step, label, why), count in groups.items()]
    unstable = [c for c in report.convergence if not c["stable"]]
    if unstable:
        out += ["", "not converged: " + ", ".join(f"step {c['step']} ({c['rounds']} rounds)"
                                                  for c in unstable)]
    return "\n".join(out)


# ---- the run ---------------------------------------------------------------------------------

class Run:
    """One scenario on one lab; `execute()` sets up, steps, and always cleans up."""

    def __init__(self, lab: Lab, filename: str, simulate: bool = False,
                 say: Say = _quiet, timeout: float = probe.TIMEOUT) -> None:
        self.lab, self.filename, self.simulate, self.say = lab, filename, simulate, say
        self.timeout = timeout
        self.data = sc.load_file(filename)
        if not isinstance(self.data, dict):
            raise sc.ScenarioError(f"{filename}: scenario must be a mapping")
        self.base = Path(filename).parent
        self.brought_up = False
        self.pods_made: list[str] = []
        self.routed: list[str] = []
        self.externals: list[tuple[int, str]] = []
        self.pools_added: list[str] = []
        self.listeners: list[subprocess.Popen[str]] = []
        self.applied: dict[str, dict[str, Any]] = {}  # manifests the run wrote
        self.restore: list[dict[str, Any]] = []  # pre-existing Namespaces/SAs, as they were
        self.created: list[dict[str, Any]] = []  # Namespaces/SAs the run created
        self.state: State = {}

    # -- offline walk

    def _walk(self) -> tuple[sc.State, list[sc.Probe]]:
        try:
            initial = sc.initial_state(self.data)
            all_probes = [p for _, ps in sc.steps_of(self.data, self.base) for p in ps]
        except sc.ScenarioError as e:
            raise sc.ScenarioError(f"{self.filename}: {e}") from e
        return initial, all_probes

    def execute(self) -> LabReport:
        initial, all_probes = self._walk()  # a broken scenario fails before the lab is touched
        if self.lab.load() is None:
            self.say(f"lab {self.lab.name!r} is not up: bringing it up with {NEW_NODES} nodes")
            cluster.up(self.lab, NEW_NODES, say=self.say)
            self.brought_up = True
        try:
            self.state = self.lab.require()
            where, placement = self._setup(initial, all_probes)
            return self._steps(initial, where, placement)
        finally:
            self._cleanup()

    # -- setup

    def _store(self, ops: list[dict[str, Any]]) -> list[Any]:
        return cluster.store(self.state, ops) if ops else []

    def _setup(self, initial: sc.State, all_probes: list[sc.Probe]) -> tuple[Where,
                                                                             dict[str, str]]:
        state = self.state
        clash = sorted(set(initial.pods) & set(state["pods"]))
        if clash:
            raise LabError(f"lab {self.lab.name!r} already has pod(s) {', '.join(clash)}; "
                           "delete them (`tabbyctl lab pod del`) or use another lab")
        under = ipaddress.ip_network(cluster.UNDERLAY)
        for key, ip in [*((k, p.ip) for k, p in initial.pods.items()),
                        *initial.externals.items()]:
            if ipaddress.ip_address(ip) in under:
                raise LabError(f"{key}: {ip} is inside the lab's underlay {under}")
        existing = self._store([{"op": "list", "kind": "IPPool"},
                                {"op": "list", "kind": "Namespace", "apiVersion": "v1"},
                                {"op": "list", "kind": "ServiceAccount", "apiVersion": "v1"}])
        cidrs = [p["spec"]["cidr"] for p in existing[0] if not p["spec"].get("disabled")]
        self._remember(existing[1], existing[2], initial)
        for cidr in pools_for(cidrs, [p.ip for p in initial.pods.values()]):
            self.pools_added.append(cidr)
            self._store([{"op": "apply", "objects": [pool_object(cidr)]}])
            self.say(f"IPPool {pool_name(cidr)} {cidr}")
        objects = [namespace_object(n, labels) for n, labels in initial.namespaces.items()]
        objects += [account_object(k, labels) for k, labels in accounts_of(initial).items()]
        self._store([{"op": "apply", "objects": objects}])

        placement = place({k: p.node for k, p in initial.pods.items()}, list(state["nodes"]))
        underlay.enable_forwarding(state)
        self._add_pods(initial, placement)
        self.state = self.lab.require()
        ns = {k: self.state["pods"][k]["netns"] for k in initial.pods}
        for i, (key, ip) in enumerate(initial.externals.items()):
            self.externals.append((i, ip))
            ns[key] = underlay.attach_external(self.lab, i, ip)
        tcp, udp = listen_ports(all_probes, initial.pods.values())
        for key, name in ns.items():
            self._listen(key, name, tcp, udp)
        node_ns = {k: self.state["nodes"][n]["ns"] for k, n in placement.items()}
        ips = {k: p.ip for k, p in initial.pods.items()} | dict(initial.externals)
        self.say(f"{len(initial.pods)} pod(s) on {len(state['nodes'])} node(s), "
                 f"{len(initial.externals)} external(s); responders on TCP {tcp} UDP {udp}")
        started = time.monotonic()
        # IPv4 only: Tabby does not route IPv6 between nodes yet (no IPv6 BGP)
        missing = wait_for_routes(self.state, [p.ip for p in initial.pods.values()
                                               if ipaddress.ip_address(p.ip).version == 4])
        self.say(f"every node routes every pod after {time.monotonic() - started:.2f} s"
                 if not missing else f"not every node routes every pod after {ROUTE_WAIT:.0f} s"
                 f" (probing anyway): {', '.join(missing)}")
        return Where(ns, node_ns, ips), placement

    def _remember(self, namespaces: list[dict[str, Any]], accounts: list[dict[str, Any]],
                  initial: sc.State) -> None:
        have = {o["metadata"]["name"]: o for o in namespaces}
        have_sa = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in accounts}
        for n in initial.namespaces:
            if n in have:
                labels = have[n]["metadata"].get("labels") or {}
                self.restore.append(namespace_object(n, labels))
            else:
                self.created.append(namespace_object(n, {}))
        for key in accounts_of(initial):
            if key in have_sa:
                self.restore.append(account_object(key, have_sa[key]["metadata"].get("labels")
                                                   or {}))
            else:
                self.created.append(account_object(key, {}))

    def _add_pods(self, initial: sc.State, placement: dict[str, str]) -> None:
        def add(key: str) -> str:
            pod = initial.pods[key]
            ports = [{"name": p.get("name"), "containerPort": int(p["port"]),
                      "protocol": str(p.get("protocol", "TCP")).upper()} for p in pod.ports]
            ports = [{k: v for k, v in p.items() if v is not None} for p in ports]
            pods.add(self.lab, pods.PodRef(pod.namespace, pod.name), placement[key],
                     pod.labels, ports, pod.ip)
            self.pods_made.append(key)
            underlay.route_pod(self.state, pod.ip, placement[key])
            self.routed.append(pod.ip)
            return key

        errors: list[str] = []
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(add, k) for k in initial.pods]
            for f in futures:
                try:
                    f.result()
                except (LabError, OSError) as e:
                    errors.append(str(e))
        if errors:
            raise LabError(f"creating pods failed: {'; '.join(errors)}")
        # the Pods as the scenario has them (service account too): the store relabels the WEPs
        self._store([{"op": "apply", "objects": [lab_pod_manifest(p, placement[k])
                                                 for k, p in initial.pods.items()]}])

    def _listen(self, key: str, ns: str, tcp: list[int], udp: list[int]) -> None:
        argv = netns.nsenter(ns, [tools.python(), "-m", "lab.probe", "serve", "--name", key,
                                  "--tcp", ",".join(map(str, tcp)),
                                  "--udp", ",".join(map(str, udp))])
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.listeners.append(proc)
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT)
        line = proc.stdout.readline().strip() if ready else "(nothing)"
        if line != "ready":
            raise LabError(f"responder in {key} did not start: {line}")

    # -- steps

    def _steps(self, initial: sc.State, where: Where, placement: dict[str, str]) -> LabReport:
        prev = copy.deepcopy(initial)
        for k, n in placement.items():
            prev.pods[k].node = n
        results: list[sc.ProbeResult] = []
        simulated: list[sc.ProbeResult] = []
        not_probed: list[dict[str, Any]] = []
        convergence: list[dict[str, Any]] = []
        state: sc.State | None = None
        for n, (state, probes) in enumerate(sc.steps_of(self.data, self.base), start=1):
            for k, node in placement.items():
                state.pods[k].node = node
            ops = step_ops(prev, state, placement)
            for op in ops:
                if op["op"] == "apply":
                    for obj in op["objects"]:
                        if obj["kind"] not in ("Namespace", "ServiceAccount", "Pod"):
                            self.applied[_ident(obj)] = obj
            started = time.monotonic()
            self._store(ops)
            prev = copy.deepcopy(state)
            if not probes:
                continue
            waited = wait_for_agents(self.state, store_revision(self.state))
            time.sleep(AGENT_SETTLE if waited == "agents" else SETTLE)
            dataplane = time.monotonic() - started
            out = self._probe_step(probes, state, where)
            self.say(f"step {n}: {len(out.results)} probe(s), dataplane {waited} after "
                     f"{dataplane:.2f} s, {out.rounds} round(s)"
                     f"{'' if out.stable else ' (NOT stable)'}, "
                     f"{time.monotonic() - started:.1f} s")
            results += out.results
            not_probed += out.not_probed
            convergence.append({"step": n, "wait": waited, "dataplaneSeconds": round(dataplane, 3),
                                "rounds": out.rounds, "stable": out.stable,
                                "flapped": out.flapped})
            if self.simulate:
                simulated += [sc.evaluate(state, p) for p in probes]
        assert state is not None
        result = sc.ScenarioResult(str(self.data.get("name", "scenario")),
                                   [sc.HOST, *state.pods, *state.externals], results)
        return LabReport(result, not_probed, convergence, simulated if self.simulate else None)

    def _probe_step(self, probes: list[sc.Probe], state: sc.State, where: Where) -> StepOutcome:
        tasks = plan(probes, state, where)
        with ThreadPoolExecutor(min(WORKERS, max(1, len(tasks)))) as pool:
            def round_() -> list[probe.Outcome]:
                return list(pool.map(lambda t: run_task(t, self.timeout), tasks))

            last = round_()
            rounds, stable = 1, False
            flapped: set[str] = set()
            while rounds < MAX_ROUNDS:
                cur = round_()
                rounds += 1
                if _signature(cur) == _signature(last):
                    stable = True
                    last = cur
                    break
                for t, a, b in zip(tasks, last, cur, strict=True):
                    if a.allowed != b.allowed:
                        flapped.add(f"{probes[t.index].label} {t.src} -> {t.dst}: "
                                    f"{a.reason} / {b.reason}")
                last = cur
        results, skipped = assemble(probes, tasks, last)
        return StepOutcome(results, skipped, rounds, stable, sorted(flapped))

    # -- cleanup

    def _cleanup(self) -> None:
        def attempt(what: str, fn: Callable[[], object], tries: int = 3) -> None:
            for left in range(tries - 1, -1, -1):
                try:
                    fn()
                    return
                except Exception as e:  # a busy etcd: again; then report and go on
                    if not left:
                        self.say(f"cleanup: {what}: {e}")
                    time.sleep(1.0)

        for proc in self.listeners:
            with contextlib.suppress(OSError):
                proc.terminate()
        for proc in self.listeners:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.stdout is not None:
                proc.stdout.close()
        if self.brought_up:
            attempt("lab down", lambda: cluster.down(self.lab, say=self.say))
            return
        with ThreadPoolExecutor(8) as pool:
            for key in self.pods_made:
                pool.submit(attempt, f"pod {key}",
                            lambda key=key: pods.delete(self.lab, pods.parse_ref(key)))
        for ip in self.routed:
            attempt(f"route {ip}", lambda ip=ip: underlay.unroute_pod(self.state, ip))
        for i, ip in self.externals:
            attempt(f"external {ip}", lambda i=i, ip=ip: underlay.detach_external(self.lab, i, ip))
        ops = [delete_op(o) for o in reversed(list(self.applied.values()))]
        ops += [delete_op(o) for o in self.created if o["kind"] == "ServiceAccount"]
        ops += [delete_op(o) for o in self.created if o["kind"] == "Namespace"]
        if self.restore:
            ops.append({"op": "apply", "objects": self.restore})
        ops += [{"op": "delete", "kind": "IPPool", "apiVersion": "projectcalico.org/v3",
                 "name": pool_name(c)} for c in self.pools_added]
        if ops and self.state:
            attempt("store objects", lambda: self._store(ops))


def _ident(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{obj['apiVersion']}/{obj['kind']}/{meta.get('namespace', '')}/{meta['name']}"


def run(lab: Lab, filename: str, simulate: bool = False, say: Say = _quiet) -> LabReport:
    return Run(lab, filename, simulate, say).execute()


def stderr_say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

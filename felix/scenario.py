"""Scenario files: namespaces, pods and policy steps with expected verdicts (pure, bar run_file).

A scenario is the shared test language of the simulator (`tabbyctl policy simulate`) and, later,
the lab's real packets (`tabbyctl lab run`). Each step is cumulative: apply manifests, delete
some, relabel pods/namespaces/service accounts, then probe every pair.

    name: id
    namespaces: {x: {ns: x}}                   # namespace -> labels
    serviceAccounts: {x/api: {role: api}}      # optional: ns/name -> labels
    pods:                                      # ns/name -> labels, ip, serviceAccount, ports, node
      x/a: {labels: {pod: a}, ip: 10.244.1.10, ports: [{name: http, port: 80, protocol: TCP}]}
    externals: {out/office: {ip: 192.0.2.10}}  # optional: addresses outside the cluster
    steps:
      - apply: [<manifest>, "file.yaml"]       # a string names a manifest file beside the scenario
        delete: [{kind: NetworkPolicy, apiVersion: networking.k8s.io/v1, namespace: x, name: n}]
        relabel: {pods: {x/a: {pod: a}}, namespaces: {x: {}}, serviceAccounts: {x/api: {}}}
        probes: {port: 80, protocol: TCP, expect: {x/a: {x/b: allow}}, hosts: false}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from datastore import k8s
from datastore.errors import InputError, ValidationError
from datastore.kinds import kind_for
from datastore.resources import identify, validate_any
from datastore.snapshot import Resource, Snapshot
from felix.calc import PolicyIndex
from felix.simulate import EndpointRef, Flow, Verdict, simulate

HOST = "host"  # probe source meaning "the node hosting the destination pod"
SIM_NODE = "sim-node"
VERDICTS = ("allow", "deny")
TOP_KEYS = {"name", "description", "namespaces", "serviceAccounts", "pods", "externals", "steps"}
STEP_KEYS = {"name", "apply", "delete", "relabel", "probes"}
PROBE_KEYS = {"port", "protocol", "icmp", "expect", "hosts", "name"}
POD_KEYS = {"labels", "ip", "serviceAccount", "ports", "node"}


class ScenarioError(InputError):
    pass


@dataclass
class Pod:
    namespace: str
    name: str
    labels: dict[str, str]
    ip: str
    service_account: str = "default"
    ports: list[dict[str, Any]] = field(default_factory=list)
    node: str = SIM_NODE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Probe:
    step: int
    protocol: str
    port: int | None
    icmp_type: int | None
    icmp_code: int | None
    expect: dict[str, dict[str, str]]
    hosts: bool = False

    @property
    def label(self) -> str:
        if self.protocol.upper() in ("ICMP", "ICMPV6"):
            if self.icmp_type is None:
                return self.protocol
            code = "" if self.icmp_code is None else f"/{self.icmp_code}"
            return f"{self.protocol} type {self.icmp_type}{code}"
        return f"{self.protocol}/{self.port}"


@dataclass
class ProbeResult:
    probe: Probe
    matrix: dict[str, dict[str, str]]
    verdicts: dict[tuple[str, str], Verdict]


@dataclass
class ScenarioResult:
    name: str
    sources: list[str]  # row order of every matrix
    results: list[ProbeResult]


@dataclass
class CheckReport:
    passed: int
    failed: int
    mismatches: list[str]


@dataclass
class State:
    """The world at one point of the scenario; steps change it cumulatively."""

    namespaces: dict[str, dict[str, str]]
    service_accounts: dict[str, dict[str, str]]
    pods: dict[str, Pod]
    externals: dict[str, str]
    manifests: dict[str, Resource] = field(default_factory=dict)  # etcd key -> object


# ---- loading ----------------------------------------------------------------------------

def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: must be a mapping")
    return value


def _labels(value: Any, where: str) -> dict[str, str]:
    return {str(k): "" if v is None else str(v) for k, v in _mapping(value, where).items()}


def _split(key: str, where: str) -> tuple[str, str]:
    if key.count("/") != 1 or not all(key.split("/")):
        raise ScenarioError(f"{where}: {key!r} must be written NAMESPACE/NAME")
    ns, name = key.split("/")
    return ns, name


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise ScenarioError(f"{where}: unknown field(s) {', '.join(extra)}; "
                            f"expected {', '.join(sorted(allowed))}")


def _pod(key: str, spec: Any, where: str) -> Pod:
    ns, name = _split(key, where)
    spec = _mapping(spec, f"{where}.{key}")
    _unknown(spec, POD_KEYS, f"{where}.{key}")
    if "ip" not in spec:
        raise ScenarioError(f"{where}.{key}: needs an ip")
    return Pod(ns, name, _labels(spec.get("labels"), f"{where}.{key}.labels"), str(spec["ip"]),
               str(spec.get("serviceAccount", "default")), list(spec.get("ports") or []),
               str(spec.get("node", SIM_NODE)))


def initial_state(data: dict[str, Any]) -> State:
    _unknown(data, TOP_KEYS, "scenario")
    pods = {k: _pod(k, v, "pods") for k, v in _mapping(data.get("pods"), "pods").items()}
    namespaces = {str(k): _labels(v, f"namespaces.{k}")
                  for k, v in _mapping(data.get("namespaces"), "namespaces").items()}
    for pod in pods.values():  # a namespace a pod lives in exists even if the file omits it
        namespaces.setdefault(pod.namespace, {})
    accounts = {}
    for key, labels in _mapping(data.get("serviceAccounts"), "serviceAccounts").items():
        _split(key, "serviceAccounts")
        accounts[key] = _labels(labels, f"serviceAccounts.{key}")
    externals = {}
    for key, spec in _mapping(data.get("externals"), "externals").items():
        spec = _mapping(spec, f"externals.{key}")
        if "ip" not in spec:
            raise ScenarioError(f"externals.{key}: needs an ip")
        externals[str(key)] = str(spec["ip"])
    return State(namespaces, accounts, pods, externals)


def _manifests(items: Any, base: Path | None, where: str) -> list[tuple[Any, str]]:
    """(manifest, default namespace) pairs; `"f.yaml"` or `{file: f.yaml, namespace: ns}`
    read manifests from a file beside the scenario, as `tabbyctl apply -n ns -f f.yaml` would."""
    out: list[tuple[Any, str]] = []
    for i, item in enumerate(items or []):
        ref = item if isinstance(item, str) else None
        namespace = "default"
        if isinstance(item, dict) and "file" in item and "kind" not in item:
            _unknown(item, {"file", "namespace"}, f"{where}[{i}]")
            ref, namespace = str(item["file"]), str(item.get("namespace", "default"))
        if ref is None:
            out.append((item, namespace))
            continue
        if base is None:
            raise ScenarioError(f"{where}[{i}]: file references need a scenario file")
        path = base / ref
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        except OSError as e:
            raise ScenarioError(f"{where}[{i}]: cannot read {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ScenarioError(f"{where}[{i}]: {path}: invalid YAML: {e}") from e
        out.extend((d, namespace) for d in docs)
    return out


# ---- applying steps ---------------------------------------------------------------------

def _apply(state: State, objs: list[tuple[Any, str]], where: str) -> None:
    for i, (raw, namespace) in enumerate(objs):
        try:
            obj = validate_any(copy.deepcopy(raw), default_namespace=namespace)
        except (ValidationError, ValueError) as e:
            raise ScenarioError(f"{where}[{i}]: {e}") from e
        kind, name, ns = identify(obj)
        labels = obj.get("metadata", {}).get("labels") or {}
        if kind.name == "Namespace" and not kind.is_calico:
            state.namespaces[name] = {k: v for k, v in labels.items()
                                      if k != "kubernetes.io/metadata.name"}
        elif kind.name == "ServiceAccount" and not kind.is_calico:
            state.service_accounts[f"{ns}/{name}"] = dict(labels)
        elif kind.name == "Pod" and not kind.is_calico:
            pod = state.pods.get(f"{ns}/{name}")
            if pod is None:
                raise ScenarioError(f"{where}[{i}]: pods are declared under `pods:` (need an ip)")
            pod.labels = dict(labels)
        else:
            state.manifests[kind.key(name, ns)] = obj


def _delete(state: State, refs: Any, where: str) -> None:
    for i, ref in enumerate(refs or []):
        ref = _mapping(ref, f"{where}[{i}]")
        try:
            kind = kind_for(str(ref.get("kind", "")), ref.get("apiVersion"))
        except ValueError as e:
            raise ScenarioError(f"{where}[{i}]: {e}") from e
        ns = str(ref.get("namespace", "default")) if kind.namespaced else None
        key = kind.key(str(ref.get("name", "")), ns)
        if state.manifests.pop(key, None) is None:
            raise ScenarioError(f"{where}[{i}]: {kind.name} {ref.get('name')} was never applied")


def _relabel(state: State, spec: Any, where: str) -> None:
    spec = _mapping(spec, where)
    _unknown(spec, {"pods", "namespaces", "serviceAccounts"}, where)
    for key, labels in _mapping(spec.get("pods"), f"{where}.pods").items():
        if key not in state.pods:
            raise ScenarioError(f"{where}.pods: unknown pod {key!r}")
        state.pods[key].labels = _labels(labels, f"{where}.pods.{key}")
    for key, labels in _mapping(spec.get("namespaces"), f"{where}.namespaces").items():
        state.namespaces[str(key)] = _labels(labels, f"{where}.namespaces.{key}")
    for key, labels in _mapping(spec.get("serviceAccounts"), f"{where}.serviceAccounts").items():
        _split(key, f"{where}.serviceAccounts")
        state.service_accounts[key] = _labels(labels, f"{where}.serviceAccounts.{key}")


# ---- the Calico model of a state --------------------------------------------------------

def pod_manifest(pod: Pod) -> Resource:
    """The v1 Pod a user would have created for a scenario pod."""
    ports = [{"name": p.get("name"), "containerPort": int(p["port"]),
              "protocol": str(p.get("protocol", "TCP")).upper()}
             for p in pod.ports]
    container: dict[str, Any] = {"name": "main"}
    if ports:
        container["ports"] = [{k: v for k, v in p.items() if v is not None} for p in ports]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
            "spec": {"serviceAccountName": pod.service_account, "nodeName": pod.node,
                     "containers": [container]},
            "status": {"podIP": pod.ip}}


def _host_net(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def snapshot_of(state: State) -> Snapshot:
    """What the store would hold: derived profiles, endpoints and the applied manifests."""
    snap = Snapshot()
    derived: list[Resource] = []
    for ns, labels in state.namespaces.items():
        derived += _derived({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": ns, "labels": labels}})
    accounts = dict(state.service_accounts)
    for pod in state.pods.values():
        accounts.setdefault(f"{pod.namespace}/{pod.service_account}", {})
    for key, labels in accounts.items():
        ns, name = key.split("/")
        derived += _derived({"apiVersion": "v1", "kind": "ServiceAccount",
                             "metadata": {"name": name, "namespace": ns, "labels": labels}})
    for obj in state.manifests.values():
        if kind_for(obj["kind"], obj["apiVersion"]).is_calico:
            snap.add(obj)
        else:
            derived += _derived(obj)
    for obj in derived:
        snap.add(validate_any(obj))
    for pod in state.pods.values():
        wep = k8s.workload_endpoint_for_pod(validate_any(pod_manifest(pod)), pod.node,
                                            [_host_net(pod.ip)])
        snap.add(validate_any(wep))
    return snap


def _derived(obj: Resource) -> list[Resource]:
    return k8s.derived_objects(validate_any(obj))


# ---- probing ----------------------------------------------------------------------------

def _probe(step: int, spec: Any, where: str, known: set[str]) -> Probe:
    spec = _mapping(spec, where)
    _unknown(spec, PROBE_KEYS, where)
    protocol = str(spec.get("protocol", "TCP"))
    icmp = _mapping(spec.get("icmp"), f"{where}.icmp")
    port = spec.get("port")
    if protocol.upper() in ("TCP", "UDP", "SCTP") and port is None:
        raise ScenarioError(f"{where}: {protocol} probes need a port")
    expect: dict[str, dict[str, str]] = {}
    for src, row in _mapping(spec.get("expect"), f"{where}.expect").items():
        if src not in known and src != HOST:
            raise ScenarioError(f"{where}.expect: unknown source {src!r}")
        for dst, verdict in _mapping(row, f"{where}.expect.{src}").items():
            if dst not in known:
                raise ScenarioError(f"{where}.expect.{src}: unknown destination {dst!r}")
            if verdict not in VERDICTS:
                raise ScenarioError(f"{where}.expect.{src}.{dst}: {verdict!r} is not allow/deny")
            expect.setdefault(src, {})[dst] = verdict
    return Probe(step, protocol, int(port) if port is not None else None,
                 icmp.get("type"), icmp.get("code"), expect,
                 bool(spec.get("hosts")) or HOST in expect)


def _endpoint(state: State, name: str) -> EndpointRef | str:
    if name in state.pods:
        pod = state.pods[name]
        return EndpointRef(pod.namespace, pod.name)
    return state.externals[name]


def flow_for(state: State, probe: Probe, src: str, dst: str) -> Flow:
    """The flow a probe sends from `src` (a pod, an external or `host`) to `dst`."""
    from_host = src == HOST
    return Flow(src=None if from_host else _endpoint(state, src), dst=_endpoint(state, dst),
                protocol=probe.protocol, port=probe.port, icmp_type=probe.icmp_type,
                icmp_code=probe.icmp_code, from_host=from_host)


def pairs(state: State, probe: Probe) -> list[tuple[str, str]]:
    """Every (source, destination) a probe covers: no self pairs, never external to external."""
    names = list(state.pods) + list(state.externals)
    sources = ([HOST] if probe.hosts else []) + names
    out = []
    for src in sources:
        for dst in names:
            if src == dst or (src not in state.pods and dst not in state.pods):
                continue
            if src == HOST and dst not in state.pods:
                continue
            out.append((src, dst))
    return out


def evaluate(state: State, probe: Probe) -> ProbeResult:
    index = PolicyIndex(snapshot_of(state))
    matrix: dict[str, dict[str, str]] = {}
    verdicts: dict[tuple[str, str], Verdict] = {}
    for src, dst in pairs(state, probe):
        verdict = simulate(index, flow_for(state, probe, src, dst))
        verdicts[(src, dst)] = verdict
        matrix.setdefault(src, {})[dst] = "allow" if verdict.allowed else "deny"
    return ProbeResult(probe, matrix, verdicts)


def steps_of(data: dict[str, Any], base: Path | None = None):  # type: ignore[no-untyped-def]
    """Walk a scenario: yields (state, probes) after each step, the state already changed."""
    state = initial_state(data)
    known = set(state.pods) | set(state.externals)
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ScenarioError("scenario: needs a non-empty list of steps")
    for n, step in enumerate(steps, start=1):
        where = f"steps[{n - 1}]"
        step = _mapping(step, where)
        _unknown(step, STEP_KEYS, where)
        _apply(state, _manifests(step.get("apply"), base, f"{where}.apply"), f"{where}.apply")
        _delete(state, step.get("delete"), f"{where}.delete")
        _relabel(state, step.get("relabel"), f"{where}.relabel")
        raw = step.get("probes") or []
        probes = [_probe(n, p, f"{where}.probes", known)
                  for p in (raw if isinstance(raw, list) else [raw])]
        yield state, probes


def run(data: dict[str, Any], base: Path | None = None) -> ScenarioResult:
    if not isinstance(data, dict):
        raise ScenarioError("scenario: must be a mapping")
    results: list[ProbeResult] = []
    state: State | None = None
    for state, probes in steps_of(data, base):
        results += [evaluate(state, p) for p in probes]
    assert state is not None
    sources = [HOST, *state.pods, *state.externals]
    return ScenarioResult(str(data.get("name", "scenario")), sources, results)


def load_file(filename: str) -> dict[str, Any]:
    path = Path(filename)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ScenarioError(f"cannot read {filename}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ScenarioError(f"{filename}: invalid YAML: {e}") from e
    return data


def run_file(filename: str) -> ScenarioResult:
    try:
        return run(load_file(filename), Path(filename).parent)
    except ScenarioError as e:
        raise ScenarioError(f"{filename}: {e}") from e


# ---- reporting --------------------------------------------------------------------------

def to_json(result: ScenarioResult) -> dict[str, Any]:
    steps = []
    for r in result.results:
        entry: dict[str, Any] = {"step": r.probe.step, "protocol": r.probe.protocol,
                                 "port": r.probe.port, "matrix": r.matrix}
        if r.probe.icmp_type is not None:
            entry["icmp"] = {"type": r.probe.icmp_type, "code": r.probe.icmp_code}
        steps.append(entry)
    return {"name": result.name, "steps": steps}


def check(result: ScenarioResult) -> CheckReport:
    passed = failed = 0
    mismatches: list[str] = []
    for r in result.results:
        for src, row in r.probe.expect.items():
            for dst, want in row.items():
                if src == dst:
                    continue
                got = r.matrix.get(src, {}).get(dst)
                if got == want:
                    passed += 1
                    continue
                failed += 1
                why = r.verdicts[(src, dst)].reason if (src, dst) in r.verdicts else "not probed"
                mismatches.append(f"step {r.probe.step} {r.probe.label}: {src} -> {dst}: "
                                  f"expected {want}, got {got or 'nothing'} ({why})")
    return CheckReport(passed, failed, mismatches)


def format_check(report: CheckReport) -> str:
    return "\n".join([*report.mismatches, f"{report.passed} passed, {report.failed} failed"])


def format_matrix(result: ScenarioResult, r: ProbeResult) -> str:
    rows = [s for s in result.sources if s in r.matrix]
    cols = [c for c in result.sources if any(c in r.matrix[s] for s in rows)]
    width = max([len(s) for s in rows] + [4])
    head = " " * width + "  " + "  ".join(c.rjust(max(len(c), 5)) for c in cols)
    lines = [head]
    for s in rows:
        cells = []
        for c in cols:
            v = r.matrix[s].get(c)
            mark = "." if v is None else v
            want = r.probe.expect.get(s, {}).get(c)
            if want is not None and v is not None and want != v:
                mark = f"!{v}"  # disagrees with the scenario's expectation
            cells.append(mark.rjust(max(len(c), 5)))
        lines.append(s.ljust(width) + "  " + "  ".join(cells))
    return "\n".join(lines)


def format_text(result: ScenarioResult) -> str:
    out = [f"scenario {result.name}: rows are sources, columns destinations"]
    for r in result.results:
        out += ["", f"step {r.probe.step}, {r.probe.label}:", format_matrix(result, r)]
    return "\n".join(out)

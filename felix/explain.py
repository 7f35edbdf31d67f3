"""`tabbyctl policy explain`: one flow against a store snapshot, with the rule trace (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import asdict
from typing import Any

from datastore import k8s
from datastore.errors import InputError
from datastore.resources import validate_any
from datastore.snapshot import Resource, Snapshot
from felix.calc import EndpointRef, PolicyIndex
from felix.simulate import Flow, Verdict, simulate

PORT_PROTOCOLS = ("TCP", "UDP", "SCTP")


class ExplainError(InputError):
    pass


def _peer(text: str) -> EndpointRef | str:
    """An IP stays an IP; `ns/pod` or an endpoint name becomes an EndpointRef."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return EndpointRef.parse(text)


def parse_flow(src: str, dst: str, port: str | None, protocol: str | None,
               icmp_type: int | None, icmp_code: int | None) -> Flow:
    """The flow described by explain's options: `--port 80/TCP`, `--protocol ICMP --icmp-type 8`."""
    number: int | None = None
    proto = protocol
    if port:
        text, _, suffix = port.partition("/")
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ExplainError(f"--port {port!r}: expected PORT[/PROTOCOL] with PORT in 1-65535")
        number = int(text)
        if suffix:
            if proto and proto.upper() != suffix.upper():
                raise ExplainError(f"--port says {suffix} but --protocol says {proto}")
            proto = suffix
    proto = (proto or ("ICMP" if icmp_type is not None else "TCP")).upper()
    if proto in PORT_PROTOCOLS and number is None:
        raise ExplainError(f"{proto} needs --port")
    if icmp_code is not None and icmp_type is None:
        raise ExplainError("--icmp-code needs --icmp-type")
    return Flow(src=_peer(src), dst=_peer(dst), protocol=proto, port=number,
                icmp_type=icmp_type, icmp_code=icmp_code)


def add_pod_endpoints(snapshot: Snapshot, pods: list[Resource]) -> None:
    """Pods applied with an address but not yet networked by a CNI get a WorkloadEndpoint view,
    so `explain` works before (or without) the plugin: the same endpoint the CNI would write."""
    networked = {(w["metadata"].get("namespace"), w["spec"].get("pod"))
                 for w in snapshot.workload_endpoints}
    for pod in pods:
        meta, status = pod.get("metadata", {}), pod.get("status") or {}
        ips = [p.get("ip") for p in status.get("podIPs") or []] or [status.get("podIP")]
        ips = [ip for ip in ips if ip]
        if not ips or (meta.get("namespace"), meta.get("name")) in networked:
            continue
        nets = [f"{ip}/128" if ":" in ip else f"{ip}/32" for ip in ips]
        node = (pod.get("spec") or {}).get("nodeName") or "unscheduled"
        snapshot.add(validate_any(k8s.workload_endpoint_for_pod(pod, node, nets)))


def explain(snapshot: Snapshot, flow: Flow) -> Verdict:
    index = PolicyIndex(snapshot)
    for side, peer in (("--from", flow.src), ("--to", flow.dst)):
        if isinstance(peer, EndpointRef) and index.find_endpoint(peer) is None:
            raise ExplainError(f"{side} {peer}: no such pod, WorkloadEndpoint or HostEndpoint "
                               "in the store (a pod needs status.podIP or a WorkloadEndpoint)")
    return simulate(index, flow)


def describe_flow(flow: Flow) -> str:
    proto = str(flow.protocol)
    what = f"{proto}/{flow.port}" if flow.port is not None else proto
    if flow.icmp_type is not None:
        what += f" type {flow.icmp_type}" + ("" if flow.icmp_code is None else f"/{flow.icmp_code}")
    return f"{flow.src} -> {flow.dst} {what}"


def format_verdict(flow: Flow, verdict: Verdict) -> str:
    lines = [f"{describe_flow(flow)}: {'ALLOWED' if verdict.allowed else 'DENIED'}",
             f"  {verdict.reason}"]
    for step in verdict.trace:
        where = " ".join(x for x in (
            step.direction, step.endpoint,
            f"tier {step.tier}" if step.tier else "",
            step.policy or "",
            f"rule {step.rule}" if step.rule is not None else "") if x)
        lines.append(f"  - {where}: {step.action} ({step.explanation})")
    lines += [f"  ! {caveat}" for caveat in verdict.caveats]
    return "\n".join(lines)


def verdict_json(flow: Flow, verdict: Verdict) -> dict[str, Any]:
    return {"flow": describe_flow(flow), "allowed": verdict.allowed, "reason": verdict.reason,
            "trace": [asdict(s) for s in verdict.trace], "caveats": verdict.caveats}

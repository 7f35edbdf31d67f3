"""`lab pod add/del` and `lab exec`: pods as a container runtime makes them.

A pod is a network namespace `tabby-lab-<lab>-pod-<ns>-<name>`. Its Pod object (labels, named
ports, nodeName) goes into the store first, as the API server has it before kubelet starts the
sandbox; then the node's installed conflist (tabby, then portmap) is exec'd from the node's
namespace with the CNI_ARGS kubelet's runtime sends, and the result is cached for DEL.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import LabError, driver, netns, procs
from lab.cluster import store
from lab.state import Lab, State

SYSTEM_CNI_PATH = "/usr/lib/cni"
_PORT_RE = re.compile(r"^(?:(?P<name>[a-z0-9-]+):)?(?P<port>\d{1,5})(?:/(?P<proto>[A-Za-z]+))?$")


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_ref(text: str) -> PodRef:
    ns, sep, name = text.partition("/")
    if not sep:
        ns, name = "default", text
    if not ns or not name or "/" in name:
        raise LabError(f"{text!r}: expected NAMESPACE/NAME")
    return PodRef(ns, name)


def parse_labels(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise LabError(f"label {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def parse_port(text: str) -> dict[str, Any]:
    """`name:80/TCP` (name and protocol optional) -> a container port."""
    m = _PORT_RE.fullmatch(text.strip())
    if not m:
        raise LabError(f"port {text!r}: expected [NAME:]PORT[/PROTOCOL], e.g. http:80/TCP")
    port: dict[str, Any] = {"containerPort": int(m["port"]),
                            "protocol": (m["proto"] or "TCP").upper()}
    if m["name"]:
        port["name"] = m["name"]
    return port


def pod_manifest(ref: PodRef, node: str, labels: Mapping[str, str],
                 ports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "tabby-lab"}
    if ports:
        container["ports"] = [dict(p) for p in ports]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": ref.name, "namespace": ref.namespace, "labels": dict(labels)},
            "spec": {"nodeName": node, "containers": [container]}}


def _runtime(state: State, node: str) -> driver.Runtime:
    n = state["nodes"][node]
    return driver.Runtime(
        host_netns=n["ns"], cni_path=(n["bin_dir"], SYSTEM_CNI_PATH),
        cache_dir=Path(n["cache_dir"]),
        # a runtime's own environment reaches the plugin: this is how the shim finds its node
        env={"TABBY_CNI_SOCKET": n["socket"]})


def _attachment(pod: Mapping[str, Any]) -> driver.Attachment:
    args = [("IgnoreUnknown", "1"), ("K8S_POD_NAMESPACE", pod["namespace"]),
            ("K8S_POD_NAME", pod["name"]), ("K8S_POD_INFRA_CONTAINER_ID", pod["container_id"])]
    if pod.get("requested_ip"):
        args.append(("IP", pod["requested_ip"]))
    # kubelet passes portMappings for hostPorts only; these pods have none
    return driver.Attachment(container_id=pod["container_id"],
                             netns=netns.path(pod["netns"]), args=tuple(args),
                             capability_args={"portMappings": []})


def _pick_node(state: State, node: str | None) -> str:
    names = list(state["nodes"])
    if node is not None:
        if node not in state["nodes"]:
            raise LabError(f"no node {node!r} in the lab (nodes: {', '.join(names)})")
        return node
    picked = names[state.get("next_node", 0) % len(names)]
    state["next_node"] = state.get("next_node", 0) + 1  # spread over the nodes in turn
    return picked


def add(lab: Lab, ref: PodRef, node: str | None = None, labels: Mapping[str, str] | None = None,
        ports: Sequence[Mapping[str, Any]] = (), ip: str | None = None) -> dict[str, Any]:
    with lab.locked():  # reserve the name, node and namespace; the CNI work runs unlocked
        state = lab.require()
        if ref.key in state["pods"]:
            raise LabError(f"pod {ref.key} already exists in lab {lab.name!r}")
        chosen = _pick_node(state, node)
        pod = {"namespace": ref.namespace, "name": ref.name, "node": chosen,
               "netns": lab.ns(f"pod-{ref.namespace}-{ref.name}"),
               "container_id": secrets.token_hex(32), "requested_ip": ip, "phase": "creating"}
        state["pods"][ref.key] = pod
        if pod["netns"] not in state["namespaces"]:
            state["namespaces"].append(pod["netns"])
        lab.save(state)
    try:
        manifest = pod_manifest(ref, chosen, labels or {}, ports)
        namespace = {"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ref.namespace}}
        store(state, [{"op": "ensure", "objects": [namespace]},
                      {"op": "apply", "objects": [manifest]}])
        netns.add(pod["netns"])
        rt, att = _runtime(state, chosen), _attachment(pod)
        netconf = driver.load_conflist(Path(state["nodes"][chosen]["net_dir"]))
        try:
            result = driver.add(rt, netconf, att)
        except LabError:
            with contextlib.suppress(LabError, OSError):  # a runtime cleans a failed ADD
                driver.delete(rt, netconf, att)
            raise
    except BaseException:
        _forget(lab, ref, pod)
        raise
    pod.update(phase="running", network=netconf["name"], result=result,
               ips=[i["address"] for i in (result or {}).get("ips", [])])
    with lab.locked():
        state = lab.require()
        state["pods"][ref.key] = pod
        lab.save(state)
    return pod


def delete(lab: Lab, ref: PodRef) -> dict[str, Any]:
    state = lab.require()
    pod = state["pods"].get(ref.key)
    if pod is None:
        raise LabError(f"no pod {ref.key} in lab {lab.name!r}")
    rt, att = _runtime(state, pod["node"]), _attachment(pod)
    netconf = driver.load_conflist(Path(state["nodes"][pod["node"]]["net_dir"]))
    for pid in netns.pids_in(pod["netns"]):  # its "containers": what `lab exec` left running
        procs.kill_pid(pid)
    driver.delete(rt, netconf, att)  # a failure keeps the pod recorded, so DEL can be retried
    netns.delete(pod["netns"])
    store(state, [{"op": "delete", "kind": "Pod", "apiVersion": "v1", "name": ref.name,
                   "namespace": ref.namespace}])
    _forget(lab, ref, pod)
    return pod


def exec_argv(lab: Lab, ref: PodRef, cmd: Sequence[str]) -> list[str]:
    pod = lab.require()["pods"].get(ref.key)
    if pod is None:
        raise LabError(f"no pod {ref.key} in lab {lab.name!r}")
    if not cmd:
        raise LabError("give the command after --, e.g. lab exec default/web -- ip addr")
    return netns.nsenter(pod["netns"], list(cmd))


def _forget(lab: Lab, ref: PodRef, pod: Mapping[str, Any]) -> None:
    """Drop the pod and its namespace from the lab (the namespace itself is gone or dropped)."""
    with contextlib.suppress(LabError, OSError):
        netns.delete(pod["netns"])
    with lab.locked():
        state = lab.load()
        if state is None:
            return
        state["pods"].pop(ref.key, None)
        if pod["netns"] in state["namespaces"]:
            state["namespaces"].remove(pod["netns"])
        lab.save(state)


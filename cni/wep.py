"""The WorkloadEndpoint the plugin writes on ADD and removes on DEL, as Calico's CNI plugin does.

Kubernetes pods (CNI_ARGS K8S_POD_NAMESPACE and K8S_POD_NAME both set) get the k8s endpoint:
name `<node>-k8s-<pod>-<iface>`, the Pod's labels (the Pod applied with `tabbyctl apply`, read
from the store) plus `projectcalico.org/{namespace,orchestrator,serviceaccount}`, profiles
`kns.<ns>` and `ksa.<ns>.<sa>`, the named and host ports, interface name, MAC, addresses and
container ID (`datastore.k8s.workload_endpoint_for_pod`). Without a stored Pod the endpoint has
only the projectcalico.org labels and the `default` service account.

Anything else is Calico's `cni` orchestrator: name `<node>-cni-<containerID>-<iface>` in
namespace `default`, profile `<network name>`, host veth `cali` + the first 11 characters of the
container ID.

An endpoint is removed only while it still belongs to the container being deleted (its
`containerID` is that one or empty), with a compare-and-swap on the revision it was read at, so
a newer sandbox of the same pod keeps its endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cni import spec
from datastore import etcd
from datastore.k8s import (
    LABEL_NAMESPACE,
    LABEL_ORCHESTRATOR,
    veth_name,
    workload_endpoint_for_pod,
    workload_endpoint_name,
)
from datastore.kinds import CALICO_API, kind_for
from datastore.resources import encode, identify, validate_all
from datastore.store import ConflictError, NotFoundError, ResourceStore, _stamp
from datastore.store import decode as decode_resource

ORCHESTRATOR_K8S = "k8s"
ORCHESTRATOR_CNI = "cni"
CNI_NAMESPACE = "default"  # Calico's namespace for non-Kubernetes workloads
DELETE_RETRIES = 5  # Calico retries a conflicting CAS delete five times

DELETED, ABSENT, KEPT = "deleted", "absent", "kept"

WEP = kind_for("WorkloadEndpoint")
POD = kind_for("Pod", "v1")
NAMESPACE = kind_for("Namespace", "v1")


@dataclass(frozen=True)
class Workload:
    """Who an attachment is: everything the endpoint's name and fields derive from."""

    node: str
    orchestrator: str  # k8s | cni
    namespace: str
    pod: str  # the pod's name; "" for the cni orchestrator
    container_id: str
    endpoint: str  # CNI_IFNAME
    host_ifname: str
    network: str

    @property
    def is_k8s(self) -> bool:
        return self.orchestrator == ORCHESTRATOR_K8S

    @property
    def name(self) -> str:
        """The endpoint's name (`ValidationError` for a part beginning or ending with '-')."""
        workload = self.pod if self.is_k8s else self.container_id
        return workload_endpoint_name(self.node, self.orchestrator, workload, self.endpoint)

    @property
    def key(self) -> str:
        return WEP.key(self.name, self.namespace)

    def describe(self) -> str:
        who = f"pod {self.namespace}/{self.pod}" if self.is_k8s else "workload"
        return f"{who} (container {self.container_id[:12]}, {self.endpoint})"


def workload_for(args: spec.CniArgs, container_id: str, ifname: str, node: str, network: str,
                 prefix: str = "cali") -> Workload:
    """Calico's identity for a request: k8s when both pod namespace and name are given."""
    if args.is_k8s:
        return Workload(node, ORCHESTRATOR_K8S, args.pod_namespace, args.pod_name, container_id,
                        ifname, veth_name(args.pod_namespace, args.pod_name, prefix), network)
    return Workload(node, ORCHESTRATOR_CNI, CNI_NAMESPACE, "", container_id, ifname,
                    prefix + container_id[:11], network)


# -- building (pure) ------------------------------------------------------------------------------


def minimal_pod(workload: Workload) -> dict[str, Any]:
    """What is known of a pod that was never applied: its name, namespace and default SA."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": workload.pod, "namespace": workload.namespace}, "spec": {}}


def build(workload: Workload, pod: dict[str, Any] | None, ip_networks: list[str],
          mac: str) -> dict[str, Any]:
    """The WorkloadEndpoint for `workload` (addresses bare or /32 /128; stored /32 /128)."""
    if workload.is_k8s:
        return workload_endpoint_for_pod(
            pod or minimal_pod(workload), workload.node, ip_networks,
            container_id=workload.container_id, interface_name=workload.host_ifname, mac=mac,
            endpoint=workload.endpoint)
    nets = [_host_network(n) for n in ip_networks]
    spec_fields: list[tuple[str, Any]] = [
        ("orchestrator", ORCHESTRATOR_CNI),
        ("node", workload.node),
        ("containerID", workload.container_id),
        ("endpoint", workload.endpoint),
        ("ipNetworks", nets),
        ("profiles", [workload.network]),
        ("interfaceName", workload.host_ifname),
        ("mac", mac.lower()),
    ]
    return {
        "kind": "WorkloadEndpoint",
        "apiVersion": CALICO_API,
        "metadata": {
            "name": workload.name,
            "namespace": workload.namespace,
            "labels": {LABEL_NAMESPACE: workload.namespace,
                       LABEL_ORCHESTRATOR: ORCHESTRATOR_CNI},
        },
        "spec": {k: v for k, v in spec_fields if v},
    }


def _host_network(text: str) -> str:
    import ipaddress

    iface = ipaddress.ip_interface(text)
    return f"{iface.ip}/{iface.max_prefixlen}"


def owned_by(wep: dict[str, Any], container_id: str) -> bool:
    """Calico's test: an endpoint without a container ID belongs to whoever deletes it."""
    owner = (wep.get("spec") or {}).get("containerID") or ""
    return not owner or owner == container_id


# -- the store (I/O) ------------------------------------------------------------------------------


def pod_key(workload: Workload) -> str | None:
    """Where the Pod is stored (k8s workloads only), for a batch of reads."""
    return POD.key(workload.pod, workload.namespace) if workload.is_k8s else None


def namespace_key(workload: Workload) -> str | None:
    return NAMESPACE.key(workload.namespace) if workload.is_k8s else None


def resource(kv: etcd.KV | None) -> dict[str, Any] | None:
    """A stored object as read_pod / read_namespace / get return it."""
    return decode_resource(kv) if kv is not None else None


async def read_pod(store: ResourceStore, workload: Workload) -> dict[str, Any] | None:
    if not workload.is_k8s:
        return None
    try:
        return await store.get(POD, workload.pod, workload.namespace)
    except NotFoundError:
        return None


async def read_namespace(store: ResourceStore, workload: Workload) -> dict[str, Any] | None:
    if not workload.is_k8s:
        return None
    try:
        return await store.get(NAMESPACE, workload.namespace)
    except NotFoundError:
        return None


async def get(store: ResourceStore, workload: Workload) -> dict[str, Any] | None:
    kv = await store.ds.get(workload.key)
    return decode_resource(kv) if kv is not None else None


class _Unread:
    pass


UNREAD = _Unread()


def put_op(wep: dict[str, Any], current: etcd.KV | None) -> tuple[etcd.Put, dict[str, Any]]:
    """The endpoint as one unconditional write, for a transaction of the caller's (ADD commits
    it with the pod's addresses); validated and stamped as `write` does (uid kept from
    `current`, the key as read). Unconditional is right here: a concurrent DEL of an earlier
    container removes the endpoint only at the revision it read, so it cannot undo this."""
    obj = validate_all([wep])[0]  # a normalised copy: stamping it leaves `wep` alone
    kind, name, namespace = identify(obj)
    key = kind.key(name, namespace)
    _stamp(obj, resource(current) if current is not None and current.key == key else None)
    return etcd.Put(key, encode(obj)), obj


async def write(store: ResourceStore, wep: dict[str, Any],
                current: etcd.KV | _Unread | None = UNREAD) -> dict[str, Any]:
    """Create or replace the endpoint (validated, uid kept across rewrites).

    `current`: the endpoint's key as the caller already read it (None: absent). Then the write
    is one transaction guarded by what was read (a Create when absent, else an Update at its
    revision) instead of a read and a write; when the key changed since, the ordinary apply
    (read, then write, retried) takes over."""
    if not isinstance(current, _Unread):
        obj = validate_all([wep])[0]  # as store.write: validate (a copy), then stamp
        kind, name, namespace = identify(obj)
        key = kind.key(name, namespace)
        if current is None or current.key == key:
            _stamp(obj, resource(current))
            op = (etcd.Create(key, encode(obj)) if current is None
                  else etcd.Update(key, encode(obj), current.mod_revision))
            try:
                revision = await store.ds.commit([op])
            except (etcd.AlreadyExists, etcd.Conflict, etcd.NotFound):
                pass  # written or removed since it was read: apply reads it again
            else:
                obj["metadata"]["resourceVersion"] = str(revision)
                return obj
    return (await store.write([wep], "apply"))[0].obj


async def delete_if_owned(store: ResourceStore, name: str, namespace: str,
                          container_id: str) -> str:
    """DELETED, ABSENT, or KEPT (it belongs to another container); CAS on the revision read."""
    key = WEP.key(name, namespace)
    for _ in range(DELETE_RETRIES):
        kv = await store.ds.get(key)
        if kv is None:
            return ABSENT
        if not owned_by(decode_resource(kv), container_id):
            return KEPT
        try:
            await store.ds.commit([etcd.Delete(key, kv.mod_revision)])
            return DELETED
        except etcd.NotFound:
            return ABSENT
        except etcd.Conflict:
            continue  # rewritten since we read it: look at the owner again
    raise ConflictError(f"WorkloadEndpoint {namespace}/{name} kept changing while being "
                        "deleted; retry")

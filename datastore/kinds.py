"""The resource kinds Tabby knows, their API groups, plurals and CLI aliases (pure).

Calico kinds live under `/calico/resources/v3/projectcalico.org/<plural>/[<ns>/]<name>`, exactly
as Calico's etcdv3 backend keeps them. Kubernetes kinds have no Calico key of their own; Tabby
keeps the object the user applied under `/tabby/k8s/<plural>/[<ns>/]<name>` and writes the Calico
objects that Calico's kube-controllers would derive from it (profiles, `knp.default.*` policies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datastore.errors import InputError

CALICO_API = "projectcalico.org/v3"
CALICO_PREFIX = "/calico/resources/v3/projectcalico.org/"
K8S_PREFIX = "/tabby/k8s/"


@dataclass(frozen=True)
class Kind:
    name: str  # "NetworkPolicy"
    api_version: str  # "projectcalico.org/v3"
    plural: str  # "networkpolicies"
    namespaced: bool
    aliases: tuple[str, ...] = field(default=())

    @property
    def is_calico(self) -> bool:
        return self.api_version == CALICO_API

    @property
    def prefix(self) -> str:
        """The etcd prefix under which every object of this kind lives."""
        base = CALICO_PREFIX if self.is_calico else K8S_PREFIX
        return f"{base}{self.plural}/"

    def key(self, name: str, namespace: str | None = None) -> str:
        if self.namespaced:
            if not namespace:
                raise ValueError(f"{self.name} is namespaced: a namespace is required")
            return f"{self.prefix}{namespace}/{name}"
        return f"{self.prefix}{name}"

    def list_prefix(self, namespace: str | None = None) -> str:
        if self.namespaced and namespace:
            return f"{self.prefix}{namespace}/"
        return self.prefix

    def __str__(self) -> str:
        return self.name if self.is_calico else f"{self.name}.{self.api_version}"


def _calico(name: str, plural: str, namespaced: bool, *aliases: str) -> Kind:
    return Kind(name, CALICO_API, plural, namespaced, aliases)


CALICO_KINDS: tuple[Kind, ...] = (
    _calico("IPPool", "ippools", False, "ippool", "ipp", "ipps", "pool", "pools"),
    _calico("IPReservation", "ipreservations", False, "ipreservation", "ipr", "iprs"),
    _calico("NetworkPolicy", "networkpolicies", True, "networkpolicy", "policy", "np", "nps",
            "policies", "netpol", "netpols"),
    _calico("GlobalNetworkPolicy", "globalnetworkpolicies", False, "globalnetworkpolicy", "gnp",
            "gnps", "globalpolicy", "globalpolicies"),
    _calico("NetworkSet", "networksets", True, "networkset", "netset", "netsets"),
    _calico("GlobalNetworkSet", "globalnetworksets", False, "globalnetworkset", "gns"),
    _calico("HostEndpoint", "hostendpoints", False, "hostendpoint", "hep", "heps"),
    _calico("WorkloadEndpoint", "workloadendpoints", True, "workloadendpoint", "wep", "weps"),
    _calico("Profile", "profiles", False, "profile", "pro", "pros"),
    _calico("Tier", "tiers", False, "tier"),
    _calico("Node", "nodes", False, "node", "no"),
    _calico("BGPConfiguration", "bgpconfigurations", False, "bgpconfiguration", "bgpconfig",
            "bgpconfigs"),
    _calico("BGPPeer", "bgppeers", False, "bgppeer", "bgpp", "bgpps", "bp", "bps"),
    _calico("FelixConfiguration", "felixconfigurations", False, "felixconfiguration",
            "felixconfig", "felixconfigs"),
    _calico("ClusterInformation", "clusterinformations", False, "clusterinformation",
            "clusterinfo", "clusterinfos"),
)

K8S_KINDS: tuple[Kind, ...] = (
    Kind("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies", True,
         ("networkpolicy.networking.k8s.io", "networkpolicies.networking.k8s.io", "knp", "knps",
          "k8snetworkpolicy")),
    Kind("Namespace", "v1", "namespaces", False, ("namespace", "ns")),
    Kind("Pod", "v1", "pods", True, ("pod", "po")),
    Kind("ServiceAccount", "v1", "serviceaccounts", True, ("serviceaccount", "sa")),
    Kind("Secret", "v1", "secrets", True, ("secret",)),
)

ALL_KINDS: tuple[Kind, ...] = CALICO_KINDS + K8S_KINDS


class UnknownKind(InputError):
    pass


def _norm_api(api_version: str) -> str:
    # Kubernetes accepts "networking.k8s.io/v1"; Calico users also write "projectcalico.org/v3".
    return api_version.strip()


def kind_for(kind: str, api_version: str | None = None) -> Kind:
    """The Kind of a manifest (`kind` + `apiVersion`).

    NetworkPolicy exists in both groups: the apiVersion decides; without one it is Calico's.
    """
    matches = [k for k in ALL_KINDS if k.name == kind]
    if not matches:
        raise UnknownKind(f"unknown kind {kind!r}; known kinds: "
                          + ", ".join(sorted({k.name for k in ALL_KINDS})))
    if api_version is None:
        return next((k for k in matches if k.is_calico), matches[0])
    for k in matches:
        if k.api_version == _norm_api(api_version):
            return k
    expected = " or ".join(k.api_version for k in matches)
    raise UnknownKind(f"kind {kind} has apiVersion {expected}, not {api_version!r}")


def kind_from_cli(word: str) -> Kind:
    """The Kind a user names on the command line (`get wep`, `get knp`, `get ippool`)."""
    w = word.strip().lower()
    for k in ALL_KINDS:
        if w == k.name.lower() or w == k.plural or w in k.aliases:
            return k
    raise UnknownKind(f"unknown resource type {word!r}; try one of: "
                      + ", ".join(sorted({k.plural for k in ALL_KINDS})))


def kind_for_key(key: str) -> tuple[Kind, str | None, str] | None:
    """Reverse of Kind.key: (kind, namespace, name) for an etcd key, or None if not a resource."""
    for k in ALL_KINDS:
        if key.startswith(k.prefix):
            rest = key[len(k.prefix):]
            parts = rest.split("/")
            if k.namespaced and len(parts) == 2 and all(parts):
                return k, parts[0], parts[1]
            if not k.namespaced and len(parts) == 1 and parts[0]:
                return k, None, parts[0]
    return None

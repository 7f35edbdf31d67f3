"""Names, labels and API versions shared by the K8s validators and converters, plus the CIDR
parser both use."""

from __future__ import annotations

import ipaddress
from typing import Any

Obj = dict[str, Any]

# Names and labels Calico uses (libcalico-go k8s/conversion constants, api v3 label names).
KNP_PREFIX = "knp.default."
NAMESPACE_PROFILE_PREFIX = "kns."
SERVICEACCOUNT_PROFILE_PREFIX = "ksa."
NAMESPACE_LABEL_PREFIX = "pcns."
SERVICEACCOUNT_LABEL_PREFIX = "pcsa."
NAME_LABEL = "projectcalico.org/name"
LABEL_NAMESPACE = "projectcalico.org/namespace"
LABEL_ORCHESTRATOR = "projectcalico.org/orchestrator"
LABEL_SERVICEACCOUNT = "projectcalico.org/serviceaccount"
LABEL_TIER = "projectcalico.org/tier"
ORCHESTRATOR_K8S = "k8s"
DEFAULT_TIER = "default"
KNP_ORDER = 1000
# The API server stamps every namespace with this label (Kubernetes >= 1.21).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

_NP_API = "networking.k8s.io/v1"
# Removed from Kubernetes in 1.16 but still in old notes; same schema, so we upgrade it.
_NP_LEGACY_APIS = ("extensions/v1beta1",)
_CORE_API = "v1"

_PROTOCOLS = ("TCP", "UDP", "SCTP")
_POLICY_TYPES = ("Ingress", "Egress")
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


def _parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if "/" not in text:
        return None
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None

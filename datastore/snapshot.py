"""A point-in-time view of the store in the Calico model, as the policy calculation needs it (pure).

Every entry is a full projectcalico.org/v3 object as a dict (kind, apiVersion, metadata, spec),
already validated and defaulted. Kubernetes objects appear here only through what Calico derives
from them: `knp.default.<name>` NetworkPolicies, `kns.<ns>` / `ksa.<ns>.<sa>` Profiles and
WorkloadEndpoints for pods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

Resource = dict[str, Any]


@dataclass
class Snapshot:
    tiers: list[Resource] = field(default_factory=list)
    network_policies: list[Resource] = field(default_factory=list)
    global_network_policies: list[Resource] = field(default_factory=list)
    profiles: list[Resource] = field(default_factory=list)
    workload_endpoints: list[Resource] = field(default_factory=list)
    host_endpoints: list[Resource] = field(default_factory=list)
    network_sets: list[Resource] = field(default_factory=list)
    global_network_sets: list[Resource] = field(default_factory=list)

    # kind name -> attribute, so loaders can file objects without a chain of ifs
    FIELDS: ClassVar[dict[str, str]] = {
        "Tier": "tiers",
        "NetworkPolicy": "network_policies",
        "GlobalNetworkPolicy": "global_network_policies",
        "Profile": "profiles",
        "WorkloadEndpoint": "workload_endpoints",
        "HostEndpoint": "host_endpoints",
        "NetworkSet": "network_sets",
        "GlobalNetworkSet": "global_network_sets",
    }

    def add(self, obj: Resource) -> None:
        """File a Calico object under its kind; kinds the policy model ignores are dropped."""
        attr = self.FIELDS.get(obj.get("kind", ""))
        if attr is not None:
            getattr(self, attr).append(obj)

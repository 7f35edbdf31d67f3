"""IP sets the rendered rules refer to, and what they hold (pure).

Selector results, network sets and named ports become sets so that rules grow with endpoints +
rules, never endpoints x rules: a rule names a set, the set lists the members.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datastore.selector import Selector
from felix.calc import PolicyIndex
from felix.model import IPSet
from felix.render_names import ipset_name, named_port_set_id
from felix.rules import PROTOCOL_NAMES, IPNetwork

_PORT_PROTOCOL_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}


@dataclass(frozen=True)
class SelectorSet:
    selector: Selector


@dataclass(frozen=True)
class NamedPortSet:
    selector: Selector
    port_name: str
    protocol: int | None  # the rule's protocol; None = the named port of any protocol

    @property
    def protocol_text(self) -> str:
        return "any" if self.protocol is None else _PORT_PROTOCOL_NAMES[self.protocol]


SetSpec = SelectorSet | NamedPortSet


def set_id(spec: SetSpec) -> str:
    if isinstance(spec, SelectorSet):
        return spec.selector.unique_id
    return named_port_set_id(spec.selector, spec.protocol_text, spec.port_name)


@dataclass
class SetCollector:
    """Records the sets one family's rules use; hands out their names."""

    family: int
    specs: dict[str, SetSpec] = field(default_factory=dict)

    def name(self, spec: SetSpec) -> str:
        name = ipset_name(self.family, set_id(spec))
        self.specs[name] = spec
        return name


def _hash_net_members(nets: list[IPNetwork]) -> frozenset[str]:
    # hash:net cannot hold a /0, so Felix stores it as two halves.
    out: set[str] = set()
    for net in nets:
        if net.prefixlen == 0:
            out.update(str(half) for half in net.subnets(prefixlen_diff=1))
        else:
            out.add(str(net))
    return frozenset(out)


def _members(index: PolicyIndex, spec: SetSpec, family: int) -> frozenset[str]:
    if isinstance(spec, SelectorSet):
        nets = [n for n in index.selector_members(spec.selector) if n.version == family]
        return _hash_net_members(nets)
    members = index.named_port_members(spec.selector, spec.port_name, spec.protocol)
    return frozenset(
        f"{ip},{PROTOCOL_NAMES[proto].lower()}:{port}"
        for ip, proto, port in members
        if ip.version == family and proto in _PORT_PROTOCOL_NAMES
    )


def build_sets(index: PolicyIndex, collector: SetCollector) -> dict[str, IPSet]:
    sets = {}
    for name, spec in collector.specs.items():
        kind = "hash:net" if isinstance(spec, SelectorSet) else "hash:ip,port"
        sets[name] = IPSet(name, kind, collector.family, _members(index, spec, collector.family))
    return sets


def net_set(family: int, set_name_id: str, nets: list[IPNetwork]) -> IPSet:
    name = ipset_name(family, set_name_id)
    return IPSet(name, "hash:net", family, _hash_net_members(nets))


"""IP sets the rendered rules refer to, and what they hold (pure).

Selector results, network sets and named ports become sets so that rules grow with endpoints +
rules, never endpoints x rules: a rule names a set, the set lists the members.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datastore.selector import Selector
from felix.calc import NamedPortMember, PolicyIndex
from felix.model import IPSet
from felix.render_cache import RenderCache
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


def _net_members(nets: frozenset[IPNetwork], family: int) -> frozenset[str]:
    return _hash_net_members([n for n in nets if n.version == family])


def _port_members(members: frozenset[NamedPortMember], family: int) -> frozenset[str]:
    return frozenset(
        f"{ip},{PROTOCOL_NAMES[proto].lower()}:{port}"
        for ip, proto, port in members
        if ip.version == family and proto in _PORT_PROTOCOL_NAMES
    )


def build_sets(index: PolicyIndex, collector: SetCollector,
               cache: RenderCache | None = None) -> dict[str, IPSet]:
    """The sets the collector saw, with their members; with `cache`, a set whose members the
    index gives as the very same object as last time is the same IPSet as last time."""
    cache = cache if cache is not None else RenderCache()
    family = collector.family
    sets = {}
    for name, spec in collector.specs.items():
        if isinstance(spec, SelectorSet):
            nets = index.selector_members(spec.selector)
            sets[name] = cache.get_for(nets, ("ipset", name), lambda n=name, m=nets: IPSet(
                n, "hash:net", family, _net_members(m, family)))
        else:
            ports = index.named_port_members(spec.selector, spec.port_name, spec.protocol)
            sets[name] = cache.get_for(ports, ("ipset", name), lambda n=name, m=ports: IPSet(
                n, "hash:ip,port", family, _port_members(m, family)))
    return sets


def net_set(family: int, set_name_id: str, nets: list[IPNetwork]) -> IPSet:
    name = ipset_name(family, set_name_id)
    return IPSet(name, "hash:net", family, _hash_net_members(nets))


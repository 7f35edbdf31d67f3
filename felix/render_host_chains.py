"""Host endpoint chains and their dispatch, per table, as Felix's endpoints.go/dispatch.go (pure).

filter: `cali-th-`/`cali-fh-` (normal policy then profiles, after the failsafe jump; traffic to
and from the host itself) and `cali-thfw-`/`cali-fhfw-` (applyOnForward policy; allowed when
none applies). mangle: `cali-fh-` for preDNAT policy (only where some applies) and `cali-th-`
for the normal egress policy of DNAT'd host traffic (RETURN rather than ACCEPT, so later mangle
rules still run). raw: `cali-th-`/`cali-fh-` for doNotTrack policy, only where some applies and
never for `interfaceName: "*"` (Felix does not support that).

An all-interfaces endpoint is each dispatch chain's default goto; the to-host default in mangle
skips traffic to local workloads first (host -> local pod is never policed).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from felix.model import Chain, Rule
from felix.render_cache import RenderCache
from felix.render_config import RenderConfig
from felix.render_endpoints import (
    ChainKind,
    ChainOptions,
    EndpointSpec,
    GuardOf,
    dispatch_chain,
    endpoint_chains,
    tier_jumps,
)
from felix.render_hosts import HostPlan
from felix.render_names import (
    FAILSAFE_IN,
    FAILSAFE_OUT,
    FROM_HOST,
    FROM_HOST_DISPATCH,
    FROM_HOST_FORWARD,
    FROM_HOST_FWD_DISPATCH,
    TO_HOST,
    TO_HOST_DISPATCH,
    TO_HOST_FORWARD,
    TO_HOST_FWD_DISPATCH,
    endpoint_chain,
)
from felix.rules import Direction


def _chains(host: HostPlan, prefix: str, kind: ChainKind, opts: ChainOptions,
            guard_of: GuardOf, cache: RenderCache) -> list[Chain]:
    """One endpoint chain (and its group chains): `cali-fh*` prefixes are ingress (into the
    host), `cali-th*` egress."""
    ingress = prefix.startswith("cali-fh")
    direction: Direction = "ingress" if ingress else "egress"
    failsafe = "" if kind == "forward" else (FAILSAFE_IN if ingress else FAILSAFE_OUT)
    profiles = host.endpoint.profiles if kind == "normal" else ()
    spec = EndpointSpec(endpoint_chain(prefix, host.iface), direction,
                        tier_jumps(host.tiers(kind, direction), direction, guard_of), profiles,
                        failsafe, kind)
    return cache.get(("endpoint", spec, opts), lambda: endpoint_chains(spec, opts))


def _unique(chains: Iterable[Chain]) -> list[Chain]:
    """Chains in order, each group chain (shared by equal runs) once."""
    return list({c.name: c for c in chains}.values())


def _dispatch(name: str, flag: str, prefix: str, hosts: Sequence[HostPlan],
              cache: RenderCache, skip_workloads: str = "") -> Chain:
    key = ("dispatch", name, flag, prefix, tuple((h.iface, h.wildcard) for h in hosts),
           skip_workloads)
    return cache.get(key, lambda: _make_dispatch(name, flag, prefix, hosts, skip_workloads))


def _make_dispatch(name: str, flag: str, prefix: str, hosts: Sequence[HostPlan],
                   skip_workloads: str) -> Chain:
    named = [(h.iface, endpoint_chain(prefix, h.iface)) for h in hosts if not h.wildcard]
    default: list[Rule] = []
    for host in hosts:
        if host.wildcard:
            if skip_workloads:
                default.append(Rule(match=f"-o {skip_workloads}", action="-j RETURN",
                                    comment="Skip egress host endpoint policy for traffic to "
                                            "local workload"))
            default.append(Rule(action=f"-g {endpoint_chain(prefix, host.iface)}"))
    return dispatch_chain(name, flag, named, drop_unknown=False, default=default)


def filter_host_chains(hosts: Sequence[HostPlan], config: RenderConfig, guard_of: GuardOf,
                       cache: RenderCache) -> list[Chain]:
    opts = ChainOptions(config.marks, config.deny_action)
    chains = _unique(c for h in hosts
                     for prefix, kind in ((TO_HOST, "normal"), (FROM_HOST, "normal"),
                                          (TO_HOST_FORWARD, "forward"),
                                          (FROM_HOST_FORWARD, "forward"))
                     for c in _chains(h, prefix, kind, opts, guard_of, cache))
    return [*chains,
            _dispatch(TO_HOST_DISPATCH, "-o", TO_HOST, hosts, cache),
            _dispatch(FROM_HOST_DISPATCH, "-i", FROM_HOST, hosts, cache),
            _dispatch(TO_HOST_FWD_DISPATCH, "-o", TO_HOST_FORWARD, hosts, cache),
            _dispatch(FROM_HOST_FWD_DISPATCH, "-i", FROM_HOST_FORWARD, hosts, cache)]


def mangle_host_chains(hosts: Sequence[HostPlan], config: RenderConfig, guard_of: GuardOf,
                       cache: RenderCache) -> list[Chain]:
    egress = ChainOptions(config.marks, "DROP", allow="-j RETURN")
    prednat = [h for h in hosts if h.prednat]
    chains = _unique([
        *(c for h in hosts for c in _chains(h, TO_HOST, "normal", egress, guard_of, cache)),
        *(c for h in prednat
          for c in _chains(h, FROM_HOST, "prednat", ChainOptions(config.marks, "DROP"),
                           guard_of, cache))])
    return [*chains,
            _dispatch(TO_HOST_DISPATCH, "-o", TO_HOST, hosts, cache, config.workload_wildcard),
            _dispatch(FROM_HOST_DISPATCH, "-i", FROM_HOST, prednat, cache)]


def raw_host_chains(hosts: Sequence[HostPlan], config: RenderConfig, guard_of: GuardOf,
                    cache: RenderCache) -> list[Chain]:
    untracked = [h for h in hosts if h.has_untracked and not h.wildcard]
    opts = ChainOptions(config.marks, "DROP")
    chains = _unique(c for h in untracked for prefix in (TO_HOST, FROM_HOST)
                     for c in _chains(h, prefix, "untracked", opts, guard_of, cache))
    return [*chains,
            _dispatch(TO_HOST_DISPATCH, "-o", TO_HOST, untracked, cache),
            _dispatch(FROM_HOST_DISPATCH, "-i", FROM_HOST, untracked, cache)]

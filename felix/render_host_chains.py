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

from collections.abc import Sequence

from felix.model import Chain, Rule
from felix.render_config import RenderConfig
from felix.render_endpoints import ChainKind, ChainOptions, EndpointSpec, dispatch_chain
from felix.render_endpoints import endpoint_chain as build_endpoint_chain
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


def _chain(host: HostPlan, prefix: str, kind: ChainKind, opts: ChainOptions) -> Chain:
    """One endpoint chain: `cali-fh*` prefixes are ingress (into the host), `cali-th*` egress."""
    ingress = prefix.startswith("cali-fh")
    direction: Direction = "ingress" if ingress else "egress"
    failsafe = "" if kind == "forward" else (FAILSAFE_IN if ingress else FAILSAFE_OUT)
    profiles = host.endpoint.profiles if kind == "normal" else ()
    spec = EndpointSpec(endpoint_chain(prefix, host.iface), direction,
                        host.tiers(kind, direction), profiles, failsafe, kind)
    return build_endpoint_chain(spec, opts)


def _dispatch(name: str, flag: str, prefix: str, hosts: Sequence[HostPlan],
              skip_workloads: str = "") -> Chain:
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


def filter_host_chains(hosts: Sequence[HostPlan], config: RenderConfig) -> list[Chain]:
    opts = ChainOptions(config.marks, config.deny_action)
    chains = [_chain(h, prefix, kind, opts) for h in hosts
              for prefix, kind in ((TO_HOST, "normal"), (FROM_HOST, "normal"),
                                   (TO_HOST_FORWARD, "forward"), (FROM_HOST_FORWARD, "forward"))]
    return [*chains,
            _dispatch(TO_HOST_DISPATCH, "-o", TO_HOST, hosts),
            _dispatch(FROM_HOST_DISPATCH, "-i", FROM_HOST, hosts),
            _dispatch(TO_HOST_FWD_DISPATCH, "-o", TO_HOST_FORWARD, hosts),
            _dispatch(FROM_HOST_FWD_DISPATCH, "-i", FROM_HOST_FORWARD, hosts)]


def mangle_host_chains(hosts: Sequence[HostPlan], config: RenderConfig) -> list[Chain]:
    egress = ChainOptions(config.marks, "DROP", allow="-j RETURN")
    prednat = [h for h in hosts if h.prednat]
    chains = [*(_chain(h, TO_HOST, "normal", egress) for h in hosts),
              *(_chain(h, FROM_HOST, "prednat", ChainOptions(config.marks, "DROP"))
                for h in prednat)]
    return [*chains,
            _dispatch(TO_HOST_DISPATCH, "-o", TO_HOST, hosts, config.workload_wildcard),
            _dispatch(FROM_HOST_DISPATCH, "-i", FROM_HOST, prednat)]


def raw_host_chains(hosts: Sequence[HostPlan], config: RenderConfig) -> list[Chain]:
    untracked = [h for h in hosts if h.has_untracked and not h.wildcard]
    opts = ChainOptions(config.marks, "DROP")
    chains = [_chain(h, prefix, "untracked", opts) for h in untracked
              for prefix in (TO_HOST, FROM_HOST)]
    return [*chains,
            _dispatch(TO_HOST_DISPATCH, "-o", TO_HOST, untracked),
            _dispatch(FROM_HOST_DISPATCH, "-i", FROM_HOST, untracked)]

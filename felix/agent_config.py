"""The renderer's configuration from the store: IPPools and FelixConfiguration (pure).

FelixConfiguration `default` applies to every node and `node.<nodename>` overrides it field by
field, as Felix merges them. Only the fields the renderer has a knob for are read; everything
else keeps Felix's default.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from datastore.snapshot import Resource
from felix.render_config import RenderConfig, pools_from_resources

log = logging.getLogger(__name__)


def merged_felix_spec(configs: Iterable[Resource], node: str) -> dict[str, Any]:
    """`default`'s spec overlaid with `node.<node>`'s."""
    by_name = {c.get("metadata", {}).get("name"): c.get("spec") or {} for c in configs}
    return {**by_name.get("default", {}), **by_name.get(f"node.{node}", {})}


def _ports(entries: Any) -> tuple[tuple[str, int], ...]:
    return tuple((str(e["protocol"]).lower(), int(e["port"])) for e in entries)


def render_config(pools: Iterable[Mapping[str, Any]], felix: Mapping[str, Any],
                  base: RenderConfig | None = None) -> RenderConfig:
    """`base` with the pools and the FelixConfiguration fields the renderer understands."""
    base = base or RenderConfig()
    try:
        changes: dict[str, Any] = {"pools": pools_from_resources(pools)}
    except (KeyError, TypeError, ValueError) as e:
        log.warning("IPPools not usable (%s); rendering without pools", e)
        changes = {"pools": ()}
    try:
        if "interfacePrefix" in felix:
            # Calico allows a comma list; the first prefix names Tabby's own interfaces
            changes["interface_prefix"] = str(felix["interfacePrefix"]).split(",")[0].strip()
        if "defaultEndpointToHostAction" in felix:
            changes["endpoint_to_host_action"] = str(felix["defaultEndpointToHostAction"]).upper()
        if "iptablesFilterDenyAction" in felix:
            changes["deny_action"] = str(felix["iptablesFilterDenyAction"]).upper()
        if "iptablesMarkMask" in felix:
            changes["mark_mask"] = int(felix["iptablesMarkMask"])
        if "failsafeInboundHostPorts" in felix:
            changes["failsafe_inbound"] = _ports(felix["failsafeInboundHostPorts"] or ())
        if "failsafeOutboundHostPorts" in felix:
            changes["failsafe_outbound"] = _ports(felix["failsafeOutboundHostPorts"] or ())
        if "logPrefix" in felix:
            changes["log_prefix"] = str(felix["logPrefix"])
        if felix.get("ipv6Support") is False:
            changes["ip_versions"] = (4,)
        if "vxlanPort" in felix:
            changes["vxlan_port"] = int(felix["vxlanPort"])
        if "allowVXLANPacketsFromWorkloads" in felix or "allowIPIPPacketsFromWorkloads" in felix:
            changes["drop_encap_from_workloads"] = not (
                felix.get("allowVXLANPacketsFromWorkloads")
                or felix.get("allowIPIPPacketsFromWorkloads"))
    except (KeyError, TypeError, ValueError) as e:  # validated on write; keep defaults if not
        log.warning("FelixConfiguration not usable (%s); using defaults for it", e)
        changes = {"pools": changes["pools"]}
    return dataclasses.replace(base, **changes)

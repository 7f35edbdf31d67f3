"""Kernel reconcilers for Felix's rendered `felix.model.Dataplane` (iptables + ipset).

`apply_dataplane(desired, DataplaneState(Runner()), sweep=...)` is the entry point; the
per-table and per-family reconcilers are usable alone.
"""

from __future__ import annotations

from felix.dataplane.apply import ApplyStats, DataplaneState, apply_dataplane
from felix.dataplane.backend import Backend, detect_backend
from felix.dataplane.ipsets import IPSets, IPSetStats
from felix.dataplane.iptables import IptablesTable, WriteStats, parse_save, plan_table
from felix.dataplane.runner import CommandError, Runner

__all__ = [
    "ApplyStats",
    "Backend",
    "CommandError",
    "DataplaneState",
    "IPSetStats",
    "IPSets",
    "IptablesTable",
    "Runner",
    "WriteStats",
    "apply_dataplane",
    "detect_backend",
    "parse_save",
    "plan_table",
]

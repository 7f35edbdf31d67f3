"""Tabby's IP sets of one family, reconciled with `ipset restore` (Calico's `ipsets.IPSets`).

Tabby owns every set named `cali4*` (IPv4) or `cali6*` (IPv6). A sync is one `ipset restore`:
create missing sets, add/del member deltas on existing ones, and move a set whose metadata
changed (maxelem) onto the new metadata by filling a temporary set and `swap`ping it in, so rules
referencing the set never see it empty. The kernel refuses to swap sets of different types
("their type does not match"), so a type change recreates the set, which is only possible while
no rule references it (Calico's names encode the type, so that is an upgrade-only case).
Stale sets are destroyed by `delete_stale()`, which the caller runs after the iptables write
that dropped their last reference.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from felix.dataplane.runner import CommandError, Runner
from felix.model import IPSet

MAXELEM = 1_048_576  # Calico's MaxIpsetSize
_CREATE_RE = re.compile(r"^create (\S+) (\S+)(.*)$")
_ADD_RE = re.compile(r"^add (\S+) (\S+)")
_OPT_RE = re.compile(r"\b(family|maxelem) (\S+)")
_REFS_RE = re.compile(r"^References: (\d+)$", re.MULTILINE)


class IPSetError(RuntimeError):
    """A desired change the kernel cannot make without opening a window (see module doc)."""


def prefix(family: int) -> str:
    return f"cali{family}"


def temp_name(family: int, n: int) -> str:
    return f"cali{family}t{n}"  # Felix's temp-set names; never a main set's name (`cali40...`)


@dataclass(frozen=True)
class Meta:
    kind: str
    family: int
    maxelem: int = MAXELEM

    def create_line(self, name: str) -> str:
        fam = "inet" if self.family == 4 else "inet6"
        return f"create {name} {self.kind} family {fam} maxelem {self.maxelem}"


@dataclass
class SetState:
    meta: Meta
    members: set[str] = field(default_factory=set)


def normalize_member(kind: str, member: str) -> str:
    """The spelling `ipset save` prints, so desired and read-back members compare equal:
    hosts without /32 or /128, networks at their base address, IPv6 compressed."""
    member = member.strip()
    if kind == "hash:net":
        net = ipaddress.ip_network(member, strict=False)
        full = net.prefixlen == net.max_prefixlen
        return str(net.network_address) if full else str(net)
    if kind == "hash:ip":
        return str(ipaddress.ip_address(member.split("/")[0]))
    if kind == "hash:ip,port":
        addr, _, port = member.partition(",")
        proto, _, num = port.rpartition(":")
        port = f"{proto.lower()}:{num}" if proto else num
        return f"{ipaddress.ip_address(addr)},{port}"
    return member


def parse_save(text: str, family: int) -> dict[str, SetState]:
    """This family's Tabby sets (`cali4*`/`cali6*`) from `ipset save` output."""
    sets: dict[str, SetState] = {}
    pre = prefix(family)
    for line in text.splitlines():
        if m := _CREATE_RE.match(line):
            if not m[1].startswith(pre):
                continue
            opts = dict(_OPT_RE.findall(m[3]))
            fam = 6 if opts.get("family") == "inet6" else 4
            sets[m[1]] = SetState(Meta(m[2], fam, int(opts.get("maxelem", 65536))))
        elif (m := _ADD_RE.match(line)) and m[1] in sets:
            sets[m[1]].members.add(m[2])
    return sets


@dataclass
class IPSetPlan:
    lines: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)
    recreated: list[str] = field(default_factory=list)
    added: int = 0
    removed: int = 0
    stale: list[str] = field(default_factory=list)
    new_state: dict[str, SetState] = field(default_factory=dict)


def normalized(ipset: IPSet) -> set[str]:
    return {normalize_member(ipset.kind, m) for m in ipset.members}


def plan_ipsets(desired: Iterable[IPSet], actual: Mapping[str, SetState], family: int,
                *, referenced: Iterable[str] = (),
                members_of: Callable[[IPSet], set[str]] = normalized) -> IPSetPlan:
    """Pure diff for one family. `referenced` names sets iptables rules still use (only
    consulted for type changes); `members_of` lets a reconciler memoize normalization."""
    plan = IPSetPlan()
    new = {k: SetState(v.meta, set(v.members)) for k, v in actual.items()}
    refs = set(referenced)
    want_names: set[str] = set()
    temps = (temp_name(family, n) for n in range(1_000_000) if temp_name(family, n) not in actual)
    for ipset in sorted(desired, key=lambda s: s.name):
        if ipset.family != family:
            continue
        if not ipset.name.startswith(prefix(family)) or len(ipset.name) > 31:
            raise ValueError(f"ipset {ipset.name!r}: needs prefix {prefix(family)} and <= 31 chars")
        want_names.add(ipset.name)
        meta = Meta(ipset.kind, ipset.family)
        members = members_of(ipset)
        have = actual.get(ipset.name)
        if have is None:
            plan.lines.append(meta.create_line(ipset.name))
            plan.lines += [f"add {ipset.name} {m}" for m in sorted(members)]
            plan.created.append(ipset.name)
            plan.added += len(members)
        elif have.meta == meta:
            adds, dels = members - have.members, have.members - members
            if not adds and not dels:
                continue
            plan.lines += [f"del {ipset.name} {m}" for m in sorted(dels)]
            plan.lines += [f"add {ipset.name} {m}" for m in sorted(adds)]
            plan.updated.append(ipset.name)
            plan.added, plan.removed = plan.added + len(adds), plan.removed + len(dels)
        elif (have.meta.kind, have.meta.family) == (meta.kind, meta.family):
            # Fill a temp set and swap it in: references follow the name, never see it empty.
            tmp = next(temps)
            plan.lines.append(meta.create_line(tmp))
            plan.lines += [f"add {tmp} {m}" for m in sorted(members)]
            plan.lines += [f"swap {ipset.name} {tmp}", f"destroy {tmp}"]
            plan.swapped.append(ipset.name)
            plan.added += len(members)
        elif ipset.name in refs:
            raise IPSetError(f"ipset {ipset.name} is referenced by iptables rules and changes "
                             f"type {have.meta.kind}/{have.meta.family} -> "
                             f"{meta.kind}/{meta.family}; the kernel cannot swap across types")
        else:
            plan.lines += [f"destroy {ipset.name}", meta.create_line(ipset.name)]
            plan.lines += [f"add {ipset.name} {m}" for m in sorted(members)]
            plan.recreated.append(ipset.name)
            plan.added += len(members)
        new[ipset.name] = SetState(meta, set(members))  # the memo stays unshared
    plan.stale = sorted(set(actual) - want_names)
    plan.new_state = new
    return plan


@dataclass(frozen=True)
class IPSetStats:
    family: int
    wrote: bool = False
    created: int = 0
    updated: int = 0
    swapped: int = 0
    recreated: int = 0
    members_added: int = 0
    members_removed: int = 0
    stale: int = 0  # sets pending destruction by delete_stale()
    ms: float = 0.0


class IPSets:
    """Reconciles one family's Tabby sets; caches the kernel state after its own writes."""

    def __init__(self, family: int, runner: Runner) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        self.family, self.runner = family, runner
        self._state: dict[str, SetState] | None = None
        self._pending_stale: list[str] = []
        self._last: Mapping[str, IPSet] | None = None
        self._memo: dict[str, tuple[IPSet, set[str]]] = {}

    def read(self) -> dict[str, SetState]:
        self._state = parse_save(self.runner.run(["ipset", "save"]).stdout, self.family)
        return self._state

    def invalidate(self) -> None:
        self._state = None

    def _references(self, name: str) -> int:
        out = self.runner.run(["ipset", "list", "-terse", name]).stdout
        m = _REFS_RE.search(out)
        return int(m[1]) if m else 0

    def apply(self, desired: Mapping[str, IPSet], *, sweep: bool = False) -> IPSetStats:
        """Creates and updates sets; with `sweep`, remembers stale ones for delete_stale()."""
        state = self._state if self._state is not None else self.read()
        mine = [s for s in desired.values() if s.family == self.family]
        retyped = [s.name for s in mine if s.name in state
                   and (state[s.name].meta.kind, state[s.name].meta.family) != (s.kind, s.family)]
        refs = [n for n in retyped if self._references(n) > 0]
        plan = plan_ipsets(mine, state, self.family, referenced=refs, members_of=self._members)
        self._memo = {s.name: self._memo[s.name] for s in mine}
        self._last = desired
        self._pending_stale = plan.stale if sweep else []
        ms = 0.0
        if plan.lines:
            start = time.perf_counter()
            self._restore(plan.lines)
            ms = (time.perf_counter() - start) * 1000
        self._state = plan.new_state
        return IPSetStats(self.family, bool(plan.lines), len(plan.created), len(plan.updated),
                          len(plan.swapped), len(plan.recreated), plan.added, plan.removed,
                          len(self._pending_stale), ms)

    def check_drift(self) -> IPSetStats | None:
        """Re-reads the kernel and restores missing sets and members of the last apply()."""
        if self._last is None:
            return None
        self.read()
        return self.apply(self._last)

    def _members(self, ipset: IPSet) -> set[str]:
        # Parsing every address on every sync would dominate a no-op; reuse unchanged sets'.
        hit = self._memo.get(ipset.name)
        if hit is None or not (hit[0] is ipset or hit[0] == ipset):
            hit = self._memo[ipset.name] = (ipset, normalized(ipset))
        return hit[1]

    def delete_stale(self) -> list[str]:
        """Destroys the sets the last sweeping apply() found stale; run after iptables has
        dropped their references. A set still referenced stays for the next sweep."""
        names, self._pending_stale = self._pending_stale, []
        if not names:
            return []
        try:
            self._restore([f"destroy {n}" for n in names])
            destroyed = names
        except CommandError:
            # One referenced set fails the batch; destroy one by one so the others go.
            destroyed = []
            for n in names:
                if self.runner.run(["ipset", "destroy", n], check=False).returncode == 0:
                    destroyed.append(n)
        if self._state is not None:
            for n in destroyed:
                self._state.pop(n, None)
        return destroyed

    def _restore(self, lines: list[str]) -> None:
        try:
            # -exist: a re-add or a del of an absent member is not an error if the cache lags.
            self.runner.run(["ipset", "restore", "-exist"], stdin="\n".join(lines) + "\n")
        except Exception:
            self._state = None  # partial write: re-read next time
            raise

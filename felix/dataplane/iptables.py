"""One iptables table of one IP family, reconciled as Calico's `iptables.Table` does.

Tabby owns every `cali-*` chain and only inserts hook rules into kernel chains. Every rule it
writes carries `-m comment --comment "cali:<hash>"` (see `felix.model.rule_hashes`), so the
kernel's state is read back from `iptables-save` as chain names plus hashes only; the match text
never has to round-trip. A sync writes the minimal delta as ONE `iptables-restore --noflush`
input: whole chains that differ (`:chain` flushes and redeclares in the same transaction, so
there is no window without rules), hook rules that are missing or misplaced, and, when sweeping,
stale `cali-*` chains. Chains of kube-proxy, Docker or anyone else are never named in the input.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from felix.dataplane.backend import Backend
from felix.dataplane.runner import Runner
from felix.model import RULE_HASH_PREFIX, Chain, Hook, Rule, Table, rule_hashes

CHAIN_PREFIX = "cali-"
FOREIGN = ""  # hash placeholder for a rule Tabby did not write
APPENDS_SEED = "*appends*"  # as Felix: appended hooks hash apart from inserted ones
COMMENT_MAX = 255  # xt_comment holds 256 bytes including the NUL

_HASH_RE = re.compile(r'--comment "?' + re.escape(RULE_HASH_PREFIX) + r'([A-Za-z0-9_-]+)"?')
_CHAIN_RE = re.compile(r"^:(\S+) ")
_APPEND_RE = re.compile(r"^-A (\S+) ")
# iptables-nft-save exits 0 but prints this when a table holds rules it cannot express.
_NFT_INCOMPATIBLE = re.compile(r"^# Table `\S+' is incompatible")


class IncompatibleTable(RuntimeError):
    """The table holds native nft rules iptables cannot show; writing blind would be unsafe."""


def owned(chain: str) -> bool:
    return chain.startswith(CHAIN_PREFIX)


@dataclass
class TableState:
    """What the kernel holds, as far as Tabby cares."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> hash per rule
    # Non-Tabby chains with Tabby rules: their full `-A` lines, for deleting by value
    # (rule numbers in chains others also write to could shift under us).
    hook_lines: dict[str, list[str]] = field(default_factory=dict)


def parse_save(text: str) -> TableState:
    """Chain names and `cali:` hashes from `iptables-save -t <table>` output."""
    state = TableState()
    for line in text.splitlines():
        if _NFT_INCOMPATIBLE.match(line):
            raise IncompatibleTable(line)
        if m := _CHAIN_RE.match(line):
            state.chains.setdefault(m[1], [])
            continue
        if not (m := _APPEND_RE.match(line)):
            continue
        chain = m[1]
        h = _HASH_RE.search(line)  # the first comment is the hash: we always write it first
        state.chains.setdefault(chain, []).append(h[1] if h else FOREIGN)
        if h and not owned(chain):
            state.hook_lines.setdefault(chain, []).append(line)
    return state


def _quote(comment: str) -> str:
    clean = comment.replace('"', "'").replace("\\", "/").replace("\n", " ")
    return clean[:COMMENT_MAX]


def render_rule(op: str, rule: Rule, rule_hash: str) -> str:
    """One restore line; `op` is the command and position, e.g. "-A cali-x" or "-I INPUT 1".
    The hash comment comes first so read-back finds it before any human comment."""
    parts = [op, f'-m comment --comment "{RULE_HASH_PREFIX}{rule_hash}"']
    if rule.comment:
        parts.append(f'-m comment --comment "{_quote(rule.comment)}"')
    parts.extend(p for p in (rule.match, rule.action) if p)
    return " ".join(parts)


@dataclass
class Plan:
    """The restore input for one sync plus what it will leave in the kernel."""

    table: str
    updates: list[str] = field(default_factory=list)  # first transaction
    deletes: list[str] = field(default_factory=list)  # second: `-X` of now-unreferenced chains
    chains_written: list[str] = field(default_factory=list)
    rules_written: int = 0
    chains_deleted: list[str] = field(default_factory=list)
    hooks_written: int = 0
    hooks_removed: int = 0
    new_state: TableState = field(default_factory=TableState)

    @property
    def empty(self) -> bool:
        return not self.updates and not self.deletes

    def restore_input(self) -> str:
        # iptables-nft-restore computes references at transaction start, so a chain whose
        # last jump is removed in this sync can only be deleted in a following transaction.
        out: list[str] = []
        for body in (self.updates, self.deletes):
            if body:
                out += [f"*{self.table}", *body, "COMMIT"]
        return "\n".join(out) + "\n"


def _hooks_by_chain(hooks: Iterable[Hook]) -> dict[str, tuple[list[Rule], list[Rule]]]:
    grouped: dict[str, tuple[list[Rule], list[Rule]]] = defaultdict(lambda: ([], []))
    for hook in hooks:
        if owned(hook.chain):
            raise ValueError(f"hook into Tabby's own chain {hook.chain}; use a rule instead")
        grouped[hook.chain][1 if hook.append else 0].append(hook.rule)
    return grouped


def plan_table(desired: Table, actual: TableState, *, sweep: bool,
               hashes_of: Callable[[Chain], list[str]] = rule_hashes) -> Plan:
    """Pure diff: the minimal restore input taking `actual` to `desired`. `hashes_of` lets a
    long-lived reconciler memoize hashes of chains that did not change."""
    plan = Plan(desired.name)
    new = TableState({k: list(v) for k, v in actual.chains.items()},
                     {k: list(v) for k, v in actual.hook_lines.items()})
    decls: list[str] = []
    body: list[str] = []

    for name, chain in sorted(desired.chains.items()):
        if not owned(name) or chain.name != name:
            raise ValueError(f"desired chain {name!r} must be keyed by its name and start "
                             f"with {CHAIN_PREFIX!r}")
        hashes = hashes_of(chain)
        if actual.chains.get(name) == hashes:
            continue
        decls.append(f":{name} - [0:0]")  # creates, or flushes within this transaction
        body += [render_rule(f"-A {name}", r, h)
                 for r, h in zip(chain.rules, hashes, strict=True)]
        plan.chains_written.append(name)
        plan.rules_written += len(hashes)
        new.chains[name] = hashes

    if sweep:
        for name in sorted(actual.chains):
            if owned(name) and name not in desired.chains:
                decls.append(f":{name} - [0:0]")  # flush first: severs its own jumps
                plan.deletes.append(f"-X {name}")
                plan.chains_deleted.append(name)
                del new.chains[name]

    hooks = _hooks_by_chain(desired.hooks)
    for kchain in sorted(set(hooks) | set(actual.hook_lines)):
        inserted, appended = hooks.get(kchain, ([], []))
        ins = rule_hashes(Chain(kchain, tuple(inserted)))
        app = rule_hashes(Chain(kchain + APPENDS_SEED, tuple(appended)))
        have = actual.chains.get(kchain, [])
        foreign = have.count(FOREIGN)
        want = ins + [FOREIGN] * foreign + app
        if have == want:
            continue
        # Out of place or missing: remove all of ours, re-add in order, in this transaction.
        for line in actual.hook_lines.get(kchain, []):
            body.append("-D" + line[2:])
            plan.hooks_removed += 1
        as_appends = [render_rule(f"-A {kchain}", r, h)
                      for r, h in zip([*inserted, *appended], ins + app, strict=True)]
        # Inserting each at position 1, last first, leaves them in order at the top.
        body += [render_rule(f"-I {kchain} 1", r, h)
                 for r, h in reversed(list(zip(inserted, ins, strict=True)))]
        body += as_appends[len(ins):]
        plan.hooks_written += len(as_appends)
        new.chains[kchain] = want
        if as_appends:
            new.hook_lines[kchain] = as_appends  # `-A` form: what a later `-D` needs
        else:
            new.hook_lines.pop(kchain, None)

    plan.updates = decls + body
    plan.new_state = new
    return plan


@dataclass(frozen=True)
class WriteStats:
    family: int
    table: str
    wrote: bool = False
    chains_written: int = 0
    rules_written: int = 0
    chains_deleted: int = 0
    hooks_written: int = 0
    hooks_removed: int = 0
    ms: float = 0.0  # wall time of the restore (0 when nothing was written)


class IptablesTable:
    """Reconciles one (family, table). Caches what it believes the kernel holds after its own
    writes, as Felix does; `check_drift()` re-reads to catch anyone else's edits."""

    def __init__(self, family: int, name: str, runner: Runner,
                 backend: Backend | None = None) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        self.family, self.name, self.runner = family, name, runner
        self.backend = backend or Backend("nft")
        self._state: TableState | None = None
        self._last: tuple[Table, bool] | None = None
        self.last_write: float | None = None  # time.monotonic() of the last restore
        self.last_read: float | None = None
        self._hash_memo: dict[str, tuple[Chain, list[str]]] = {}

    def read(self) -> TableState:
        out = self.runner.run(self.backend.save_cmd(self.family, self.name)).stdout
        self._state = parse_save(out)
        self.last_read = time.monotonic()
        return self._state

    def invalidate(self) -> None:
        self._state = None

    @property
    def last_desired(self) -> Table | None:
        return self._last[0] if self._last else None

    def plan(self, desired: Table, *, sweep: bool = False) -> Plan:
        if desired.name != self.name:
            raise ValueError(f"table {desired.name!r} given to the {self.name!r} reconciler")
        state = self._state if self._state is not None else self.read()
        plan = plan_table(desired, state, sweep=sweep, hashes_of=self._hashes)
        for name in self._hash_memo.keys() - desired.chains.keys():
            del self._hash_memo[name]
        return plan

    def _hashes(self, chain: Chain) -> list[str]:
        # Hashing is most of a no-op sync's cost; an unchanged chain (often the very same
        # object from an incremental renderer) keeps its hashes.
        hit = self._hash_memo.get(chain.name)
        if hit is not None and (hit[0] is chain or hit[0] == chain):
            return hit[1]
        hashes = rule_hashes(chain)
        self._hash_memo[chain.name] = (chain, hashes)
        return hashes

    def apply(self, desired: Table, *, sweep: bool = False) -> WriteStats:
        plan = self.plan(desired, sweep=sweep)
        self._last = (desired, sweep)
        if plan.empty:
            return WriteStats(self.family, self.name)
        start = time.perf_counter()
        try:
            self.runner.run(self.backend.restore_cmd(self.family), stdin=plan.restore_input())
        except Exception:
            self._state = None  # unknown outcome: the next sync re-reads
            raise
        ms = (time.perf_counter() - start) * 1000
        self._state = plan.new_state
        self.last_write = time.monotonic()
        return WriteStats(self.family, self.name, True, len(plan.chains_written),
                          plan.rules_written, len(plan.chains_deleted), plan.hooks_written,
                          plan.hooks_removed, ms)

    def check_drift(self, desired: Table | None = None, *, sweep: bool | None = None
                    ) -> WriteStats:
        """Re-read the kernel and repair anything that differs from the last (or given)
        desired state: edited or foreign rules in Tabby chains, missing or moved hooks."""
        if desired is None:
            if self._last is None:
                raise RuntimeError("check_drift() before any apply() needs a desired table")
            desired = self._last[0]
        if sweep is None:
            sweep = self._last[1] if self._last else False
        self.read()
        return self.apply(desired, sweep=sweep)

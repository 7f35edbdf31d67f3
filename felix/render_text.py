"""A Dataplane as `iptables-restore` / `ipset restore` input (pure).

Full-table text for loading a fresh namespace (tests, debugging); the reconcilers write
minimal deltas instead. Each rule carries its `cali:<hash>` comment, then its human comment.
"""

from __future__ import annotations

from felix.model import RULE_HASH_PREFIX, Chain, Dataplane, IPSet, Rule, Table, rule_hashes

MAX_COMMENT = 256  # xt_comment's limit


def _comment(text: str) -> str:
    cleaned = text.replace('"', "'").replace("\n", " ")[: MAX_COMMENT - 1]
    return f'-m comment --comment "{cleaned}"'


def rule_line(verb: str, chain: str, rule: Rule, rule_hash: str | None) -> str:
    parts = [verb, chain]
    if rule_hash is not None:
        parts.append(_comment(RULE_HASH_PREFIX + rule_hash))
    if rule.comment:
        parts.append(_comment(rule.comment))
    parts += [rule.match, rule.action]
    return " ".join(p for p in parts if p)


def iptables_restore_text(table: Table) -> str:
    """`*table`, chain declarations, rules, then hooks (inserted ones keep their order)."""
    lines = [f"*{table.name}"]
    lines += [f":{name} - [0:0]" for name in table.chains]
    for chain in table.chains.values():
        for rule, rule_hash in zip(chain.rules, rule_hashes(chain), strict=True):
            lines.append(rule_line("-A", chain.name, rule, rule_hash))
    lines += _hook_lines(table)
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _hook_lines(table: Table) -> list[str]:
    """Inserted hooks go to the top in their given order; appended ones to the end."""
    lines = []
    for append in (False, True):
        by_chain: dict[str, list[Rule]] = {}
        for hook in table.hooks:
            if hook.append == append:
                by_chain.setdefault(hook.chain, []).append(hook.rule)
        for kernel_chain, rules in by_chain.items():
            hashes = rule_hashes(Chain(kernel_chain, tuple(rules)))
            for position, (rule, rule_hash) in enumerate(zip(rules, hashes, strict=True), 1):
                verb = f"-A {kernel_chain}" if append else f"-I {kernel_chain} {position}"
                lines.append(rule_line(verb, "", rule, rule_hash))
    return lines


def ipset_restore_text(sets: list[IPSet]) -> str:
    lines = []
    for s in sets:
        family = "inet" if s.family == 4 else "inet6"
        lines.append(f"create {s.name} {s.kind} family {family} maxelem 1048576")
        lines += [f"add {s.name} {m}" for m in sorted(s.members)]
    return "\n".join(lines) + "\n"


def dataplane_text(dataplane: Dataplane, family: int) -> dict[str, str]:
    """table name -> restore text for one family."""
    return {name: iptables_restore_text(table)
            for (fam, name), table in sorted(dataplane.tables.items()) if fam == family}

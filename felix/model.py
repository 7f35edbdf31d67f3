"""Pure value objects describing the dataplane Felix wants (the renderer/reconciler contract).

The renderer produces a `Dataplane`; the reconcilers diff it against the kernel. Rule identity
follows Calico: every rule carries a `cali:<hash>` comment whose hash chains the chain name and
every rule before it, so a moved or edited rule gets a new hash.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

RULE_HASH_PREFIX = "cali:"
HASH_LENGTH = 16


@dataclass(frozen=True)
class Rule:
    match: str = ""  # iptables match text, e.g. "-i cali+ -m set --match-set cali40s:X src"
    action: str = ""  # target text: "-j ACCEPT", "-g cali-tw-cali1234", "-j MARK ..."
    comment: str = ""  # human note; rendered as an extra -m comment after the hash comment

    def text(self) -> str:
        """Match + action without comments: what the rule hash is computed over."""
        return " ".join(part for part in (self.match, self.action) if part)


@dataclass(frozen=True)
class Chain:
    name: str  # Tabby owns every chain whose name starts with "cali-"
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True)
class Hook:
    chain: str  # a kernel chain: INPUT, FORWARD, OUTPUT, PREROUTING, POSTROUTING
    rule: Rule  # usually Rule(action="-j cali-INPUT")
    append: bool = False  # False: insert at the top (Calico's default); True: append


@dataclass(frozen=True)
class Table:
    name: str  # filter | raw | mangle | nat
    chains: Mapping[str, Chain]
    hooks: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class IPSet:
    name: str  # <= 31 chars, e.g. "cali40s:qMt7iLlGDhvLnCjM0l9nzxb"
    kind: str  # "hash:net" | "hash:ip,port" | "hash:ip"
    family: int  # 4 | 6
    members: frozenset[str]  # "10.244.1.5/32" or "10.244.1.5,tcp:8080"


@dataclass(frozen=True)
class Dataplane:
    tables: Mapping[tuple[int, str], Table]  # (4|6, table name) -> desired chains + hooks
    ipsets: Mapping[str, IPSet]


def rule_hashes(chain: Chain) -> list[str]:
    """Calico's rule hashes: SHA-224 seeded with the chain name, chained over each rule's text.

    Each digest feeds the next, so a rule's hash depends on its position and everything before it.
    """
    digest = hashlib.sha224(chain.name.encode()).digest()
    hashes: list[str] = []
    for rule in chain.rules:
        digest = hashlib.sha224(digest + rule.text().encode()).digest()
        encoded = base64.urlsafe_b64encode(digest).decode().rstrip("=")
        hashes.append(encoded[:HASH_LENGTH])
    return hashes

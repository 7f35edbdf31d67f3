from __future__ import annotations

import base64
import hashlib

from felix.model import RULE_HASH_PREFIX, Chain, Rule, rule_hashes


def _reference(name: str, texts: list[str]) -> list[str]:
    digest = hashlib.sha224(name.encode()).digest()
    out = []
    for text in texts:
        digest = hashlib.sha224(digest + text.encode()).digest()
        out.append(base64.urlsafe_b64encode(digest).decode()[:16])
    return out


def test_rule_text_joins_match_and_action_without_comment() -> None:
    rule = Rule(match="-i cali+", action="-j ACCEPT", comment="hello")
    assert rule.text() == "-i cali+ -j ACCEPT"
    assert Rule(action="-j DROP").text() == "-j DROP"
    assert Rule().text() == ""


def test_hashes_match_calico_scheme() -> None:
    rules = (Rule(match="-i cali+", action="-j ACCEPT"), Rule(action="-j DROP"))
    assert rule_hashes(Chain("cali-INPUT", rules)) == _reference(
        "cali-INPUT", ["-i cali+ -j ACCEPT", "-j DROP"]
    )


def test_hashes_are_16_urlsafe_chars() -> None:
    hashes = rule_hashes(Chain("cali-x", tuple(Rule(action=f"-j R{i}") for i in range(20))))
    assert all(len(h) == 16 for h in hashes)
    assert all(
        set(h) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for h in hashes
    )
    assert RULE_HASH_PREFIX == "cali:"


def test_hash_depends_on_chain_name_position_and_predecessors() -> None:
    a, b = Rule(action="-j ACCEPT"), Rule(action="-j DROP")
    assert rule_hashes(Chain("c1", (a,))) != rule_hashes(Chain("c2", (a,)))
    assert rule_hashes(Chain("c", (a, b)))[1] != rule_hashes(Chain("c", (b, b)))[1]
    assert rule_hashes(Chain("c", (a, b)))[0] == rule_hashes(Chain("c", (a, a)))[0]


def test_comment_does_not_change_hash() -> None:
    plain = Chain("c", (Rule(action="-j ACCEPT"),))
    noted = Chain("c", (Rule(action="-j ACCEPT", comment="note"),))
    assert rule_hashes(plain) == rule_hashes(noted)


def test_empty_chain_has_no_hashes() -> None:
    assert rule_hashes(Chain("c")) == []

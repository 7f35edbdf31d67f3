"""Calico label selectors: parse, match, canonicalise, prefix (pure, no I/O).

Grammar (as accepted by Calico's libcalico-go selector tokenizer/parser):

    selector   := <empty> | or_expr
    or_expr    := and_expr ("||" and_expr)*
    and_expr   := unary ("&&" unary)*
    unary      := "!"* primary
    primary    := "(" or_expr ")" | "all()" | "global()" | "has(" label ")"
                | label ("==" | "!=" | "contains" | "starts with" | "ends with") string
                | label ("in" | "not in") "{" [string ("," string)* [","]] "}"

* label: 1-512 of ``[A-Za-z0-9_./-]``; string: '...' or "..." with no escapes.
* Whitespace is only space and tab (a newline is an error, as in Calico).
* Word operators need a word boundary after them, but not between their words:
  ``notin``, ``startswith``, ``endswith`` and ``a contains'x'`` are all accepted.
* ``!`` applies to the whole comparison: ``!a == 'x'`` is ``!(a == 'x')``.

Canonical form is Calico's ``Selector.String()`` so that set IDs derived from it agree with
Felix: ``a == "x"`` (double quotes unless the value contains ``"``), every ``&&``/``||`` group in
parentheses (``(a == "x" && has(b))``), ``!`` glued to its operand, set members sorted and
de-duplicated, ``all()`` for the empty selector. One deliberate difference: ``!(!x)`` is
collapsed to ``x`` (Calico prints ``!!x``, which would not round-trip).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from datastore.errors import InputError

__all__ = ["MAX_LABEL_LENGTH", "MAX_NESTING", "Selector", "SelectorError", "matches", "parse"]

MAX_LABEL_LENGTH = 512
# Calico has no limit; ours keeps the recursive parser far from Python's recursion limit.
MAX_NESTING = 100

_WS = " \t"
_IDENT = re.compile(r"[A-Za-z0-9_./-]+")


class SelectorError(InputError):
    """A selector string did not parse; `position` is a 0-based index into `text`."""

    def __init__(self, text: str, position: int, reason: str) -> None:
        self.text = text
        self.position = position
        self.reason = reason
        quoted = json.dumps(text, ensure_ascii=False)
        super().__init__(f"invalid selector {quoted}: {reason} at position {position}")


# --- tokens --------------------------------------------------------------------------------

_LABEL = "label"
_STRING = "string"
_EOF = "end of selector"
# Punctuation and keyword kinds are the token text itself ("(", "&&", "not in", "has", ...).


class _Tok(NamedTuple):
    kind: str
    value: str
    pos: int


_PUNCT = {"(": "(", ")": ")", "{": "{", "}": "}", ",": ","}
_DOUBLED = {"=": "==", "&": "&&", "|": "||"}
# Each must end at a word boundary, so none can shadow another whatever the order.
_WORD_OPS: tuple[tuple[str, ...], ...] = (
    ("contains",),
    ("starts", "with"),
    ("ends", "with"),
    ("not", "in"),
    ("in",),
)
_OP_HINT = "an operator (==, !=, in, not in, contains, starts with, ends with)"


def _skip_ws(text: str, i: int) -> int:
    n = len(text)
    while i < n and text[i] in _WS:
        i += 1
    return i


def _at_boundary(text: str, i: int) -> bool:
    return i >= len(text) or _IDENT.match(text, i) is None


def _word_op(text: str, i: int) -> tuple[str, int] | None:
    """Match a word operator at i; whitespace between its words is optional, like Calico."""
    for words in _WORD_OPS:
        j = i
        for k, word in enumerate(words):
            if k:
                j = _skip_ws(text, j)
            if not text.startswith(word, j):
                break
            j += len(word)
        else:
            if _at_boundary(text, j):
                return " ".join(words), j
    return None


def _label(text: str, i: int, what: str) -> tuple[str, int]:
    m = _IDENT.match(text, i)
    if m is None:
        raise SelectorError(text, i, f"expected {what}")
    if len(m.group()) > MAX_LABEL_LENGTH:
        raise SelectorError(text, i, f"label longer than {MAX_LABEL_LENGTH} characters")
    return m.group(), m.end()


def _close_call(text: str, i: int, name: str) -> int:
    i = _skip_ws(text, i)
    if not text.startswith(")", i):
        raise SelectorError(text, i, f"expected ')' to close {name}(")
    return i + 1


def _tokenize(text: str) -> list[_Tok]:
    toks: list[_Tok] = []
    n = len(text)
    i = _skip_ws(text, 0)
    while i < n:
        c = text[i]
        start = i
        if c in _PUNCT:
            toks.append(_Tok(_PUNCT[c], c, i))
            i += 1
        elif c in "'\"":
            end = text.find(c, i + 1)
            if end < 0:
                raise SelectorError(text, i, f"unterminated string literal (no closing {c})")
            toks.append(_Tok(_STRING, text[i + 1 : end], i))
            i = end + 1
        elif c in _DOUBLED:
            op = _DOUBLED[c]
            if not text.startswith(op, i):
                raise SelectorError(text, i, f"expected '{op}'")
            toks.append(_Tok(op, op, i))
            i += 2
        elif c == "!":
            op = "!=" if text.startswith("!=", i) else "!"
            toks.append(_Tok(op, op, i))
            i += len(op)
        elif toks and toks[-1].kind == _LABEL:
            # Calico's tokenizer is contextual: after a label only a word operator may follow.
            found = _word_op(text, i)
            if found is None:
                raise SelectorError(text, i, f"expected {_OP_HINT} after label {toks[-1].value!r}")
            toks.append(_Tok(found[0], found[0], i))
            i = found[1]
        elif text.startswith("has(", i):
            key, i = _label(text, _skip_ws(text, i + 4), "a label inside has()")
            i = _close_call(text, i, "has")
            toks.append(_Tok("has", key, start))
        elif text.startswith("all(", i):
            i = _close_call(text, i + 4, "all")
            toks.append(_Tok("all", "", start))
        elif text.startswith("global(", i):
            i = _close_call(text, i + 7, "global")
            toks.append(_Tok("global", "", start))
        elif _IDENT.match(text, i):
            key, i = _label(text, i, "a label")
            toks.append(_Tok(_LABEL, key, start))
        else:
            raise SelectorError(text, i, f"unexpected character {c!r}")
        i = _skip_ws(text, i)
    toks.append(_Tok(_EOF, "", n))
    return toks


# --- syntax tree ---------------------------------------------------------------------------
# Frozen so a cached Selector can be shared freely.


def _quote(value: str) -> str:
    # No escapes exist, so pick the quote the value does not contain (never both).
    return f"'{value}'" if '"' in value else f'"{value}"'


@dataclass(frozen=True, slots=True)
class _All:
    def ev(self, labels: Mapping[str, str]) -> bool:
        return True

    def render(self) -> str:
        return "all()"

    def prefixed(self, prefix: str) -> _Node:
        return self


@dataclass(frozen=True, slots=True)
class _Global:
    def ev(self, labels: Mapping[str, str]) -> bool:
        return True

    def render(self) -> str:
        return "global()"

    def prefixed(self, prefix: str) -> _Node:
        return self


@dataclass(frozen=True, slots=True)
class _Has:
    key: str

    def ev(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def render(self) -> str:
        return f"has({self.key})"

    def prefixed(self, prefix: str) -> _Node:
        return _Has(prefix + self.key)


def _op_eq(have: str, want: str) -> bool:
    return have == want


def _op_ne(have: str, want: str) -> bool:
    return have != want


_CMP_OPS: dict[str, Callable[[str, str], bool]] = {
    "==": _op_eq,
    "!=": _op_ne,
    "contains": str.__contains__,
    "starts with": str.startswith,
    "ends with": str.endswith,
}


@dataclass(frozen=True, slots=True)
class _Cmp:
    key: str
    op: str
    value: str

    def ev(self, labels: Mapping[str, str]) -> bool:
        if self.key not in labels:
            # An absent label satisfies only "!="; everything else needs it present.
            return self.op == "!="
        return _CMP_OPS[self.op](labels[self.key], self.value)

    def render(self) -> str:
        return f"{self.key} {self.op} {_quote(self.value)}"

    def prefixed(self, prefix: str) -> _Node:
        return _Cmp(prefix + self.key, self.op, self.value)


@dataclass(frozen=True, slots=True)
class _InSet:
    key: str
    values: frozenset[str]
    negated: bool

    def ev(self, labels: Mapping[str, str]) -> bool:
        if self.key not in labels:
            return self.negated
        return (labels[self.key] in self.values) != self.negated

    def render(self) -> str:
        members = ", ".join(_quote(v) for v in sorted(self.values))
        return f"{self.key} {'not in' if self.negated else 'in'} {{{members}}}"

    def prefixed(self, prefix: str) -> _Node:
        return _InSet(prefix + self.key, self.values, self.negated)


@dataclass(frozen=True, slots=True)
class _Not:
    operand: _Node

    def ev(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.ev(labels)

    def render(self) -> str:
        return "!" + self.operand.render()

    def prefixed(self, prefix: str) -> _Node:
        return _Not(self.operand.prefixed(prefix))


@dataclass(frozen=True, slots=True)
class _And:
    operands: tuple[_Node, ...]

    def ev(self, labels: Mapping[str, str]) -> bool:
        return all(op.ev(labels) for op in self.operands)

    def render(self) -> str:
        return "(" + " && ".join(op.render() for op in self.operands) + ")"

    def prefixed(self, prefix: str) -> _Node:
        return _And(tuple(op.prefixed(prefix) for op in self.operands))


@dataclass(frozen=True, slots=True)
class _Or:
    operands: tuple[_Node, ...]

    def ev(self, labels: Mapping[str, str]) -> bool:
        return any(op.ev(labels) for op in self.operands)

    def render(self) -> str:
        return "(" + " || ".join(op.render() for op in self.operands) + ")"

    def prefixed(self, prefix: str) -> _Node:
        return _Or(tuple(op.prefixed(prefix) for op in self.operands))


_Node = _All | _Global | _Has | _Cmp | _InSet | _Not | _And | _Or


def _negate(node: _Node) -> _Node:
    return node.operand if isinstance(node, _Not) else _Not(node)


def _walk(node: _Node) -> list[_Node]:
    out: list[_Node] = []
    stack = [node]
    while stack:
        n = stack.pop()
        out.append(n)
        if isinstance(n, _Not):
            stack.append(n.operand)
        elif isinstance(n, _And | _Or):
            stack.extend(n.operands)
    return out


_Matcher = Callable[[Mapping[str, str]], bool]


def _always(labels: Mapping[str, str]) -> bool:
    return True


def _compile(node: _Node) -> _Matcher:
    """A closure equivalent to `node.ev` (same result for every label map), built once."""
    if isinstance(node, _All | _Global):
        return _always
    if isinstance(node, _Has):
        key = node.key
        return lambda labels: key in labels
    if isinstance(node, _Cmp):
        key, want = node.key, node.value
        # `labels.get` gives None for an absent label: never == a str, always != one.
        if node.op == "==":
            return lambda labels: labels.get(key) == want
        if node.op == "!=":
            return lambda labels: labels.get(key) != want
        op = _CMP_OPS[node.op]
        return lambda labels: key in labels and op(labels[key], want)
    if isinstance(node, _InSet):
        key, values, negated = node.key, node.values, node.negated
        # None (absent) is never in a set of str: absent gives `negated`, as `ev` does.
        if negated:
            return lambda labels: labels.get(key) not in values
        return lambda labels: labels.get(key) in values
    if isinstance(node, _Not):
        inner = _compile(node.operand)
        return lambda labels: not inner(labels)
    parts = tuple(map(_compile, node.operands))
    if isinstance(node, _And):
        if len(parts) == 2:
            a, b = parts
            return lambda labels: a(labels) and b(labels)

        def conj(labels: Mapping[str, str]) -> bool:
            return all(p(labels) for p in parts)
        return conj
    if len(parts) == 2:
        a, b = parts
        return lambda labels: a(labels) or b(labels)

    def disj(labels: Mapping[str, str]) -> bool:
        return any(p(labels) for p in parts)
    return disj


def _conjuncts(node: _Node) -> list[_Node]:
    if isinstance(node, _And):
        return [c for op in node.operands for c in _conjuncts(op)]
    return [node]


# --- parser --------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, toks: list[_Tok]) -> None:
        self.text = text
        self.toks = toks
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != _EOF:
            self.i += 1
        return tok

    def fail(self, tok: _Tok, what: str) -> SelectorError:
        return SelectorError(self.text, tok.pos, f"expected {what}")

    def parse(self) -> _Node:
        if self.peek().kind == _EOF:
            return _All()
        node = self.or_expr(0)
        tok = self.peek()
        if tok.kind != _EOF:
            raise self.fail(tok, "'&&', '||' or end of selector")
        return node

    def or_expr(self, depth: int) -> _Node:
        ops = [self.and_expr(depth)]
        while self.peek().kind == "||":
            self.take()
            ops.append(self.and_expr(depth))
        return ops[0] if len(ops) == 1 else _Or(tuple(ops))

    def and_expr(self, depth: int) -> _Node:
        ops = [self.unary(depth)]
        while self.peek().kind == "&&":
            self.take()
            ops.append(self.unary(depth))
        return ops[0] if len(ops) == 1 else _And(tuple(ops))

    def unary(self, depth: int) -> _Node:
        negated = False
        while self.peek().kind == "!":
            self.take()
            negated = not negated
        node = self.primary(depth)
        return _negate(node) if negated else node

    def primary(self, depth: int) -> _Node:
        tok = self.take()
        kind = tok.kind
        if kind == "all":
            return _All()
        if kind == "global":
            return _Global()
        if kind == "has":
            return _Has(tok.value)
        if kind == "(":
            if depth >= MAX_NESTING:
                raise SelectorError(
                    self.text, tok.pos, f"parentheses nested deeper than {MAX_NESTING}"
                )
            node = self.or_expr(depth + 1)
            close = self.peek()
            if close.kind != ")":
                raise self.fail(close, "'&&', '||' or ')'")
            self.take()
            return node
        if kind == _LABEL:
            return self.comparison(tok.value)
        raise self.fail(tok, "a label, has(), all(), global(), '!' or '('")

    def comparison(self, key: str) -> _Node:
        op = self.take()
        if op.kind in _CMP_OPS:
            value = self.take()
            if value.kind != _STRING:
                raise self.fail(value, "a quoted string")
            return _Cmp(key, op.kind, value.value)
        if op.kind in ("in", "not in"):
            brace = self.take()
            if brace.kind != "{":
                raise self.fail(brace, "'{'")
            return _InSet(key, self.set_members(), op.kind == "not in")
        raise self.fail(op, f"{_OP_HINT} after label {key!r}")

    def set_members(self) -> frozenset[str]:
        # Calico accepts a trailing comma ({'a',}) but not a lone one ({,}).
        values: list[str] = []
        while True:
            tok = self.take()
            if tok.kind == "}":
                return frozenset(values)
            if tok.kind != _STRING:
                raise self.fail(tok, "a quoted string or '}'")
            values.append(tok.value)
            sep = self.take()
            if sep.kind == "}":
                return frozenset(values)
            if sep.kind != ",":
                raise self.fail(sep, "',' or '}'")


# --- public API ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, eq=False)
class Selector:
    """An immutable parsed selector. Equal (and hashed) by canonical form."""

    _root: _Node
    canonical: str = field(init=False)
    _keys: frozenset[str] = field(init=False)
    _uses_global: bool = field(init=False)
    _match: _Matcher = field(init=False)
    _required: tuple[tuple[str, str | None], ...] = field(init=False)

    def __post_init__(self) -> None:
        nodes = _walk(self._root)
        keys = frozenset(n.key for n in nodes if isinstance(n, _Has | _Cmp | _InSet))
        object.__setattr__(self, "canonical", self._root.render())
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_uses_global", any(isinstance(n, _Global) for n in nodes))
        object.__setattr__(self, "_match", _compile(self._root))
        required = tuple(dict.fromkeys(
            (n.key, n.value) if isinstance(n, _Cmp) else (n.key, None)
            for n in _conjuncts(self._root)
            if isinstance(n, _Has) or (isinstance(n, _Cmp) and n.op == "==")))
        object.__setattr__(self, "_required", required)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return self._match(labels)

    @property
    def required_labels(self) -> tuple[tuple[str, str | None], ...]:
        """Terms every match must satisfy: (key, value) for a top-level `key == "value"`
        conjunct, (key, None) for a top-level `has(key)`. Empty when there are none (the
        selector is then no conjunction containing such a term)."""
        return self._required

    def with_label_prefix(self, prefix: str) -> Selector:
        """Prefix every label key (e.g. "pcns." for namespace selectors)."""
        if prefix and _IDENT.fullmatch(prefix) is None:
            raise ValueError(f"label prefix {prefix!r} has characters not allowed in a label")
        if not prefix or not self._keys:
            return self
        return Selector(self._root.prefixed(prefix))

    @property
    def is_all(self) -> bool:
        return isinstance(self._root, _All)

    @property
    def is_global(self) -> bool:
        return isinstance(self._root, _Global)

    @property
    def uses_global(self) -> bool:
        return self._uses_global

    @property
    def unique_id(self) -> str:
        """Calico's selector UID: "s:" + unpadded base64url(SHA-224("s:" + canonical))."""
        digest = hashlib.sha224(("s:" + self.canonical).encode()).digest()
        return "s:" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def label_keys(self) -> frozenset[str]:
        return self._keys

    def __str__(self) -> str:
        return self.canonical

    def __repr__(self) -> str:
        return f"Selector({self.canonical!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selector):
            return NotImplemented
        return self.canonical == other.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)


@lru_cache(maxsize=16384)
def parse(text: str) -> Selector:
    """Parse a Calico selector; raises SelectorError. Results are cached and immutable."""
    if not isinstance(text, str):
        raise TypeError(f"selector must be a str, not {type(text).__name__}")
    return Selector(_Parser(text, _tokenize(text)).parse())


def matches(text: str, labels: Mapping[str, str]) -> bool:
    return parse(text).matches(labels)

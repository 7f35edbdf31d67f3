"""Calico selector grammar: matching, canonical form, prefixing, errors, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datastore.selector import (
    MAX_LABEL_LENGTH,
    MAX_NESTING,
    Selector,
    SelectorError,
    matches,
    parse,
)

# (selector, labels that match, labels that do not)
MATCH_CASES: list[tuple[str, list[dict[str, str]], list[dict[str, str]]]] = [
    ("a == 'b'", [{"a": "b"}, {"a": "b", "c": "d"}], [{}, {"a": "c"}, {"c": "b"}]),
    ('a == "b"', [{"a": "b"}], [{}, {"a": "B"}]),
    ("a == ''", [{"a": ""}], [{}, {"a": "x"}]),
    ("a != 'b'", [{}, {"a": "c"}, {"c": "b"}], [{"a": "b"}]),
    ('a != "b"', [{}, {"a": ""}], [{"a": "b"}]),
    ("a in {'x', \"y\"}", [{"a": "x"}, {"a": "y"}], [{}, {"a": "z"}, {"x": "x"}]),
    ("a in {}", [], [{}, {"a": ""}, {"a": "x"}]),
    ("a in {'x',}", [{"a": "x"}], [{"a": ""}]),
    ("a not in {'x', \"y\"}", [{}, {"a": "z"}], [{"a": "x"}, {"a": "y"}]),
    ("a not in {}", [{}, {"a": "x"}], []),
    ("a in {\"'\", '\"'}", [{"a": "'"}, {"a": '"'}], [{"a": "x"}]),
    ("has(a)", [{"a": ""}, {"a": "x"}], [{}, {"b": "a"}]),
    ("!has(a)", [{}, {"b": "a"}], [{"a": ""}]),
    ("a contains 'ell'", [{"a": "hello"}, {"a": "ell"}], [{}, {"a": "elo"}]),
    ('a contains ""', [{"a": ""}, {"a": "x"}], [{}]),
    ('a starts with "he"', [{"a": "hello"}], [{}, {"a": "ahe"}]),
    ("a starts with 'he'", [{"a": "he"}], [{"a": "h"}]),
    ("a ends with 'lo'", [{"a": "hello"}], [{}, {"a": "lol"}]),
    ('a ends with "lo"', [{"a": "lo"}], [{"a": "o"}]),
    ("all()", [{}, {"a": "b"}], []),
    ("", [{}, {"a": "b"}], []),
    (" \t ", [{}], []),
    ("global()", [{}, {"a": "b"}], []),
    ("!all()", [], [{}, {"a": "b"}]),
    # Negation of a comparison: absent labels flip to matching.
    ("!a == 'b'", [{}, {"a": "c"}], [{"a": "b"}]),
    ("!a in {'b'}", [{}, {"a": "c"}], [{"a": "b"}]),
    ("!a contains 'b'", [{}, {"a": "c"}], [{"a": "abc"}]),
    ("!a != 'b'", [{"a": "b"}], [{}, {"a": "c"}]),
    ("!a not in {'b'}", [{"a": "b"}], [{}, {"a": "c"}]),
    ("!!has(a)", [{"a": ""}], [{}]),
    ("!!!has(a)", [{}], [{"a": ""}]),
    ("! ! ! has(a)", [{}], [{"a": ""}]),
    ("!(!has(a))", [{"a": ""}], [{}]),
    # Precedence: ! > && > ||.
    ("has(a) || has(b) && has(c)", [{"a": ""}, {"b": "", "c": ""}], [{"b": ""}, {"c": ""}]),
    ("(has(a) || has(b)) && has(c)", [{"a": "", "c": ""}, {"b": "", "c": ""}], [{"a": ""}]),
    ("!has(a) && has(b)", [{"b": ""}], [{"a": "", "b": ""}, {}]),
    ("!(has(a) && has(b))", [{}, {"a": ""}, {"b": ""}], [{"a": "", "b": ""}]),
    ("!has(a) || has(b)", [{}, {"a": "", "b": ""}], [{"a": ""}]),
    ("!(!has(a) || has(b))", [{"a": ""}], [{}, {"a": "", "b": ""}]),
    ("a == 'x' && b == 'y' || c == 'z'", [{"a": "x", "b": "y"}, {"c": "z"}], [{"a": "x"}]),
    ("a == 'x' && (b == 'y' || c == 'z')", [{"a": "x", "c": "z"}], [{"c": "z"}]),
    # Multi-word operator spacing and word-boundary rules (as Calico's tokenizer).
    ("a not\t \tin {'x'}", [{"a": "y"}], [{"a": "x"}]),
    ("a notin {'x'}", [{"a": "y"}], [{"a": "x"}]),
    ("a startswith 'x'", [{"a": "xy"}], [{"a": "yx"}]),
    ("a starts   with 'x'", [{"a": "xy"}], [{"a": "yx"}]),
    ("a endswith 'x'", [{"a": "yx"}], [{"a": "xy"}]),
    ("a ends \t with 'x'", [{"a": "yx"}], [{"a": "xy"}]),
    ("a contains'x'", [{"a": "yxy"}], [{"a": "y"}]),
    ("a in{'x'}", [{"a": "x"}], [{"a": "y"}]),
    ("a=='x'&&b!='y'", [{"a": "x"}], [{"a": "x", "b": "y"}]),
    ("has( a )", [{"a": ""}], [{}]),
    ("all( )", [{}], []),
    ("\tglobal(\t)\t", [{}], []),
    # Label keys with dots, slashes, dashes, underscores, leading digits.
    (
        "projectcalico.org/namespace == 'default'",
        [{"projectcalico.org/namespace": "default"}],
        [{"projectcalico.org/namespace": "kube-system"}],
    ),
    (
        "pcns.kubernetes.io/metadata.name in {'a-b', 'c_d'}",
        [{"pcns.kubernetes.io/metadata.name": "a-b"}],
        [{"kubernetes.io/metadata.name": "a-b"}],
    ),
    ("has(app.kubernetes.io/part-of)", [{"app.kubernetes.io/part-of": "x"}], [{}]),
    ("9-_./x == 'v'", [{"9-_./x": "v"}], [{}]),
    # Keywords are only keywords in position: these are plain labels.
    ("in == 'x'", [{"in": "x"}], [{}]),
    ("not in {'x'}", [{"not": "x"}], [{"in": "x"}]),
    ("has == 'x' && all != 'y'", [{"has": "x"}], [{"has": "x", "all": "y"}]),
    # String contents are opaque: operators, braces and the other quote are just characters.
    ("a == '&& || ! ( ) { } \" =='", [{"a": '&& || ! ( ) { } " =='}], [{}]),
    ('a == "it\'s"', [{"a": "it's"}], [{"a": "its"}]),
    ("a == 'tab\there'", [{"a": "tab\there"}], [{}]),
]


@pytest.mark.parametrize(("text", "good", "bad"), MATCH_CASES)
def test_matching(text: str, good: list[dict[str, str]], bad: list[dict[str, str]]) -> None:
    sel = parse(text)
    again = parse(sel.canonical)
    for labels in good:
        assert sel.matches(labels), labels
        assert again.matches(labels), labels
        assert matches(text, labels)
    for labels in bad:
        assert not sel.matches(labels), labels
        assert not again.matches(labels), labels
        assert not matches(text, labels)


CANONICAL_CASES: list[tuple[str, str]] = [
    ("", "all()"),
    ("   ", "all()"),
    (" all() ", "all()"),
    (" (all() )", "all()"),
    ("((global()))", "global()"),
    ("a=='x'", 'a == "x"'),
    ('a == "x"', 'a == "x"'),
    ("(a == 'x')", 'a == "x"'),
    ("a == '\"'", "a == '\"'"),
    ('a == "\'"', 'a == "\'"'),
    ("a!='\"'", "a != '\"'"),
    ("a contains 'x'", 'a contains "x"'),
    ("a startswith 'x'", 'a starts with "x"'),
    ("a ends\twith 'x'", 'a ends with "x"'),
    ("a notin {'x'}", 'a not in {"x"}'),
    ("a in {}", "a in {}"),
    ("a in {'d', 'a', \"b\", 'a',}", 'a in {"a", "b", "d"}'),
    ("a in {'\"', \"'\"}", "a in {'\"', \"'\"}"),
    ("has( a )", "has(a)"),
    ("! has(a)", "!has(a)"),
    ("!!has(a)", "has(a)"),
    ("!!!has(a)", "!has(a)"),
    ("!(!has(a))", "has(a)"),
    ("!(k == 'v')", '!k == "v"'),
    ("has(a) && has(b)", "(has(a) && has(b))"),
    ("has(b) && has(a)", "(has(b) && has(a))"),  # operand order is kept
    ("has(a) || has(b) && has(c)", "(has(a) || (has(b) && has(c)))"),
    ("(has(a) || has(b)) && has(c)", "((has(a) || has(b)) && has(c))"),
    ("has(a) && (has(b) && has(c))", "(has(a) && (has(b) && has(c)))"),
    ("! (has( b)||! has(a ))", "!(has(b) || !has(a))"),
    ('! (a == "b"&&! c != "d")', '!(a == "b" && !c != "d")'),
    (
        "!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))",
        '!(!((k == "v" && has(t)) || all()) && a in {"b", "c"})',
    ),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL_CASES)
def test_canonical_form_and_round_trip(text: str, canonical: str) -> None:
    sel = parse(text)
    assert sel.canonical == canonical
    assert str(sel) == canonical
    assert parse(canonical).canonical == canonical
    assert parse(canonical) == sel
    assert hash(parse(canonical)) == hash(sel)


@pytest.mark.parametrize(
    "spellings",
    [
        ["a=='x'", 'a == "x"', "(a == 'x')", "((a=='x'))", "!!a == 'x'", "!(!(a == 'x'))"],
        ["a in {'y','x'}", 'a in {"x", "y", "x"}', "a in {'x', 'y',}"],
        ["a not in {}", "a notin{}", "a not \t in {}"],
        ["", " ", "all()", "(all())", "\tall( )"],
    ],
)
def test_equivalent_spellings_share_canonical(spellings: list[str]) -> None:
    assert len({parse(s).canonical for s in spellings}) == 1


# Calico's own test vectors for Selector.UniqueID().
@pytest.mark.parametrize(
    ("text", "uid"),
    [
        ("", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
        (" (all() )", "s:5y5I3VdRZfDU01O--xXAPx2yxCQQqMf0M6IWug"),
        ("! (has( b)||! has(a ))", "s:Iss0uCleLYv1GSv_pNm7hAO58kE9jAx1NKyG3Q"),
        ('! (a == "b"&&! c != "d")', "s:lh3haoY1ikTRkd4UZu0nWSaIBknYLPJLX16d-w"),
    ],
)
def test_unique_id_matches_calico(text: str, uid: str) -> None:
    assert parse(text).unique_id == uid


@pytest.mark.parametrize(
    ("text", "prefix", "expected"),
    [
        ("k == 'v'", "visited/", 'visited/k == "v"'),
        ("k != 'v'", "pcns.", 'pcns.k != "v"'),
        ("k contains 'v'", "pcns.", 'pcns.k contains "v"'),
        ("k starts with 'v'", "pcns.", 'pcns.k starts with "v"'),
        ("k ends with 'v'", "pcns.", 'pcns.k ends with "v"'),
        ("k in {'v'}", "pcsa.", 'pcsa.k in {"v"}'),
        ("k not in {'v'}", "pcsa.", 'pcsa.k not in {"v"}'),
        ("has(k)", "pcsa.", "has(pcsa.k)"),
        ("!has(k)", "pcsa.", "!has(pcsa.k)"),
        ("k == 'v' || has(x)", "pcns.", '(pcns.k == "v" || has(pcns.x))'),
        (
            "kubernetes.io/metadata.name == 'prod' && !has(x)",
            "pcns.",
            '(pcns.kubernetes.io/metadata.name == "prod" && !has(pcns.x))',
        ),
        (
            "!(!(k == 'v' && has(t) || all()) && (a in {'b', 'c'}))",
            "visited/",
            '!(!((visited/k == "v" && has(visited/t)) || all()) && visited/a in {"b", "c"})',
        ),
        ("all()", "pcns.", "all()"),
        ("", "pcns.", "all()"),
        ("global()", "pcns.", "global()"),
        ("has(k)", "", "has(k)"),
    ],
)
def test_with_label_prefix(text: str, prefix: str, expected: str) -> None:
    sel = parse(text)
    out = sel.with_label_prefix(prefix)
    assert out.canonical == expected
    assert parse(expected) == out
    assert sel.canonical == parse(text).canonical  # original untouched


def test_with_label_prefix_semantics_and_flags() -> None:
    sel = parse("kubernetes.io/metadata.name == 'prod'").with_label_prefix("pcns.")
    assert sel.matches({"pcns.kubernetes.io/metadata.name": "prod"})
    assert not sel.matches({"kubernetes.io/metadata.name": "prod"})
    assert sel.label_keys() == frozenset({"pcns.kubernetes.io/metadata.name"})
    assert parse("all()").with_label_prefix("pcns.").is_all
    assert parse("global()").with_label_prefix("pcns.").is_global


@pytest.mark.parametrize("prefix", ["pc ns.", "pcns:", "é.", "a'"])
def test_with_label_prefix_rejects_bad_prefix(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        parse("has(a)").with_label_prefix(prefix)


@pytest.mark.parametrize(
    ("text", "is_all", "is_global", "uses_global"),
    [
        ("", True, False, False),
        ("all()", True, False, False),
        ("(all())", True, False, False),
        ("all() && all()", False, False, False),
        ("!all()", False, False, False),
        ("global()", False, True, True),
        ("(global())", False, True, True),
        ("!global()", False, False, True),
        ("has(a) || global()", False, False, True),
        ("has(global)", False, False, False),
        ("global == 'x'", False, False, False),
    ],
)
def test_flags(text: str, is_all: bool, is_global: bool, uses_global: bool) -> None:
    sel = parse(text)
    assert (sel.is_all, sel.is_global, sel.uses_global) == (is_all, is_global, uses_global)


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("", set()),
        ("global()", set()),
        ("a == 'x' && (has(b) || !c in {'y'}) && d not in {} && a != 'z'", {"a", "b", "c", "d"}),
        ("x contains 'a' || y starts with 'b' || z ends with 'c'", {"x", "y", "z"}),
        ("projectcalico.org/namespace == 'n'", {"projectcalico.org/namespace"}),
    ],
)
def test_label_keys(text: str, keys: set[str]) -> None:
    assert parse(text).label_keys() == frozenset(keys)


def test_parse_is_cached_and_selector_immutable() -> None:
    sel = parse("a == 'x'")
    assert parse("a == 'x'") is sel
    assert isinstance(sel, Selector)
    with pytest.raises(AttributeError):
        sel.canonical = "all()"  # type: ignore[misc]
    assert repr(sel) == "Selector('a == \"x\"')"
    assert {sel, parse('a=="x"')} == {sel}
    assert sel != "a == 'x'"


def test_label_length_limit() -> None:
    key = "k" * MAX_LABEL_LENGTH
    assert parse(f"has({key})").matches({key: ""})
    with pytest.raises(SelectorError) as err:
        parse(f"a == 'x' || {key}k == 'x'")
    assert err.value.position == 12
    with pytest.raises(SelectorError):
        parse(f"has({key}k)")


def test_nesting_limit() -> None:
    ok = "(" * MAX_NESTING + "has(a)" + ")" * MAX_NESTING
    assert parse(ok).canonical == "has(a)"
    deep = "(" * (MAX_NESTING + 1) + "has(a)" + ")" * (MAX_NESTING + 1)
    with pytest.raises(SelectorError) as err:
        parse(deep)
    assert err.value.position == MAX_NESTING
    with pytest.raises(SelectorError):
        parse("!(" * 5000)


def test_long_flat_expressions() -> None:
    text = " && ".join(f"has(k{i})" for i in range(3000))
    sel = parse(text)
    assert sel.matches({f"k{i}": "" for i in range(3000)})
    assert parse(sel.canonical) == sel
    assert parse("!" * 10001 + "has(a)").canonical == "!has(a)"


# (text, position, fragment of the message naming what was expected)
ERROR_CASES: list[tuple[str, int, str]] = [
    ("a == ", 5, "expected a quoted string"),
    ("a ==", 4, "expected a quoted string"),
    ("a == b", 5, "expected a quoted string"),
    ("'b' == b", 0, "expected a label"),
    ("a == 'x", 5, "unterminated string"),
    ('a == "x', 5, "unterminated string"),
    ("a == \"x'", 5, "unterminated string"),
    ("a", 1, "expected an operator"),
    ("a ", 2, "expected an operator"),
    ("a b", 2, "expected an operator"),
    ("a 'x'", 2, "expected an operator"),
    ("a has(b)", 2, "expected an operator"),
    ("a containsx 'y'", 2, "expected an operator"),
    ("a in-x {}", 2, "expected an operator"),
    ("a not inx {}", 2, "expected an operator"),
    ("a IN {}", 2, "expected an operator"),
    ("a\n== 'x'", 1, "expected an operator"),
    ("has (a)", 4, "expected an operator"),
    ("a = 'x'", 2, "expected '=='"),
    ("has(a) & has(b)", 7, "expected '&&'"),
    ("has(a) | has(b)", 7, "expected '||'"),
    ("!", 1, "expected a label"),
    ("&& has(a)", 0, "expected a label"),
    ("has(a) &&", 9, "expected a label"),
    ("has(a) || ", 10, "expected a label"),
    ("a == 'b' && %", 12, "unexpected character '%'"),
    ("%", 0, "unexpected character '%'"),
    ("\n", 0, "unexpected character '\\n'"),
    ("has(a) && \u00e9 == 'x'", 10, "unexpected character"),
    ("(", 1, "expected a label"),
    ("()", 1, "expected a label"),
    (")", 0, "expected a label"),
    ("(has(a)", 7, "')'"),
    ("(has(a) has(b))", 8, "')'"),
    ("has(a))", 6, "end of selector"),
    ("has(a) has(b)", 7, "end of selector"),
    ("a == 'x' b", 9, "end of selector"),
    ("a == 'x' 'y'", 9, "end of selector"),
    ("a in {'x'", 9, "expected ',' or '}'"),
    ("a in {'x' 'y'}", 10, "expected ',' or '}'"),
    ("a in {,}", 6, "expected a quoted string or '}'"),
    ("a in {'x',,}", 10, "expected a quoted string or '}'"),
    ("a in {x}", 6, "expected a quoted string or '}'"),
    ("a in 'x'", 5, "expected '{'"),
    ("a not in", 8, "expected '{'"),
    ("has(", 4, "expected a label inside has()"),
    ("has()", 4, "expected a label inside has()"),
    ("has('a')", 4, "expected a label inside has()"),
    ("has(a", 5, "expected ')' to close has("),
    ("has(a b)", 6, "expected ')' to close has("),
    ("all(", 4, "expected ')' to close all("),
    ("all(x)", 4, "expected ')' to close all("),
    ("global(", 7, "expected ')' to close global("),
    ("a != ||", 5, "expected a quoted string"),
    ('foo in {"", ||', 12, "expected a quoted string or '}'"),
    ("!= 'x'", 0, "expected a label"),
]


@pytest.mark.parametrize(("text", "position", "fragment"), ERROR_CASES)
def test_errors(text: str, position: int, fragment: str) -> None:
    with pytest.raises(SelectorError) as err:
        parse(text)
    exc = err.value
    assert isinstance(exc, ValueError)
    assert exc.text == text
    assert exc.position == position
    message = str(exc)
    assert fragment in message
    assert message.endswith(f"at position {position}")
    assert message.startswith("invalid selector ")


def test_error_message_format() -> None:
    with pytest.raises(SelectorError) as err:
        parse("a == ")
    assert str(err.value) == 'invalid selector "a == ": expected a quoted string at position 5'


def test_non_string_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        parse(42)  # type: ignore[arg-type]


# --- fuzzing -------------------------------------------------------------------------------

_SEL_CHARS = "ab.=!&|(){}'\", \tinotsarwhecldg\n%"


def _check_any_text(text: str) -> None:
    try:
        sel = parse(text)
    except SelectorError as exc:
        assert 0 <= exc.position <= len(text)
        return
    canon = sel.canonical
    assert parse(canon).canonical == canon


@settings(max_examples=500)
@given(st.text())
def test_fuzz_arbitrary_text_only_raises_selector_error(text: str) -> None:
    _check_any_text(text)


@settings(max_examples=1500)
@given(st.text(alphabet=_SEL_CHARS, max_size=40))
def test_fuzz_selector_alphabet_only_raises_selector_error(text: str) -> None:
    _check_any_text(text)


_keys = st.sampled_from(["a", "b", "pcns.x/y-z", "has", "in"])
_values = st.sampled_from(["", "v", "w", "it's", 'say "hi"', "v w"])
_ws = st.sampled_from(["", " ", "  ", "\t", " \t "])


def _lit(value: str, single: bool) -> str:
    if "'" in value:
        return f'"{value}"'
    if '"' in value or single:
        return f"'{value}'"
    return f'"{value}"'


@st.composite
def _leaf(draw: st.DrawFn) -> str:
    key = draw(_keys)
    sp = draw(_ws)
    kind = draw(st.integers(0, 8))
    if kind == 0:
        return f"has({sp}{key}{sp})"
    if kind == 1:
        return draw(st.sampled_from(["all()", "global()", "all( )"]))
    if kind in (2, 3):
        vals = draw(st.lists(_values, max_size=3))
        body = ",".join(draw(_ws) + _lit(v, draw(st.booleans())) + draw(_ws) for v in vals)
        op = "in" if kind == 2 else draw(st.sampled_from(["not in", "notin", "not\tin"]))
        return f"{key} {op}{sp}{{{body}}}"
    op = draw(st.sampled_from(["==", "!=", "contains", "starts with", "endswith", "ends  with"]))
    lit = _lit(draw(_values), draw(st.booleans()))
    return f"{key}{' ' if op[0].isalpha() else sp}{op}{sp}{lit}"


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from(["&&", "||"]), children, _ws).map(
            lambda t: f"{t[0]}{t[3]}{t[1]}{t[3]}{t[2]}"
        ),
        st.tuples(st.sampled_from(["!", "!!", "! ", "!!!"]), children).map(
            lambda t: f"{t[0]}({t[1]})"
        ),
        children.map(lambda c: f"( {c} )"),
    )


_selectors = st.recursive(_leaf(), _combine, max_leaves=12)
_label_sets = st.dictionaries(_keys, _values, max_size=5)


@settings(max_examples=400)
@given(_selectors, st.lists(_label_sets, min_size=1, max_size=5))
def test_fuzz_generated_selectors_round_trip(text: str, label_sets: list[dict[str, str]]) -> None:
    sel = parse(text)
    canon = sel.canonical
    again = parse(canon)
    assert again.canonical == canon
    for labels in label_sets:
        assert again.matches(labels) == sel.matches(labels)
    prefixed = sel.with_label_prefix("pcns.")
    assert parse(prefixed.canonical) == prefixed
    for labels in label_sets:
        moved = {f"pcns.{k}": v for k, v in labels.items()}
        assert prefixed.matches(moved) == sel.matches(labels)

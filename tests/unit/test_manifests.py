"""Manifest files as calicoctl and kubectl users write them."""

from __future__ import annotations

import pytest

from ctl.manifests import ManifestError, parse_manifests

NS = '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}'


def test_yaml_documents() -> None:
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\n" \
           "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n"
    assert [o["metadata"]["name"] for o in parse_manifests(text)] == ["a", "b"]


def test_json_object_array_and_list_kind() -> None:
    assert len(parse_manifests(NS)) == 1
    assert len(parse_manifests(f"[{NS}, {NS}]")) == 2
    listed = f'{{"apiVersion": "v1", "kind": "List", "items": [{NS}, {NS}]}}'
    assert len(parse_manifests(listed)) == 2


def test_json_documents_separated_like_yaml() -> None:
    assert len(parse_manifests(f"{NS}\n---\n{NS}\n")) == 2


@pytest.mark.parametrize(("text", "needle"), [
    ('{"kind": "Namespace",, }', "invalid JSON at line 1"),
    ("kind: [Namespace\n", "invalid YAML at line 2"),
    ("- 1\n- 2\n", "a document must be a mapping, not int"),
])
def test_errors_name_the_place(text: str, needle: str) -> None:
    with pytest.raises(ManifestError, match=r"f\.yaml: ") as e:
        parse_manifests(text, "f.yaml")
    assert needle in str(e.value)

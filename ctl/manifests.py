"""Reading manifests the way calicoctl and kubectl do: multi-document YAML or JSON, `-` = stdin."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from datastore.errors import InputError


class ManifestError(InputError):
    pass


def parse_manifests(text: str, source: str = "<input>") -> list[dict[str, Any]]:
    """All objects in a text: YAML documents, a JSON object or array, or a `kind: List`."""
    try:
        docs = _load(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: "
                            f"{e.msg}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"{source}: invalid YAML{where}: {problem}") from e
    objs: list[dict[str, Any]] = []
    for doc in docs:
        objs.extend(_flatten(doc, source))
    return objs


def _load(text: str) -> list[Any]:
    """JSON when it parses as JSON; otherwise YAML, which also covers JSON documents separated
    by `---`. A text that looks like JSON and is neither reports the JSON error."""
    if text.lstrip().startswith(("{", "[")):
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as json_error:
            try:
                return list(yaml.safe_load_all(text))
            except yaml.YAMLError:
                raise json_error from None
    return list(yaml.safe_load_all(text))


def _flatten(doc: Any, source: str) -> list[dict[str, Any]]:
    if doc is None:
        return []
    if isinstance(doc, list):
        return [o for d in doc for o in _flatten(d, source)]
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: a document must be a mapping, not {type(doc).__name__}")
    if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
        return [o for d in doc["items"] for o in _flatten(d, source)]
    return [doc]


def read_manifests(filename: str, recursive: bool = False) -> list[dict[str, Any]]:
    """Objects from a file, a directory (its .yaml/.yml/.json files) or `-` for stdin."""
    if filename == "-":
        return parse_manifests(sys.stdin.read(), "<stdin>")
    path = Path(filename)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in path.glob(pattern)
                       if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
        return [o for f in files for o in parse_manifests(f.read_text(), str(f))]
    try:
        text = path.read_text()
    except OSError as e:
        raise ManifestError(f"cannot read {filename}: {e.strerror}") from e
    return parse_manifests(text, filename)

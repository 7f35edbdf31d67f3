"""Pieces of the previous rendering, reused while their inputs are the same (pure).

The renderer is a function of the PolicyIndex and the config; most of what it produces for a
sync (policy chains, endpoint chains, IP sets) depends on inputs that did not change since the
last one. `RenderCache.get(key, make)` returns what `make()` returned for an equal key in this or
the previous rendering; `get_for(obj, key, make)` also requires the very same `obj` (a compiled
policy, a set's members), which it holds so its id cannot be reused. Keys must name every input
`make` reads. An entry the latest rendering did not use is dropped, so the cache holds one
rendering's worth. Reused objects are the same objects, which the dataplane's reconcilers also
recognise by identity.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

_T = TypeVar("_T")
_MISSING = object()


class RenderCache:
    def __init__(self) -> None:
        self._now: dict[Hashable, Any] = {}
        self._before: dict[Hashable, Any] = {}

    def start(self) -> None:
        """A rendering begins: what the previous one made is reusable for this one only."""
        self._before, self._now = self._now, {}

    def get(self, key: Hashable, make: Callable[[], _T]) -> _T:
        value = self._now.get(key, _MISSING)
        if value is _MISSING:
            value = self._before.get(key, _MISSING)
            if value is _MISSING:
                value = make()
            self._now[key] = value
        return value  # type: ignore[return-value]

    def get_for(self, obj: object, key: Hashable, make: Callable[[], _T]) -> _T:
        """As `get`, keyed by `obj`'s identity too."""
        full = (id(obj), key)
        entry = self._now.get(full)
        if entry is None or entry[0] is not obj:
            entry = self._before.get(full)
            if entry is None or entry[0] is not obj:
                entry = (obj, make())
            self._now[full] = entry
        return entry[1]  # type: ignore[no-any-return]

    @property
    def size(self) -> int:  # not __len__: an empty cache must not be falsy
        return len(self._now)

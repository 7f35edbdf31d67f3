"""Errors shared by validation and conversion (pure)."""

from __future__ import annotations


class TabbyError(Exception):
    """Any error meant for a person: front ends print str() as one line and exit non-zero."""


class InputError(TabbyError, ValueError):
    """Something a user gave (a file, a flag, a manifest) is wrong; str() says what and where.
    Front ends print it as one line; every module's input errors derive from it."""


class ValidationError(InputError):
    """An object was rejected. Each problem names the field path and the reason.

    str() is one line a person can act on, e.g.
    `NetworkPolicy default/web: spec.ingress[0].destination.ports[1]: 70000 is out of range`.
    """

    def __init__(self, problems: list[tuple[str, str]], subject: str = "") -> None:
        self.problems = list(problems)
        self.subject = subject
        super().__init__(self._render())

    def _render(self) -> str:
        body = "; ".join(f"{path}: {reason}" if path else reason for path, reason in self.problems)
        return f"{self.subject}: {body}" if self.subject else body

    def with_subject(self, subject: str) -> ValidationError:
        return ValidationError(self.problems, subject)


class Problems:
    """Collects (path, reason) pairs while walking an object; raise() if any were found."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, reason: str) -> None:
        self.items.append((path, reason))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, subject: str = "") -> None:
        if self.items:
            raise ValidationError(self.items, subject)

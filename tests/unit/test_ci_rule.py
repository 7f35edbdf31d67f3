"""Under CI=true a missing binary or missing root fails the test instead of skipping it."""

from __future__ import annotations

import pytest

from tests import conftest


def test_missing_binary_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_binary("tabby-no-such-binary")


def test_missing_binary_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI requires it"):
        conftest.require_binary("tabby-no-such-binary")


def test_present_binary_is_returned() -> None:
    assert conftest.require_binary("sh").endswith("/sh")

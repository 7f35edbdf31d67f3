"""Shared fixtures: a real etcd per test module (or per test when a test breaks it).

Tests that need something this machine may lack call `require_binary()` / `require_root()`.
Outside CI they skip; under `CI=true` a missing binary or missing root is a failure, so CI can
never go green by skipping.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.etcd_server import EtcdServer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI requires it: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"missing binary {name!r} (run ./install.sh)")
    return path  # type: ignore[return-value]


def require_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("etcd"):
        require_binary("etcd")
    if item.get_closest_marker("root") or item.get_closest_marker("netns"):
        require_root()
        if item.get_closest_marker("netns"):
            require_binary("ip")


@contextmanager
def running_etcd(workdir: Path) -> Iterator[EtcdServer]:
    """An etcd on a free loopback port; stopped (by its pid) and removed even on failure."""
    require_binary("etcd")
    server = EtcdServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the whole module; tests keep to their own key prefixes or wipe it."""
    with running_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def fresh_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A private etcd for a test that restarts, compacts or otherwise breaks it."""
    with running_etcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
def make_ns() -> Iterator[Callable[[], str]]:
    """Creates network namespaces tabby-t-<random>-<n> with lo up; all are deleted afterwards,
    even on failure. Tests do all their networking inside these, never in the root namespace."""
    require_root()
    require_binary("ip")
    tag = secrets.token_hex(3)
    made: list[str] = []

    def make() -> str:
        name = f"tabby-t-{tag}-{len(made)}"
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                       capture_output=True)
        return name

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

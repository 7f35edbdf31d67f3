"""A lab's name, directory, lock and state file.

Everything a lab writes on disk lives under its directory (`/run/tabby-lab/<lab>/` unless
`--state-dir` says otherwise), and `state.json` lists every namespace and process it made. Each
is recorded *before* it is created, so a crash at any point leaves nothing `lab down` cannot find.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lab import LabError
from lab.netns import PREFIX

DEFAULT_BASE = Path("/run/tabby-lab")
DEFAULT_NAME = "default"
# no '-': the namespace prefix of one lab must never be a prefix of another lab's
NAME_RE = re.compile(r"^[a-z0-9]{1,20}$")
LOCK_TIMEOUT = 120.0

State = dict[str, Any]


class Lab:
    def __init__(self, name: str = DEFAULT_NAME, base: str | Path | None = None) -> None:
        if not NAME_RE.fullmatch(name):
            raise LabError(f"lab name {name!r}: use 1-20 lowercase letters and digits")
        self.name = name
        self.base = Path(base) if base else DEFAULT_BASE
        self.dir = self.base / name

    @property
    def prefix(self) -> str:
        """Every namespace of this lab starts with it."""
        return f"{PREFIX}{self.name}-"

    def ns(self, role: str) -> str:
        return self.prefix + role

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def lock_path(self) -> Path:
        return self.dir / "lock"

    def load(self) -> State | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise LabError(f"{self.state_path}: unreadable ({e}); `lab down` still cleans up "
                           "by namespace name") from e

    def require(self) -> State:
        state = self.load()
        if state is None:
            raise LabError(f"no lab {self.name!r} (no {self.state_path}); run `tabbyctl lab up`")
        return state

    def save(self, state: State) -> None:
        """Atomic replace: a reader (or a crash) sees the old or the new state, never half."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(f".tmp.{os.getpid()}")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.state_path)

    @contextmanager
    def locked(self, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
        """One writer of the state at a time (pod adds may run in parallel). flock dies with
        its holder, so a crashed command never leaves the lab locked."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LabError(f"lab {self.name!r} is busy (lock {self.lock_path} held "
                                       f"for {timeout:g} s)") from None
                    time.sleep(0.05)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)


def labs(base: str | Path | None = None) -> list[str]:
    """Labs that have a directory under `base`."""
    root = Path(base) if base else DEFAULT_BASE
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name))
    except FileNotFoundError:
        return []

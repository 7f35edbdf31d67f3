"""Running the dataplane tools (iptables-restore, ipset, ...) as subprocesses.

One small seam: the reconcilers never call subprocess directly, so tests (and a future
per-namespace agent) pass a Runner that prefixes every command, e.g. with `nsenter --net=`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_TIMEOUT = 30.0


class CommandError(RuntimeError):
    """A dataplane tool failed; carries its stderr, which names the offending line."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        status = "timed out" if returncode is None else f"exited {returncode}"
        super().__init__(f"{' '.join(self.argv)} {status}: {self.stderr or '(no stderr)'}")


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs one command with optional stdin and a timeout; `prefix` is prepended to argv."""

    def __init__(self, prefix: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT) -> None:
        self.prefix = tuple(prefix)
        self.timeout = timeout

    @classmethod
    def in_netns(cls, name: str, timeout: float = DEFAULT_TIMEOUT) -> Runner:
        """Every command runs in the named netns (/run/netns/<name>); cheaper than
        `ip netns exec`, which also remounts /sys."""
        return cls(("nsenter", f"--net=/run/netns/{name}", "--"), timeout)

    def run(self, argv: Sequence[str], *, stdin: str | None = None, check: bool = True,
            timeout: float | None = None) -> Result:
        full = [*self.prefix, *argv]
        try:
            proc = subprocess.run(full, input=stdin, capture_output=True, text=True,
                                  timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise CommandError(full, None, str(exc.stderr or "")) from exc
        except FileNotFoundError as exc:
            raise CommandError(full, 127, str(exc)) from exc
        if check and proc.returncode != 0:
            raise CommandError(full, proc.returncode, proc.stderr)
        return Result(proc.returncode, proc.stdout, proc.stderr)

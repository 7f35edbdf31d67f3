"""`python -m cni.fallback`: the `tabby` plugin run in-process, for when tabby-node's socket is
absent or does not answer. The shim execs it with the runtime's environment and stdin; it
prints what tabby-node would have answered and exits with the same code.

Runtimes probe VERSION before every operation (podman does), so a valid VERSION is answered
from the CNI spec module alone, before the handler's netlink and etcd imports (~0.3 s).
"""

from __future__ import annotations

import os
import sys


def _version_only() -> int | None:
    """Answer a well-formed VERSION cheaply; None hands anything else to the full handler."""
    if os.environ.get("CNI_COMMAND") != "VERSION":
        return None
    from cni import spec

    data = b"" if sys.stdin.isatty() else sys.stdin.buffer.read()
    try:
        req = spec.read_request(os.environ, data)
    except spec.CNIError:
        sys.stdin = open(os.devnull)  # noqa: SIM115 - the handler re-reads; errors are its job
        return _full(data)
    sys.stdout.write(spec.render(spec.version_result(req.version)))
    return 0


def _full(stdin: bytes | None = None) -> int:
    from cni.handler import run_in_process

    return run_in_process(stdin=stdin)


if __name__ == "__main__":
    answered = _version_only()
    sys.exit(answered if answered is not None else _full())

"""Exec'ing another IPAM plugin from CNI_PATH, as Calico does for `host-local` (libcni's
`invoke.DelegateAdd/Del/Check`).

The delegate gets the main plugin's own environment with CNI_COMMAND set, and the same netconf
on stdin; its stdout is its result or its error. Its error keeps its code and is prefixed with
its name so the runtime's log says who failed. Every exec is bounded in time; a delegate that
does not answer is killed.

`ipam.type` `tabby-ipam` or `calico-ipam` is never exec'd: the handler runs Tabby's allocator
in-process (`is_in_process`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from cni import spec
from cni.netconf import IN_PROCESS_IPAM
from cni.spec import CNIError

TIMEOUT = 20.0  # one delegate exec


def is_in_process(ipam_type: str) -> bool:
    return ipam_type in IN_PROCESS_IPAM


def find_plugin(name: str, paths: Sequence[str]) -> str:
    """The executable `name` in the CNI_PATH directories, in order (libcni FindInPath)."""
    if not name or "/" in name:
        raise CNIError(spec.INVALID_CONFIG, f"invalid IPAM plugin type {name!r}",
                       "ipam.type names an executable in CNI_PATH, e.g. host-local")
    for directory in paths:
        path = os.path.join(directory, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    where = ", ".join(paths) or "(CNI_PATH is empty)"
    raise CNIError(spec.INVALID_CONFIG, f"IPAM plugin {name} not found in CNI_PATH {where}",
                   f"install {name} into one of those directories or fix ipam.type")


async def run(command: str, plugin: str, stdin: bytes, environ: Mapping[str, str],
              paths: Sequence[str], timeout: float = TIMEOUT) -> dict[str, Any] | None:
    """Exec `plugin` with `command`; its JSON output (None when it printed nothing)."""
    path = find_plugin(plugin, paths)
    env = {k: v for k, v in environ.items() if isinstance(v, str)}
    env["CNI_COMMAND"] = command
    env.setdefault("CNI_PATH", ":".join(paths))
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    proc = await asyncio.create_subprocess_exec(
        path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except BaseException:  # a timeout or a cancelled request: never leave the child behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 2.0)
        raise
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise _error(plugin, command, proc.returncode, text, err.decode(errors="replace"))
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise CNIError(spec.DECODING_FAILURE, f"IPAM plugin {plugin} {command} printed something "
                       f"that is not JSON: {text[:200]!r}") from None
    return value if isinstance(value, dict) else None


def _error(plugin: str, command: str, rc: int | None, out: str, err: str) -> CNIError:
    with contextlib.suppress(ValueError, AttributeError):
        raw = json.loads(out)
        if isinstance(raw.get("code"), int):
            return CNIError(raw["code"], f"IPAM plugin {plugin}: {raw.get('msg', '')}",
                            str(raw.get("details", "")))
    tail = (err.strip() or out).splitlines()[-1:] or [""]
    return CNIError(spec.INTERNAL, f"IPAM plugin {plugin} {command} failed (exit {rc})",
                    tail[0][:500])


async def add(plugin: str, stdin: bytes, environ: Mapping[str, str], paths: Sequence[str],
              version: str) -> dict[str, Any]:
    """The delegate's ADD result in the internal 1.x shape; code 6 when it gives none."""
    raw = await run(spec.ADD, plugin, stdin, environ, paths)
    if raw is None:
        raise CNIError(spec.DECODING_FAILURE, f"IPAM plugin {plugin} ADD printed no result")
    result = spec.parse_result(raw, version)
    if not result["ips"]:
        raise CNIError(spec.INVALID_CONFIG, f"IPAM plugin {plugin} assigned no address",
                       "check its ranges in the ipam section")
    return result


async def delete(plugin: str, stdin: bytes, environ: Mapping[str, str],
                 paths: Sequence[str]) -> None:
    await run(spec.DEL, plugin, stdin, environ, paths)


async def check(plugin: str, stdin: bytes, environ: Mapping[str, str],
                paths: Sequence[str]) -> None:
    await run(spec.CHECK, plugin, stdin, environ, paths)

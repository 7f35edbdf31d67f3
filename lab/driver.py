"""A small CNI runtime with libcni's semantics, to exec a node's installed conflist as kubelet's
runtime would.

Per plugin: inject `name` + `cniVersion`, `prevResult` (previous plugin's result on ADD; the
cached result on CHECK and on DEL from 0.4.0), `runtimeConfig` limited to the plugin's
`capabilities`; ADD and CHECK in order, DEL in reverse; the ADD result is cached per
(network, container, ifname) in libcni's cache format. Plugins run with `nsenter --net=` into the
node's namespace, so their host side lands there and never in the root namespace.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import LabError

EXEC_TIMEOUT = 60.0  # a runtime bounds each plugin exec the same way
CONF_SUFFIXES = (".conf", ".conflist", ".json")


class CNIError(LabError):
    def __init__(self, plugin: str, command: str, rc: int, stdout: str, stderr: str) -> None:
        self.plugin, self.command, self.rc = plugin, command, rc
        self.stdout, self.stderr = stdout, stderr
        try:
            err = json.loads(stdout)
            detail = f"code {err.get('code')}: {err.get('msg')}"
            if err.get("details"):
                detail += f" ({err['details']})"
        except ValueError:
            detail = (stdout.strip() or stderr.strip() or "no output")[-500:]
        super().__init__(f"CNI {command} failed in plugin {plugin} (exit {rc}): {detail}")


@dataclass(frozen=True)
class Runtime:
    """Where and how plugins run: the node's netns name, CNI_PATH, extra env, the result cache."""

    host_netns: str
    cni_path: tuple[str, ...]
    cache_dir: Path
    env: Mapping[str, str] = field(default_factory=dict)
    timeout: float = EXEC_TIMEOUT


@dataclass(frozen=True)
class Attachment:
    container_id: str
    netns: str  # path, e.g. /run/netns/tabby-lab-x-pod-default-web
    ifname: str = "eth0"
    args: tuple[tuple[str, str], ...] = ()  # CNI_ARGS pairs
    capability_args: Mapping[str, Any] = field(default_factory=dict)  # runtimeConfig by capability


def load_conflist(net_dir: Path) -> dict[str, Any]:
    """The first network config in lexical order, as libcni picks it (a .conf is wrapped)."""
    files = sorted(p for p in net_dir.iterdir() if p.suffix in CONF_SUFFIXES and p.is_file())
    if not files:
        raise LabError(f"no CNI network config in {net_dir}")
    conf = json.loads(files[0].read_text())
    if "plugins" not in conf:
        conf = {"cniVersion": conf.get("cniVersion", "0.2.0"), "name": conf["name"],
                "plugins": [conf]}
    return conf


def find_plugin(kind: str, cni_path: Sequence[str]) -> str:
    for d in cni_path:
        candidate = os.path.join(d, kind)
        if os.access(candidate, os.X_OK):
            return candidate
    raise LabError(f"CNI plugin {kind!r} not found in {':'.join(cni_path)}")


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def plugin_conf(plugin: Mapping[str, Any], netconf: Mapping[str, Any], prev: Any,
                capability_args: Mapping[str, Any]) -> dict[str, Any]:
    conf = dict(plugin, name=netconf["name"], cniVersion=netconf["cniVersion"])
    if prev is not None:
        conf["prevResult"] = prev
    caps = {k: capability_args[k] for k, on in (plugin.get("capabilities") or {}).items()
            if on and k in capability_args}
    if caps:
        conf["runtimeConfig"] = caps
    return conf


def exec_plugin(rt: Runtime, command: str, conf: Mapping[str, Any], att: Attachment) -> Any:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **rt.env, "CNI_COMMAND": command,
           "CNI_CONTAINERID": att.container_id, "CNI_NETNS": att.netns,
           "CNI_IFNAME": att.ifname, "CNI_PATH": ":".join(rt.cni_path),
           "CNI_ARGS": ";".join(f"{k}={v}" for k, v in att.args)}
    exe = find_plugin(conf["type"], rt.cni_path)
    argv = ["nsenter", f"--net=/run/netns/{rt.host_netns}", exe]
    try:
        p = subprocess.run(argv, input=json.dumps(conf).encode(), env=env,
                           capture_output=True, timeout=rt.timeout)
    except subprocess.TimeoutExpired as e:
        raise CNIError(conf["type"], command, -1, "", f"timed out after {rt.timeout:g} s") from e
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if p.returncode != 0:
        raise CNIError(conf["type"], command, p.returncode, out, err)
    if command != "ADD" or not out.strip():
        return None
    try:
        return json.loads(out)
    except ValueError as e:
        raise CNIError(conf["type"], command, 0, out, f"result is not JSON: {e}") from e


def cache_path(rt: Runtime, netconf: Mapping[str, Any], att: Attachment) -> Path:
    return rt.cache_dir / "results" / f"{netconf['name']}-{att.container_id}-{att.ifname}"


def add(rt: Runtime, netconf: Mapping[str, Any], att: Attachment) -> Any:
    """ADD every plugin in order; the last result is cached and returned."""
    prev = None
    for plugin in netconf["plugins"]:
        conf = plugin_conf(plugin, netconf, prev, att.capability_args)
        result = exec_plugin(rt, "ADD", conf, att)
        prev = result if result is not None else prev
    _write_cache(rt, netconf, att, prev)
    return prev


def cached(rt: Runtime, netconf: Mapping[str, Any], att: Attachment) -> dict[str, Any] | None:
    try:
        return json.loads(cache_path(rt, netconf, att).read_text())
    except (OSError, ValueError):
        return None


def delete(rt: Runtime, netconf: Mapping[str, Any], att: Attachment) -> None:
    """DEL every plugin in reverse order with the cached result; then drop the cache entry."""
    entry = cached(rt, netconf, att)
    prev = entry.get("result") if entry else None
    with_prev = _version_tuple(netconf["cniVersion"]) >= (0, 4, 0)
    for plugin in reversed(netconf["plugins"]):
        conf = plugin_conf(plugin, netconf, prev if with_prev else None, att.capability_args)
        exec_plugin(rt, "DEL", conf, att)
    cache_path(rt, netconf, att).unlink(missing_ok=True)


def check(rt: Runtime, netconf: Mapping[str, Any], att: Attachment) -> None:
    entry = cached(rt, netconf, att)
    if entry is None:
        raise LabError(f"no cached result for {att.container_id}: nothing to CHECK")
    for plugin in netconf["plugins"]:
        exec_plugin(rt, "CHECK", plugin_conf(plugin, netconf, entry["result"],
                                             att.capability_args), att)


def _write_cache(rt: Runtime, netconf: Mapping[str, Any], att: Attachment, result: Any) -> None:
    path = cache_path(rt, netconf, att)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "kind": "cniCacheV1",
        "containerId": att.container_id,
        "ifName": att.ifname,
        "networkName": netconf["name"],
        "config": base64.b64encode(json.dumps(netconf).encode()).decode(),
        "cniArgs": [list(a) for a in att.args],
        "capabilityArgs": dict(att.capability_args),
        "result": result,
        "cachedAt": time.time(),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)

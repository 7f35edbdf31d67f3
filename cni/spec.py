"""The CNI specification (1.1.0 and the versions before it) as plain data and pure functions.

Standard library only: the `tabby` shim imports this module on every exec, so it must load in a
millisecond and pull in nothing of Tabby's.

What is here, each as the spec (github.com/containernetworking/cni SPEC.md, CONVENTIONS.md) and
libcni's reference code define it:

- versions: SUPPORTED_VERSIONS, parse_version, negotiate, check_version, version_result;
- errors: the reserved codes as constants, CNIError(code, msg, details).to_json();
- results: convert_result between the 0.1.0/0.2.0, 0.3.x/0.4.0 and 1.x shapes, parse_result;
- CNI_ARGS: parse_cni_args -> CniArgs (K8S_POD_*, IgnoreUnknown, IP);
- a whole invocation: read_request(environ, stdin) -> Request, with the spec's code for every
  way the environment or the config can be wrong.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
from collections import namedtuple
from types import MappingProxyType

# typing and dataclasses cost the shim ~12 ms per exec (dataclasses pulls in inspect); the
# records below are namedtuples and the annotations are never evaluated
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection, Iterable, Mapping
    from typing import Any

# -- versions ---------------------------------------------------------------------------------

CURRENT_VERSION = "1.1.0"
SUPPORTED_VERSIONS: tuple[str, ...] = (
    "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0",
)
UNVERSIONED = "0.1.0"  # a config without cniVersion is 0.1.0 (libcni DecodeVersion)

ADD, DEL, CHECK, GC, STATUS, VERSION = "ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION"
COMMANDS: tuple[str, ...] = (ADD, DEL, CHECK, GC, STATUS, VERSION)

# the oldest config version in which each command exists (older configs cannot ask for it)
COMMAND_SINCE = {CHECK: "0.4.0", GC: "1.1.0", STATUS: "1.1.0"}

# -- error codes (SPEC.md "Error"; 0-99 reserved, 100+ free for plugins) ----------------------

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51
INTERNAL = 999  # libcni's ErrInternal: an error the plugin did not classify

# Tabby's own codes. They live here so the shim, the daemon and tabby-ipam agree on them.
POOL_EXHAUSTED = 100
NO_MATCHING_POOL = 101
ADDRESS_IN_USE = 102
NOT_IN_POOL = 103
ALLOCATION_MISSING = 104
PLUMBING_FAILED = 110       # ADD could not plumb the pod, or CHECK found it changed
ENDPOINT_MISSING = 111      # CHECK found no WorkloadEndpoint for the container

ERROR_NAMES = {
    INCOMPATIBLE_VERSION: "Incompatible CNI version",
    UNSUPPORTED_FIELD: "Unsupported field in network configuration",
    UNKNOWN_CONTAINER: "Container unknown or does not exist",
    INVALID_ENVIRONMENT: "Invalid necessary environment variables",
    IO_FAILURE: "I/O failure",
    DECODING_FAILURE: "Failed to decode content",
    INVALID_CONFIG: "Invalid network config",
    TRY_AGAIN_LATER: "Try again later",
    NOT_AVAILABLE: "The plugin is not available",
    LIMITED_CONNECTIVITY: "The plugin is not available; existing containers may have "
    "limited connectivity",
    POOL_EXHAUSTED: "IP pool exhausted",
    NO_MATCHING_POOL: "No matching IP pool",
    ADDRESS_IN_USE: "Address in use",
    NOT_IN_POOL: "Address not in any IP pool",
    ALLOCATION_MISSING: "Allocation missing",
    INTERNAL: "Internal error",
}


class CNIError(Exception):
    """A failure reported to the runtime as the spec's error result on stdout."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        self.code = code
        self.msg = msg
        self.details = details
        super().__init__(f"{msg}; {details}" if details else msg)

    def to_json(self, cni_version: str = CURRENT_VERSION) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


_VERSION_RE = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?$")


def parse_version(text: str) -> tuple[int, int, int]:
    """`1.0.0` -> (1, 0, 0); the empty string is 0.1.0 as in libcni."""
    if text == "":
        return (0, 1, 0)
    m = _VERSION_RE.match(text)
    if m is None:
        raise CNIError(DECODING_FAILURE, f"invalid CNI version {text!r}",
                       "expected a semantic version such as 1.0.0")
    return (int(m[1]), int(m[2] or 0), int(m[3] or 0))


def version_at_least(version: str, other: str) -> bool:
    return parse_version(version) >= parse_version(other)


def check_version(version: str, supported: Collection[str] = SUPPORTED_VERSIONS) -> None:
    """Code 1 unless `version` is one this plugin speaks (exact match, as libcni's Reconciler)."""
    if version not in supported:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            "incompatible CNI versions",
            f"config is {version!r}, plugin supports {', '.join(supported)}; "
            "set cniVersion in the network config to one of them",
        )


def negotiate(config_versions: Iterable[str],
              supported: Collection[str] = SUPPORTED_VERSIONS) -> str:
    """The highest version both sides support (a conflist's cniVersion + cniVersions)."""
    offered = list(config_versions)
    common = [v for v in offered if v in supported]
    if not common:
        check_version(max(offered, key=parse_version, default=""), supported)
    return max(common, key=parse_version)


def peek_version(stdin: bytes) -> str:
    """The config's cniVersion for error output, when it names one Tabby supports."""
    with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
        version = json.loads(stdin).get("cniVersion")
        if version in SUPPORTED_VERSIONS:
            return str(version)
    return CURRENT_VERSION


def render(obj: Mapping[str, Any]) -> str:
    """How Tabby's plugins print a result or an error (indented JSON, newline-terminated)."""
    return json.dumps(obj, indent=4) + "\n"


def version_result(requested: str | None = None,
                   supported: Collection[str] = SUPPORTED_VERSIONS) -> dict[str, Any]:
    """The VERSION command's output; cniVersion echoes the input's, as the spec says."""
    return {"cniVersion": requested or CURRENT_VERSION, "supportedVersions": list(supported)}


# -- results ----------------------------------------------------------------------------------
#
# Internally a result is the 1.x shape: {"cniVersion", "interfaces", "ips": [{"address",
# "gateway", "interface"}], "routes", "dns"}. 0.3.x/0.4.0 add ips[].version and know fewer
# interface fields; 0.1.0/0.2.0 have one ip4 and one ip6 with their routes inside.

_IFACE_FIELDS_04 = ("name", "mac", "sandbox")
_DNS_FIELDS = ("nameservers", "domain", "search", "options")


def _family(address: str) -> int:
    try:
        return ipaddress.ip_interface(address).version
    except ValueError:
        raise CNIError(DECODING_FAILURE, f"invalid result: {address!r} is not an address "
                       "in CIDR notation") from None


def _shape(version: str) -> str:
    parse_version(version)
    if version in ("0.1.0", "0.2.0"):
        return "02"
    if version in ("0.3.0", "0.3.1", "0.4.0"):
        return "04"
    if version in ("1.0.0", "1.1.0"):
        return "1x"
    raise CNIError(INCOMPATIBLE_VERSION, f"unsupported CNI result version {version!r}",
                   f"supported: {', '.join(SUPPORTED_VERSIONS)}")


def parse_result(raw: Any, default_version: str = CURRENT_VERSION) -> dict[str, Any]:
    """Any version's result (e.g. a prevResult) in the internal 1.x shape.

    A result without cniVersion is taken to be in `default_version` (libcni injects the
    config's version into prevResult the same way). Code 6 when it is malformed.
    """
    if not isinstance(raw, dict):
        raise CNIError(DECODING_FAILURE, "invalid result: expected a JSON object")
    version = raw.get("cniVersion") or default_version
    if not isinstance(version, str):
        raise CNIError(DECODING_FAILURE, "invalid result: cniVersion must be a string")
    shape = _shape(version)
    out: dict[str, Any] = {"cniVersion": version, "interfaces": [], "ips": [], "routes": [],
                           "dns": _dns(raw.get("dns"))}
    if shape == "02":
        for key in ("ip4", "ip6"):
            conf = raw.get(key)
            if conf is None:
                continue
            if not isinstance(conf, dict) or not isinstance(conf.get("ip"), str):
                raise CNIError(DECODING_FAILURE, f"invalid result: {key}.ip is missing")
            _family(conf["ip"])
            ip: dict[str, Any] = {"address": conf["ip"]}
            if conf.get("gateway"):
                ip["gateway"] = conf["gateway"]
            out["ips"].append(ip)
            out["routes"].extend(_routes(conf.get("routes")))
        return out
    for iface in _list(raw, "interfaces"):
        if not isinstance(iface, dict) or not isinstance(iface.get("name"), str):
            raise CNIError(DECODING_FAILURE, "invalid result: every interface needs a name")
        out["interfaces"].append(dict(iface))
    for ipc in _list(raw, "ips"):
        if not isinstance(ipc, dict) or not isinstance(ipc.get("address"), str):
            raise CNIError(DECODING_FAILURE, "invalid result: every ips entry needs an address")
        _family(ipc["address"])
        out["ips"].append({k: v for k, v in ipc.items() if k != "version"})
    out["routes"] = _routes(raw.get("routes"))
    return out


def convert_result(result: Mapping[str, Any], to_version: str) -> dict[str, Any]:
    """A result in the JSON shape of `to_version` (libcni's converters, as its types print)."""
    r = parse_result(dict(result))
    shape = _shape(to_version)
    if shape == "02":
        return _to_02(r, to_version)
    out: dict[str, Any] = {"cniVersion": to_version}
    if shape == "04":
        ifaces = [{k: i[k] for k in _IFACE_FIELDS_04 if i.get(k)} for i in r["interfaces"]]
        ips = [{"version": str(_family(ip["address"])), **ip} for ip in r["ips"]]
    else:
        ifaces, ips = r["interfaces"], r["ips"]
    if ifaces:
        out["interfaces"] = ifaces
    if ips:
        out["ips"] = ips
    if r["routes"]:
        out["routes"] = r["routes"]
    if r["dns"] or shape == "04":  # 0.4.0's Go type always prints dns, 1.x omits it when empty
        out["dns"] = r["dns"]
    return out


def _to_02(r: Mapping[str, Any], version: str) -> dict[str, Any]:
    out: dict[str, Any] = {"cniVersion": version}
    for ip in r["ips"]:  # only the first address of each family fits
        key = "ip4" if _family(ip["address"]) == 4 else "ip6"
        if key not in out:
            out[key] = {"ip": ip["address"], **({"gateway": ip["gateway"]}
                                                 if ip.get("gateway") else {})}
    if "ip4" not in out and "ip6" not in out:
        raise CNIError(INCOMPATIBLE_VERSION, f"cannot express this result in CNI {version}",
                       "0.1.0 and 0.2.0 results need at least one IP address")
    for route in r["routes"]:
        key = "ip4" if _family(route["dst"]) == 4 else "ip6"
        if key in out:
            out[key].setdefault("routes", []).append(
                {k: route[k] for k in ("dst", "gw") if k in route})
    out["dns"] = r["dns"]
    return out


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise CNIError(DECODING_FAILURE, f"invalid result: {key} must be a list")
    return value


def _routes(raw: Any) -> list[dict[str, Any]]:
    routes = _list({"routes": raw}, "routes")
    for route in routes:
        if not isinstance(route, dict) or not isinstance(route.get("dst"), str):
            raise CNIError(DECODING_FAILURE, "invalid result: every route needs a dst")
        _family(route["dst"])
    return [dict(r) for r in routes]


def _dns(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CNIError(DECODING_FAILURE, "invalid result: dns must be an object")
    return {k: raw[k] for k in _DNS_FIELDS if raw.get(k)}


# -- CNI_ARGS ---------------------------------------------------------------------------------

K8S_ARGS: tuple[str, ...] = (
    "K8S_POD_NAMESPACE", "K8S_POD_NAME", "K8S_POD_INFRA_CONTAINER_ID", "K8S_POD_UID",
)
IGNORE_UNKNOWN = "IgnoreUnknown"


_EMPTY: Mapping[str, Any] = MappingProxyType({})


class CniArgs(namedtuple("CniArgs", ["pairs"], defaults=[_EMPTY])):
    """CNI_ARGS as key -> value (`pairs`); keys are case-sensitive as in libcni."""

    __slots__ = ()
    pairs: Mapping[str, str]

    def get(self, key: str) -> str:
        return self.pairs.get(key, "")

    @property
    def pod_namespace(self) -> str:
        return self.get("K8S_POD_NAMESPACE")

    @property
    def pod_name(self) -> str:
        return self.get("K8S_POD_NAME")

    @property
    def infra_container_id(self) -> str:
        return self.get("K8S_POD_INFRA_CONTAINER_ID")

    @property
    def is_k8s(self) -> bool:
        """Both namespace and name given: Calico's test for the k8s orchestrator."""
        return bool(self.pod_namespace and self.pod_name)

    @property
    def ignore_unknown(self) -> bool:
        value = self.get(IGNORE_UNKNOWN).lower()
        if value in ("", "0", "false"):
            return False
        if value in ("1", "true"):
            return True
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS: IgnoreUnknown={self.get(IGNORE_UNKNOWN)!r}"
                       " is not a boolean", "use IgnoreUnknown=1 or IgnoreUnknown=true")

    @property
    def ips(self) -> tuple[str, ...]:
        """`IP=` (host-local's convention: a comma list of ip[/prefix])."""
        return tuple(p.strip() for p in self.get("IP").split(",") if p.strip())

    def require_known(self, known: Collection[str]) -> None:
        """Code 4 for keys the plugin does not know, unless IgnoreUnknown is set (libcni)."""
        ignore = self.ignore_unknown  # a malformed IgnoreUnknown is an error either way
        unknown = sorted(k for k in self.pairs if k not in known and k != IGNORE_UNKNOWN)
        if unknown and not ignore:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS: unknown args {', '.join(unknown)}",
                           "add IgnoreUnknown=1 to CNI_ARGS to let plugins skip what they "
                           "do not use")


def parse_cni_args(text: str) -> CniArgs:
    """`K=V;K2=V2` -> CniArgs; code 4 for a pair without `=` or with an empty key."""
    pairs: dict[str, str] = {}
    for pair in text.split(";"):
        if not pair:
            continue  # tolerate a trailing or doubled separator
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS: invalid pair {pair!r}",
                           "CNI_ARGS must be KEY=VALUE pairs separated by semicolons")
        pairs[key] = value
    return CniArgs(pairs)


# -- the invocation -----------------------------------------------------------------------------

# which variables each command requires (SPEC.md section 2)
REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    ADD: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    DEL: ("CNI_CONTAINERID", "CNI_IFNAME"),
    CHECK: ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    GC: ("CNI_PATH",),
    STATUS: (),
    VERSION: (),
}
_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")  # container IDs and network names
MAX_IFNAME = 15


_REQUEST_FIELDS = ("command", "container_id", "netns", "ifname", "args", "path", "config",
                   "version")


class Request(namedtuple("Request", _REQUEST_FIELDS,
                         defaults=["", "", "", CniArgs(), (), _EMPTY, CURRENT_VERSION])):
    """One plugin invocation: the CNI_* environment and the decoded config from stdin.

    `version` is the config's cniVersion: results and errors are given in it.
    """

    __slots__ = ()
    command: str
    container_id: str
    netns: str
    ifname: str
    args: CniArgs
    path: tuple[str, ...]
    config: Mapping[str, Any]
    version: str

    @property
    def name(self) -> str:
        return str(self.config.get("name", ""))

    @property
    def runtime_config(self) -> Mapping[str, Any]:
        rc = self.config.get("runtimeConfig")
        return rc if isinstance(rc, dict) else {}

    @property
    def prev_result(self) -> dict[str, Any] | None:
        """prevResult in the internal 1.x shape, or None when the runtime sent none."""
        raw = self.config.get("prevResult")
        if raw in (None, {}):
            return None
        try:
            return parse_result(raw, self.version)
        except CNIError as e:
            raise CNIError(DECODING_FAILURE, f"could not parse prevResult: {e.msg}",
                           e.details) from None

    @property
    def valid_attachments(self) -> list[tuple[str, str]]:
        """GC's `cni.dev/valid-attachments` as (containerID, ifname) pairs."""
        raw = self.config.get("cni.dev/valid-attachments") or []
        if not isinstance(raw, list) or not all(isinstance(a, dict) for a in raw):
            raise CNIError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list of "
                           "{containerID, ifname} objects")
        return [(str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in raw]


def read_request(environ: Mapping[str, str], stdin: bytes) -> Request:
    """Validate the environment and the config the way the spec and libcni's skel do.

    Order: CNI_COMMAND and the variables it needs (code 4), then the config: JSON (6), name (7),
    cniVersion (1), and whether that version has the command at all (1). VERSION needs nothing
    but the command; its stdin is read for cniVersion only.
    """
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        what = "is not set" if not command else f"={command!r} is not a CNI command"
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_COMMAND {what}",
                       f"set CNI_COMMAND to one of {', '.join(COMMANDS)}")
    if command == VERSION:
        return Request(command, version=_version_probe(stdin))
    missing = [v for v in REQUIRED_ENV[command] if not environ.get(v)]
    if missing:
        raise CNIError(INVALID_ENVIRONMENT,
                       f"required environment variables {', '.join(missing)} missing",
                       f"CNI_COMMAND={command} needs {', '.join(REQUIRED_ENV[command])}")
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    if container_id and not _NAME_RE.match(container_id):
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID={container_id!r} is invalid",
                       "it must start with a letter or digit, followed by letters, digits, "
                       "_ . or -")
    if ifname:
        _check_ifname(ifname)
    config = decode_config(stdin)
    version = config_version(config)
    since = COMMAND_SINCE.get(command)
    if since and not version_at_least(version, since):
        raise CNIError(INCOMPATIBLE_VERSION, f"config version {version} does not allow {command}",
                       f"{command} needs cniVersion {since} or later")
    return Request(
        command=command,
        container_id=container_id,
        netns=environ.get("CNI_NETNS", ""),
        ifname=ifname,
        args=parse_cni_args(environ.get("CNI_ARGS", "")),
        path=tuple(p for p in environ.get("CNI_PATH", "").split(":") if p),
        config=config,
        version=version,
    )


def decode_config(stdin: bytes) -> dict[str, Any]:
    """The plugin config from stdin: a JSON object (6) with a valid name (7)."""
    try:
        config = json.loads(stdin)
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(DECODING_FAILURE, f"error decoding the network config from stdin: {e}",
                       "the runtime must pass the plugin config as one JSON object") from None
    if not isinstance(config, dict):
        raise CNIError(DECODING_FAILURE, "the network config on stdin is not a JSON object")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CNIError(INVALID_CONFIG, "missing network name",
                       'set "name" in the network config')
    if not _NAME_RE.match(name):
        raise CNIError(INVALID_CONFIG, f"invalid characters in network name {name!r}",
                       "use letters, digits, _ . and - (starting with a letter or digit)")
    return config


def config_version(config: Mapping[str, Any]) -> str:
    """The config's cniVersion, checked against SUPPORTED_VERSIONS (code 1)."""
    version = config.get("cniVersion", "")
    if not isinstance(version, str):
        raise CNIError(DECODING_FAILURE, "cniVersion must be a string")
    version = version or UNVERSIONED
    parse_version(version)
    check_version(version)
    return version


def _version_probe(stdin: bytes) -> str:
    """VERSION's input cniVersion; a probe with no or odd input still gets an answer."""
    try:
        raw = json.loads(stdin) if stdin.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return CURRENT_VERSION
    version = raw.get("cniVersion") if isinstance(raw, dict) else None
    return version if isinstance(version, str) and version else CURRENT_VERSION


def _check_ifname(ifname: str) -> None:
    problem = None
    if len(ifname) > MAX_IFNAME:
        problem = f"is longer than {MAX_IFNAME} characters"
    elif ifname in (".", ".."):
        problem = "is . or .."
    elif any(c in "/:" or c.isspace() for c in ifname):
        problem = "contains / or : or whitespace"
    if problem:
        raise CNIError(INVALID_ENVIRONMENT, f"CNI_IFNAME={ifname!r} {problem}",
                       "use a Linux interface name such as eth0")

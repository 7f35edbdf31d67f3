"""The `tabby` main plugin's netconf: Calico's `calico` plugin fields as one frozen record.

Pure, apart from `config_from_netconf` checking that the etcd certificate files it names exist.
Every problem is a CNI error with code 7 (INVALID_CONFIG) naming the field and what to write.

Fields read (Calico's names, `cni-plugin/pkg/types/types.go`):

- `name`, `type`, `cniVersion`;
- `datastore_type`: `etcdv3` (or absent); `kubernetes` is refused, Tabby keeps its data in etcd;
- `etcd_endpoints`, `etcd_ca_cert_file`, `etcd_cert_file`, `etcd_key_file`, and the older
  `etcd_scheme` + `etcd_authority` used when `etcd_endpoints` is absent; `etcd_discovery_srv` is
  refused (list the members instead);
- `nodename`, `nodename_file` (default `/var/lib/calico/nodename`), `nodename_file_optional`,
  `hostname`: the node is the first of nodename, the file's content, hostname, the OS's name;
- `mtu`: the pod MTU; 0 or absent means: the number in `/var/lib/calico/mtu` (as Calico; the
  routing agent writes it: the uplink's MTU minus the overhead of the encapsulation the IPPools
  use), else (`require_mtu_file` false, the default) the MTU of the host's default-route
  interface minus `mtu_overhead` (Tabby's field, default 0). Tabby's `mtu_file` field names
  another file (the lab gives each node its own);
- `ipam`: `{type, ...}`; `tabby-ipam` or `calico-ipam` means Tabby's allocator in-process, its
  fields as tabby-ipam reads them (`assign_ipv4`, `ipv4_pools`, ...); any other type is an IPAM
  plugin exec'd from CNI_PATH with this same netconf (e.g. Debian's `host-local`);
- `log_level`, `log_file_path`;
- `container_settings.allow_ip_forwarding`: the pod's `net.ipv4.ip_forward`;
- `feature_control.ip_addrs_no_ipam`: allow the Pod annotation
  `cni.projectcalico.org/ipAddrsNoIpam` (addresses given without IPAM; off by default, as in
  Calico, since it lets a pod claim any address); `feature_control.floating_ips` is accepted
  but Tabby has no floating IPs (an ADD asking for them is refused);
- `policy.type` (kept for reference: Tabby always reads Pods from its store).

Not a netconf field but part of it as Calico has it: the host veth prefix, the first entry of
`FELIX_INTERFACEPREFIX` in the environment (default `cali`).

Unknown fields are ignored, as Calico does (chained plugins' conflists carry many).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cni import spec
from cni.ipam_plugin import NODENAME_FILE, PluginConf, parse_conf
from cni.spec import CNIError
from datastore.config import DATASTORE_ETCD, ConfigError, EtcdConfig, config_from_netconf

IN_PROCESS_IPAM = ("tabby-ipam", "calico-ipam")
DEFAULT_PREFIX = "cali"
MAX_IFNAME = 15
VETH_HASH_LEN = 11  # cali + 11 hex digits of sha1("<ns>.<pod>")
MIN_MTU, MAX_MTU = 68, 65535
DEFAULT_MTU_FILE = "/var/lib/calico/mtu"  # written by the routing agent (bgp.mtu), as Felix does


@dataclass(frozen=True)
class NetConf:
    name: str
    cni_version: str
    type: str
    etcd: EtcdConfig
    ipam: Mapping[str, Any]  # the raw `ipam` section (a delegated plugin reads it itself)
    ipam_conf: PluginConf  # tabby-ipam's reading of it; also nodename/log fields
    datastore_type: str = DATASTORE_ETCD
    nodename_file_optional: bool = False
    mtu: int = 0  # 0 = from mtu_file, else detected from the host's uplink
    mtu_overhead: int = 0
    mtu_file: str = DEFAULT_MTU_FILE
    require_mtu_file: bool = False
    allow_ip_forwarding: bool = False
    ip_addrs_no_ipam: bool = False  # feature_control: the ipAddrsNoIpam annotation is allowed
    interface_prefix: str = DEFAULT_PREFIX
    policy_type: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ipam_type(self) -> str:
        return str(self.ipam.get("type", ""))

    @property
    def in_process_ipam(self) -> bool:
        return self.ipam_type in IN_PROCESS_IPAM

    @property
    def log_level(self) -> int:
        return self.ipam_conf.log_level

    @property
    def log_file_path(self) -> str:
        return self.ipam_conf.log_file_path

    @property
    def nodename_file(self) -> str:
        return self.ipam_conf.nodename_file


def parse_netconf(config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> NetConf:
    """The netconf as the plugin uses it; code 7 naming the field for anything malformed.

    `config` is what `spec.read_request` decoded (a dict with a valid name); `environ` is where
    FELIX_INTERFACEPREFIX is looked up.
    """
    ipam = config.get("ipam")
    if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
        raise _bad("ipam", "must be an object with a type",
                   'e.g. "ipam": {"type": "tabby-ipam"} or {"type": "host-local", ...}')
    in_process = ipam["type"] in IN_PROCESS_IPAM
    # a delegated plugin's section has its own fields (host-local's routes may carry mtu...)
    ipam_conf = parse_conf(config if in_process else {**config, "ipam": {}})
    settings = config.get("container_settings")
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise _bad("container_settings", "must be an object",
                   '{"allow_ip_forwarding": true}')
    features = config.get("feature_control")
    features = {} if features is None else features
    if not isinstance(features, dict):
        raise _bad("feature_control", "must be an object", '{"ip_addrs_no_ipam": true}')
    _flag(features, "floating_ips", "feature_control.")  # well-formed, though not supported
    policy = config.get("policy")
    policy = {} if policy is None else policy
    if not isinstance(policy, dict):
        raise _bad("policy", "must be an object", '{"type": "k8s"}')
    return NetConf(
        name=str(config["name"]),
        cni_version=str(config.get("cniVersion") or spec.UNVERSIONED),
        type=_text(config, "type"),
        datastore_type=_datastore_type(config),
        etcd=_etcd(config),
        ipam=dict(ipam),
        ipam_conf=ipam_conf,
        nodename_file_optional=_flag(config, "nodename_file_optional"),
        mtu=_mtu(config),
        mtu_overhead=_int(config, "mtu_overhead", 0, 0, 1000),
        mtu_file=_text(config, "mtu_file") or DEFAULT_MTU_FILE,
        require_mtu_file=_flag(config, "require_mtu_file"),
        allow_ip_forwarding=_flag(settings, "allow_ip_forwarding", "container_settings."),
        ip_addrs_no_ipam=_flag(features, "ip_addrs_no_ipam", "feature_control."),
        interface_prefix=interface_prefix(environ or {}),
        policy_type=_text(policy, "type", "policy."),
        raw=config,
    )


def interface_prefix(environ: Mapping[str, str]) -> str:
    """Felix's FELIX_INTERFACEPREFIX is a comma list; Calico's CNI uses its first entry."""
    first = environ.get("FELIX_INTERFACEPREFIX", "").split(",")[0].strip()
    prefix = first or DEFAULT_PREFIX
    if len(prefix) + VETH_HASH_LEN > MAX_IFNAME or not prefix.isalnum():
        raise _bad("FELIX_INTERFACEPREFIX", f"{prefix!r} cannot prefix a veth name",
                   f"use at most {MAX_IFNAME - VETH_HASH_LEN} letters or digits, e.g. cali")
    return prefix


# -- fields -------------------------------------------------------------------------------------


def _bad(path: str, problem: str, hint: str = "") -> CNIError:
    return CNIError(spec.INVALID_CONFIG, f"invalid network config: {path} {problem}", hint)


def _text(section: Mapping[str, Any], key: str, where: str = "") -> str:
    value = section.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad(where + key, f"must be a string, not {json.dumps(value)}")
    return value


def _flag(section: Mapping[str, Any], key: str, where: str = "") -> bool:
    value = section.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _bad(where + key, f"is {json.dumps(value)}", "use true or false")


def _int(section: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = section.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(key, f"is {json.dumps(value)}", f"use a whole number from {low} to {high}")
    return value


def read_mtu_file(path: str) -> int | None:
    """The MTU the routing agent wrote; None when there is no usable file."""
    try:
        with open(path, "rb") as f:
            value = int(f.read(32).strip() or b"0")
    except (OSError, ValueError):
        return None
    return value if MIN_MTU <= value <= MAX_MTU else None


def _mtu(config: Mapping[str, Any]) -> int:
    mtu = _int(config, "mtu", 0, 0, MAX_MTU)
    if 0 < mtu < MIN_MTU:
        raise _bad("mtu", f"is {mtu}", f"use 0 (detect) or {MIN_MTU} to {MAX_MTU}")
    return mtu


def _datastore_type(config: Mapping[str, Any]) -> str:
    value = _text(config, "datastore_type").strip() or DATASTORE_ETCD
    if value == "kubernetes":
        raise _bad("datastore_type", "is kubernetes, which Tabby does not support: Tabby keeps "
                   "its data in etcd only",
                   f'set "datastore_type": "{DATASTORE_ETCD}" (or leave it out) and point '
                   "etcd_endpoints at the cluster's etcd")
    if value != DATASTORE_ETCD:
        raise _bad("datastore_type", f"is {value!r}, not a datastore type",
                   f'use "{DATASTORE_ETCD}"')
    return value


def _etcd(config: Mapping[str, Any]) -> EtcdConfig:
    if _text(config, "etcd_discovery_srv"):
        raise _bad("etcd_discovery_srv", "is not supported",
                   "list the etcd members in etcd_endpoints instead")
    fields = dict(config)
    authority = _text(config, "etcd_authority").strip()
    if not _text(config, "etcd_endpoints").strip() and authority:
        scheme = _text(config, "etcd_scheme").strip() or "http"
        fields["etcd_endpoints"] = f"{scheme}://{authority}"  # Calico's pre-v3 pair
    fields["datastore_type"] = None  # checked above, with the CNI's own wording
    try:
        return config_from_netconf(fields)
    except ConfigError as e:
        raise CNIError(spec.INVALID_CONFIG, f"invalid network config: {e}",
                       "fix the etcd_* fields of the CNI network config") from None


__all__ = ["IN_PROCESS_IPAM", "NODENAME_FILE", "NetConf", "interface_prefix", "parse_netconf"]

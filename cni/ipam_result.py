"""tabby-ipam's identities and results (pure): the handle and attributes an allocation gets, the
IPAM result printed for ADD, and the CNI error a failure becomes.
"""

from __future__ import annotations

import ipaddress
import sys
import time

from cni import spec
from cni.spec import CNIError

# kept out of the VERSION probe's path, as in cni.ipam_plugin: typing is not imported at run time
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from typing import Any

DEADLINE = 60.0  # bound on one whole request against etcd

# -- identities and results (pure) ------------------------------------------------------------


def handle_id(network: str, container_id: str) -> str:
    return f"{network}.{container_id}"


def legacy_handle(args: spec.CniArgs, container_id: str) -> str:
    """The workload ID Calico v2 used as handle: `<ns>.<pod>` for pods, else the container ID."""
    return f"{args.pod_namespace}.{args.pod_name}" if args.is_k8s else container_id


def go_timestamp(ns: int) -> str:
    """Go's `time.Now().UTC().String()`, the timestamp format calico-ipam stores."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(secs))
    fraction = f".{frac:09d}".rstrip("0") if frac else ""
    return f"{base}{fraction} +0000 UTC"


def allocation_attrs(node: str, args: spec.CniArgs, now_ns: int) -> dict[str, str]:
    attrs = {"node": node, "timestamp": go_timestamp(now_ns)}
    if args.is_k8s:
        attrs["pod"] = args.pod_name
        attrs["namespace"] = args.pod_namespace
    return attrs


def ipam_result(addresses: Iterable[str], version: str, gateways: Iterable[str] = (),
                routes: Iterable[Mapping[str, str]] = ()) -> dict[str, Any]:
    """An IPAM result: ips without `interface`, no interfaces (SPEC.md section 5)."""
    by_family = {ipaddress.ip_address(g).version: g for g in gateways}
    ips = []
    for a in addresses:
        gateway = by_family.get(ipaddress.ip_interface(a).version)
        ips.append({"address": a, **({"gateway": gateway} if gateway else {})})
    result = {"cniVersion": spec.CURRENT_VERSION, "ips": ips, "routes": [dict(r) for r in routes]}
    return spec.convert_result(result, version)


def error_for(exc: BaseException, etcd: str = "") -> CNIError:
    """The CNI error a person sees for a failure, with what to do about it."""
    if isinstance(exc, CNIError):
        return exc
    from datastore.config import ConfigError
    from ipam import errors

    text = str(exc)
    where = f" ({etcd})" if etcd else ""
    table: list[tuple[type[BaseException], int, str]] = [
        (errors.PoolExhausted, spec.POOL_EXHAUSTED,
         "add an IPPool or enlarge one, or find leaked addresses with `tabbyctl ipam check` "
         "and free them with `tabbyctl ipam release`"),
        (errors.NoMatchingPool, spec.NO_MATCHING_POOL,
         "create an enabled IPPool of this address family whose nodeSelector matches this node, "
         "or fix ipv4_pools/ipv6_pools in the CNI network config"),
        (errors.AddressInUse, spec.ADDRESS_IN_USE,
         "the address asked for (CNI_ARGS IP= or runtimeConfig ips) belongs to another "
         "workload; ask for a free address or for none"),
        (errors.NotInPool, spec.NOT_IN_POOL,
         "ask for an address inside an enabled IPPool, or create a pool that contains it"),
        (errors.InvalidRequest, spec.INVALID_CONFIG, "fix the request or the IPAM config"),
        (errors.IPAMError, spec.TRY_AGAIN_LATER, "the runtime will retry"),
        (ConfigError, spec.INVALID_CONFIG, "fix the etcd_* fields of the CNI network config"),
    ]
    if "datastore.etcd" in sys.modules:  # only a loaded client can have failed
        from datastore.etcd import DatastoreError, Unavailable

        table[-1:-1] = [
            (Unavailable, spec.TRY_AGAIN_LATER,
             f"check that etcd is running and that etcd_endpoints in the CNI network config"
             f"{where} points at it; the runtime will retry"),
            (DatastoreError, spec.TRY_AGAIN_LATER, f"etcd{where} failed; the runtime will retry"),
        ]
    for kind, code, hint in table:
        if isinstance(exc, kind):
            return CNIError(code, text, hint)
    if isinstance(exc, TimeoutError):
        return CNIError(spec.TRY_AGAIN_LATER, f"etcd{where} did not finish the request within "
                        f"{DEADLINE:.0f} s", "etcd is overloaded or unreachable; the runtime "
                        "will retry")
    return CNIError(spec.INTERNAL, f"internal error: {type(exc).__name__}: {exc}",
                    "this is a bug in tabby-ipam; the log (log_file_path) has the traceback")

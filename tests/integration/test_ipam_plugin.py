"""tabby-ipam exec'd as a runtime does (env + stdin -> stdout + exit code) against a real etcd.

Every test starts from an empty /calico/ prefix with IPPools written the way tabbyctl stores
them (full projectcalico.org/v3 JSON, validated). The last test runs the plugin as the IPAM of
Debian's `ptp` plugin inside network namespaces the test creates.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni import ipam_plugin, spec
from datastore.validation import validate
from tests.conftest import require_binary, require_root
from tests.etcd_server import EtcdServer

TABBY_IPAM = str(Path(sys.executable).parent / "tabby-ipam")
POOL_PREFIX = "/calico/resources/v3/projectcalico.org/ippools/"
NODE = "node-a"
NET = "k8s-pod-network"
POD_ARGS = ("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;"
            "K8S_POD_INFRA_CONTAINER_ID=c1")


@dataclass
class Run:
    rc: int
    out: Any  # stdout as JSON, or None when empty
    err: str
    seconds: float


def exec_plugin(command: str, conf: dict[str, Any], *, cid: str = "c1", args: str = "",
                netns: str = "/run/netns/tabby-none", stdin: bytes | None = None,
                env: dict[str, str] | None = None) -> Run:
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
            "CNI_PATH": str(Path(TABBY_IPAM).parent), "CNI_ARGS": args}
    e = {k: v for k, v in {**base, **(env or {})}.items() if v is not None}
    start = time.monotonic()
    p = subprocess.run([TABBY_IPAM], input=json.dumps(conf).encode() if stdin is None else stdin,
                       env=e, capture_output=True, timeout=60)
    took = time.monotonic() - start
    text = p.stdout.decode()
    return Run(p.returncode, json.loads(text) if text.strip() else None, p.stderr.decode(), took)


def ok(run: Run) -> Any:
    assert run.rc == 0, f"rc={run.rc} out={run.out} err={run.err[-2000:]}"
    return run.out


def failed(run: Run, code: int) -> dict[str, Any]:
    assert run.rc != 0, run.out
    assert isinstance(run.out, dict) and run.out["code"] == code, (run.out, run.err[-2000:])
    assert run.out["msg"]
    return run.out


def pool(name: str, cidr: str, **spec_fields: Any) -> dict[str, Any]:
    obj = validate({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                    "metadata": {"name": name}, "spec": {"cidr": cidr, **spec_fields}})
    obj["metadata"].update(uid=f"uid-{name}", creationTimestamp="2026-01-01T00:00:00Z")
    return obj


def put_pools(server: EtcdServer, *pools: dict[str, Any]) -> None:
    for p in pools:
        server.etcdctl("put", POOL_PREFIX + p["metadata"]["name"], json.dumps(p))


def ipam_dump(server: EtcdServer) -> dict[str, Any]:
    out = server.etcdctl("get", "--prefix", "/calico/ipam/v2/", "-w", "json")
    kvs = json.loads(out).get("kvs", [])
    return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
            for kv in kvs}


def handle_of(server: EtcdServer, handle: str) -> dict[str, Any] | None:
    return ipam_dump(server).get(f"/calico/ipam/v2/handle/{handle}")


@pytest.fixture
def store(etcd_server: EtcdServer) -> EtcdServer:
    """An etcd with nothing under /calico/ but one IPv4 pool."""
    etcd_server.etcdctl("del", "--prefix", "/calico/")
    put_pools(etcd_server, pool("pool-a", "10.250.0.0/24"))
    return etcd_server


@pytest.fixture
def conf(store: EtcdServer, tmp_path: Path) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "name": NET, "type": "tabby-ipam",
            "etcd_endpoints": store.endpoint, "nodename": NODE,
            "ipam_lock_file": str(tmp_path / "ipam.lock"),
            "ipam": {"type": "tabby-ipam"}}


def with_ipam(conf: dict[str, Any], **ipam: Any) -> dict[str, Any]:
    return {**conf, "ipam": {**conf["ipam"], **ipam}}


def address(result: dict[str, Any], i: int = 0) -> ipaddress.IPv4Interface:
    return ipaddress.ip_interface(result["ips"][i]["address"])  # type: ignore[return-value]


# -- protocol, no etcd needed ---------------------------------------------------------------------


def test_version() -> None:
    out = ok(exec_plugin("VERSION", {}, stdin=b'{"cniVersion":"0.4.0"}'))
    assert out == {"cniVersion": "0.4.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    # podman's probe before every use: dummy variables, stdin only a version
    probe = exec_plugin("VERSION", {}, cid="", netns="dummy", stdin=b'{"cniVersion":"1.0.0"}',
                        env={"CNI_IFNAME": "dummy", "CNI_PATH": "dummy"})
    assert ok(probe)["supportedVersions"][-1] == "1.1.0"


def test_missing_cni_command() -> None:
    run = exec_plugin("", {"cniVersion": "1.0.0", "name": NET}, env={"CNI_COMMAND": None})
    out = failed(run, spec.INVALID_ENVIRONMENT)
    assert "CNI_COMMAND" in out["msg"] and run.rc == 1
    assert "CNI protocol versions supported" in run.err


def test_undecodable_netconf() -> None:
    out = failed(exec_plugin("ADD", {}, stdin=b'{"cniVersion": "1.0.0", name'),
                 spec.DECODING_FAILURE)
    assert "network config" in out["msg"]


@pytest.mark.parametrize(("ipam", "needle"), [
    ({"assign_ipv4": "maybe"}, "ipam.assign_ipv4"),
    ({"ipv4_pools": ["fd00::/64"]}, "not an IPv4 CIDR"),
    ({"ipv6_pools": "pool-a"}, "ipam.ipv6_pools"),
])
def test_invalid_netconf(ipam: dict[str, Any], needle: str) -> None:
    conf = {"cniVersion": "1.0.0", "name": NET, "ipam": {"type": "tabby-ipam", **ipam}}
    out = failed(exec_plugin("ADD", conf), spec.INVALID_CONFIG)
    assert needle in out["msg"] and out["cniVersion"] == "1.0.0"


def test_invalid_etcd_settings() -> None:
    conf = {"cniVersion": "1.0.0", "name": NET, "etcd_endpoints": "ftp://x", "ipam": {}}
    assert "etcd_endpoints" in failed(exec_plugin("ADD", conf), spec.INVALID_CONFIG)["msg"]


def test_unknown_cni_args_need_ignore_unknown() -> None:
    conf = {"cniVersion": "1.0.0", "name": NET, "ipam": {}}
    assert "FOO" in failed(exec_plugin("ADD", conf, args="FOO=1"), spec.INVALID_ENVIRONMENT)["msg"]


def test_unreachable_etcd_is_try_again_later(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = {"cniVersion": "1.0.0", "name": NET, "nodename": NODE,
            "etcd_endpoints": f"http://127.0.0.1:{port}", "ipam_lock_file": str(tmp_path / "l"),
            "ipam": {}}
    for command in ("ADD", "DEL"):
        run = exec_plugin(command, conf)
        out = failed(run, spec.TRY_AGAIN_LATER)
        assert f"127.0.0.1:{port}" in out["msg"] and "etcd_endpoints" in out["details"]
        assert run.seconds < 20  # bounded, never a hang
    status = {**conf, "cniVersion": "1.1.0"}
    failed(exec_plugin("STATUS", status), spec.NOT_AVAILABLE)


# -- against etcd ---------------------------------------------------------------------------------

@pytest.mark.etcd
@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_result_in_each_version(conf: dict[str, Any], store: EtcdServer,
                                    version: str) -> None:
    out = ok(exec_plugin("ADD", {**conf, "cniVersion": version}, args=POD_ARGS))
    assert out["cniVersion"] == version and "interfaces" not in out
    ip = address(out)
    assert ip.network.prefixlen == 26  # the block's prefix, as calico-ipam prints it
    assert ip in ipaddress.ip_network("10.250.0.0/24")
    assert "interface" not in out["ips"][0]
    if version.startswith("0."):
        assert out["ips"][0]["version"] == "4" and out["dns"] == {}
    else:
        assert "version" not in out["ips"][0] and "dns" not in out
    handle = handle_of(store, f"{NET}.c1")
    assert handle is not None and handle["block"] == {str(ip.network): 1}
    block = ipam_dump(store)[f"/calico/ipam/v2/assignment/ipv4/block/{ip.network.network_address}"
                             f"-{ip.network.prefixlen}"]
    attrs = [a for a in block["attributes"] if a["handle_id"] == f"{NET}.c1"]
    assert attrs and attrs[0]["secondary"]["node"] == NODE
    assert attrs[0]["secondary"]["pod"] == "web-0" and attrs[0]["secondary"]["namespace"] == "prod"
    assert attrs[0]["secondary"]["timestamp"].endswith(" +0000 UTC")
    assert block["affinity"] == f"host:{NODE}"


@pytest.mark.etcd
def test_del_twice_and_del_of_unknown_container(conf: dict[str, Any], store: EtcdServer) -> None:
    first = address(ok(exec_plugin("ADD", conf, args=POD_ARGS)))
    assert handle_of(store, f"{NET}.c1") is not None
    prev = {**conf, "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": str(first)}]}}
    assert ok(exec_plugin("DEL", prev, args=POD_ARGS)) is None
    assert handle_of(store, f"{NET}.c1") is None
    # the second DEL of the CRI flow: no netns, no prevResult
    assert ok(exec_plugin("DEL", conf, args=POD_ARGS, netns="")) is None
    assert ok(exec_plugin("DEL", conf, cid="never-added")) is None
    # the address went back to the free list: no allocation is left anywhere
    for key, value in ipam_dump(store).items():
        if "/assignment/" in key:
            assert all(a is None for a in value["allocations"])


@pytest.mark.etcd
def test_del_releases_the_legacy_pod_handle(conf: dict[str, Any], store: EtcdServer) -> None:
    # Calico v2 used "<namespace>.<pod>" as handle; an ADD on network "prod" with container ID
    # "web-0" leaves exactly such a handle behind.
    ok(exec_plugin("ADD", {**conf, "name": "prod"}, cid="web-0"))
    assert handle_of(store, "prod.web-0") is not None
    ok(exec_plugin("DEL", conf, cid="c9", args=POD_ARGS))
    assert handle_of(store, "prod.web-0") is None


@pytest.mark.etcd
def test_check(conf: dict[str, Any], store: EtcdServer) -> None:
    result = ok(exec_plugin("ADD", conf))
    with_prev = {**conf, "prevResult": result}
    assert ok(exec_plugin("CHECK", with_prev)) is None
    # a main plugin's result (narrowed to /32, with interfaces) checks the same
    narrowed = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
                "ips": [{"address": f"{address(result).ip}/32", "interface": 0}]}
    assert ok(exec_plugin("CHECK", {**conf, "prevResult": narrowed})) is None
    failed(exec_plugin("CHECK", conf), spec.INVALID_CONFIG)  # no prevResult
    failed(exec_plugin("CHECK", {**with_prev, "cniVersion": "0.3.1"}), spec.INCOMPATIBLE_VERSION)
    ok(exec_plugin("DEL", conf))
    out = failed(exec_plugin("CHECK", with_prev), spec.ALLOCATION_MISSING)
    assert str(address(result).ip) in out["msg"]


@pytest.mark.etcd
def test_requested_address(conf: dict[str, Any], store: EtcdServer) -> None:
    out = ok(exec_plugin("ADD", conf, cid="a", args="IgnoreUnknown=1;IP=10.250.0.77"))
    assert out["ips"] == [{"address": "10.250.0.77/32"}]  # calico-ipam prints requested IPs so
    assert handle_of(store, f"{NET}.a") is not None
    taken = failed(exec_plugin("ADD", conf, cid="b", args="IP=10.250.0.77"), spec.ADDRESS_IN_USE)
    assert "10.250.0.77" in taken["msg"]
    assert handle_of(store, f"{NET}.b") is None
    failed(exec_plugin("ADD", conf, cid="c", args="IP=192.0.2.9"), spec.NOT_IN_POOL)
    failed(exec_plugin("ADD", conf, cid="d", args="IP=10.250.0.300"), spec.INVALID_ENVIRONMENT)
    # runtimeConfig ips wins over CNI_ARGS
    rc = {**conf, "runtimeConfig": {"ips": ["10.250.0.78/24"]}}
    out = ok(exec_plugin("ADD", rc, cid="e", args="IP=10.250.0.79"))
    assert out["ips"] == [{"address": "10.250.0.78/32"}]
    ok(exec_plugin("DEL", conf, cid="a"))
    ok(exec_plugin("ADD", conf, cid="f", args="IP=10.250.0.77"))  # free again after DEL


@pytest.mark.etcd
def test_dual_stack_and_rollback(conf: dict[str, Any], store: EtcdServer) -> None:
    dual = with_ipam(conf, assign_ipv6="true")
    before = ipam_dump(store)
    out = failed(exec_plugin("ADD", dual, cid="v6"), spec.NO_MATCHING_POOL)
    assert out["details"]
    after = ipam_dump(store)
    assert not [k for k in after if k.startswith("/calico/ipam/v2/handle/")]
    for key, value in after.items():  # the IPv4 half was not left allocated
        if "/assignment/" in key:
            assert all(a is None for a in value["allocations"]), key
    assert set(before) <= set(after)
    put_pools(store, pool("pool-v6", "fd00:10:250::/120"))
    out = ok(exec_plugin("ADD", dual, cid="v6"))
    v4, v6 = address(out, 0), address(out, 1)
    assert (v4.version, v6.version, v6.network.prefixlen) == (4, 6, 122)
    ok(exec_plugin("DEL", dual, cid="v6"))
    assert handle_of(store, f"{NET}.v6") is None


@pytest.mark.etcd
def test_exhaustion(conf: dict[str, Any], store: EtcdServer) -> None:
    store.etcdctl("del", "--prefix", "/calico/")
    put_pools(store, pool("tiny", "10.251.0.0/30", blockSize=30))
    got = {address(ok(exec_plugin("ADD", conf, cid=f"x{i}"))).ip for i in range(4)}
    assert len(got) == 4  # Calico hands out every address of the block, .0 and .3 included
    before = ipam_dump(store)
    run = exec_plugin("ADD", conf, cid="x4")
    out = failed(run, spec.POOL_EXHAUSTED)
    assert run.rc == 1 and "IPPool" in out["details"]
    assert ipam_dump(store) == before  # nothing half-written
    ok(exec_plugin("DEL", conf, cid="x0"))
    ok(exec_plugin("ADD", conf, cid="x4"))


@pytest.mark.etcd
def test_pool_by_name_and_cidr(conf: dict[str, Any], store: EtcdServer) -> None:
    put_pools(store, pool("pool-b", "10.252.0.0/24"))
    by_name = address(ok(exec_plugin("ADD", with_ipam(conf, ipv4_pools=["pool-b"]), cid="n"))).ip
    assert by_name in ipaddress.ip_network("10.252.0.0/24")
    by_cidr = address(ok(exec_plugin("ADD", with_ipam(conf, ipv4_pools=["10.250.0.0/24"]),
                                     cid="m"))).ip
    assert by_cidr in ipaddress.ip_network("10.250.0.0/24")


@pytest.mark.etcd
def test_concurrent_adds_get_distinct_addresses(conf: dict[str, Any], store: EtcdServer) -> None:
    with ThreadPoolExecutor(8) as pool_:
        runs = list(pool_.map(lambda i: exec_plugin("ADD", conf, cid=f"p{i}"), range(12)))
    ips = [address(ok(r)).ip for r in runs]
    assert len(set(ips)) == 12


@pytest.mark.etcd
def test_gc_and_status(conf: dict[str, Any], store: EtcdServer) -> None:
    c11 = {**conf, "cniVersion": "1.1.0"}
    assert ok(exec_plugin("STATUS", c11)) is None
    for cid in ("keep", "stale"):
        ok(exec_plugin("ADD", c11, cid=cid))
    ok(exec_plugin("ADD", {**c11, "nodename": "node-b"}, cid="other-node"))
    gc = {**c11, "cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}
    assert ok(exec_plugin("GC", gc, cid="", netns="")) is None
    assert handle_of(store, f"{NET}.keep") is not None
    assert handle_of(store, f"{NET}.stale") is None
    assert handle_of(store, f"{NET}.other-node") is not None  # another node's: never touched
    store.etcdctl("del", "--prefix", POOL_PREFIX)
    failed(exec_plugin("STATUS", c11), spec.NOT_AVAILABLE)


@pytest.mark.etcd
def test_logs_go_to_stderr_and_the_log_file(conf: dict[str, Any], tmp_path: Path) -> None:
    log = tmp_path / "logs" / "tabby-ipam.log"
    run = exec_plugin("ADD", {**conf, "log_file_path": str(log), "log_level": "debug"})
    ok(run)
    assert "assigned" in run.err
    assert "assigned" in log.read_text()


# -- as the IPAM of Debian's ptp plugin ---------------------------------------------------------

PTP_DIR = "/usr/lib/cni"


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    require_root()
    require_binary("ip")
    require_binary("nsenter")
    host, pod = f"tabby-ipt{os.getpid()}-host", f"tabby-ipt{os.getpid()}-pod"
    try:
        for ns in (host, pod):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", host, "link", "set", "lo", "up"], check=True)
        yield host, pod
    finally:
        for ns in (host, pod):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.etcd
@pytest.mark.netns
def test_as_the_ipam_of_ptp(conf: dict[str, Any], store: EtcdServer, tmp_path: Path,
                            namespaces: tuple[str, str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{os.environ.get('PATH', '')}:{PTP_DIR}")
    ptp = require_binary("ptp")
    host, pod = namespaces
    # ptp execs its IPAM in its own (test host) netns, where etcd's loopback address is not;
    # this wrapper runs tabby-ipam back in the test's netns. Nothing else differs.
    wrapper_dir = tmp_path / "bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "tabby-ipam"
    wrapper.write_text(f"#!/bin/sh\nexec nsenter --net=/proc/{os.getpid()}/ns/net {TABBY_IPAM}\n")
    wrapper.chmod(0o755)
    # ptp puts the result's gateway on the host veth: Calico's link-local one will do. (No
    # default route: ptp adds result routes before the one that makes 169.254.1.1 on-link.)
    net = {**with_ipam(conf, gateway="169.254.1.1"),
           "name": "tabby-ptp", "type": "ptp", "ipMasq": False, "mtu": 1400}
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_CONTAINERID": "ptp1",
           "CNI_NETNS": f"/run/netns/{pod}", "CNI_IFNAME": "eth0",
           "CNI_PATH": f"{wrapper_dir}:{PTP_DIR}", "CNI_ARGS": POD_ARGS}

    def run_ptp(command: str, body: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["nsenter", f"--net=/run/netns/{host}", ptp],
                              input=json.dumps(body).encode(),
                              env={**env, "CNI_COMMAND": command}, capture_output=True,
                              timeout=60)

    add = run_ptp("ADD", net)
    assert add.returncode == 0, (add.stdout, add.stderr)
    result = json.loads(add.stdout)
    ip = ipaddress.ip_interface(result["ips"][0]["address"])
    assert ip.ip in ipaddress.ip_network("10.250.0.0/24")
    assert handle_of(store, "tabby-ptp.ptp1") is not None
    shown = subprocess.run(["ip", "-n", pod, "-o", "addr", "show", "eth0"], capture_output=True,
                           text=True, check=True).stdout
    assert str(ip) in shown
    gateway = result["ips"][0]["gateway"]
    assert gateway == "169.254.1.1"
    # reachability without ping: a TCP connect to the gateway is refused (RST) only if packets
    # get there and back; a broken path times out
    probe = (f"import socket\ntry:\n socket.create_connection(('{gateway}', 9), timeout=3)\n"
             "except ConnectionRefusedError:\n print('refused')")
    reach = subprocess.run(["nsenter", f"--net=/run/netns/{pod}", sys.executable, "-c", probe],
                           capture_output=True, text=True, timeout=30)
    assert reach.stdout.strip() == "refused", reach.stdout + reach.stderr
    check = run_ptp("CHECK", {**net, "prevResult": result})
    assert check.returncode == 0, (check.stdout, check.stderr)
    delete = run_ptp("DEL", {**net, "prevResult": result})
    assert delete.returncode == 0, (delete.stdout, delete.stderr)
    assert handle_of(store, "tabby-ptp.ptp1") is None
    assert run_ptp("DEL", net).returncode == 0  # again, without prevResult


# -- pure parts of the plugin ---------------------------------------------------------------------


def test_go_timestamp() -> None:
    assert ipam_plugin.go_timestamp(1_777_777_777_123_456_789) == (
        "2026-05-03 03:09:37.123456789 +0000 UTC")
    assert ipam_plugin.go_timestamp(1_777_777_777_000_000_000) == "2026-05-03 03:09:37 +0000 UTC"
    assert ipam_plugin.go_timestamp(1_777_777_777_500_000_000).endswith(":37.5 +0000 UTC")


def test_conf_defaults_are_calicos() -> None:
    c = ipam_plugin.parse_conf({"name": "n"})
    assert (c.assign_ipv4, c.assign_ipv6, c.ipv4_pools) == (True, False, ())
    assert c.nodename_file == "/var/lib/calico/nodename"
    c = ipam_plugin.parse_conf({"name": "n", "ipam": {"assign_ipv4": "false",
                                                      "assign_ipv6": True}})
    assert (c.assign_ipv4, c.assign_ipv6) == (False, True)


def test_gateway_and_routes_extension() -> None:
    c = ipam_plugin.parse_conf({"name": "n", "ipam": {
        "gateway": ["169.254.1.1", "fe80::1"], "routes": [{"dst": "0.0.0.0/0"}]}})
    out = ipam_plugin.ipam_result(["10.0.0.5/26", "fd00::5/122"], "0.4.0", c.gateways, c.routes)
    assert out == {"cniVersion": "0.4.0",
                   "ips": [{"version": "4", "address": "10.0.0.5/26", "gateway": "169.254.1.1"},
                           {"version": "6", "address": "fd00::5/122", "gateway": "fe80::1"}],
                   "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    assert ipam_plugin.ipam_result(["10.0.0.5/26"], "1.0.0") == {
        "cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/26"}]}  # calico-ipam's, exactly
    for bad in ({"gateway": "x"}, {"gateway": ["10.0.0.1", "10.0.0.2"]},
                {"routes": [{"dst": "nope"}]}, {"routes": {"dst": "0.0.0.0/0"}}):
        with pytest.raises(spec.CNIError) as info:
            ipam_plugin.parse_conf({"name": "n", "ipam": bad})
        assert info.value.code == spec.INVALID_CONFIG


def test_requested_ip_precedence() -> None:
    args = spec.parse_cni_args("IP=10.0.0.1,fd00::1")
    assert [str(i) for i in ipam_plugin.requested_ips({}, args)] == ["10.0.0.1", "fd00::1"]
    conf = {"args": {"cni": {"ips": ["10.0.0.2/24"]}}}
    assert [str(i) for i in ipam_plugin.requested_ips(conf, args)] == ["10.0.0.2"]
    conf["runtimeConfig"] = {"ips": ["10.0.0.3"]}
    assert [str(i) for i in ipam_plugin.requested_ips(conf, args)] == ["10.0.0.3"]
    with pytest.raises(spec.CNIError) as info:
        ipam_plugin.requested_ips({"runtimeConfig": {"ips": ["10.0.0.1", "10.0.0.2"]}},
                                  spec.CniArgs())
    assert info.value.code == spec.INVALID_CONFIG


def test_handles() -> None:
    pod = spec.parse_cni_args(POD_ARGS)
    assert ipam_plugin.handle_id(NET, "abc") == "k8s-pod-network.abc"
    assert ipam_plugin.legacy_handle(pod, "abc") == "prod.web-0"
    assert ipam_plugin.legacy_handle(spec.CniArgs(), "abc") == "abc"
    attrs = ipam_plugin.allocation_attrs("n1", pod, 0)
    assert attrs == {"node": "n1", "timestamp": "1970-01-01 00:00:00 +0000 UTC", "pod": "web-0",
                     "namespace": "prod"}
    assert set(ipam_plugin.allocation_attrs("n1", spec.CniArgs(), 0)) == {"node", "timestamp"}


def test_nodename_order(tmp_path: Path) -> None:
    f = tmp_path / "nodename"
    c = ipam_plugin.parse_conf({"name": "n", "nodename_file": str(f), "hostname": "old"})
    assert ipam_plugin.determine_nodename(c) == "old"
    f.write_text("from-file\n")
    assert ipam_plugin.determine_nodename(c) == "from-file"
    c = ipam_plugin.parse_conf({"name": "n", "nodename": "explicit", "nodename_file": str(f)})
    assert ipam_plugin.determine_nodename(c) == "explicit"


@pytest.mark.etcd
def test_calico_annotations_on_pod_and_namespace(conf: dict[str, Any], store: EtcdServer) -> None:
    """ipv4pools (pod over namespace over netconf) and ipAddrs, read from the Pod and Namespace
    objects tabbyctl stores."""
    from datastore.k8s import validate_k8s

    put_pools(store, pool("pool-b", "10.251.0.0/24"), pool("pool-c", "10.252.0.0/24"))

    def put_k8s(obj: dict[str, Any]) -> None:
        obj = validate_k8s(obj)
        meta = obj["metadata"]
        plural = {"Pod": "pods", "Namespace": "namespaces"}[obj["kind"]]
        where = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
        store.etcdctl("put", f"/tabby/k8s/{plural}/{where}", json.dumps(obj))

    def pod(annotations: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "web-0", "namespace": "prod", "annotations": annotations},
                "spec": {"containers": [{"name": "c"}]}}

    put_k8s({"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": "prod", "annotations": {"cni.projectcalico.org/ipv4pools": '["pool-b"]'}}})
    put_k8s(pod({}))
    from_namespace = ok(exec_plugin("ADD", conf, cid="n1", args=POD_ARGS))
    assert address(from_namespace) in ipaddress.ip_network("10.251.0.0/24")
    put_k8s(pod({"cni.projectcalico.org/ipv4pools": '["10.252.0.0/24"]'}))
    from_pod = ok(exec_plugin("ADD", conf, cid="n2", args=POD_ARGS))
    assert address(from_pod) in ipaddress.ip_network("10.252.0.0/24")
    put_k8s(pod({"cni.projectcalico.org/ipAddrs": '["10.250.0.200"]'}))
    exact = ok(exec_plugin("ADD", conf, cid="n3", args=POD_ARGS))
    assert exact["ips"] == [{"address": "10.250.0.200/32"}]
    put_k8s(pod({"cni.projectcalico.org/ipAddrs": "10.250.0.201"}))  # not a JSON list
    before = ipam_dump(store)
    bad = failed(exec_plugin("ADD", conf, cid="n4", args=POD_ARGS), spec.INVALID_CONFIG)
    assert "cni.projectcalico.org/ipAddrs" in bad["msg"] and "prod/web-0" in bad["msg"]
    assert ipam_dump(store) == before
    no_k8s = ok(exec_plugin("ADD", conf, cid="n5"))  # not a pod: the netconf decides
    assert address(no_k8s) in ipaddress.ip_network("10.250.0.0/24")

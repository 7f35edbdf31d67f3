"""The `tabby` plugin's handler (cni.handler) against a real etcd and real namespaces.

Safety: every test makes its own "host" network namespace and its pod namespaces; the handler is
told to plumb the host side there through `TABBY_HOST_NETNS` (a test-only knob of the request
environment), while it runs in the test process, in the root namespace, where etcd listens on
loopback. Nothing is ever plumbed into the root namespace: the harness checks that no `cali*`
link appeared there, and deletes its namespaces (and with them every veth and route) at the end.

The in-process fallback (`python -m cni.fallback`, what the shim execs) is exercised as a child
process with the same knob.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import handler, spec
from cni.handler import Reply, Services
from datastore.etcd import Conflict
from datastore.store import ResourceStore
from datastore.validation import validate
from tests.conftest import require_binary, require_root
from tests.etcd_server import EtcdServer

ROOT = Path(__file__).resolve().parents[2]
NET = "k8s-pod-network"
NODE = "node-a"
POOL_CIDR = "10.250.0.0/24"
POOL_PREFIX = "/calico/resources/v3/projectcalico.org/ippools/"
WEP_PREFIX = "/calico/resources/v3/projectcalico.org/workloadendpoints/"
HANDLE_PREFIX = "/calico/ipam/v2/handle/"
CNI_PATH = "/usr/lib/cni"

pytestmark = [pytest.mark.etcd, pytest.mark.netns]


def sh(*args: str, check: bool = True) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {done.stderr}")
    return done.stdout


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(sh("ip", "-n", ns, "-j", *args) or "[]")


def link_names(ns: str | None = None) -> set[str]:
    out = sh("ip", *(["-n", ns] if ns else []), "-j", "link", "show")
    return {link["ifname"] for link in json.loads(out or "[]")}


def sysctl(ns: str, key: str) -> str:
    return sh("nsenter", f"--net=/run/netns/{ns}", "cat", f"/proc/sys/{key}").strip()


def etcd_keys(server: EtcdServer, prefix: str) -> list[str]:
    return [k for k in server.etcdctl("get", "--prefix", prefix, "--keys-only").split() if k]


def etcd_values(server: EtcdServer, prefix: str) -> dict[str, Any]:
    out = json.loads(server.etcdctl("get", "--prefix", prefix, "-w", "json"))
    return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv["value"]))
            for kv in out.get("kvs", [])}


def allocated(server: EtcdServer) -> list[int]:
    """Every allocated ordinal over all blocks."""
    return [i for key, block in etcd_values(server, "/calico/ipam/v2/assignment/").items()
            for i, a in enumerate(block.get("allocations", [])) if a is not None]


def ok(reply: Reply) -> Any:
    assert reply.exit_code == 0, (reply.stdout, reply.stderr)
    return json.loads(reply.stdout) if reply.stdout.strip() else None


def failed(reply: Reply, code: int) -> dict[str, Any]:
    assert reply.exit_code != 0, reply.stdout
    out = json.loads(reply.stdout)
    assert out["code"] == code, (out, reply.stderr)
    assert out["msg"]
    return out


def pod_args(name: str, namespace: str = "prod", cid: str = "") -> str:
    return (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
            f"K8S_POD_INFRA_CONTAINER_ID={cid}")


class Harness:
    """A test host netns, pod netns on demand, one Services (one event loop) for the test."""

    def __init__(self, server: EtcdServer, tmp_path: Path, remember: bool = False) -> None:
        require_root()
        require_binary("ip")
        require_binary("nsenter")
        self.server = server
        self.tag = f"tht{uuid.uuid4().hex[:6]}"
        self.host = f"{self.tag}-host"
        self.pods: list[str] = []
        self.spool = tmp_path / "spool"
        self.root_links = link_names()
        self.loop = asyncio.new_event_loop()
        server.etcdctl("del", "--prefix", "/calico/")
        server.etcdctl("del", "--prefix", "/tabby/")
        pool = validate({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                         "metadata": {"name": "pool-a"}, "spec": {"cidr": POOL_CIDR}})
        server.etcdctl("put", POOL_PREFIX + "pool-a", json.dumps(pool))
        sh("ip", "netns", "add", self.host)
        sh("ip", "-n", self.host, "link", "set", "lo", "up")
        self.svc = self.run(Services.open(server.config(), logging.getLogger("test.cni"),
                                          self.spool, remember=remember))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def pod(self, name: str = "") -> str:
        ns = f"{self.tag}-{name or len(self.pods)}"
        sh("ip", "netns", "add", ns)
        self.pods.append(ns)
        return ns

    def conf(self, version: str = "1.0.0", **fields: Any) -> dict[str, Any]:
        return {"cniVersion": version, "name": NET, "type": "tabby",
                "etcd_endpoints": self.server.endpoint, "nodename": NODE, "mtu": 1400,
                "ipam": {"type": "tabby-ipam"}, **fields}

    def env(self, command: str, cid: str, netns: str | None, args: str) -> dict[str, str]:
        return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
                "CNI_CONTAINERID": cid, "CNI_NETNS": f"/run/netns/{netns}" if netns else "",
                "CNI_IFNAME": "eth0", "CNI_PATH": CNI_PATH, "CNI_ARGS": args,
                handler.HOST_NETNS_ENV: f"/run/netns/{self.host}"}

    async def acall(self, command: str, conf: dict[str, Any], cid: str, netns: str | None,
                    args: str, prev: Any = None, stdin: bytes | None = None,
                    env: dict[str, str] | None = None) -> Reply:
        body = dict(conf, **({"prevResult": prev} if prev is not None else {}))
        environ = {**self.env(command, cid, netns, args), **(env or {})}
        environ = {k: v for k, v in environ.items() if v is not None}

        async def factory(_config: Any) -> Services:
            return self.svc

        data = json.dumps(body).encode() if stdin is None else stdin
        return await handler.handle(environ, data, factory)

    def call(self, *args: Any, **kwargs: Any) -> Reply:
        return self.run(self.acall(*args, **kwargs))

    def add(self, pod: str, name: str, cid: str, conf: dict[str, Any] | None = None,
            namespace: str = "prod") -> dict[str, Any]:
        return ok(self.call("ADD", conf or self.conf(), cid, pod,
                            pod_args(name, namespace, cid)))

    def apply(self, *objs: dict[str, Any]) -> None:
        self.run(ResourceStore(self.svc.ds).write(list(objs), "apply"))

    def host_links(self) -> set[str]:
        return {n for n in link_names(self.host) if n != "lo"}

    def close(self) -> None:
        try:
            self.run(self.svc.close())
            self.loop.close()
        finally:
            for ns in [*self.pods, self.host]:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        leaked = {n for n in link_names() - self.root_links if n.startswith("cali")}
        assert not leaked, f"plumbing leaked into the root namespace: {leaked}"


@pytest.fixture(params=["read", "remembered"])
def lab(etcd_server: EtcdServer, tmp_path: Path, request: pytest.FixtureRequest
        ) -> Iterator[Harness]:
    """Every test twice: reading what ADD needs, and as tabby-node does, from watched copies
    (datastore.remembered; the watches catch up only while a request runs, so these also go
    through the guarded fallback)."""
    h = Harness(etcd_server, tmp_path, remember=request.param == "remembered")
    try:
        yield h
    finally:
        h.close()


def assert_clean(h: Harness) -> None:
    """No endpoint, no handle, no allocation, no veth."""
    assert etcd_keys(h.server, WEP_PREFIX) == []
    assert etcd_keys(h.server, HANDLE_PREFIX) == []
    assert allocated(h.server) == []
    assert h.host_links() == set()


# -- VERSION and malformed requests ---------------------------------------------------------------


def test_version_needs_no_etcd(lab: Harness) -> None:
    async def no_services(_config: Any) -> Services:
        raise AssertionError("VERSION must not open the datastore")

    probe = {"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy", "CNI_IFNAME": "dummy",
             "CNI_PATH": "dummy", "CNI_CONTAINERID": ""}
    reply = lab.run(handler.handle(probe, b'{"cniVersion":"1.0.0"}', no_services))
    assert ok(reply) == {"cniVersion": "1.0.0", "supportedVersions": list(spec.SUPPORTED_VERSIONS)}


def test_bad_requests_leave_nothing_behind(lab: Harness) -> None:
    pod = lab.pod()
    args = pod_args("web-0")
    failed(lab.call("ADD", {}, "c1", pod, args, stdin=b'{"cniVersion": "1.0.0", name'),
           spec.DECODING_FAILURE)
    failed(lab.call("ADD", lab.conf("9.9.9"), "c1", pod, args), spec.INCOMPATIBLE_VERSION)
    failed(lab.call("ADD", lab.conf(), "c1", None, args), spec.INVALID_ENVIRONMENT)
    out = failed(lab.call("ADD", lab.conf(), "c1", f"{lab.tag}-absent", args),
                 spec.INVALID_ENVIRONMENT)
    assert "does not exist" in out["msg"]
    failed(lab.call("ADD", lab.conf(datastore_type="kubernetes"), "c1", pod, args),
           spec.INVALID_CONFIG)
    # a container ID the CNI spec allows but a WorkloadEndpoint cannot hold: the failure comes
    # after the allocation and the plumbing, which are both undone
    out = failed(lab.call("ADD", lab.conf(), "c_1", pod, args), spec.INVALID_CONFIG)
    assert "containerID" in out["msg"]
    assert_clean(lab)
    assert link_names(pod) == {"lo"}


# -- ADD ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_add_result_per_version(lab: Harness, version: str) -> None:
    pod = lab.pod()
    result = lab.add(pod, "web-0", "c1", lab.conf(version))
    assert result["cniVersion"] == version
    host_if, pod_if = result["interfaces"]
    veth = "cali" + hashlib.sha1(b"prod.web-0").hexdigest()[:11]
    assert host_if == {"name": veth, "mac": "ee:ee:ee:ee:ee:ee"}
    assert pod_if["name"] == "eth0" and pod_if["sandbox"] == f"/run/netns/{pod}"
    assert ("mtu" in pod_if) == (version == "1.1.0")
    [ip] = result["ips"]
    assert ip["interface"] == 1 and "gateway" not in ip
    assert ("version" in ip) == (version in ("0.3.1", "0.4.0"))
    address = ipaddress.ip_interface(ip["address"])
    assert address.network.prefixlen == 32 and address.ip in ipaddress.ip_network(POOL_CIDR)
    if version != "1.0.0":
        return
    # read back from the kernel
    [eth0] = ip_json(pod, "addr", "show", "eth0")
    assert eth0["mtu"] == 1400 and eth0["address"] == pod_if["mac"]
    assert {(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["family"] == "inet"} \
        == {(str(address.ip), 32)}
    routes = {(r["dst"], r.get("gateway")) for r in ip_json(pod, "route", "show")}
    assert routes == {("default", "169.254.1.1"), ("169.254.1.1", None)}
    [host_route] = ip_json(lab.host, "route", "show", "dev", host_if["name"])
    assert host_route["dst"] == str(address.ip) and host_route["protocol"] == "80"
    [neigh] = ip_json(lab.host, "neigh", "show", "dev", host_if["name"])
    assert neigh["dst"] == str(address.ip) and neigh["lladdr"] == pod_if["mac"]
    assert "PERMANENT" in neigh["state"]
    [cali] = ip_json(lab.host, "link", "show", host_if["name"])
    assert cali["address"] == "ee:ee:ee:ee:ee:ee" and cali["mtu"] == 1400
    assert sysctl(lab.host, f"net/ipv4/conf/{host_if['name']}/proxy_arp") == "1"
    assert sysctl(lab.host, f"net/ipv4/conf/{host_if['name']}/forwarding") == "1"
    assert sysctl(pod, "net/ipv4/ip_forward") == "0"


def test_workload_endpoint_as_calico_writes_it(lab: Harness) -> None:
    lab.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "prod"}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "web-7d9f", "namespace": "prod",
                      "labels": {"app": "web", "tier": "front"}},
         "spec": {"serviceAccountName": "api", "containers": [
             {"name": "c", "ports": [{"name": "http", "containerPort": 8080},
                                     {"containerPort": 9090, "hostPort": 19090,
                                      "protocol": "UDP"},
                                     {"containerPort": 7070}]}]}})
    pod = lab.pod()
    log_file = lab.spool.parent / "log" / "cni.log"
    result = lab.add(pod, "web-7d9f", "c0ffee1", lab.conf(log_file_path=str(log_file)))
    assert "wrote WorkloadEndpoint prod/node--a-k8s-web--7d9f-eth0" in log_file.read_text()
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["metadata"]["name"] == "node--a-k8s-web--7d9f-eth0"
    assert endpoint["metadata"]["namespace"] == "prod"
    assert endpoint["metadata"]["labels"] == {
        "app": "web", "tier": "front", "projectcalico.org/namespace": "prod",
        "projectcalico.org/orchestrator": "k8s", "projectcalico.org/serviceaccount": "api"}
    s = endpoint["spec"]
    assert s["orchestrator"] == "k8s" and s["node"] == NODE and s["pod"] == "web-7d9f"
    assert s["containerID"] == "c0ffee1" and s["endpoint"] == "eth0"
    assert s["profiles"] == ["kns.prod", "ksa.prod.api"]
    assert s["interfaceName"] == result["interfaces"][0]["name"]
    assert s["mac"] == result["interfaces"][1]["mac"]
    assert s["ipNetworks"] == [result["ips"][0]["address"]]
    assert [(p["name"], p["port"], p["hostPort"]) for p in s["ports"]] == [
        ("http", 8080, 0), ("", 9090, 19090)]
    # the allocation carries calico-ipam's attributes
    [handle_key] = etcd_keys(lab.server, HANDLE_PREFIX)
    assert handle_key.endswith(f"{NET}.c0ffee1")
    # the endpoint went into etcd in the same transaction as the address (one revision)
    revs = json.loads(lab.server.etcdctl("get", "--prefix", "/calico/", "-w", "json"))["kvs"]
    by_key = {base64.b64decode(kv["key"]).decode(): kv["mod_revision"] for kv in revs}
    [wep_rev] = [r for k, r in by_key.items() if k.startswith(WEP_PREFIX)]
    assert by_key[handle_key] == wep_rev


def test_pod_annotations_read_while_the_veth_is_made(lab: Harness) -> None:
    """ADD makes the veth before the Pod is read: a MAC the Pod's annotation asks for still
    wins, and a Pod that turns out to use the host network gets its veth removed."""
    lab.apply(
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "fixed-mac", "namespace": "prod",
                      "annotations": {"cni.projectcalico.org/hwAddr": "0A:58:0A:F4:00:09"}},
         "spec": {"containers": [{"name": "c"}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostnet", "namespace": "prod"},
         "spec": {"hostNetwork": True, "containers": [{"name": "c"}]}})
    pod = lab.pod()
    result = lab.add(pod, "fixed-mac", "cmac1")
    assert result["interfaces"][1]["mac"] == "0a:58:0a:f4:00:09"
    [eth0] = ip_json(pod, "link", "show", "eth0")
    assert eth0["address"] == "0a:58:0a:f4:00:09"
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["spec"]["mac"] == "0a:58:0a:f4:00:09"
    ok(lab.call("DEL", lab.conf(), "cmac1", pod, pod_args("fixed-mac", cid="cmac1")))
    other = lab.pod()
    out = failed(lab.call("ADD", lab.conf(), "chost1", other, pod_args("hostnet", cid="chost1")),
                 spec.INVALID_CONFIG)
    assert "host network" in out["msg"]
    assert_clean(lab)
    assert link_names(other) == {"lo"}


def test_addresses_given_without_ipam(lab: Harness) -> None:
    """Calico's `ipAddrsNoIpam`, only where the netconf's feature_control allows it: the pod
    gets the addresses as given (here outside every pool), IPAM records nothing, CHECK passes
    without an IPAM record, DEL leaves nothing. Refused (code 7, nothing left) when the netconf
    does not allow it, together with `ipAddrs`, and for `floatingIPs` (Tabby has none)."""
    no_ipam = "cni.projectcalico.org/ipAddrsNoIpam"

    def pod(name: str, annotations: dict[str, str]) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "prod", "annotations": annotations},
                "spec": {"containers": [{"name": "c"}]}}

    lab.apply(pod("given", {no_ipam: '["10.99.0.7", "fd00:99::7"]'}),
              pod("both", {no_ipam: '["10.99.0.8"]',
                           "cni.projectcalico.org/ipAddrs": '["10.250.0.9"]'}),
              pod("floating", {"cni.projectcalico.org/floatingIPs": '["192.0.2.1"]'}))
    allowed = lab.conf(feature_control={"ip_addrs_no_ipam": True})
    ns = lab.pod()
    args = pod_args("given", cid="cgiven1")
    result = ok(lab.call("ADD", allowed, "cgiven1", ns, args))
    assert [ip["address"] for ip in result["ips"]] == ["10.99.0.7/32", "fd00:99::7/128"]
    [eth0] = ip_json(ns, "addr", "show", "eth0")
    assert {("10.99.0.7", 32), ("fd00:99::7", 128)} <= {
        (a["local"], a["prefixlen"]) for a in eth0["addr_info"]}
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["spec"]["ipNetworks"] == ["10.99.0.7/32", "fd00:99::7/128"]
    assert etcd_keys(lab.server, HANDLE_PREFIX) == [] and allocated(lab.server) == []
    assert ok(lab.call("CHECK", allowed, "cgiven1", ns, args, prev=result)) is None
    ok(lab.call("DEL", allowed, "cgiven1", ns, args))
    assert_clean(lab)
    for name, conf, words in (("given", lab.conf(), '"feature_control"'),
                              ("both", allowed, "has both"),
                              ("floating", allowed, "floating IPs")):
        other = lab.pod()
        out = failed(lab.call("ADD", conf, f"c{name}2", other, pod_args(name, cid=f"c{name}2")),
                     spec.INVALID_CONFIG)
        assert words in f"{out['msg']} {out.get('details', '')}", out
        assert_clean(lab)
        assert link_names(other) == {"lo"}
    bad = lab.conf(feature_control={"ip_addrs_no_ipam": "yes"})
    out = failed(lab.call("ADD", bad, "cbad1", lab.pod(), pod_args("given")), spec.INVALID_CONFIG)
    assert "feature_control.ip_addrs_no_ipam" in out["msg"]
    assert_clean(lab)


def test_non_k8s_workload_and_requested_ip_and_mac(lab: Harness) -> None:
    """podman's CNI_ARGS: only K8S_POD_NAME, plus IP= and MAC= for --ip and --mac-address."""
    pod = lab.pod()
    args = "IgnoreUnknown=1;K8S_POD_NAME=box;IP=10.250.0.77;MAC=02:11:22:33:44:55"
    result = ok(lab.call("ADD", lab.conf(), "podmanbox1", pod, args))
    assert result["ips"][0]["address"] == "10.250.0.77/32"
    assert result["interfaces"][1]["mac"] == "02:11:22:33:44:55"
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["metadata"]["name"] == "node--a-cni-podmanbox1-eth0"
    assert endpoint["spec"]["profiles"] == [NET]
    ok(lab.call("DEL", lab.conf(), "podmanbox1", pod, args))
    assert_clean(lab)


def test_repeated_add_keeps_the_address_and_replaces_the_plumbing(lab: Harness) -> None:
    pod = lab.pod()
    first = lab.add(pod, "web-0", "c1")
    second = lab.add(pod, "web-0", "c1")
    assert first["ips"] == second["ips"]
    assert len(etcd_keys(lab.server, HANDLE_PREFIX)) == 1 and len(allocated(lab.server)) == 1
    [eth0] = ip_json(pod, "link", "show", "eth0")
    assert eth0["address"] == second["interfaces"][1]["mac"]


def test_dual_stack_and_detected_mtu(lab: Harness) -> None:
    pool6 = validate({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                      "metadata": {"name": "pool-6"}, "spec": {"cidr": "fd00:250::/112"}})
    lab.server.etcdctl("put", POOL_PREFIX + "pool-6", json.dumps(pool6))
    conf = lab.conf(ipam={"type": "calico-ipam", "assign_ipv6": "true"}, mtu_overhead=50,
                    mtu_file=str(lab.spool.parent / "no-mtu-file"))
    del conf["mtu"]  # detected: the test host has no default route, so 1500 - overhead
    pod = lab.pod()
    result = lab.add(pod, "web-0", "c1", conf)
    v4, v6 = (ipaddress.ip_interface(ip["address"]) for ip in result["ips"])
    assert (v4.version, v4.network.prefixlen, v6.version, v6.network.prefixlen) == (4, 32, 6, 128)
    [eth0] = ip_json(pod, "addr", "show", "eth0")
    assert eth0["mtu"] == 1450
    assert (str(v6.ip), 128) in {(a["local"], a["prefixlen"]) for a in eth0["addr_info"]}
    [default6] = ip_json(pod, "-6", "route", "show", "default")
    assert default6["gateway"] == "fe80::ecee:eeff:feee:eeee"
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["spec"]["ipNetworks"] == [str(v4), str(v6)]
    ok(lab.call("CHECK", conf, "c1", pod, pod_args("web-0"), prev=result))
    ok(lab.call("DEL", conf, "c1", pod, pod_args("web-0")))
    assert_clean(lab)


def test_mtu_from_the_routing_agents_file(lab: Harness) -> None:
    """mtu 0: the number tabby-node's routing agent wrote (Calico's /var/lib/calico/mtu);
    with require_mtu_file and no file, ADD says to try again and leaves nothing behind."""
    mtu_file = lab.spool.parent / "mtu"
    mtu_file.write_text("1410\n")
    conf = lab.conf(mtu_file=str(mtu_file))
    del conf["mtu"]
    pod = lab.pod()
    lab.add(pod, "web-0", "cm1", conf)
    assert ip_json(pod, "link", "show", "eth0")[0]["mtu"] == 1410
    ok(lab.call("DEL", conf, "cm1", pod, pod_args("web-0", cid="cm1")))
    mtu_file.unlink()
    out = failed(lab.call("ADD", dict(conf, require_mtu_file=True), "cm2", pod,
                          pod_args("web-0", cid="cm2")), spec.TRY_AGAIN_LATER)
    assert str(mtu_file) in out["msg"]
    assert_clean(lab)
    assert link_names(pod) == {"lo"}


def test_chained_with_portmap(lab: Harness) -> None:
    """A conflist [tabby, portmap] driven as libcni does: portmap gets tabby's result as
    prevResult and the runtime's portMappings, in the same (test host) namespace."""
    portmap = require_binary(f"{CNI_PATH}/portmap")
    require_binary("iptables")
    pod = lab.pod()
    args = pod_args("web-0")
    result = lab.add(pod, "web-0", "c1")
    address = ipaddress.ip_interface(result["ips"][0]["address"]).ip
    mapping = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}

    def run_portmap(command: str) -> subprocess.CompletedProcess[bytes]:
        body = {"cniVersion": "1.0.0", "name": NET, "type": "portmap", "snat": True,
                "capabilities": {"portMappings": True}, "runtimeConfig": mapping,
                "prevResult": result}
        env = {k: v for k, v in lab.env(command, "c1", pod, args).items()
               if k != handler.HOST_NETNS_ENV}
        return subprocess.run(["nsenter", f"--net=/run/netns/{lab.host}", portmap], env=env,
                              input=json.dumps(body).encode(), capture_output=True, timeout=30)

    added = run_portmap("ADD")
    assert added.returncode == 0, added.stdout + added.stderr
    assert json.loads(added.stdout)["ips"] == result["ips"]  # passed through unchanged
    rules = sh("nsenter", f"--net=/run/netns/{lab.host}", "iptables-save", "-t", "nat")
    assert f"--to-destination {address}:80" in rules
    deleted = run_portmap("DEL")  # reverse order: portmap first, then tabby
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    ok(lab.call("DEL", lab.conf(), "c1", pod, args, prev=result))
    assert_clean(lab)


# -- DEL ------------------------------------------------------------------------------------------


def test_del_removes_everything_and_can_repeat(lab: Harness) -> None:
    pod = lab.pod()
    args = pod_args("web-0", cid="c1")
    result = lab.add(pod, "web-0", "c1")
    assert len(lab.host_links()) == 1
    assert ok(lab.call("DEL", lab.conf(), "c1", pod, args, prev=result)) is None
    assert_clean(lab)
    assert link_names(pod) == {"lo"}
    ok(lab.call("DEL", lab.conf(), "c1", pod, args))  # containerd's second DEL
    ok(lab.call("DEL", lab.conf(), "c1", None, args))  # with an empty CNI_NETNS
    sh("ip", "netns", "del", pod)
    ok(lab.call("DEL", lab.conf(), "c1", pod, args))  # with a vanished netns
    assert_clean(lab)


def test_del_with_empty_netns_after_add(lab: Harness) -> None:
    """ctr's DEL: the task is gone (its netns with it), CNI_NETNS is empty."""
    pod = lab.pod()
    lab.add(pod, "web-0", "c1")
    sh("ip", "netns", "del", pod)
    ok(lab.call("DEL", lab.conf(), "c1", None, pod_args("web-0")))
    assert_clean(lab)


def test_del_keeps_the_endpoint_of_a_newer_container(lab: Harness) -> None:
    old, new = lab.pod(), lab.pod()
    lab.add(old, "web-0", "old1")
    fresh = lab.add(new, "web-0", "new1")  # the pod's new sandbox: same endpoint, same veth
    ok(lab.call("DEL", lab.conf(), "old1", old, pod_args("web-0")))
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["spec"]["containerID"] == "new1"
    assert [k.rsplit(".", 1)[-1] for k in etcd_keys(lab.server, HANDLE_PREFIX)] == ["new1"]
    ok(lab.call("CHECK", lab.conf(), "new1", new, pod_args("web-0"), prev=fresh))


def test_del_with_etcd_down_spools_and_replay_finishes(fresh_etcd: EtcdServer,
                                                        tmp_path: Path) -> None:
    lab = Harness(fresh_etcd, tmp_path)
    try:
        pod = lab.pod()
        args = pod_args("web-0")
        lab.add(pod, "web-0", "c1")
        ok(lab.call("STATUS", lab.conf("1.1.0"), "", None, ""))
        fresh_etcd.stop()
        failed(lab.call("STATUS", lab.conf("1.1.0"), "", None, ""), spec.NOT_AVAILABLE)
        reply = lab.call("DEL", lab.conf(), "c1", pod, args)
        assert ok(reply) is None and "unreachable" in reply.stderr
        assert lab.host_links() == set() and link_names(pod) == {"lo"}  # local part done
        [record_path] = lab.spool.iterdir()
        record = json.loads(record_path.read_text())
        assert record["handles"] == [f"{NET}.c1", "prod.web-0"]
        assert record["workloadEndpoint"] == {"name": "node--a-k8s-web--0-eth0",
                                              "namespace": "prod", "containerID": "c1"}
        assert lab.run(handler.replay_pending_deletes(lab.svc)) == 0  # still down: kept
        assert record_path.exists()
        fresh_etcd.start()
        assert lab.run(handler.replay_pending_deletes(lab.svc)) == 1
        assert list(lab.spool.iterdir()) == []
        assert_clean(lab)
    finally:
        lab.close()


# -- CHECK, GC, STATUS ----------------------------------------------------------------------------


def test_check_passes_then_fails_when_broken(lab: Harness) -> None:
    pod = lab.pod()
    args = pod_args("web-0")
    result = lab.add(pod, "web-0", "c1")
    assert ok(lab.call("CHECK", lab.conf(), "c1", pod, args, prev=result)) is None
    failed(lab.call("CHECK", lab.conf(), "c1", pod, args), spec.INVALID_CONFIG)  # no prevResult
    sh("ip", "-n", pod, "route", "del", "default")
    out = failed(lab.call("CHECK", lab.conf(), "c1", pod, args, prev=result),
                 handler.PLUMBING_FAILED)
    assert "default route" in out["msg"]
    sh("ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
    ok(lab.call("CHECK", lab.conf(), "c1", pod, args, prev=result))
    lab.server.etcdctl("del", "--prefix", WEP_PREFIX)
    failed(lab.call("CHECK", lab.conf(), "c1", pod, args, prev=result), handler.ENDPOINT_MISSING)
    lab.run(lab.svc.ipam.release_by_handle(f"{NET}.c1"))
    failed(lab.call("CHECK", lab.conf(), "c1", pod, args, prev=result),
           spec.ALLOCATION_MISSING)


def test_gc_releases_what_the_runtime_no_longer_lists(lab: Harness) -> None:
    pods = {cid: lab.pod() for cid in ("c1", "c2", "c3")}
    for i, (cid, pod) in enumerate(pods.items()):
        lab.add(pod, f"web-{i}", cid, lab.conf("1.1.0"))
    gc = lab.conf("1.1.0", **{"cni.dev/valid-attachments": [
        {"containerID": "c2", "ifname": "eth0"}]})
    ok(lab.call("GC", gc, "", None, ""))
    assert [k.rsplit(".", 1)[-1] for k in etcd_keys(lab.server, HANDLE_PREFIX)] == ["c2"]
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["spec"]["containerID"] == "c2" and len(allocated(lab.server)) == 1


# -- IPAM through another plugin ------------------------------------------------------------------


def test_host_local_ipam(lab: Harness, tmp_path: Path) -> None:
    require_binary(f"{CNI_PATH}/host-local")
    data = tmp_path / "host-local"
    conf = lab.conf(ipam={"type": "host-local", "dataDir": str(data),
                          "ranges": [[{"subnet": "10.251.0.0/24"}]]})
    pod = lab.pod()
    args = pod_args("web-0")
    result = ok(lab.call("ADD", conf, "c1", pod, args))
    [ip] = result["ips"]
    assert ip == {"address": "10.251.0.2/32", "interface": 1}
    assert (data / NET / "10.251.0.2").exists()
    assert etcd_keys(lab.server, HANDLE_PREFIX) == []  # Tabby's IPAM was not used
    [endpoint] = etcd_values(lab.server, WEP_PREFIX).values()
    assert endpoint["spec"]["ipNetworks"] == ["10.251.0.2/32"]
    result = ok(lab.call("ADD", conf, "c1", pod, args))  # repeated: a new veth, same address
    assert result["ips"] == [ip]
    ok(lab.call("CHECK", conf, "c1", pod, args, prev=result))
    ok(lab.call("DEL", conf, "c1", pod, args, prev=result))
    assert not (data / NET / "10.251.0.2").exists()
    ok(lab.call("DEL", conf, "c1", None, args))
    assert_clean(lab)


# -- many at once ---------------------------------------------------------------------------------


def test_fifty_adds_in_parallel(lab: Harness) -> None:
    pods = [lab.pod(f"p{i}") for i in range(50)]

    async def all_of(command: str) -> list[Reply]:
        return await asyncio.gather(*(
            lab.acall(command, lab.conf(), f"par{i}", pod, pod_args(f"web-{i}"))
            for i, pod in enumerate(pods)))

    results = [ok(r) for r in lab.run(all_of("ADD"))]
    addresses = {r["ips"][0]["address"] for r in results}
    assert len(addresses) == 50
    assert len(lab.host_links()) == 50
    assert len(etcd_keys(lab.server, WEP_PREFIX)) == 50
    for reply in lab.run(all_of("DEL")):
        ok(reply)
    assert_clean(lab)


# -- the in-process fallback, as the shim execs it ------------------------------------------------


def test_fallback_child_process(lab: Harness) -> None:
    pod = lab.pod()

    def fallback(command: str, body: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
        env = {**lab.env(command, "fb1", pod, pod_args("web-0")),
               handler.SPOOL_ENV: str(lab.spool)}
        return subprocess.run([sys.executable, "-m", "cni.fallback"], cwd=ROOT, env=env,
                              input=json.dumps(body).encode(), capture_output=True, timeout=60)

    add = fallback("ADD", lab.conf())
    assert add.returncode == 0, add.stderr.decode()
    result = json.loads(add.stdout)
    assert b"wrote WorkloadEndpoint" in add.stderr
    # the same shape as the daemon's answer for the same request
    again = lab.add(pod, "web-0", "fb1")
    assert again["ips"] == result["ips"]
    assert [i["name"] for i in again["interfaces"]] == [i["name"] for i in result["interfaces"]]
    bad = fallback("ADD", {**lab.conf(), "cniVersion": "0.0.9"})
    assert bad.returncode == 1 and json.loads(bad.stdout)["code"] == spec.INCOMPATIBLE_VERSION
    delete = fallback("DEL", {**lab.conf(), "prevResult": result})
    assert delete.returncode == 0 and delete.stdout == b"", delete.stderr.decode()
    assert_clean(lab)
    version = subprocess.run([sys.executable, "-m", "cni.fallback"], cwd=ROOT,
                             env={"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]},
                             input=b'{"cniVersion":"0.4.0"}', capture_output=True, timeout=60)
    assert json.loads(version.stdout)["cniVersion"] == "0.4.0"


def test_endpoint_write_guarded_by_an_earlier_read(etcd_server: EtcdServer) -> None:
    """wep.write with the key as read before: a Create/Update guarded by that read; when the
    key changed since, the ordinary apply takes over (uid and creationTimestamp kept)."""
    from cni import wep
    from datastore.etcd import Datastore

    w = wep.Workload(NODE, "k8s", "guarded", "pod-1", "c" * 64, "eth0", "cali0123456789a",
                     NET)

    async def go() -> None:
        async with Datastore(etcd_server.config()) as ds:
            store = ResourceStore(ds)
            if await ds.get(w.key) is not None:
                await ds.delete(w.key)
            first = await wep.write(store, wep.build(w, None, ["10.1.0.1"], "02:00:00:00:00:01"),
                                    None)
            kv = await ds.get(w.key)
            assert kv is not None and first["metadata"]["resourceVersion"] == str(kv.mod_revision)
            uid = first["metadata"]["uid"]
            # read as absent, but it exists by now: the Create is refused, apply replaces it
            second = await wep.write(store, wep.build(w, None, ["10.1.0.2"], "02:00:00:00:00:02"),
                                     None)
            assert second["metadata"]["uid"] == uid
            # read at an old revision: the Update is refused, apply replaces it
            third = await wep.write(store, wep.build(w, None, ["10.1.0.3"], "02:00:00:00:00:03"),
                                    kv)
            assert third["metadata"]["uid"] == uid
            # read at the current revision: one guarded Update
            fourth = await wep.write(store, wep.build(w, None, ["10.1.0.4"], "02:00:00:00:00:04"),
                                     await ds.get(w.key))
            stored = wep.resource(await ds.get(w.key))
            assert stored is not None
            assert stored["metadata"]["uid"] == fourth["metadata"]["uid"] == uid
            assert stored["metadata"]["creationTimestamp"] == first["metadata"]["creationTimestamp"]
            assert stored["spec"]["ipNetworks"] == ["10.1.0.4/32"]
            await ds.delete(w.key)

    asyncio.run(go())


def test_remembered_reads_skip_the_read_and_follow_every_change(
        etcd_server: EtcdServer, tmp_path: Path) -> None:
    """tabby-node's ADD once its watches have listed: no read round trip; what changed behind
    the watches' back (a Pod applied just before, pools swapped by etcdctl, a repeated ADD)
    fails the commit's guards and is read for real, so every result is still right."""
    h = Harness(etcd_server, tmp_path, remember=True)
    try:
        remembered = h.svc.remembered
        assert remembered is not None
        reads: list[int] = []
        read_many = h.svc.ds.read_many

        async def counted(*args: Any, **kwargs: Any) -> Any:
            reads.append(1)
            return await read_many(*args, **kwargs)

        h.svc.ds.read_many = counted  # type: ignore[method-assign]
        first = h.pod()
        h.add(first, "web-0", "r0")  # reads, and starts the watches
        assert reads == [1]

        async def caught_up() -> None:
            """Listed, and the first ADD's block claim (an affinity) seen by the watch."""
            from datastore.reads import ReadBatch
            from ipam.keys import host_prefix

            while True:
                got = remembered.answer(ReadBatch(lists=[host_prefix(NODE)]))
                if all(remembered.watching().values()) and got is not None:
                    try:
                        await h.svc.ds.commit(got[1])  # guards only: they hold
                        return
                    except Conflict:
                        pass
                await asyncio.sleep(0.01)
        h.run(asyncio.wait_for(caught_up(), 10))
        assert len(remembered.watching()) >= 5  # pods, namespaces, profiles, pools, host...

        addresses = set()
        pods = [h.pod() for _ in range(4)]
        for i, pod in enumerate(pods):
            addresses.add(h.add(pod, f"web-{i + 1}", f"r{i + 1}")["ips"][0]["address"])
        assert reads == [1], "ADD read etcd although its watches had everything"
        assert len(addresses) == 4 and len(etcd_keys(h.server, WEP_PREFIX)) == 5

        # a Pod applied right before its ADD: its labels are on the endpoint either way
        h.apply({"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "fresh", "namespace": "prod", "labels": {"app": "new"}},
                 "spec": {"containers": [{"name": "c"}]}})
        h.add(h.pod(), "fresh", "rf")
        endpoint = next(v for k, v in etcd_values(h.server, WEP_PREFIX).items() if "fresh" in k)
        assert endpoint["metadata"]["labels"]["app"] == "new"

        # pools swapped behind the watches' back: the next address is from the new pool
        pool_b = validate({"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                           "metadata": {"name": "pool-b"}, "spec": {"cidr": "10.251.0.0/24"}})
        h.server.etcdctl("put", POOL_PREFIX + "pool-b", json.dumps(pool_b))
        h.server.etcdctl("del", POOL_PREFIX + "pool-a")
        moved = h.add(h.pod(), "web-9", "r9")["ips"][0]["address"]
        assert moved.startswith("10.251.0.")

        # the same container again: it keeps its address (a handle that exists is read)
        again = h.add(pods[0], "web-1", "r1")["ips"][0]["address"]
        assert again in addresses
        assert len(etcd_keys(h.server, HANDLE_PREFIX)) == 7
    finally:
        h.close()

"""A real container runtime drives Tabby: Debian's podman 4.3 (CNI backend, runc) runs
containers on a lab node with the conflist cni-install wrote there (tabby + Debian's portmap).

podman execs `tabby` exactly as on a node: VERSION probes with a bare stdin, ADD/DEL with its
own 64-hex container IDs and `/run/netns/netns-<uuid>` namespaces, `K8S_POD_NAME` only, the
`portMappings` runtimeConfig for the chained portmap, DEL with its cached prevResult. Every
podman command runs inside the lab node's namespace (`nsenter --net=`) with a private
containers.conf, storage and image (busybox-static as the whole root filesystem), so nothing
of it reaches the root namespace; the lab's teardown removes the node with whatever podman
left in it (its CNI-* iptables chains live there too).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni import netns as nslib
from tests.conftest import require_binary
from tests.integration.test_lab import LabCli

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

NETWORK = "k8s-pod-network"  # the conflist's name, as cni-install writes it
IMAGE = "localhost/tabby-bb:latest"
WEP_PREFIX = "/calico/resources/v3/projectcalico.org/workloadendpoints/"
HANDLE_PREFIX = "/calico/ipam/v2/handle/"
TIMEOUT = 120


class Podman:
    """podman with private storage and config, run inside a lab node's namespace."""

    def __init__(self, lab: LabCli, work: Path) -> None:
        self.lab, self.work = lab, work
        state = lab.state()
        self.node = state["nodes"]["node1"]
        self.etcd = state["etcd"]
        conf = work / "containers.conf"
        conf.write_text(f"""[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[network]
network_backend = "cni"
default_network = "{NETWORK}"
cni_plugin_dirs = ["{self.node['bin_dir']}", "/usr/lib/cni"]
network_config_dir = "{self.node['net_dir']}"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
""")
        # the lab's socket is not the default /run/tabby/cni.sock: podman hands its environment
        # to the plugins, so the shim finds it (podman's cleanup process does not: its DEL
        # runs through the shim's in-process fallback, the other path a node can take)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf),
                    "TABBY_CNI_SOCKET": self.node["socket"]}
        self.base = ["podman", "--root", str(work / "root"), "--runroot", str(work / "runroot"),
                     "--tmpdir", str(work / "tmp")]

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.node['ns']}", *self.base,
                               *args], env=self.env, capture_output=True, text=True,
                              timeout=TIMEOUT)
        if check:
            assert done.returncode == 0, f"podman {' '.join(args)}: {done.stdout}{done.stderr}"
        return done

    def import_busybox(self) -> None:
        busybox = require_binary("busybox")
        rootfs = self.work / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            for d in ("bin", "etc", "proc", "sys", "dev", "tmp"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.add(busybox, "bin/busybox")
            for applet in ("sh", "ip", "cat", "tail", "sleep", "nc", "echo"):
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        self("import", str(rootfs), IMAGE)

    def etcd_keys(self, prefix: str) -> list[str]:
        done = subprocess.run(["ip", "netns", "exec", self.etcd["ns"], "etcdctl",
                               f"--endpoints={self.etcd['endpoint']}", "get", "--prefix",
                               "--keys-only", prefix], capture_output=True, text=True,
                              env={**os.environ, "ETCDCTL_API": "3"}, check=True, timeout=30)
        return [k for k in done.stdout.split() if k]

    def host_veths(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.node["ns"], "-o", "link", "show"],
                             capture_output=True, text=True, check=True).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines()
                if ": cali" in line]


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    for binary in ("podman", "runc", "nsenter", "etcdctl", "/usr/lib/cni/portmap"):
        require_binary(binary)
    work = tmp_path_factory.mktemp("podman")
    cli = LabCli(f"p{os.getpid()}", work / "lab")
    pm: Podman | None = None
    try:
        cli.run("up", "--nodes", "1")
        pm = Podman(cli, work)
        pm.import_busybox()
        yield pm
    finally:
        if pm is not None:
            pm("rm", "--all", "--force", "--time", "0", check=False)
            pm("rmi", "--all", "--force", check=False)
        cli.run("down", check=False)
        shutil.rmtree(work, ignore_errors=True)


def node_tcp(pm: Podman, host: str, port: int) -> str:
    """Connect from the lab node's namespace and read what the other end says (retried while
    refused: the container's `nc` is restarted after each connection)."""
    def talk() -> str:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection((host, port), timeout=5) as c:
                    return c.recv(100).decode().strip()
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    return nslib.run_in_netns(pm.node["ns"], talk)


def test_run_rm_gets_a_calico_pod_network_and_leaves_nothing(podman: Podman) -> None:
    out = podman("run", "--rm", "--name", "once", "--network", NETWORK, IMAGE, "/bin/sh", "-c",
                 "ip -o -4 addr show dev eth0; ip route; tail -1 /etc/hosts; "
                 "cat /sys/class/net/eth0/mtu").stdout.splitlines()
    addr_line, default, link_route, hosts, mtu = out
    ip = addr_line.split("inet ")[1].split()[0]
    assert ip.startswith("10.244.") and ip.endswith("/32"), addr_line
    assert default.split() == ["default", "via", "169.254.1.1", "dev", "eth0"]
    assert link_route.split()[:4] == ["169.254.1.1", "dev", "eth0", "scope"]
    # podman read Tabby's result: the address it puts in the container's /etc/hosts
    assert hosts.split()[0] == ip.split("/")[0] and hosts.split()[-1] == "once"
    assert mtu == "1500"  # the lab's MTU file: no encapsulation
    # --rm: podman's DEL removed the endpoint, the address and the veth
    assert podman.etcd_keys(WEP_PREFIX) == []
    assert podman.etcd_keys(HANDLE_PREFIX) == []
    assert podman.host_veths() == []


def test_a_running_container_is_reachable_directly_and_through_portmap(
        podman: Podman) -> None:
    podman("run", "--detach", "--name", "web", "--network", NETWORK, "--publish", "18080:8080",
           IMAGE, "/bin/sh", "-c", "while true; do echo hello | nc -l -p 8080; done")
    try:
        info: Any = podman("inspect", "web", "--format",
                           "{{.Id}} {{.NetworkSettings.Networks}}").stdout.split()
        cid = info[0]
        ip = podman("inspect", "web", "--format",
                    f"{{{{(index .NetworkSettings.Networks \"{NETWORK}\").IPAddress}}}}"
                    ).stdout.strip()
        [wep] = podman.etcd_keys(WEP_PREFIX)
        assert wep.endswith(f"/default/node1-cni-{cid}-eth0")  # Calico's name, no k8s pod
        assert podman.host_veths() == [f"cali{cid[:11]}"]
        assert node_tcp(podman, ip, 8080) == "hello"
        # portmap, chained after tabby, DNATs the node's port to the address Tabby gave
        assert node_tcp(podman, podman.node["ip"], 18080) == "hello"
    finally:
        podman("rm", "--force", "--time", "0", "web")
    assert podman.etcd_keys(WEP_PREFIX) == []
    assert podman.etcd_keys(HANDLE_PREFIX) == []
    assert podman.host_veths() == []

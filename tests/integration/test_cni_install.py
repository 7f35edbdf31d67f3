"""cni-install into temporary directories: files, modes, conflist, idempotence, uninstall, and
the installed `tabby` running VERSION through the in-process fallback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cni import shim, spec
from cni.install import SYSTEM_PLUGINS
from datastore.config import EtcdConfig, config_from_netconf, load_config

CNI_INSTALL = Path(sys.executable).parent / "cni-install"
# The interpreter cni-install runs under (its own shebang), which it bakes into what it installs;
# pytest's sys.executable may name the same venv as python3 instead of python.
INSTALL_PYTHON = CNI_INSTALL.read_text().splitlines()[0][2:].split()[0]


def dirs(tmp_path: Path) -> dict[str, Path]:
    return {"bin": tmp_path / "bin", "net": tmp_path / "net.d", "cfg": tmp_path / "etc-tabby"}


def install(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    d = dirs(tmp_path)
    return subprocess.run(
        [str(CNI_INSTALL), "--bin-dir", str(d["bin"]), "--net-dir", str(d["net"]),
         "--config-dir", str(d["cfg"]), *extra],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("ETCD_")})


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (src / name).write_text(f"-----BEGIN TEST {name}-----\n")
        files[name] = src / name
    return files


def tls_args(tls: dict[str, Path]) -> list[str]:
    return ["--etcd-endpoints", "https://10.0.0.1:2379,https://10.0.0.2:2379",
            "--etcd-ca-cert-file", str(tls["ca.pem"]), "--etcd-cert-file", str(tls["cert.pem"]),
            "--etcd-key-file", str(tls["key.pem"]), "--nodename", "node-1"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def snapshot(root: Path) -> dict[str, tuple[int, int, float]]:
    return {str(p): (p.lstat().st_ino, p.lstat().st_mode, p.lstat().st_mtime)
            for p in sorted(root.rglob("*"))}


def test_installs_files_with_modes_and_content(tmp_path: Path, tls: dict[str, Path]) -> None:
    done = install(tmp_path, *tls_args(tls))
    assert done.returncode == 0, done.stderr
    d = dirs(tmp_path)
    cfg = d["cfg"]
    for option, name in (("ca.pem", "etcd-ca.crt"), ("cert.pem", "etcd-cert.crt"),
                         ("key.pem", "etcd-key.key")):
        assert (cfg / name).read_bytes() == tls[option].read_bytes()
        assert mode(cfg / name) == 0o600
    assert mode(d["bin"] / "tabby") == mode(d["bin"] / "tabby-ipam") == 0o755

    conflist = json.loads((d["net"] / "10-tabby.conflist").read_text())
    assert conflist == {
        "name": "k8s-pod-network", "cniVersion": "1.0.0",
        "plugins": [
            {"type": "tabby", "datastore_type": "etcdv3",
             "etcd_endpoints": "https://10.0.0.1:2379,https://10.0.0.2:2379",
             "etcd_ca_cert_file": str(cfg / "etcd-ca.crt"),
             "etcd_cert_file": str(cfg / "etcd-cert.crt"),
             "etcd_key_file": str(cfg / "etcd-key.key"),
             "nodename": "node-1", "mtu": 0, "log_level": "info",
             "log_file_path": "/var/log/tabby/cni.log", "ipam": {"type": "tabby-ipam"}},
            {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}},
        ],
    }
    # tabbyctl and tabby-node read the same etcd settings as the plugin (one warm connection)
    assert load_config(str(cfg / "tabbyctl.cfg")) == config_from_netconf(conflist["plugins"][0])
    assert load_config(str(cfg / "tabbyctl.cfg")) == EtcdConfig(
        endpoints=("https://10.0.0.1:2379", "https://10.0.0.2:2379"),
        ca_cert_file=str(cfg / "etcd-ca.crt"), cert_file=str(cfg / "etcd-cert.crt"),
        key_file=str(cfg / "etcd-key.key"))

    first = (d["bin"] / "tabby").read_text().splitlines()[0]
    assert first in ("#!/usr/bin/python3 -IS", f"#!{INSTALL_PYTHON} -IS")
    module = (d["bin"] / ".tabby" / "tabby_shim.py").read_text()
    assert f"TABBY_PYTHON = {INSTALL_PYTHON!r}\n" in module
    assert module.replace(f"TABBY_PYTHON = {INSTALL_PYTHON!r}", 'TABBY_PYTHON = ""') == (
        Path(shim.__file__).read_text())  # otherwise a verbatim copy
    assert (d["bin"] / "tabby-ipam").read_text().startswith(f"#!{INSTALL_PYTHON} -I\n")
    if (SYSTEM_PLUGINS / "portmap").exists():
        assert os.readlink(d["bin"] / "portmap") == str(SYSTEM_PLUGINS / "portmap")
    leftovers = [p for p in tmp_path.rglob(".*") if p.name != ".tabby"]
    assert leftovers == []  # no temporary files


def test_the_shim_runs_from_its_precompiled_bytecode(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    tabby = dirs(tmp_path)["bin"] / "tabby"
    interpreter = tabby.read_text().splitlines()[0][2:].split()[0]
    done = subprocess.run([interpreter, "-IS", "-v", str(tabby), "--version"],
                          capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout == f"tabby {shim.VERSION}\n"
    # -v says when the bytecode is valid for the source and used instead of compiling it
    module = dirs(tmp_path)["bin"] / ".tabby" / "tabby_shim.py"
    assert f".pyc matches {module}" in done.stderr


def test_second_run_changes_nothing_and_says_so(tmp_path: Path, tls: dict[str, Path]) -> None:
    assert install(tmp_path, *tls_args(tls)).returncode == 0
    before = snapshot(tmp_path)
    again = install(tmp_path, *tls_args(tls))
    assert again.returncode == 0
    assert again.stdout == "cni-install: nothing to do; everything is already in place\n"
    assert snapshot(tmp_path) == before


def test_a_changed_option_rewrites_only_what_changes(tmp_path: Path, tls: dict[str, Path]
                                                     ) -> None:
    assert install(tmp_path, *tls_args(tls)).returncode == 0
    conflist = dirs(tmp_path)["net"] / "10-tabby.conflist"
    done = install(tmp_path, *tls_args(tls), "--mtu", "1400")
    assert done.stdout == f"cni-install: updated {conflist} (mode 0644)\n"
    assert json.loads(conflist.read_text())["plugins"][0]["mtu"] == 1400
    # a key file made readable by others is put back to 0600
    key = dirs(tmp_path)["cfg"] / "etcd-key.key"
    key.chmod(0o644)
    assert "updated" in install(tmp_path, *tls_args(tls), "--mtu", "1400").stdout
    assert mode(key) == 0o600
    # the MTU file tabby-node writes, when it is not Calico's /var/lib/calico/mtu
    install(tmp_path, *tls_args(tls), "--mtu-file", "/run/tabby-x/mtu")
    plugin = json.loads(conflist.read_text())["plugins"][0]
    assert (plugin["mtu"], plugin["mtu_file"]) == (0, "/run/tabby-x/mtu")


def test_dropping_tls_removes_the_copies(tmp_path: Path, tls: dict[str, Path]) -> None:
    assert install(tmp_path, *tls_args(tls)).returncode == 0
    done = install(tmp_path, "--etcd-endpoints", "http://127.0.0.1:2379")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dirs(tmp_path)["cfg"].iterdir()) == ["tabbyctl.cfg"]
    plugin = json.loads((dirs(tmp_path)["net"] / "10-tabby.conflist").read_text())["plugins"][0]
    assert "etcd_key_file" not in plugin and "nodename" not in plugin


def test_bad_settings_fail_before_writing(tmp_path: Path, tls: dict[str, Path]) -> None:
    done = install(tmp_path, "--etcd-endpoints", "http://10.0.0.1:2379",
                   "--etcd-ca-cert-file", str(tls["ca.pem"]))
    assert done.returncode != 0 and "https" in done.stderr
    done = install(tmp_path, "--etcd-endpoints", "ftp://x")
    assert done.returncode != 0 and "not an etcd endpoint" in done.stderr
    assert not any(tmp_path.glob("bin")) and not any(tmp_path.glob("net.d"))


def test_installed_tabby_runs_version_through_the_fallback(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    tabby = dirs(tmp_path)["bin"] / "tabby"
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "VERSION",
           "TABBY_CNI_SOCKET": str(tmp_path / "absent.sock")}  # no TABBY_PYTHON: the baked one
    done = subprocess.run([str(tabby)], input=b'{"cniVersion":"0.4.0"}', env=env,
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == spec.version_result("0.4.0")
    version = subprocess.run([str(tabby), "--version"], capture_output=True, text=True,
                             timeout=30, check=True)
    assert version.stdout == f"tabby {shim.VERSION}\n"
    ipam = subprocess.run([str(dirs(tmp_path)["bin"] / "tabby-ipam")],
                          input=b'{"cniVersion":"1.0.0"}', env=env, capture_output=True,
                          timeout=60, check=False)
    assert ipam.returncode == 0, ipam.stderr
    assert json.loads(ipam.stdout)["cniVersion"] == "1.0.0"


def test_uninstall_removes_everything_it_installed(tmp_path: Path, tls: dict[str, Path]) -> None:
    assert install(tmp_path, *tls_args(tls)).returncode == 0
    d = dirs(tmp_path)
    (d["bin"] / "bridge").write_text("someone else's plugin")
    done = install(tmp_path, "--uninstall")
    assert done.returncode == 0
    assert "removed" in done.stdout
    assert [p.name for p in d["bin"].iterdir()] == ["bridge"]
    assert list(d["net"].iterdir()) == []
    assert not d["cfg"].exists()
    assert install(tmp_path, "--uninstall").stdout == (
        "cni-install: nothing to do; everything is already in place\n")

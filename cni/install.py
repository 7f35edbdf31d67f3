"""cni-install: bootstrap a node for Tabby, as Calico's install-cni does.

Installs into the CNI bin dir `tabby` and `tabby-ipam`; writes Tabby's config (`tabbyctl.cfg`,
copies of the etcd TLS files, mode 0600) and then, last, `10-tabby.conflist` into the CNI net
dir, so a runtime never sees a conflist whose plugin is missing.

`tabby` is a five-line launcher (`#!/usr/bin/python3 -IS`) that imports a copy of cni/shim.py,
with this virtualenv's python baked in for the in-process fallback, from `<bin-dir>/.tabby/`
together with its bytecode compiled by that interpreter: a script is compiled on every exec
(~2.5 ms, against ~11 ms for a whole exec of the shim), an imported module is not. Runtimes
exec only `<bin-dir>/<type>`, so the hidden directory is invisible to them.

Idempotent: a file whose content and mode are already right is not touched, and a re-run says
that nothing changed. Every write is a rename of a complete temporary file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from datastore.config import DEFAULT_ENDPOINT, ConfigError, load_config

CONFLIST_NAME = "10-tabby.conflist"
NETWORK_NAME = "k8s-pod-network"
CONFLIST_VERSION = "1.0.0"  # Debian's portmap (v1.1.1) speaks up to 1.0.0
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_NET_DIR = "/etc/cni/net.d"
DEFAULT_CONFIG_DIR = "/etc/tabby"
DEFAULT_CNI_LOG = "/var/log/tabby/cni.log"
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
MAX_SHEBANG = 255  # the kernel's limit for a #! line (BINPRM_BUF_SIZE, Linux >= 5.1)
SHIM_DIR = ".tabby"
SHIM_MODULE = "tabby_shim"

# option -> (file name in the config dir, EtcdConfig field)
TLS_FILES = {
    "etcd_ca_cert_file": "etcd-ca.crt",
    "etcd_cert_file": "etcd-cert.crt",
    "etcd_key_file": "etcd-key.key",
}
_TLS_SPEC_FIELDS = {
    "etcd_ca_cert_file": "etcdCACertFile",
    "etcd_cert_file": "etcdCertFile",
    "etcd_key_file": "etcdKeyFile",
}


class InstallError(Exception):
    """cni-install cannot go on; str() says why and what to do."""


@dataclass(frozen=True)
class Wanted:
    """A file cni-install owns: its path, exact content and mode, or a symlink target."""

    path: Path
    content: bytes = b""
    mode: int = 0o644
    link_to: Path | None = None

    def state(self) -> str:
        """absent / current / different, compared with what is on disk."""
        if self.link_to is not None:
            if not self.path.is_symlink():
                return "different" if self.path.exists() else "absent"
            return "current" if Path(os.readlink(self.path)) == self.link_to else "different"
        try:
            st = self.path.lstat()
        except FileNotFoundError:
            return "absent"
        if (st.st_mode & 0o7777) != self.mode or self.path.is_symlink():
            return "different"
        return "current" if self.path.read_bytes() == self.content else "different"


def atomic_write(path: Path, content: bytes, mode: int) -> None:
    """Write a complete temporary file with its final mode, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # before any byte is written: a key is never readable by others
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_symlink(path: Path, target: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, path)


# -- what to install --------------------------------------------------------------------------


def shim_python(venv_python: str) -> str:
    """The interpreter for `tabby`: Debian's python3 if it is 3.11+ (~17 ms to start), else
    this venv's python (a pyenv-built interpreter starts ~3x slower)."""
    try:
        done = subprocess.run(
            [SYSTEM_PYTHON, "-IS", "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True, text=True, timeout=10)
        if done.returncode == 0 and done.stdout.strip() == "True":
            return SYSTEM_PYTHON
    except (OSError, subprocess.TimeoutExpired):
        pass
    return venv_python


def _shebang(python: str, flags: str) -> str:
    # one argument only: the kernel passes everything after the path as a single word
    line = f"#!{python} {flags}\n"
    if len(line) > MAX_SHEBANG:
        raise InstallError(f"{python} is too long a path for a #! line; install the virtualenv "
                           "under a shorter path")
    return line


def shim_source(venv_python: str) -> bytes:
    source = (Path(__file__).with_name("shim.py")).read_text()
    source, n = re.subn(r"^TABBY_PYTHON = .*$", f"TABBY_PYTHON = {venv_python!r}", source,
                        count=1, flags=re.MULTILINE)
    if n != 1:
        raise InstallError("cni/shim.py has no TABBY_PYTHON line to rewrite")
    return source.encode()


_COMPILE = """import py_compile, sys
py_compile.compile(sys.argv[1], cfile=sys.argv[2], dfile=sys.argv[3], doraise=True,
                   invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
print(sys.implementation.cache_tag)
"""


def compile_for(interpreter: str, source: bytes, module: Path) -> tuple[str, bytes]:
    """(file name, bytes) of `source`'s bytecode as `interpreter` reads it. Hash-checked, so
    the bytes do not depend on mtimes (re-runs compare equal) and an edited source is never
    run from stale bytecode; an interpreter upgrade just recompiles."""
    with tempfile.TemporaryDirectory() as tmp:
        src, pyc = Path(tmp) / "shim.py", Path(tmp) / "shim.pyc"
        src.write_bytes(source)
        done = subprocess.run([interpreter, "-IS", "-c", _COMPILE, str(src), str(pyc),
                               str(module)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise InstallError(f"{interpreter} cannot compile the shim: {done.stderr.strip()}")
        return f"{SHIM_MODULE}.{done.stdout.strip()}.pyc", pyc.read_bytes()


def shim_files(bin_dir: Path, interpreter: str, venv_python: str) -> list[Wanted]:
    """The shim module, its bytecode, then the launcher (last: it never names a missing
    module)."""
    module = bin_dir / SHIM_DIR / f"{SHIM_MODULE}.py"
    source = shim_source(venv_python)
    pyc_name, pyc = compile_for(interpreter, source, module)
    launcher = (_shebang(interpreter, "-IS")
                + '"""tabby: Tabby\'s CNI plugin, installed by cni-install (cni/shim.py)."""\n'
                + f"import sys\n\nsys.path.insert(0, {str(module.parent)!r})\n"
                + f"from {SHIM_MODULE} import exit_now, main  # noqa: E402\n\n"
                + "exit_now(main())\n")
    return [Wanted(module, source), Wanted(module.parent / "__pycache__" / pyc_name, pyc),
            Wanted(bin_dir / "tabby", launcher.encode(), 0o755)]


def ipam_script(venv_python: str) -> bytes:
    return (_shebang(venv_python, "-I")
            + '"""tabby-ipam: Tabby\'s CNI IPAM plugin (installed by cni-install)."""\n'
            + "from cni.ipam_plugin import main\n\nmain()\n").encode()


def conflist(opts: argparse.Namespace, tls: dict[str, Path]) -> dict[str, object]:
    tabby: dict[str, object] = {
        "type": "tabby",
        "datastore_type": "etcdv3",
        "etcd_endpoints": opts.etcd_endpoints,
    }
    tabby.update({option: str(path) for option, path in tls.items()})
    if opts.nodename:
        tabby["nodename"] = opts.nodename
    tabby.update({"mtu": opts.mtu, "log_level": opts.log_level,
                  "log_file_path": opts.cni_log_file, "ipam": {"type": "tabby-ipam"}})
    if opts.mtu_file:
        tabby["mtu_file"] = opts.mtu_file
    portmap = {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}}
    return {"name": NETWORK_NAME, "cniVersion": CONFLIST_VERSION, "plugins": [tabby, portmap]}


def tabbyctl_cfg(endpoints: str, tls: dict[str, Path]) -> bytes:
    lines = ["apiVersion: projectcalico.org/v3", "kind: CalicoAPIConfig", "metadata: {}",
             "spec:", "  datastoreType: etcdv3", f"  etcdEndpoints: {json.dumps(endpoints)}"]
    lines += [f"  {_TLS_SPEC_FIELDS[o]}: {json.dumps(str(p))}" for o, p in tls.items()]
    return ("\n".join(lines) + "\n").encode()


def plan(opts: argparse.Namespace) -> list[Wanted]:
    """Every file cni-install owns with its wanted content, in write order (conflist last)."""
    bin_dir, net_dir, cfg_dir = Path(opts.bin_dir), Path(opts.net_dir), Path(opts.config_dir)
    given = {o: getattr(opts, o) for o in TLS_FILES if getattr(opts, o)}
    tls = {o: cfg_dir / TLS_FILES[o] for o in given}
    wanted = []
    for option, source in given.items():
        try:
            wanted.append(Wanted(tls[option], Path(source).read_bytes(), 0o600))
        except OSError as e:
            raise InstallError(f"--{option.replace('_', '-')} {source}: {e.strerror}") from None
    wanted.append(Wanted(cfg_dir / "tabbyctl.cfg", tabbyctl_cfg(opts.etcd_endpoints, tls)))
    venv_python = opts.python
    wanted += shim_files(bin_dir, shim_python(venv_python), venv_python)
    wanted.append(Wanted(bin_dir / "tabby-ipam", ipam_script(venv_python), 0o755))
    portmap = SYSTEM_PLUGINS / "portmap"
    link = bin_dir / "portmap"
    if portmap.exists() and (not link.exists() or link.is_symlink()):
        wanted.append(Wanted(link, link_to=portmap))  # the conflist chains it; CRI has one dir
    text = json.dumps(conflist(opts, tls), indent=2) + "\n"
    wanted.append(Wanted(net_dir / CONFLIST_NAME, text.encode()))
    return wanted


def stale_tls_files(opts: argparse.Namespace) -> Iterator[Path]:
    """Copies of TLS files from an earlier run that this run no longer configures."""
    for option, name in TLS_FILES.items():
        path = Path(opts.config_dir) / name
        if not getattr(opts, option) and path.exists():
            yield path


def validate(opts: argparse.Namespace) -> None:
    """The etcd settings must be usable, with datastore.config's own checks and messages."""
    env = {"ETCD_ENDPOINTS": opts.etcd_endpoints}
    env.update({option.upper(): getattr(opts, option) or "" for option in TLS_FILES})
    try:
        config = load_config(env=env)
    except ConfigError as e:
        raise InstallError(str(e)) from None
    opts.etcd_endpoints = ",".join(config.endpoints)


# -- install / uninstall ----------------------------------------------------------------------


def install(opts: argparse.Namespace) -> list[str]:
    validate(opts)
    changes = []
    for item in plan(opts):
        state = item.state()
        if state == "current":
            continue
        if item.link_to is not None:
            atomic_symlink(item.path, item.link_to)
            changes.append(f"linked {item.path} -> {item.link_to}")
        else:
            atomic_write(item.path, item.content, item.mode)
            changes.append(f"{'wrote' if state == 'absent' else 'updated'} {item.path}"
                           f" (mode {item.mode:04o})")
    for path in stale_tls_files(opts):
        path.unlink()
        changes.append(f"removed {path} (no longer configured)")
    return changes


def uninstall(opts: argparse.Namespace) -> list[str]:
    bin_dir, cfg_dir = Path(opts.bin_dir), Path(opts.config_dir)
    shim_dir = bin_dir / SHIM_DIR
    paths = [Path(opts.net_dir) / CONFLIST_NAME,  # first: the runtime stops calling tabby
             bin_dir / "tabby", bin_dir / "tabby-ipam",
             *sorted(shim_dir.rglob("*"), reverse=True),  # files before their directories
             shim_dir, cfg_dir / "tabbyctl.cfg", *(cfg_dir / name for name in TLS_FILES.values())]
    link = bin_dir / "portmap"
    if link.is_symlink() and Path(os.readlink(link)) == SYSTEM_PLUGINS / "portmap":
        paths.append(link)
    changes = []
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        elif path.is_symlink() or path.exists():
            path.unlink()
        else:
            continue
        changes.append(f"removed {path}")
    if cfg_dir.is_dir() and not any(cfg_dir.iterdir()):
        cfg_dir.rmdir()
        changes.append(f"removed {cfg_dir}/")
    return changes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="cni-install", description=__doc__.split("\n\n")[0])
    p.add_argument("--bin-dir", default=DEFAULT_BIN_DIR, help=f"default {DEFAULT_BIN_DIR}")
    p.add_argument("--net-dir", default=DEFAULT_NET_DIR, help=f"default {DEFAULT_NET_DIR}")
    p.add_argument("--config-dir", default=DEFAULT_CONFIG_DIR,
                   help=f"Tabby's config and etcd TLS copies (default {DEFAULT_CONFIG_DIR})")
    p.add_argument("--etcd-endpoints", default=env.get("ETCD_ENDPOINTS") or DEFAULT_ENDPOINT,
                   help=f"comma list (default ETCD_ENDPOINTS or {DEFAULT_ENDPOINT})")
    for option in TLS_FILES:
        p.add_argument(f"--{option.replace('_', '-')}", dest=option,
                       default=env.get(option.upper()) or None,
                       help=f"copied into the config dir, mode 0600 (default {option.upper()})")
    p.add_argument("--nodename", help="node name for the conflist (default: the CNI plugin "
                                      "reads /var/lib/calico/nodename, written by tabby-node)")
    p.add_argument("--mtu", type=int, default=0,
                   help="pod MTU; 0 (default): the one tabby-node writes to the MTU file, "
                        "which leaves room for the encapsulation")
    p.add_argument("--mtu-file", default="",
                   help="where tabby-node writes the pod MTU, if not /var/lib/calico/mtu "
                        "(tabby-node --mtu-file)")
    p.add_argument("--log-level", default="info", help="CNI plugin log level (default info)")
    p.add_argument("--cni-log-file", default=DEFAULT_CNI_LOG, help=f"default {DEFAULT_CNI_LOG}")
    p.add_argument("--python", default=sys.executable,
                   help="the Tabby virtualenv's python (default: the one running cni-install)")
    p.add_argument("--uninstall", action="store_true", help="remove what cni-install installed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    try:
        changes = uninstall(opts) if opts.uninstall else install(opts)
    except (InstallError, OSError) as e:
        sys.exit(f"cni-install: {e}")
    for line in changes:
        print(f"cni-install: {line}")
    if not changes:
        print("cni-install: nothing to do; everything is already in place")


if __name__ == "__main__":
    main()

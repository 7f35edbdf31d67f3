"""The `tabby` shim on its own: framing, fallback choice, the memfd hand-over, import cost.

The shim runs here as the installed copy does: `/usr/bin/python3 -IS cni/shim.py` (Debian's
python when it is 3.11+, else this interpreter).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni import shim, spec
from node.cni_service import parse_request, reply_frame

ROOT = Path(__file__).resolve().parents[2]
SHIM = ROOT / "cni" / "shim.py"


def shim_python() -> str:
    probe = subprocess.run(["/usr/bin/python3", "-IS", "-c",
                            "import sys; print(sys.version_info >= (3, 11))"],
                           capture_output=True, text=True, check=False)
    return "/usr/bin/python3" if probe.stdout.strip() == "True" else sys.executable


PYTHON = shim_python()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short path: unix socket names are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="tabby-shim-", dir="/tmp"))
    try:
        yield d
    finally:
        for p in sorted(d.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        d.rmdir()


def run_shim(env: dict[str, str], stdin: bytes = b"", *args: str,
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PYTHON, "-IS", str(SHIM), *args], input=stdin, env=env,
                          capture_output=True, timeout=timeout, check=False)


# -- framing ----------------------------------------------------------------------------------


def test_request_frame_round_trips_through_the_daemon_parser() -> None:
    env = {b"CNI_COMMAND": b"ADD", b"CNI_ARGS": "K8S_POD_NAME=ünïcode;IP=10.0.0.1".encode(),
           b"CNI_NETNS": b"", b"CNI_PATH": b"/opt/cni/bin:/x=y", b"PATH": b"/bin\xff"}
    stdin = b'{"cniVersion":"1.0.0","name":"n\xc3\xa9t"}\n\xff\xfe not utf-8 \x00'
    frame = shim.encode_request(env, stdin)
    got_env, got_stdin = parse_request(frame)
    assert got_stdin == stdin  # the runtime's exact bytes, even invalid UTF-8 and NUL
    assert {k.encode(): v.encode("utf-8", "surrogateescape") for k, v in got_env.items()} == env


def test_the_first_shims_json_frames_are_still_understood() -> None:
    frame = json.dumps({"env": {"CNI_COMMAND": "DEL"}, "stdin": "{}\udcff"}).encode()
    assert parse_request(frame) == ({"CNI_COMMAND": "DEL"}, b"{}\xff")
    assert json.loads(reply_frame(0, "out", "err", legacy=True)) == {
        "exit_code": 0, "stdout": "out", "stderr": "err"}


def test_reply_frame_round_trips_through_the_shim_decoder() -> None:
    out = json.dumps({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.1/32"}]}, indent=4)
    raw = reply_frame(7, out + "\n", "log line é\n")
    assert shim.decode_reply(raw) == (7, (out + "\n").encode(), "log line é\n".encode())
    assert shim.decode_reply(reply_frame(0, "", "")) == (0, b"", b"")


@pytest.mark.parametrize("raw", [b"", b"{", b'{"exit_code": 0}', b"TABBY-CNI 2 0 5",
                                 b"TABBY-CNI 2 x 0\n", b"TABBY-CNI 2 0 9\nshort",
                                 b"TABBY-CNI 3 0 0\n", b"TABBY-CNI 2 0 0 0\n"])
def test_malformed_replies_are_value_errors(raw: bytes) -> None:
    with pytest.raises(ValueError):
        shim.decode_reply(raw)


def test_only_cni_variables_and_path_are_forwarded() -> None:
    env = {b"CNI_COMMAND": b"DEL", b"CNI_NETNS": b"", b"PATH": b"/usr/bin", b"HOME": b"/root",
           b"TABBY_PYTHON": b"/x", b"KUBECONFIG": b"/secret"}
    assert shim.forwarded_env(env) == {b"CNI_COMMAND": b"DEL", b"CNI_NETNS": b"",
                                       b"PATH": b"/usr/bin"}


def test_error_json_is_a_cni_error_in_the_request_version() -> None:
    err = json.loads(shim.error_json(shim.TRY_AGAIN_LATER, 'later "é"\n',
                                     b'{"cniVersion":"0.4.0"}'))
    assert err == {"cniVersion": "0.4.0", "code": 11, "msg": "Try again later",
                   "details": 'later "é"\n'}
    assert json.loads(shim.error_json(50, "x", b"\xff"))["cniVersion"] == spec.CURRENT_VERSION


def test_constants_agree_with_the_rest_of_tabby() -> None:
    assert shim.SUPPORTED_VERSIONS == spec.SUPPORTED_VERSIONS
    assert shim.CURRENT_VERSION == spec.CURRENT_VERSION
    assert shim.TRY_AGAIN_LATER == spec.TRY_AGAIN_LATER
    assert shim.NOT_AVAILABLE == spec.NOT_AVAILABLE
    assert shim._ERROR_NAMES[11] == spec.ERROR_NAMES[11]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == shim.VERSION
    from node.cni_service import DEFAULT_SOCKET, REQUEST_TIMEOUT

    assert shim.DEFAULT_SOCKET == DEFAULT_SOCKET
    assert shim.REPLY_TIMEOUT > REQUEST_TIMEOUT  # the daemon answers first, even on timeout


def test_fallback_python_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shim, "TABBY_PYTHON", "")
    assert shim.fallback_python({}) == sys.executable
    monkeypatch.setattr(shim, "TABBY_PYTHON", "/baked/python")
    assert shim.fallback_python({}) == "/baked/python"
    assert shim.fallback_python({b"TABBY_PYTHON": b"/env/python"}) == "/env/python"


# -- as an executable -------------------------------------------------------------------------


def test_imports_nothing_beyond_builtin_c_modules() -> None:
    done = subprocess.run([PYTHON, "-IS", "-X", "importtime", str(SHIM), "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout == f"tabby {shim.VERSION}\n"
    imported = {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    imported.discard("imported package")  # the header line
    # interpreter start-up imports these before the shim runs
    startup = {"_io", "marshal", "posix", "_frozen_importlib_external", "time", "zipimport",
               "_codecs", "codecs", "encodings.aliases", "encodings", "encodings.utf_8",
               "_signal", "_abc", "abc", "io", "_thread", "_warnings", "_weakref", "_imp",
               "encodings.latin_1"}
    assert imported - startup <= {"_socket"}


def test_fallback_execs_the_tabby_python_with_stdin_in_a_memfd(short_dir: Path) -> None:
    fake = short_dir / "python"
    fake.write_text('#!/bin/sh\necho "argv: $*"\nls -l /proc/self/fd/0\ncat\nexit 7\n')
    fake.chmod(0o755)
    env = {"CNI_COMMAND": "ADD", "TABBY_CNI_SOCKET": str(short_dir / "absent.sock"),
           "TABBY_PYTHON": str(fake), "PATH": os.environ["PATH"]}
    done = run_shim(env, b'{"cniVersion":"1.0.0"}\xff')
    lines = done.stdout.split(b"\n", 2)
    assert done.returncode == 7
    assert lines[0] == b"argv: -I -m cni.fallback"
    assert b"memfd:tabby-stdin" in lines[1]
    assert lines[2] == b'{"cniVersion":"1.0.0"}\xff'


def test_stale_socket_file_falls_back(short_dir: Path) -> None:
    path = short_dir / "cni.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # bound, never listening: connect is refused
    stale.close()
    fake = short_dir / "python"
    fake.write_text("#!/bin/sh\necho fell back\n")
    fake.chmod(0o755)
    done = run_shim({"CNI_COMMAND": "VERSION", "TABBY_CNI_SOCKET": str(path),
                     "TABBY_PYTHON": str(fake)})
    assert (done.returncode, done.stdout) == (0, b"fell back\n")


def test_no_daemon_and_no_fallback_python_is_error_50(short_dir: Path) -> None:
    env = {"CNI_COMMAND": "DEL", "TABBY_CNI_SOCKET": str(short_dir / "absent.sock"),
           "TABBY_PYTHON": str(short_dir / "no-such-python")}
    done = run_shim(env, b'{"cniVersion":"0.3.1"}')
    err = json.loads(done.stdout)
    assert done.returncode == 1
    assert (err["code"], err["cniVersion"]) == (50, "0.3.1")
    assert "no-such-python" in err["details"] and b"tabby:" in done.stderr


def test_a_daemon_that_never_answers_gets_error_11_not_a_fallback(short_dir: Path) -> None:
    path = short_dir / "cni.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)  # accepted by the kernel, never read, never answered
    try:
        env = {"CNI_COMMAND": "ADD", "TABBY_CNI_SOCKET": str(path),
               "TABBY_CNI_REPLY_TIMEOUT": "0.5", "TABBY_PYTHON": "/bin/false"}
        done = run_shim(env, b'{"cniVersion":"1.0.0"}')
    finally:
        listener.close()
    err = json.loads(done.stdout)
    assert done.returncode == 1
    assert err["code"] == spec.TRY_AGAIN_LATER and "did not answer within 0.5 s" in err["details"]


def test_version_flag() -> None:
    for flag in ("--version", "-v"):
        done = run_shim({}, b"", flag)
        assert (done.returncode, done.stdout) == (0, f"tabby {shim.VERSION}\n".encode())

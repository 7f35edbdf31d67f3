"""tabbyctl as users run it (the installed console script) against a real etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.etcd
TABBYCTL = str(Path(sys.executable).parent / "tabbyctl")
EXAMPLES = Path(__file__).resolve().parents[2] / "conf" / "examples"

POLICY = """\
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: allow-dns}
spec:
  order: 10
  selector: has(dns-client)
  types: [Egress]
  egress:
  - {action: Allow, protocol: UDP, destination: {ports: [53]}}
---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: blue}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: prod, labels: {role: db}}
spec: {containers: [{name: c, ports: [{name: redis, containerPort: 6379}]}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: prod, labels: {role: frontend}}
spec: {containers: [{name: c}]}
status: {podIP: 10.244.1.11}
"""


@pytest.fixture(scope="module")
def env(etcd_server: EtcdServer) -> Iterator[dict[str, str]]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "TABBY_"))}
    e["ETCD_ENDPOINTS"] = etcd_server.endpoint
    yield e


def tabbyctl(env: dict[str, str], *args: str, stdin: str | None = None,
             ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([TABBYCTL, *args], input=stdin, env=env, capture_output=True,
                          text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def store_dump(server: EtcdServer) -> str:
    return server.etcdctl("get", "--prefix", "/")


def test_apply_get_and_the_etcd_layout(env: dict[str, str], etcd_server: EtcdServer) -> None:
    out = tabbyctl(env, "apply", "-f", "-", stdin=POLICY).stdout
    assert "created GlobalNetworkPolicy allow-dns" in out and "created Pod prod/db" in out
    keys = etcd_server.etcdctl("get", "--prefix", "/calico/", "--keys-only").split()
    assert "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/allow-dns" in keys
    assert "/calico/resources/v3/projectcalico.org/profiles/kns.prod" in keys
    assert "/calico/resources/v3/projectcalico.org/profiles/ksa.prod.default" in keys
    table = tabbyctl(env, "get", "gnp", "-o", "wide").stdout.splitlines()
    assert table[0].split() == ["NAME", "TIER", "ORDER", "SELECTOR"]
    assert table[1].split() == ["allow-dns", "default", "10", "has(dns-client)"]
    as_yaml = yaml.safe_load(tabbyctl(env, "get", "globalnetworkpolicy", "allow-dns",
                                      "-o", "yaml").stdout)
    assert as_yaml["spec"]["egress"][0]["destination"]["ports"] == [53]
    assert int(as_yaml["metadata"]["resourceVersion"]) > 0
    listing = json.loads(tabbyctl(env, "get", "profiles", "-o", "json").stdout)
    assert listing["kind"] == "ProfileList"
    assert "projectcalico-default-allow" in {p["metadata"]["name"] for p in listing["items"]}
    pods = tabbyctl(env, "get", "pods", "-A").stdout
    assert "prod" in pods and "frontend" in pods and "role=db" in pods


BAD_INPUTS = [
    ("a port out of range",
     "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\n"
     "spec: {ingress: [{action: Allow, protocol: TCP, destination: {ports: [70000]}}]}\n",
     "ports[0]"),
    ("an unknown action",
     "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\n"
     "spec: {ingress: [{action: Accept}]}\n", "spec.ingress[0].action"),
    ("a bad selector",
     "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: x}\n"
     "spec: {selector: \"app == 'x\"}\n", "position"),
    ("a bad CIDR in a Kubernetes ipBlock",
     "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\n"
     "spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}\n",
     "ipBlock.cidr"),
    ("an unknown kind", "apiVersion: projectcalico.org/v3\nkind: Gizmo\nmetadata: {name: x}\n",
     "unknown kind 'Gizmo'"),
    ("broken YAML", "apiVersion: v1\nkind: [Namespace\n", "invalid YAML"),
    ("a good document followed by a bad one",
     "apiVersion: v1\nkind: Namespace\nmetadata: {name: fine}\n---\n"
     "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\n"
     "spec: {cidr: 10.244.0.0/16, blockSize: 40}\n", "document 2"),
]


@pytest.mark.parametrize(("what", "text", "needle"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_invalid_input_is_one_line_and_writes_nothing(env: dict[str, str],
                                                      etcd_server: EtcdServer, what: str,
                                                      text: str, needle: str) -> None:
    before = store_dump(etcd_server)
    for verb in ("apply", "create"):
        proc = tabbyctl(env, verb, "-f", "-", stdin=text, ok=False)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert needle in lines[0]
    assert store_dump(etcd_server) == before


def test_other_mistakes_are_one_line_too(env: dict[str, str], etcd_server: EtcdServer) -> None:
    before = store_dump(etcd_server)
    cases = [
        (["apply", "-f", "/nonexistent.yaml"], "cannot read /nonexistent.yaml"),
        (["get", "gizmos"], "unknown resource type 'gizmos'"),
        (["get", "ippool", "nope"], "IPPool nope not found"),
        (["delete", "gnp", "nope"], "GlobalNetworkPolicy nope not found"),
        (["patch", "gnp", "allow-dns", "-p", '{"spec": {"order": "high"}}'], "spec.order"),
        (["label", "gnp", "allow-dns", "bad key=v"], "labels"),
        (["policy", "explain", "--from", "prod/ghost", "--to", "prod/db", "--port", "6379/TCP"],
         "prod/ghost: no such pod"),
        (["policy", "explain", "--from", "prod/db", "--to", "prod/db", "--port", "99999"],
         "PORT in 1-65535"),
    ]
    for args, needle in cases:
        proc = tabbyctl(env, *args, ok=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.stderr)
        assert needle in lines[0], (args, lines[0])
    assert store_dump(etcd_server) == before


def test_create_replace_delete(env: dict[str, str], tmp_path: Path) -> None:
    pool = tmp_path / "pool.yaml"
    pool.write_text("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p1}\n"
                    "spec: {cidr: 10.244.0.0/16}\n")
    assert "created IPPool p1" in tabbyctl(env, "create", "-f", str(pool)).stdout
    again = tabbyctl(env, "create", "-f", str(pool), ok=False)
    assert again.returncode == 1 and "IPPool p1 already exists" in again.stderr
    assert "skipped IPPool p1" in tabbyctl(env, "create", "--skip-exists", "-f", str(pool)).stdout
    pool.write_text(pool.read_text().replace("16}", "16, natOutgoing: true}"))
    assert "configured IPPool p1" in tabbyctl(env, "replace", "-f", str(pool)).stdout
    shown = yaml.safe_load(tabbyctl(env, "get", "ippool", "p1", "-o", "yaml").stdout)
    assert shown["spec"]["natOutgoing"] is True and shown["spec"]["blockSize"] == 26
    stale = tmp_path / "stale.yaml"
    shown["spec"]["natOutgoing"] = False
    stale.write_text(yaml.safe_dump(shown))
    tabbyctl(env, "patch", "ippool", "p1", "-p", '{"spec": {"disabled": true}}')
    conflict = tabbyctl(env, "replace", "-f", str(stale), ok=False)
    assert conflict.returncode == 1 and "stale resourceVersion" in conflict.stderr
    assert "deleted IPPool p1" in tabbyctl(env, "delete", "-f", str(pool)).stdout
    assert tabbyctl(env, "delete", "-f", str(pool), "--skip-not-exists").returncode == 0
    missing = tabbyctl(env, "replace", "-f", str(pool), ok=False)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_patch_and_label(env: dict[str, str]) -> None:
    tabbyctl(env, "patch", "gnp", "allow-dns", "--type", "json",
             "-p", '[{"op": "replace", "path": "/spec/order", "value": 5}]')
    tabbyctl(env, "label", "gnp", "allow-dns", "owner=netops")
    clash = tabbyctl(env, "label", "gnp", "allow-dns", "owner=other", ok=False)
    assert clash.returncode == 1 and "--overwrite" in clash.stderr
    tabbyctl(env, "label", "gnp", "allow-dns", "owner=other", "--overwrite")
    got = yaml.safe_load(tabbyctl(env, "get", "gnp", "allow-dns", "-o", "yaml").stdout)
    assert got["spec"]["order"] == 5 and got["metadata"]["labels"]["owner"] == "other"
    tabbyctl(env, "label", "gnp", "allow-dns", "owner", "--remove")
    got = yaml.safe_load(tabbyctl(env, "get", "gnp", "allow-dns", "-o", "yaml").stdout)
    assert "owner" not in (got["metadata"].get("labels") or {})


def test_explain_against_the_live_store(env: dict[str, str]) -> None:
    before = tabbyctl(env, "policy", "explain", "--from", "prod/frontend", "--to", "prod/db",
                      "--port", "6379/TCP").stdout
    assert "ALLOWED" in before
    tabbyctl(env, "apply", "-n", "prod", "-f", str(EXAMPLES / "001-deny-ingress.yaml"))
    denied = json.loads(tabbyctl(env, "policy", "explain", "--from", "prod/frontend", "--to",
                                 "prod/db", "--port", "6379/TCP", "-o", "json").stdout)
    assert denied["allowed"] is False
    assert "knp.default.deny-ingress" in denied["reason"]
    assert any(step["direction"] == "ingress" for step in denied["trace"])
    from_ip = tabbyctl(env, "policy", "explain", "--from", "10.244.1.11", "--to", "prod/db",
                       "--port", "6379/TCP").stdout
    assert "DENIED" in from_ip
    tabbyctl(env, "delete", "networkpolicy.networking.k8s.io", "deny-ingress", "-n", "prod")


def test_config_file_and_unreachable_etcd(env: dict[str, str], etcd_server: EtcdServer,
                                          tmp_path: Path) -> None:
    cfg = tmp_path / "tabbyctl.cfg"
    cfg.write_text("apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata: {}\n"
                   f"spec: {{datastoreType: etcdv3, etcdEndpoints: '{etcd_server.endpoint}'}}\n")
    no_env = {k: v for k, v in env.items() if k != "ETCD_ENDPOINTS"}
    assert "allow-dns" in tabbyctl(no_env, "-c", str(cfg), "get", "gnp").stdout
    dead = dict(no_env, ETCD_ENDPOINTS="http://127.0.0.1:9")  # discard port: nothing listens
    proc = tabbyctl(dead, "get", "gnp", ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1
    assert "http://127.0.0.1:9" in lines[0] and "unreachable" in lines[0]

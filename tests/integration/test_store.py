"""The resource store against a real etcd: Calico's layout, derived objects, atomic writes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from datastore.errors import ValidationError
from datastore.etcd import Datastore
from datastore.kinds import kind_for
from datastore.store import (
    AlreadyExistsError,
    ConflictError,
    NotFoundError,
    ResourceStore,
)
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.etcd
T = TypeVar("T")

GNP = {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy",
       "metadata": {"name": "allow-dns"},
       "spec": {"order": 10, "selector": "all()", "types": ["Egress"],
                "egress": [{"action": "Allow", "protocol": "UDP",
                            "destination": {"ports": [53]}}]}}
KNP = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
       "metadata": {"name": "deny-ingress", "namespace": "dev"},
       "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
NAMESPACE = {"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": "dev", "labels": {"team": "a"}}}


def run(server: EtcdServer, fn: Callable[[ResourceStore], Awaitable[T]]) -> T:
    async def go() -> T:
        async with Datastore(server.config()) as ds:
            return await asyncio.wait_for(fn(ResourceStore(ds)), 60)
    return asyncio.run(go())


def dump(server: EtcdServer) -> dict[str, Any]:
    """Every key and value in etcd, for before/after comparisons."""
    async def go() -> dict[str, Any]:
        async with Datastore(server.config()) as ds:
            kvs, _ = await ds.list("/")
            return {kv.key: kv.value for kv in kvs}
    return asyncio.run(go())


@pytest.fixture
def server(fresh_etcd: EtcdServer) -> EtcdServer:
    return fresh_etcd


def test_calico_object_is_stored_in_calicos_layout(server: EtcdServer) -> None:
    created = run(server, lambda st: st.create(GNP))
    raw = dump(server)
    key = "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/allow-dns"
    stored = json.loads(raw[key])
    assert stored["kind"] == "GlobalNetworkPolicy"
    assert stored["apiVersion"] == "projectcalico.org/v3"
    assert "resourceVersion" not in stored["metadata"]  # it is the mod revision, never stored
    assert stored["metadata"]["uid"] and stored["metadata"]["creationTimestamp"]
    assert stored["spec"]["tier"] == "default" and stored["spec"]["types"] == ["Egress"]
    got = run(server, lambda st: st.get(kind_for("GlobalNetworkPolicy"), "allow-dns"))
    assert got["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    revision = server.etcdctl("get", key, "-w", "json")
    assert str(json.loads(revision)["kvs"][0]["mod_revision"]) == got["metadata"]["resourceVersion"]


def test_kubernetes_objects_write_what_kube_controllers_would(server: EtcdServer) -> None:
    run(server, lambda st: st.write([KNP, NAMESPACE], "apply"))
    raw = dump(server)
    knp_key = "/calico/resources/v3/projectcalico.org/networkpolicies/dev/knp.default.deny-ingress"
    as_written = json.loads(raw["/tabby/k8s/networkpolicies/dev/deny-ingress"])
    assert as_written["spec"]["podSelector"] == {}
    converted = json.loads(raw[knp_key])
    assert converted["spec"]["order"] == 1000
    assert converted["spec"]["selector"] == "projectcalico.org/orchestrator == 'k8s'"
    profile = json.loads(raw["/calico/resources/v3/projectcalico.org/profiles/kns.dev"])
    assert profile["spec"]["labelsToApply"]["pcns.team"] == "a"
    # get shows the user's object back
    k8s_kind = kind_for("NetworkPolicy", "networking.k8s.io/v1")
    back = run(server, lambda st: st.get(k8s_kind, "deny-ingress", "dev"))
    assert back["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    # deleting the Kubernetes object deletes what was derived from it, in the same txn
    run(server, lambda st: st.delete(k8s_kind, "deny-ingress", "dev"))
    raw = dump(server)
    assert knp_key not in raw and "/tabby/k8s/networkpolicies/dev/deny-ingress" not in raw


def test_a_batch_is_all_or_nothing(server: EtcdServer) -> None:
    run(server, lambda st: st.create(GNP))
    before = dump(server)
    with pytest.raises(AlreadyExistsError, match="GlobalNetworkPolicy allow-dns already exists"):
        run(server, lambda st: st.write([NAMESPACE, KNP, GNP], "create"))
    assert dump(server) == before
    bad = json.loads(json.dumps(GNP))
    bad["metadata"]["name"] = "second"
    bad["spec"]["egress"][0]["destination"]["ports"] = [70000]
    with pytest.raises(ValidationError, match=r"document 2: .*ports\[0\]"):
        run(server, lambda st: st.write([NAMESPACE, bad], "apply"))
    assert dump(server) == before
    skipped = run(server, lambda st: st.write([GNP, NAMESPACE], "create", skip_existing=True))
    assert [r.action for r in skipped] == ["skipped", "created"]


def test_replace_is_guarded_by_resource_version(server: EtcdServer) -> None:
    created = run(server, lambda st: st.create(GNP))
    stale = json.loads(json.dumps(created))
    newer = json.loads(json.dumps(created))
    newer["spec"]["order"] = 20
    run(server, lambda st: st.replace(newer))
    stale["spec"]["order"] = 30
    with pytest.raises(ConflictError, match="stale resourceVersion"):
        run(server, lambda st: st.replace(stale))
    got = run(server, lambda st: st.get(kind_for("GlobalNetworkPolicy"), "allow-dns"))
    assert got["spec"]["order"] == 20
    assert got["metadata"]["uid"] == created["metadata"]["uid"]  # identity survives updates
    with pytest.raises(NotFoundError):
        missing = json.loads(json.dumps(GNP))
        missing["metadata"]["name"] = "nope"
        run(server, lambda st: st.replace(missing))


def test_relabelling_a_pod_relabels_its_workload_endpoint(server: EtcdServer) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web", "namespace": "dev", "labels": {"app": "web"}},
           "spec": {"containers": [{"name": "c"}]}}
    wep = {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
           "metadata": {"name": "node1-k8s-web-eth0", "namespace": "dev",
                        "labels": {"app": "web"}},
           "spec": {"orchestrator": "k8s", "node": "node1", "pod": "web", "endpoint": "eth0",
                    "interfaceName": "cali0123456789a", "ipNetworks": ["10.244.1.5/32"],
                    "profiles": ["kns.dev", "ksa.dev.default"]}}
    run(server, lambda st: st.write([NAMESPACE, pod, wep], "apply"))
    pod["metadata"]["labels"] = {"app": "web", "version": "2"}
    run(server, lambda st: st.apply(pod))
    got = run(server, lambda st: st.get(kind_for("WorkloadEndpoint"), "node1-k8s-web-eth0", "dev"))
    assert got["metadata"]["labels"]["version"] == "2"
    assert got["metadata"]["labels"]["projectcalico.org/namespace"] == "dev"


def test_snapshot_holds_the_calico_model(server: EtcdServer) -> None:
    run(server, lambda st: st.write([GNP, KNP, NAMESPACE], "apply"))
    snap = run(server, lambda st: st.snapshot())
    names = {p["metadata"]["name"] for p in snap.profiles}
    assert {"kns.dev", "projectcalico-default-allow"} <= names
    assert [p["metadata"]["name"] for p in snap.network_policies] == ["knp.default.deny-ingress"]
    assert [p["metadata"]["name"] for p in snap.global_network_policies] == ["allow-dns"]

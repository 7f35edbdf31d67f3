"""cni.netconf: Calico's main-plugin netconf fields, their defaults and the code-7 errors (pure),
and the WorkloadEndpoint identities and objects cni.wep builds from a request (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cni import spec, wep
from cni.netconf import NetConf, interface_prefix, parse_netconf, read_mtu_file
from cni.spec import CNIError
from datastore.validation import validate

BASE: dict[str, Any] = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby",
                        "ipam": {"type": "tabby-ipam"}}


def conf(**fields: Any) -> NetConf:
    return parse_netconf({**BASE, **fields})


def code_and_msg(**fields: Any) -> tuple[int, str]:
    with pytest.raises(CNIError) as info:
        parse_netconf({**BASE, **fields})
    return info.value.code, str(info.value)


def test_defaults() -> None:
    c = conf()
    assert (c.name, c.cni_version, c.type) == ("k8s-pod-network", "1.0.0", "tabby")
    assert c.datastore_type == "etcdv3"
    assert c.etcd.endpoints == ("http://127.0.0.1:2379",)
    assert (c.mtu, c.mtu_overhead) == (0, 0)  # 0 = detect from the uplink
    assert c.in_process_ipam and c.ipam_type == "tabby-ipam"
    assert c.ipam_conf.assign_ipv4 and not c.ipam_conf.assign_ipv6
    assert c.nodename_file == "/var/lib/calico/nodename"
    assert c.log_level == 20 and c.log_file_path == ""
    assert not c.allow_ip_forwarding
    assert c.interface_prefix == "cali"


def test_calico_etcd_manifest_fields() -> None:
    """The calico plugin entry of Calico's calico-etcd.yaml conflist, as written there."""
    c = conf(log_level="debug", log_file_path="/var/log/calico/cni/cni.log",
             etcd_endpoints="http://10.0.0.1:2379,http://10.0.0.2:2379", mtu=1440,
             ipam={"type": "calico-ipam", "assign_ipv6": "true",
                   "ipv4_pools": ["default-ipv4-ippool"]},
             policy={"type": "k8s"}, kubernetes={"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"},
             container_settings={"allow_ip_forwarding": True}, nodename="node-1")
    assert c.etcd.endpoints == ("http://10.0.0.1:2379", "http://10.0.0.2:2379")
    assert c.mtu == 1440 and c.log_level == 10
    assert c.log_file_path == "/var/log/calico/cni/cni.log"
    assert c.in_process_ipam and c.ipam_conf.assign_ipv6
    assert c.ipam_conf.ipv4_pools == ("default-ipv4-ippool",)
    assert c.allow_ip_forwarding and c.policy_type == "k8s"
    assert c.ipam_conf.nodename == "node-1"


def test_etcd_authority_and_scheme() -> None:
    c = conf(etcd_authority="10.1.1.1:4001", etcd_scheme="https")
    assert c.etcd.endpoints == ("https://10.1.1.1:4001",)
    # etcd_endpoints wins over the old pair
    assert conf(etcd_authority="10.1.1.1:4001", etcd_endpoints="http://e:2379"
                ).etcd.endpoints == ("http://e:2379",)


def test_kubernetes_datastore_is_refused_clearly() -> None:
    code, msg = code_and_msg(datastore_type="kubernetes")
    assert code == spec.INVALID_CONFIG
    assert "kubernetes" in msg and "etcd" in msg and "etcdv3" in msg


@pytest.mark.parametrize(("fields", "where"), [
    ({"datastore_type": "consul"}, "datastore_type"),
    ({"etcd_endpoints": "ftp://x"}, "etcd_endpoints"),
    ({"etcd_cert_file": "/nonexistent/cert"}, "etcd_cert_file"),
    ({"etcd_discovery_srv": "example.com"}, "etcd_discovery_srv"),
    ({"mtu": "1500"}, "mtu"),
    ({"mtu": 10}, "mtu"),
    ({"mtu": 70000}, "mtu"),
    ({"mtu_overhead": -1}, "mtu_overhead"),
    ({"ipam": None}, "ipam"),
    ({"ipam": {"assign_ipv4": "true"}}, "ipam"),
    ({"ipam": {"type": "tabby-ipam", "assign_ipv4": "maybe"}}, "assign_ipv4"),
    ({"container_settings": {"allow_ip_forwarding": "yes"}}, "allow_ip_forwarding"),
    ({"container_settings": []}, "container_settings"),
    ({"feature_control": {"ip_addrs_no_ipam": "on"}}, "feature_control.ip_addrs_no_ipam"),
    ({"feature_control": {"floating_ips": 1}}, "feature_control.floating_ips"),
    ({"feature_control": "all"}, "feature_control"),
    ({"nodename": 5}, "nodename"),
    ({"log_file_path": ["x"]}, "log_file_path"),
])
def test_bad_fields_are_code_7_naming_the_field(fields: dict[str, Any], where: str) -> None:
    code, msg = code_and_msg(**fields)
    assert code == spec.INVALID_CONFIG
    assert where in msg


def test_mtu_zero_means_detect_and_overhead_is_kept() -> None:
    c = conf(mtu=0, mtu_overhead=50)
    assert (c.mtu, c.mtu_overhead) == (0, 50)
    assert (c.mtu_file, c.require_mtu_file) == ("/var/lib/calico/mtu", False)
    c = conf(mtu_file="/run/x/mtu", require_mtu_file="true")
    assert (c.mtu_file, c.require_mtu_file) == ("/run/x/mtu", True)


def test_read_mtu_file(tmp_path: Path) -> None:
    f = tmp_path / "mtu"
    assert read_mtu_file(str(f)) is None  # absent
    for text, want in (("1450\n", 1450), ("9000", 9000), ("", None), ("abc", None),
                       ("20", None), ("70000", None)):
        f.write_text(text)
        assert read_mtu_file(str(f)) == want, text


def test_delegated_ipam_section_is_not_read_as_tabby_ipam() -> None:
    """host-local's fields (routes with mtu, ranges) belong to host-local, not to us."""
    c = conf(ipam={"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/24"}]],
                   "routes": [{"dst": "0.0.0.0/0", "mtu": 1400}]})
    assert not c.in_process_ipam and c.ipam_type == "host-local"
    assert c.ipam["ranges"] == [[{"subnet": "10.250.0.0/24"}]]


def test_interface_prefix_from_felix_env() -> None:
    assert interface_prefix({}) == "cali"
    assert interface_prefix({"FELIX_INTERFACEPREFIX": "tap,cali"}) == "tap"
    assert parse_netconf(BASE, {"FELIX_INTERFACEPREFIX": "veth"}).interface_prefix == "veth"
    with pytest.raises(CNIError) as info:
        interface_prefix({"FELIX_INTERFACEPREFIX": "toolong"})
    assert info.value.code == spec.INVALID_CONFIG


def test_unknown_fields_are_ignored() -> None:
    c = conf(num_queues=2, feature_control={"floating_ips": True}, capabilities={"ips": True},
             runtimeConfig={"portMappings": []}, prevResult={"cniVersion": "1.0.0"})
    assert c.name == "k8s-pod-network"
    assert not c.ip_addrs_no_ipam  # off unless the netconf says so, as in Calico
    assert conf(feature_control={"ip_addrs_no_ipam": True}).ip_addrs_no_ipam


# -- WorkloadEndpoint identity and object (cni.wep, pure) ----------------------------------------

K8S_ARGS = spec.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-7d9f;"
                               "K8S_POD_INFRA_CONTAINER_ID=abc")


def test_k8s_workload_names_as_calico() -> None:
    w = wep.workload_for(K8S_ARGS, "abc123", "eth0", "node-1", "k8s-pod-network")
    assert w.name == "node--1-k8s-web--7d9f-eth0"
    assert w.host_ifname == "cali" + __import__("hashlib").sha1(b"prod.web-7d9f").hexdigest()[:11]
    assert w.namespace == "prod" and w.is_k8s
    assert w.key.endswith("/workloadendpoints/prod/node--1-k8s-web--7d9f-eth0")


def test_non_k8s_workload_is_the_cni_orchestrator() -> None:
    args = spec.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=only-a-name")  # podman's args
    w = wep.workload_for(args, "0123456789abcdef", "eth0", "node-1", "tabby-net")
    assert w.orchestrator == "cni" and w.namespace == "default"
    assert w.name == "node--1-cni-0123456789abcdef-eth0"
    assert w.host_ifname == "cali0123456789a"
    endpoint = validate(wep.build(w, None, ["10.0.0.5"], "02:00:00:00:00:01"))
    assert endpoint["spec"]["profiles"] == ["tabby-net"]
    assert endpoint["spec"]["ipNetworks"] == ["10.0.0.5/32"]
    assert endpoint["metadata"]["labels"] == {"projectcalico.org/namespace": "default",
                                              "projectcalico.org/orchestrator": "cni"}


def test_k8s_endpoint_from_pod_labels_ports_and_sa() -> None:
    w = wep.workload_for(K8S_ARGS, "abc123", "eth0", "node-1", "k8s-pod-network")
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web-7d9f", "namespace": "prod", "labels": {"app": "web"}},
           "spec": {"serviceAccountName": "api", "containers": [
               {"name": "c", "ports": [{"name": "http", "containerPort": 8080},
                                       {"containerPort": 9090}]}]}}
    built = wep.build(w, pod, ["10.0.0.5/26", "fd00::5"], "02:00:00:00:00:01")
    endpoint = validate(built)
    assert endpoint["metadata"]["labels"] == {
        "app": "web", "projectcalico.org/namespace": "prod",
        "projectcalico.org/orchestrator": "k8s", "projectcalico.org/serviceaccount": "api"}
    s = endpoint["spec"]
    assert s["profiles"] == ["kns.prod", "ksa.prod.api"]
    assert s["ipNetworks"] == ["10.0.0.5/32", "fd00::5/128"]
    # the named port only; Calico writes all five fields (validation upper-cases protocol)
    assert built["spec"]["ports"] == [{"name": "http", "protocol": "tcp", "port": 8080,
                                       "hostPort": 0, "hostIP": ""}]
    assert len(s["ports"]) == 1
    assert (s["containerID"], s["interfaceName"], s["mac"]) == ("abc123", w.host_ifname,
                                                                "02:00:00:00:00:01")


def test_absent_pod_gives_only_calico_labels() -> None:
    w = wep.workload_for(K8S_ARGS, "abc123", "eth0", "node-1", "k8s-pod-network")
    endpoint = validate(wep.build(w, None, ["10.0.0.5"], ""))
    assert set(endpoint["metadata"]["labels"]) == {
        "projectcalico.org/namespace", "projectcalico.org/orchestrator",
        "projectcalico.org/serviceaccount"}
    assert endpoint["spec"]["profiles"] == ["kns.prod", "ksa.prod.default"]


def test_ownership_is_calicos_rule() -> None:
    assert wep.owned_by({"spec": {"containerID": "a"}}, "a")
    assert not wep.owned_by({"spec": {"containerID": "b"}}, "a")
    assert wep.owned_by({"spec": {}}, "a")  # no container ID: whoever deletes it

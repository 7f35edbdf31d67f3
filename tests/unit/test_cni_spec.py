"""cni.spec against the CNI spec's rules and libcni's reference behaviour (pure, no I/O)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cni import spec
from cni.spec import CNIError

ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c0ffee",
    "CNI_NETNS": "/run/netns/pod0",
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
}
CONF = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "tabby-ipam"}


def request(env: dict[str, str] | None = None, conf: object = CONF, **changes: str):
    e = {**ENV, **(env or {}), **changes}
    e = {k: v for k, v in e.items() if v is not None}
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    return spec.read_request(e, stdin)


def code_of(fn, *args, **kwargs) -> int:
    with pytest.raises(CNIError) as info:
        fn(*args, **kwargs)
    return info.value.code


# -- module hygiene -----------------------------------------------------------------------------


def test_spec_imports_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import cni.spec; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'cni'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_error_codes_are_the_specs() -> None:
    assert (spec.INCOMPATIBLE_VERSION, spec.UNSUPPORTED_FIELD, spec.UNKNOWN_CONTAINER,
            spec.INVALID_ENVIRONMENT, spec.IO_FAILURE, spec.DECODING_FAILURE,
            spec.INVALID_CONFIG, spec.TRY_AGAIN_LATER, spec.NOT_AVAILABLE,
            spec.LIMITED_CONNECTIVITY) == (1, 2, 3, 4, 5, 6, 7, 11, 50, 51)
    tabby = [spec.POOL_EXHAUSTED, spec.NO_MATCHING_POOL, spec.ADDRESS_IN_USE, spec.NOT_IN_POOL,
             spec.ALLOCATION_MISSING]
    assert all(code >= 100 for code in tabby)  # 0-99 belong to the spec
    assert len(set(tabby)) == len(tabby)


def test_error_json() -> None:
    e = CNIError(7, "Invalid Configuration", "Network 192.168.0.0/31 too small")
    assert e.to_json("1.1.0") == {"cniVersion": "1.1.0", "code": 7,
                                  "msg": "Invalid Configuration",
                                  "details": "Network 192.168.0.0/31 too small"}
    assert CNIError(11, "later").to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 11,
                                                      "msg": "later"}
    assert str(e) == "Invalid Configuration; Network 192.168.0.0/31 too small"


# -- versions -----------------------------------------------------------------------------------


def test_peek_version_for_error_output() -> None:
    assert spec.peek_version(b'{"cniVersion": "0.4.0", "name": "x"}') == "0.4.0"
    for unusable in (b'{"cniVersion": "9.9.9"}', b"[1]", b"{", b"\xff", b"", b'"1.0.0"'):
        assert spec.peek_version(unusable) == spec.CURRENT_VERSION, unusable


def test_supported_versions_and_version_output() -> None:
    assert {"0.3.1", "0.4.0", "1.0.0", "1.1.0"} <= set(spec.SUPPORTED_VERSIONS)
    assert spec.CURRENT_VERSION == "1.1.0"
    assert spec.version_result("1.0.0") == {"cniVersion": "1.0.0",
                                            "supportedVersions": list(spec.SUPPORTED_VERSIONS)}
    assert spec.version_result(None)["cniVersion"] == "1.1.0"


@pytest.mark.parametrize(("text", "parsed"), [
    ("1.0.0", (1, 0, 0)), ("0.3.1", (0, 3, 1)), ("", (0, 1, 0)), ("1", (1, 0, 0)),
])
def test_parse_version(text: str, parsed: tuple[int, int, int]) -> None:
    assert spec.parse_version(text) == parsed


def test_bad_version_is_a_decoding_failure() -> None:
    assert code_of(spec.parse_version, "one.two") == spec.DECODING_FAILURE
    assert code_of(spec.parse_version, "1.0.0.0") == spec.DECODING_FAILURE


def test_negotiation_picks_the_highest_common_version() -> None:
    assert spec.negotiate(["0.3.1", "0.4.0", "1.0.0"]) == "1.0.0"
    assert spec.negotiate(["2.0.0", "1.1.0"]) == "1.1.0"
    assert spec.negotiate(["0.4.0"], supported=("0.3.1", "0.4.0")) == "0.4.0"
    assert code_of(spec.negotiate, ["2.0.0"]) == spec.INCOMPATIBLE_VERSION


def test_version_check_is_exact() -> None:
    spec.check_version("0.4.0")
    assert code_of(spec.check_version, "0.5.0") == spec.INCOMPATIBLE_VERSION
    assert spec.version_at_least("1.1.0", "1.0.0")
    assert not spec.version_at_least("0.3.1", "0.4.0")


# -- results ------------------------------------------------------------------------------------

IPAM_RESULT = {"cniVersion": "1.1.0", "ips": [{"address": "10.244.1.5/26"},
                                              {"address": "fd00:10:244::5/122"}]}
FULL_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cali123", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1450},
                   {"name": "eth0", "mac": "02:11:22:33:44:55", "sandbox": "/run/netns/p"}],
    "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
    "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
    "dns": {"nameservers": ["10.96.0.10"], "search": []},
}


def test_ipam_result_in_every_1x_version() -> None:
    for version in ("1.0.0", "1.1.0"):
        assert spec.convert_result(IPAM_RESULT, version) == {
            "cniVersion": version,
            "ips": [{"address": "10.244.1.5/26"}, {"address": "fd00:10:244::5/122"}],
        }


def test_ipam_result_in_04x_has_ip_versions_and_dns() -> None:
    for version in ("0.3.0", "0.3.1", "0.4.0"):
        assert spec.convert_result(IPAM_RESULT, version) == {
            "cniVersion": version,
            "ips": [{"version": "4", "address": "10.244.1.5/26"},
                    {"version": "6", "address": "fd00:10:244::5/122"}],
            "dns": {},
        }


def test_ipam_result_in_02x() -> None:
    assert spec.convert_result(IPAM_RESULT, "0.2.0") == {
        "cniVersion": "0.2.0", "ip4": {"ip": "10.244.1.5/26"},
        "ip6": {"ip": "fd00:10:244::5/122"}, "dns": {},
    }


def test_full_result_down_to_040_drops_what_040_cannot_say() -> None:
    out = spec.convert_result(FULL_RESULT, "0.4.0")
    assert out["interfaces"] == [{"name": "cali123", "mac": "ee:ee:ee:ee:ee:ee"},
                                 {"name": "eth0", "mac": "02:11:22:33:44:55",
                                  "sandbox": "/run/netns/p"}]
    assert out["ips"] == [{"version": "4", "address": "10.244.1.5/32",
                           "gateway": "169.254.1.1", "interface": 1}]
    assert out["routes"] == FULL_RESULT["routes"]
    assert out["dns"] == {"nameservers": ["10.96.0.10"]}


def test_round_trip_through_every_version_keeps_addresses() -> None:
    for version in spec.SUPPORTED_VERSIONS:
        there = spec.convert_result(FULL_RESULT, version)
        back = spec.convert_result(there, "1.1.0")
        assert back["ips"][0]["address"] == "10.244.1.5/32"
        assert back["routes"] == [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]


def test_02x_routes_follow_their_family() -> None:
    r = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1",
                                         "routes": [{"dst": "0.0.0.0/0"}]}}
    assert spec.parse_result(r) == {"cniVersion": "0.2.0", "interfaces": [],
                                    "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1"}],
                                    "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
    assert spec.convert_result(r, "0.1.0")["ip4"] == r["ip4"]


def test_02x_needs_an_address() -> None:
    assert code_of(spec.convert_result, {"cniVersion": "1.0.0"}, "0.2.0") == (
        spec.INCOMPATIBLE_VERSION)


def test_result_without_version_takes_the_default() -> None:
    r = spec.parse_result({"ips": [{"version": "4", "address": "10.0.0.2/24"}]}, "0.4.0")
    assert r["cniVersion"] == "0.4.0"
    assert r["ips"] == [{"address": "10.0.0.2/24"}]


@pytest.mark.parametrize("bad", [
    [], {"cniVersion": "1.0.0", "ips": {"address": "x"}},
    {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]},
    {"cniVersion": "1.0.0", "ips": [{"gateway": "10.0.0.1"}]},
    {"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]},
    {"cniVersion": "1.0.0", "dns": []},
])
def test_malformed_results_are_decoding_failures(bad: object) -> None:
    assert code_of(spec.parse_result, bad) == spec.DECODING_FAILURE


def test_unknown_result_version() -> None:
    assert code_of(spec.convert_result, IPAM_RESULT, "9.0.0") == spec.INCOMPATIBLE_VERSION


# -- CNI_ARGS -----------------------------------------------------------------------------------


def test_cni_args_kubernetes() -> None:
    args = spec.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;"
                               "K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1")
    assert (args.pod_namespace, args.pod_name, args.infra_container_id) == ("prod", "web-0", "abc")
    assert args.is_k8s and args.ignore_unknown
    assert args.ips == ()


def test_cni_args_order_does_not_matter() -> None:
    a = spec.parse_cni_args("K8S_POD_NAME=web;IgnoreUnknown=1;K8S_POD_NAMESPACE=prod")
    b = spec.parse_cni_args("K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web;IgnoreUnknown=1")
    assert a == b


def test_cni_args_ip_list() -> None:
    assert spec.parse_cni_args("IP=10.0.0.5").ips == ("10.0.0.5",)
    assert spec.parse_cni_args("IP=10.0.0.5/24,fd00::5").ips == ("10.0.0.5/24", "fd00::5")


def test_cni_args_podman_style() -> None:
    args = spec.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;MAC=02:11:22:33:44:55")
    assert not args.is_k8s  # a name without a namespace is not Kubernetes (Calico's rule)
    args.require_known({"K8S_POD_NAME"})


@pytest.mark.parametrize("text", ["FOO", "=1", "A=1;B"])
def test_cni_args_malformed(text: str) -> None:
    assert code_of(spec.parse_cni_args, text) == spec.INVALID_ENVIRONMENT


def test_cni_args_empty_and_trailing_separator() -> None:
    assert spec.parse_cni_args("").pairs == {}
    assert spec.parse_cni_args("A=1;").pairs == {"A": "1"}
    assert spec.parse_cni_args("A=b=c").pairs == {"A": "b=c"}


def test_unknown_args_need_ignore_unknown() -> None:
    args = spec.parse_cni_args("FOO=1;IP=10.0.0.1")
    with pytest.raises(CNIError) as info:
        args.require_known({"IP"})
    assert info.value.code == spec.INVALID_ENVIRONMENT
    assert "FOO" in info.value.msg
    spec.parse_cni_args("FOO=1;IgnoreUnknown=true").require_known({"IP"})
    assert code_of(spec.parse_cni_args("IgnoreUnknown=maybe").require_known, ()) == 4


# -- read_request -------------------------------------------------------------------------------


def test_add_request() -> None:
    r = request(CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p")
    assert (r.command, r.container_id, r.netns, r.ifname) == ("ADD", "c0ffee", "/run/netns/pod0",
                                                              "eth0")
    assert r.path == ("/opt/cni/bin", "/usr/lib/cni")
    assert r.args.pod_name == "p" and r.name == "k8s-pod-network" and r.version == "1.0.0"
    assert r.prev_result is None and r.runtime_config == {}


def test_missing_command() -> None:
    with pytest.raises(CNIError) as info:
        request(CNI_COMMAND=None)
    assert info.value.code == spec.INVALID_ENVIRONMENT
    assert "CNI_COMMAND" in info.value.msg


def test_unknown_command() -> None:
    with pytest.raises(CNIError) as info:
        request(CNI_COMMAND="ATTACH")
    assert info.value.code == spec.INVALID_ENVIRONMENT and "ATTACH" in info.value.msg


def test_missing_variables_are_named() -> None:
    with pytest.raises(CNIError) as info:
        request(CNI_NETNS=None, CNI_IFNAME="")
    assert info.value.code == spec.INVALID_ENVIRONMENT
    assert "CNI_NETNS" in info.value.msg and "CNI_IFNAME" in info.value.msg


def test_del_does_not_need_netns_or_path() -> None:
    r = request(CNI_COMMAND="DEL", CNI_NETNS="", CNI_PATH=None)
    assert r.netns == "" and r.path == ()


def test_add_does_not_need_path() -> None:
    assert request(CNI_PATH=None).path == ()


def test_gc_needs_path_and_11() -> None:
    conf = {**CONF, "cniVersion": "1.1.0",
            "cni.dev/valid-attachments": [{"containerID": "a", "ifname": "eth0"}]}
    assert request(conf=conf, CNI_COMMAND="GC").valid_attachments == [("a", "eth0")]
    assert code_of(request, conf=conf, CNI_COMMAND="GC", CNI_PATH=None) == 4
    assert code_of(request, CNI_COMMAND="GC") == spec.INCOMPATIBLE_VERSION  # 1.0.0 has no GC


def test_status_needs_only_the_command() -> None:
    env = {"CNI_COMMAND": "STATUS"}
    r = spec.read_request(env, json.dumps({**CONF, "cniVersion": "1.1.0"}).encode())
    assert r.command == "STATUS"
    assert code_of(spec.read_request, env, json.dumps(CONF).encode()) == (
        spec.INCOMPATIBLE_VERSION)


def test_check_needs_040() -> None:
    assert request(CNI_COMMAND="CHECK").command == "CHECK"
    conf = {**CONF, "cniVersion": "0.3.1"}
    assert code_of(request, conf=conf, CNI_COMMAND="CHECK") == spec.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("cid", ["-x", "a b", "a/b", "ä"])
def test_invalid_container_id(cid: str) -> None:
    assert code_of(request, CNI_CONTAINERID=cid) == spec.INVALID_ENVIRONMENT


@pytest.mark.parametrize("ifname", ["a" * 16, ".", "..", "et h0", "eth0:1", "a/b"])
def test_invalid_ifname(ifname: str) -> None:
    assert code_of(request, CNI_IFNAME=ifname) == spec.INVALID_ENVIRONMENT


@pytest.mark.parametrize("stdin", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_undecodable_config(stdin: bytes) -> None:
    assert code_of(request, conf=stdin) == spec.DECODING_FAILURE


@pytest.mark.parametrize("conf", [{"cniVersion": "1.0.0"}, {"cniVersion": "1.0.0", "name": ""},
                                  {"cniVersion": "1.0.0", "name": "bad name"},
                                  {"cniVersion": "1.0.0", "name": 5}])
def test_bad_network_name(conf: dict[str, object]) -> None:
    assert code_of(request, conf=conf) == spec.INVALID_CONFIG


def test_unsupported_config_version() -> None:
    with pytest.raises(CNIError) as info:
        request(conf={**CONF, "cniVersion": "2.0.0"})
    assert info.value.code == spec.INCOMPATIBLE_VERSION and "2.0.0" in info.value.details
    assert code_of(request, conf={**CONF, "cniVersion": 1}) == spec.DECODING_FAILURE


def test_config_without_version_is_010() -> None:
    conf = {"name": "net"}
    assert request(conf=conf).version == "0.1.0"


def test_prev_result_is_parsed_in_the_config_version() -> None:
    prev = {"ips": [{"version": "4", "address": "10.0.0.2/24"}], "dns": {}}
    r = request(CNI_COMMAND="CHECK", conf={**CONF, "cniVersion": "0.4.0", "prevResult": prev})
    assert r.prev_result is not None
    assert r.prev_result["ips"] == [{"address": "10.0.0.2/24"}]
    bad = request(CNI_COMMAND="DEL", conf={**CONF, "prevResult": {"ips": "x"}})
    with pytest.raises(CNIError) as info:
        _ = bad.prev_result
    assert info.value.code == spec.DECODING_FAILURE and "prevResult" in info.value.msg


def test_runtime_config() -> None:
    r = request(conf={**CONF, "runtimeConfig": {"ips": ["10.0.0.9/24"]}})
    assert r.runtime_config == {"ips": ["10.0.0.9/24"]}


def test_version_request_needs_nothing_else() -> None:
    r = spec.read_request({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"0.4.0"}')
    assert (r.command, r.version) == ("VERSION", "0.4.0")
    # podman's probe: dummy env, stdin only {"cniVersion": ...}; odd input still answers
    assert spec.read_request({"CNI_COMMAND": "VERSION", "CNI_NETNS": "dummy"}, b"").version == (
        "1.1.0")
    assert spec.read_request({"CNI_COMMAND": "VERSION"}, b"junk").version == "1.1.0"

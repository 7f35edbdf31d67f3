"""Host endpoints in the renderer: resolution, and the filter/mangle/raw chains of each kind."""

from __future__ import annotations

from typing import Any

from datastore.snapshot import Snapshot
from felix.calc import PolicyIndex
from felix.model import Dataplane
from felix.render import RenderResult, render_with_report
from felix.render_config import RenderConfig
from felix.render_names import ALL_INTERFACES, length_limited

API = "projectcalico.org/v3"
NODE = "n1"
ACCEPTED = "-m mark --mark 0x10000/0x10000"


def hep(name: str, iface: str | None = "eth0", ips: tuple[str, ...] = (),
        node: str = NODE, **labels: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"node": node, "expectedIPs": list(ips)}
    if iface is not None:
        spec["interfaceName"] = iface
    return {"kind": "HostEndpoint", "apiVersion": API,
            "metadata": {"name": name, "labels": labels or {"role": "node"}}, "spec": spec}


def gnp(name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("selector", "role == 'node'")
    return {"kind": "GlobalNetworkPolicy", "apiVersion": API, "metadata": {"name": name},
            "spec": spec}


ALLOW_8080 = [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [8080]}}]
GUARD_8080 = "-p tcp -m multiport --dports 8080"  # its jumps skip other packets


def run(*objs: dict[str, Any], **config: Any) -> RenderResult:
    snap = Snapshot()
    for obj in objs:
        snap.add(obj)
    return render_with_report(PolicyIndex(snap), NODE, RenderConfig(ip_versions=(4,), **config))


def chain(dp: Dataplane, name: str, table: str = "filter") -> list[str]:
    return [r.text() for r in dp.tables[(4, table)].chains[name].rules]


def names(dp: Dataplane, table: str) -> set[str]:
    return set(dp.tables[(4, table)].chains)


# --- resolution ----------------------------------------------------------------------------


def test_named_interface_dispatches_in_filter_and_mangle() -> None:
    dp = run(hep("h")).dataplane
    assert chain(dp, "cali-from-host-endpoint") == ["-i eth0 -g cali-fh-eth0"]
    assert chain(dp, "cali-to-host-endpoint") == ["-o eth0 -g cali-th-eth0"]
    assert chain(dp, "cali-from-hep-forward") == ["-i eth0 -g cali-fhfw-eth0"]
    assert chain(dp, "cali-to-hep-forward") == ["-o eth0 -g cali-thfw-eth0"]
    assert chain(dp, "cali-to-host-endpoint", "mangle") == ["-o eth0 -g cali-th-eth0"]
    # nothing preDNAT or untracked: those tables dispatch nowhere
    assert chain(dp, "cali-from-host-endpoint", "mangle") == []
    assert chain(dp, "cali-from-host-endpoint", "raw") == []
    assert "cali-fh-eth0" not in names(dp, "raw") | names(dp, "mangle")


def test_expected_ips_only_resolve_against_host_interfaces() -> None:
    ep = hep("h", iface=None, ips=("10.0.0.5",))
    result = run(ep)
    assert "cali-fh-eth1" not in names(result.dataplane, "filter")
    assert [p.kind for p in result.problems] == ["endpoint"]
    assert "not known" in result.problems[0].reason
    interfaces = {"eth1": ["10.0.0.5/24"], "eth2": ["192.168.1.1/24"], "cali123": ["10.0.0.5"]}
    result = run(ep, host_interfaces=interfaces)
    assert not result.problems
    assert chain(result.dataplane, "cali-from-host-endpoint") == ["-i eth1 -g cali-fh-eth1"]
    result = run(ep, host_interfaces={"eth2": ["192.168.1.1"]})
    assert "no interface" in result.problems[0].reason


def test_one_endpoint_per_interface_earliest_name_wins() -> None:
    by_ip = hep("a-by-ip", iface=None, ips=("10.0.0.5",), role="ip")
    named = hep("b-named", role="named")
    result = run(by_ip, named, gnp("p", selector="role == 'named'", ingress=ALLOW_8080),
                 host_interfaces={"eth0": ["10.0.0.5"]})
    assert chain(result.dataplane, "cali-from-host-endpoint") == ["-i eth0 -g cali-fh-eth0"]
    assert "cali-pi-gnp/p" not in names(result.dataplane, "filter")  # a-by-ip governs eth0
    assert [p.name for p in result.problems] == ["host endpoint b-named"]


def test_all_interfaces_endpoint_is_the_dispatch_default() -> None:
    dp = run(hep("all", iface="*"), hep("eth", node="other")).dataplane
    fh, th = (length_limited(p, ALL_INTERFACES) for p in ("cali-fh-", "cali-th-"))
    fhfw = length_limited("cali-fhfw-", ALL_INTERFACES)
    assert fh == "cali-fh-any-interface-at-all" and fhfw.startswith("cali-fhfw-_")
    assert chain(dp, "cali-from-host-endpoint") == [f"-g {fh}"]
    assert chain(dp, "cali-from-hep-forward") == [f"-g {fhfw}"]
    # host -> local pod is never policed: filter OUTPUT returns first, mangle skips it here
    assert chain(dp, "cali-OUTPUT")[1] == "-o cali+ -j RETURN"
    assert chain(dp, "cali-to-host-endpoint", "mangle") == ["-o cali+ -j RETURN", f"-g {th}"]


# --- normal policy (filter) ----------------------------------------------------------------


def test_default_deny_apart_from_failsafes() -> None:
    dp = run(hep("h")).dataplane
    assert chain(dp, "cali-fh-eth0") == [
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        "-m conntrack --ctstate INVALID -j DROP",
        "-j cali-failsafe-in",
        "-j MARK --set-xmark 0x0/0x30000",
        "-j DROP"]
    assert chain(dp, "cali-th-eth0")[2] == "-j cali-failsafe-out"
    assert chain(dp, "cali-th-eth0")[-1] == "-j DROP"
    assert "-p tcp -m multiport --dports 22 -j ACCEPT" in chain(dp, "cali-failsafe-in")


def test_failsafe_ports_come_from_config() -> None:
    dp = run(hep("h"), failsafe_inbound=(("tcp", 2222),), failsafe_outbound=()).dataplane
    assert chain(dp, "cali-failsafe-in") == ["-p tcp -m multiport --dports 2222 -j ACCEPT"]
    assert chain(dp, "cali-failsafe-out") == []
    # raw also lets the replies of the other direction's failsafe connections through
    assert chain(dp, "cali-failsafe-out", "raw") == [
        "-p tcp -m multiport --sports 2222 -j ACCEPT"]


def test_normal_policy_and_profiles() -> None:
    profile = {"kind": "Profile", "apiVersion": API, "metadata": {"name": "open"},
               "spec": {"ingress": [{"action": "Allow"}]}}
    ep = hep("h")
    ep["spec"]["profiles"] = ["open"]
    dp = run(ep, profile, gnp("web", ingress=ALLOW_8080)).dataplane
    fh = chain(dp, "cali-fh-eth0")
    assert fh.index(f"{GUARD_8080} -m mark --mark 0x0/0x20000 -j cali-pi-gnp/web") < fh.index(
        "-j cali-pri-open")
    assert "cali-pi-gnp/web" not in names(dp, "raw") | names(dp, "mangle")
    # normal policy without applyOnForward leaves forwarded traffic alone
    assert chain(dp, "cali-fhfw-eth0")[-2:] == [
        "-j MARK --set-xmark 0x10000/0x10000", "-j RETURN"]


def test_apply_on_forward_policy_governs_forwarded_traffic() -> None:
    policy = gnp("fwd", applyOnForward=True, types=["Egress"], egress=[{"action": "Deny"}])
    dp = run(hep("h"), policy).dataplane
    thfw = chain(dp, "cali-thfw-eth0")
    assert "-m mark --mark 0x0/0x20000 -j cali-po-gnp/fwd" in thfw
    assert thfw[-1] == "-m mark --mark 0x0/0x20000 -j DROP"  # end of tier, no profiles
    assert "cali-failsafe-out" not in " ".join(thfw)
    assert chain(dp, "cali-fhfw-eth0")[-1] == "-j RETURN"  # no ingress forward policy
    assert "-j cali-po-gnp/fwd" in " ".join(chain(dp, "cali-th-eth0"))  # also normal
    forward = chain(dp, "cali-FORWARD")
    assert forward[1] == "-m mark --mark 0x0/0x10000 -j cali-from-hep-forward"
    assert forward[-1] == "-j cali-to-hep-forward"


def test_dnatted_host_egress_uses_the_mangle_chain_with_return() -> None:
    dp = run(hep("h"), gnp("out", types=["Egress"], egress=[{"action": "Allow"}])).dataplane
    th = chain(dp, "cali-th-eth0", "mangle")
    assert th[:2] == ["-m conntrack --ctstate RELATED,ESTABLISHED -j MARK --set-xmark "
                      "0x10000/0x10000", "-m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"]
    assert "-m mark --mark 0x0/0x20000 -j cali-po-gnp/out" in th
    assert "cali-po-gnp/out" in names(dp, "mangle")
    assert "-m conntrack --ctstate DNAT -j cali-to-host-endpoint" in chain(
        dp, "cali-POSTROUTING", "mangle")


# --- doNotTrack (raw) and preDNAT (mangle) -------------------------------------------------


def test_do_not_track_policy_in_raw() -> None:
    policy = gnp("dnt", doNotTrack=True, applyOnForward=True, ingress=ALLOW_8080)
    dp = run(hep("h"), policy).dataplane
    assert chain(dp, "cali-fh-eth0", "raw") == [
        "-j cali-failsafe-in",
        "-j MARK --set-xmark 0x0/0x30000",
        "-j MARK --set-xmark 0x0/0x20000",
        f"{GUARD_8080} -m mark --mark 0x0/0x20000 -j cali-pi-gnp/dnt",
        f"{ACCEPTED} -j NOTRACK",
        f"{ACCEPTED} -j RETURN"]  # no conntrack, no end-of-tier drop, no profiles
    assert chain(dp, "cali-from-host-endpoint", "raw") == ["-i eth0 -g cali-fh-eth0"]
    assert "cali-pi-gnp/dnt" in names(dp, "raw")
    assert "cali-pi-gnp/dnt" not in names(dp, "filter")
    pre = chain(dp, "cali-PREROUTING", "raw")
    assert pre[-2:] == ["-m mark --mark 0x0/0x80000 -j cali-from-host-endpoint",
                        f"{ACCEPTED} -j ACCEPT"]
    assert chain(dp, "cali-OUTPUT", "raw")[1:] == ["-j cali-to-host-endpoint",
                                                   f"{ACCEPTED} -j ACCEPT"]


def test_do_not_track_is_ignored_for_all_interfaces_and_reported() -> None:
    policy = gnp("dnt", doNotTrack=True, applyOnForward=True, ingress=ALLOW_8080)
    result = run(hep("all", iface="*"), policy)
    assert chain(result.dataplane, "cali-from-host-endpoint", "raw") == []
    assert "doNotTrack" in result.problems[0].reason


def test_pre_dnat_policy_in_mangle() -> None:
    deny = [{"action": "Deny", "protocol": "TCP", "destination": {"ports": [8080]}}]
    policy = gnp("pre", preDNAT=True, applyOnForward=True, ingress=deny)
    dp = run(hep("h"), policy).dataplane
    fh = chain(dp, "cali-fh-eth0", "mangle")
    assert fh[:3] == ["-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                      "-m conntrack --ctstate INVALID -j DROP", "-j cali-failsafe-in"]
    assert fh[-1] == f"{ACCEPTED} -j RETURN"  # no end-of-tier drop
    assert chain(dp, "cali-pi-gnp/pre", "mangle")[-1] == "-m mark --mark 0x40000/0x40000 -j DROP"
    assert chain(dp, "cali-from-host-endpoint", "mangle") == ["-i eth0 -g cali-fh-eth0"]
    assert "cali-pi-gnp/pre" not in names(dp, "filter")
    assert "-j cali-pi-gnp/pre" not in " ".join(chain(dp, "cali-fh-eth0"))


def test_deny_is_drop_outside_filter_even_when_configured_reject() -> None:
    deny = [{"action": "Deny"}]
    policy = gnp("pre", preDNAT=True, applyOnForward=True, ingress=deny)
    dp = run(hep("h"), policy, gnp("n", ingress=deny), deny_action="REJECT").dataplane
    assert chain(dp, "cali-pi-gnp/pre", "mangle")[-1].endswith("-j DROP")
    assert chain(dp, "cali-pi-gnp/n")[-1].endswith("-j REJECT")


def test_invalid_host_policies_fail_closed() -> None:
    cases = {
        "a": {"preDNAT": True, "ingress": ALLOW_8080},  # no applyOnForward
        "b": {"preDNAT": True, "doNotTrack": True, "applyOnForward": True},
        "c": {"preDNAT": True, "applyOnForward": True, "types": ["Ingress", "Egress"],
              "egress": [{"action": "Allow"}]},
    }
    result = run(hep("h"), *(gnp(k, **v) for k, v in cases.items()))
    assert sorted(p.name for p in result.problems) == ["a", "b", "c"]
    dp = result.dataplane
    assert chain(dp, "cali-pi-gnp/a", "mangle") == ["-j DROP"]
    assert chain(dp, "cali-pi-gnp/b", "raw") == ["-j DROP"]


def test_workloads_never_get_host_only_policy() -> None:
    wep = {"kind": "WorkloadEndpoint", "apiVersion": API,
           "metadata": {"name": "w", "namespace": "x", "labels": {"role": "node"}},
           "spec": {"node": NODE, "interfaceName": "cali1", "ipNetworks": ["10.244.0.1/32"]}}
    policy = gnp("dnt", doNotTrack=True, applyOnForward=True, ingress=ALLOW_8080)
    dp = run(wep, policy).dataplane
    assert "cali-pi-gnp/dnt" not in names(dp, "filter") | names(dp, "raw")

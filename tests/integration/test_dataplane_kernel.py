"""felix.dataplane against the kernel, each test in its own fresh network namespace.

SAFETY: every command the reconcilers run goes through `Runner.in_netns(<test ns>)`, and the
test's own checks use `ip netns exec`, so nothing here reads or writes the root namespace's
iptables or ipsets. Namespaces are deleted in `finally`.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from felix.dataplane import (
    DataplaneState,
    IPSets,
    IptablesTable,
    Runner,
    apply_dataplane,
    detect_backend,
)
from felix.dataplane.ipsets import IPSetError
from felix.dataplane.runner import CommandError, Result
from felix.model import Chain, Dataplane, Hook, IPSet, Rule, Table, rule_hashes
from tests.netns_tools import TCP_CLIENT as CLIENT

pytestmark = pytest.mark.netns

HASH = re.compile(r'--comment "?cali:([A-Za-z0-9_-]+)')
ADDR = {4: ("10.99.0.1", "10.99.0.2", 24), 6: ("fd99::1", "fd99::2", 64)}


def sh(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    return subprocess.run(argv, input=stdin, check=check, capture_output=True, text=True,
                          timeout=30).stdout


def ipt(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def save(ns: str, family: int, table: str = "filter", counters: bool = False) -> str:
    extra = ["-c"] if counters else []
    return sh("ip", "netns", "exec", ns, f"{ipt(family)}-save", "-t", table, *extra)


def kernel_hashes(text: str) -> dict[str, list[str]]:
    """Chain -> hashes ("" for foreign rules), parsed here independently of the module."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            out.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            m = HASH.search(line)
            out.setdefault(line.split()[1], []).append(m[1] if m else "")
    return out


@dataclass
class Call:
    argv: list[str]
    stdin: str | None


class LoggingRunner(Runner):
    """Records every command (without the nsenter prefix): the write log the tests assert on."""

    def __init__(self, prefix: Sequence[str] = (), timeout: float = 30.0) -> None:
        super().__init__(prefix, timeout)
        self.calls: list[Call] = []

    def run(self, argv: Sequence[str], *, stdin: str | None = None, check: bool = True,
            timeout: float | None = None) -> Result:
        self.calls.append(Call(list(argv), stdin))
        return super().run(argv, stdin=stdin, check=check, timeout=timeout)

    def writes(self) -> list[Call]:
        return [c for c in self.calls
                if "restore" in c.argv[0] or c.argv[:2] in (["ipset", "restore"],
                                                             ["ipset", "destroy"])]

    def restores(self) -> list[str]:
        return [c.stdin or "" for c in self.calls if c.argv[0].endswith("tables-nft-restore")
                or c.argv[0].endswith("tables-legacy-restore")]


@pytest.fixture
def ns(make_ns: Callable[[], str]) -> str:
    return make_ns()


@pytest.fixture
def runner(ns: str) -> LoggingRunner:
    return LoggingRunner.in_netns(ns)


# --- desired state -------------------------------------------------------------------------

def set_name(family: int, what: str = "clients") -> str:
    return f"cali{family}0s:{what}"


def desired(family: int, members: Sequence[str] = (), *, allow_port: int = 80,
            extra: Sequence[Chain] = ()) -> Dataplane:
    s = set_name(family)
    chains = [
        Chain("cali-INPUT", (
            Rule(f"-p tcp -m set --match-set {s} src -m tcp --dport 81", "-j DROP",
                 "deny 81 from clients"),
            Rule(action="-j cali-pi-allow"),
        )),
        Chain("cali-pi-allow", (Rule(f"-p tcp -m tcp --dport {allow_port}", "-j ACCEPT"),)),
        Chain("cali-OUTPUT", (Rule("-o lo", "-j RETURN"),)),
        Chain("cali-FORWARD", (Rule("-m mark --mark 0x10000/0x10000", "-j ACCEPT"),)),
        *extra,
    ]
    hooks = (Hook("INPUT", Rule(action="-j cali-INPUT")),
             Hook("OUTPUT", Rule(action="-j cali-OUTPUT")),
             Hook("FORWARD", Rule(action="-j cali-FORWARD")),
             Hook("FORWARD", Rule("-m mark --mark 0x10000/0x10000", "-j ACCEPT"), append=True))
    nat = Table("nat", {"cali-POSTROUTING": Chain("cali-POSTROUTING",
                                                  (Rule("-o lo", "-j RETURN"),))},
                (Hook("POSTROUTING", Rule(action="-j cali-POSTROUTING"), append=True),))
    return Dataplane(
        tables={(family, "filter"): Table("filter", {c.name: c for c in chains}, hooks),
                (family, "nat"): nat},
        ipsets={s: IPSet(s, "hash:net", family, frozenset(members))},
    )


def state_for(runner: Runner, family: int) -> DataplaneState:
    return DataplaneState(runner, families=(family,))


def assert_programmed(ns: str, want: Dataplane, family: int) -> None:
    for (fam, tname), table in want.tables.items():
        got = kernel_hashes(save(ns, fam, tname))
        for chain in table.chains.values():
            assert got.get(chain.name) == rule_hashes(chain), (tname, chain.name)
        for hook in table.hooks:
            if not hook.append:
                h = rule_hashes(Chain(hook.chain, (hook.rule,)))[0]
                assert h in got[hook.chain], (tname, hook.chain)
    for s in want.ipsets.values():
        listing = sh("ip", "netns", "exec", ns, "ipset", "list", s.name)
        assert f"Type: {s.kind}" in listing


def set_members(ns: str, name: str) -> set[str]:
    out = sh("ip", "netns", "exec", ns, "ipset", "list", name)
    return set(out.split("Members:\n", 1)[1].split())


# --- iptables ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_first_apply_into_empty_netns(ns: str, runner: LoggingRunner, family: int) -> None:
    want = desired(family, [ADDR[family][0]])
    stats = apply_dataplane(want, state_for(runner, family), sweep=True)
    assert_programmed(ns, want, family)
    assert stats.restores == 2 and len(runner.restores()) == 2  # filter + nat, one each
    assert stats.chains_written == 5 and stats.rules_written == 6
    # inserted hooks sit at the top; the mark-accept rule was appended
    rules = [ln for ln in save(ns, family).splitlines() if ln.startswith("-A FORWARD")]
    assert "-j cali-FORWARD" in rules[0] and "--mark" in rules[-1]
    assert set_members(ns, set_name(family)) == {ADDR[family][0]}


@pytest.mark.parametrize("family", [4, 6])
def test_reapply_same_state_writes_nothing(ns: str, runner: LoggingRunner, family: int) -> None:
    want = desired(family, [ADDR[family][0]])
    state = state_for(runner, family)
    apply_dataplane(want, state, sweep=True)
    runner.calls.clear()
    stats = apply_dataplane(want, state, sweep=True)
    assert not stats.wrote and runner.calls == []  # cached: not even a read


def test_one_changed_chain_is_all_that_is_written(ns: str, runner: LoggingRunner) -> None:
    state = state_for(runner, 4)
    apply_dataplane(desired(4), state, sweep=True)
    # Traffic on lo bumps cali-OUTPUT's counter; a whole-table rewrite would reset it.
    sh("ip", "netns", "exec", ns, sys.executable, "-c",
       "import socket\ntry: socket.create_connection(('127.0.0.1', 9), 1)\nexcept OSError: pass")
    before = [ln for ln in save(ns, 4, counters=True).splitlines() if "-A cali-OUTPUT" in ln]
    assert not before[0].startswith("[0:0]")
    runner.calls.clear()
    stats = apply_dataplane(desired(4, allow_port=8080), state, sweep=True)
    assert stats.chains_written == 1 and stats.rules_written == 1 and stats.restores == 1
    [text] = runner.restores()
    assert re.findall(r"^:(\S+)", text, re.M) == ["cali-pi-allow"]
    assert not re.search(r"^-[DIFX] ", text, re.M)
    after = [ln for ln in save(ns, 4, counters=True).splitlines() if "-A cali-OUTPUT" in ln]
    assert after == before


def test_foreign_chains_and_hooks_are_never_touched(ns: str, runner: LoggingRunner) -> None:
    kube = ("*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n"
            "-A INPUT -m conntrack --ctstate NEW -j KUBE-SERVICES\n"
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n"
            "-A KUBE-SERVICES -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REJECT\n"
            "-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT\nCOMMIT\n"
            "*nat\n:KUBE-POSTROUTING - [0:0]\n-A POSTROUTING -j KUBE-POSTROUTING\n"
            "-A KUBE-POSTROUTING -j MASQUERADE\nCOMMIT\n")
    sh("ip", "netns", "exec", ns, "iptables-restore", "--noflush", stdin=kube)

    def foreign() -> dict[str, list[str]]:
        return {t: [ln for ln in save(ns, 4, t).splitlines()
                    if ln.startswith("-A") and "cali" not in ln] for t in ("filter", "nat")}

    original = foreign()
    state = state_for(runner, 4)
    apply_dataplane(desired(4), state, sweep=True)
    apply_dataplane(desired(4, allow_port=443), state, sweep=True)
    assert foreign() == original
    assert "cali-INPUT" in save(ns, 4).split("-A INPUT", 2)[1]  # our hook went on top
    post = [ln for ln in save(ns, 4, "nat").splitlines() if ln.startswith("-A POSTROUTING")]
    assert "KUBE" in post[0] and "cali-POSTROUTING" in post[1]  # appended after kube's
    # Tabby wanting nothing at all removes only Tabby's objects.
    apply_dataplane(Dataplane({}, {}), state, sweep=True)
    assert foreign() == original
    assert "cali" not in save(ns, 4) + save(ns, 4, "nat")
    assert all("KUBE" not in text for text in runner.restores())


@pytest.mark.parametrize("family", [4, 6])
def test_check_drift_repairs_hand_edits(ns: str, runner: LoggingRunner, family: int) -> None:
    want = desired(family, [ADDR[family][0]])
    state = state_for(runner, family)
    apply_dataplane(want, state, sweep=True)
    sh("ip", "netns", "exec", ns, "ipset", "del", set_name(family), ADDR[family][0])
    tool = ("ip", "netns", "exec", ns, ipt(family))
    sh(*tool, "-D", "INPUT", "1")  # our hook
    sh(*tool, "-R", "cali-pi-allow", "1", "-p", "tcp", "--dport", "80", "-j", "DROP")
    sh(*tool, "-A", "cali-OUTPUT", "-j", "ACCEPT")  # a foreign rule in our chain
    table = state.table(family, "filter")
    assert not table.apply(want.tables[(family, "filter")], sweep=True).wrote  # cache is blind
    [stats] = [s for s in state.check_drift(force=True) if s.table == "filter"]
    assert stats.wrote and stats.chains_written == 2 and stats.hooks_written >= 1
    assert_programmed(ns, want, family)
    assert set_members(ns, set_name(family)) == {ADDR[family][0]}
    assert not table.check_drift().wrote  # repaired for good


def test_stale_chains_are_kept_until_sweep(ns: str, runner: LoggingRunner) -> None:
    # The old cali-INPUT jumped to cali-old, which jumps to cali-old2: deleting them needs the
    # jumps gone first (iptables-nft counts references at transaction start).
    old2 = Chain("cali-old2", (Rule(action="-j DROP"),))
    old = Chain("cali-old", (Rule(action="-j cali-old2"),))
    first = desired(4)
    f = first.tables[(4, "filter")]
    inp = Chain("cali-INPUT", (*f.chains["cali-INPUT"].rules, Rule("-p udp", "-j cali-old")))
    first = Dataplane({**first.tables, (4, "filter"): Table(
        "filter", {**f.chains, "cali-INPUT": inp, old.name: old, old2.name: old2}, f.hooks)},
        first.ipsets)
    apply_dataplane(first, state_for(runner, 4), sweep=True)
    apply_dataplane(desired(4), state_for(runner, 4), sweep=False)
    chains = kernel_hashes(save(ns, 4))
    assert "cali-old" in chains and "cali-old2" in chains
    stats = apply_dataplane(desired(4), state_for(runner, 4), sweep=True)
    chains = kernel_hashes(save(ns, 4))
    assert "cali-old" not in chains and "cali-old2" not in chains
    assert sum(t.chains_deleted for t in stats.tables) == 2
    assert_programmed(ns, desired(4), 4)


# --- ipsets --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [4, 6])
def test_ipset_member_deltas(ns: str, runner: LoggingRunner, family: int) -> None:
    net = "10.7.0." if family == 4 else "fd07::"
    sets = IPSets(family, runner)
    name = set_name(family)

    def want(*hosts: int) -> dict[str, IPSet]:
        return {name: IPSet(name, "hash:net", family, frozenset(f"{net}{h}" for h in hosts))}

    sets.apply(want(1, 2, 3))
    runner.calls.clear()
    stats = sets.apply(want(2, 3, 4))
    assert (stats.members_added, stats.members_removed) == (1, 1)
    [call] = runner.writes()
    assert call.stdin == f"del {name} {net}1\nadd {name} {net}4\n"
    assert set_members(ns, name) == {f"{net}{h}" for h in (2, 3, 4)}


def test_ipset_metadata_change_swaps_under_live_references(ns: str, runner: LoggingRunner
                                                           ) -> None:
    name = set_name(4)
    sh("ip", "netns", "exec", ns, "ipset", "restore", stdin=(
        f"create {name} hash:net family inet maxelem 65536\nadd {name} 10.7.0.1\n"))
    sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-m", "set", "--match-set",
       name, "src", "-j", "DROP")
    stats = IPSets(4, runner).apply({name: IPSet(name, "hash:net", 4, frozenset({"10.7.0.2"}))})
    assert stats.swapped == 1
    listing = sh("ip", "netns", "exec", ns, "ipset", "list", "-t", name)
    assert "maxelem 1048576" in listing and "References: 1" in listing
    assert set_members(ns, name) == {"10.7.0.2"}
    assert "cali4t" not in sh("ip", "netns", "exec", ns, "ipset", "list", "-n")


def test_ipset_type_change(ns: str, runner: LoggingRunner) -> None:
    name = set_name(4)
    sh("ip", "netns", "exec", ns, "ipset", "restore", stdin=(
        f"create {name} hash:ip family inet\nadd {name} 10.7.0.1\n"))
    to_net = {name: IPSet(name, "hash:net", 4, frozenset({"10.7.0.0/24"}))}
    sh("ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-m", "set", "--match-set",
       name, "src", "-j", "DROP")
    with pytest.raises(IPSetError):  # referenced: the kernel cannot swap across types
        IPSets(4, runner).apply(to_net)
    assert "Type: hash:ip\n" in sh("ip", "netns", "exec", ns, "ipset", "list", name)
    sh("ip", "netns", "exec", ns, "iptables", "-F", "INPUT")
    assert IPSets(4, runner).apply(to_net).recreated == 1
    assert "Type: hash:net" in sh("ip", "netns", "exec", ns, "ipset", "list", name)
    assert set_members(ns, name) == {"10.7.0.0/24"}


def test_stale_set_destroyed_only_after_the_iptables_write(ns: str, runner: LoggingRunner
                                                          ) -> None:
    gone = set_name(4, "gone")
    extra = Chain("cali-gone", (Rule(f"-m set --match-set {gone} src", "-j DROP"),))
    first = desired(4, extra=[extra])
    first = Dataplane(first.tables, {**first.ipsets, gone: IPSet(gone, "hash:net", 4,
                                                                  frozenset({"10.8.0.0/16"}))})
    apply_dataplane(first, state_for(runner, 4), sweep=True)
    apply_dataplane(desired(4), state_for(runner, 4), sweep=False)
    assert gone in sh("ip", "netns", "exec", ns, "ipset", "list", "-n")
    runner.calls.clear()
    stats = apply_dataplane(desired(4), state_for(runner, 4), sweep=True)
    assert stats.sets_destroyed == [gone]
    kinds = [c.argv[0] if "restore" in c.argv[0] else " ".join(c.argv[:2])
             for c in runner.writes()]
    assert kinds == ["iptables-nft-restore", "ipset restore"]  # chain removed, then the set
    assert "destroy " + gone in runner.writes()[-1].stdin
    assert gone not in sh("ip", "netns", "exec", ns, "ipset", "list", "-n")


# --- packets -------------------------------------------------------------------------------

SERVER = """
import select, socket, sys
socks = []
for port in (80, 81):
    s = socket.socket(socket.AF_INET6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", port)); s.listen(64); socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        s.accept()[0].close()
"""


@contextmanager
def pair(make_ns: Callable[[], str], family: int) -> Iterator[tuple[str, str]]:
    """Client ns a and server ns b joined by a veth, with the server listening on 80 and 81."""
    a, b = make_ns(), make_ns()
    ca, cb, plen = ADDR[family]
    sh("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", b)
    for n, dev, addr in ((a, "va", ca), (b, "vb", cb)):
        extra = ["nodad"] if family == 6 else []
        sh("ip", "-n", n, "addr", "add", f"{addr}/{plen}", "dev", dev, *extra)
        sh("ip", "-n", n, "link", "set", dev, "up")
    server = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", SERVER],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        # a fresh veth may drop the first SYN while neighbour discovery settles
        assert any(connects(a, cb, 80) for _ in range(5)), "no connectivity before any rules"
        yield a, b
    finally:
        server.kill()
        server.wait()


def connects(ns: str, addr: str, port: int, timeout: float = 1.0) -> bool:
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, addr, str(port),
            str(timeout)]
    return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


@pytest.mark.parametrize("family", [4, 6])
def test_packets_obey_the_applied_chains(make_ns: Callable[[], str], family: int) -> None:
    with pair(make_ns, family) as (a, b):
        ca, cb, _ = ADDR[family]
        assert connects(a, cb, 80) and connects(a, cb, 81)
        state = DataplaneState(Runner.in_netns(b), families=(family,))
        apply_dataplane(desired(family, [ca]), state, sweep=True)
        assert connects(a, cb, 80)
        assert not connects(a, cb, 81, timeout=0.5)
        # the client leaves the set: only the ipset delta is written, and 81 opens
        stats = apply_dataplane(desired(family, []), state, sweep=True)
        assert stats.restores == 0 and stats.ipsets[0].members_removed == 1
        assert connects(a, cb, 81)


def test_restart_writes_nothing_and_never_opens_a_window(make_ns: Callable[[], str]) -> None:
    with pair(make_ns, 4) as (a, b):
        ca, cb, _ = ADDR[4]
        apply_dataplane(desired(4, [ca]), DataplaneState(Runner.in_netns(b), families=(4,)),
                        sweep=True)
        # A new agent process: no memory, reads the kernel, finds everything in place.
        fresh = LoggingRunner.in_netns(b)
        stats = apply_dataplane(desired(4, [ca]), DataplaneState(fresh, families=(4,)),
                                sweep=True)
        assert not stats.wrote and fresh.writes() == []
        assert not connects(a, cb, 81, timeout=0.5)
        # Restart with one policy changed: one atomic restore replaces just that chain;
        # the live chains are never flushed or deleted on their own first.
        fresh = LoggingRunner.in_netns(b)
        stats = apply_dataplane(desired(4, [ca], allow_port=8080),
                                DataplaneState(fresh, families=(4,)), sweep=True)
        [text] = fresh.restores()
        assert re.findall(r"^:(\S+)", text, re.M) == ["cali-pi-allow"]
        assert not re.search(r"^-[DFX] ", text, re.M)
        assert [c.argv[0] for c in fresh.writes()] == ["iptables-nft-restore"]
        assert not connects(a, cb, 81, timeout=0.5) and connects(a, cb, 80)


# --- scale ---------------------------------------------------------------------------------

def bulk(n_chains: int, rules: int, changed: int = -1) -> Table:
    chains = {}
    for c in range(n_chains):
        port = 1000 + (1 if c == changed else 0)
        name = f"cali-pi-bulk{c:04d}"
        chains[name] = Chain(name, tuple(
            Rule(f"-p tcp -s 10.{c // 250}.{c % 250}.{r}/32 -m tcp --dport {port + r}",
                 "-j ACCEPT") for r in range(rules)))
    dispatch = Chain("cali-INPUT", tuple(Rule(action=f"-j {n}") for n in chains))
    return Table("filter", {**chains, "cali-INPUT": dispatch},
                 (Hook("INPUT", Rule(action="-j cali-INPUT")),))


def test_apply_timings_200_chains_2000_rules(ns: str, runner: LoggingRunner) -> None:
    table = IptablesTable(4, "filter", runner)
    t0 = time.perf_counter()
    first = table.apply(bulk(200, 10), sweep=True)
    first_ms = (time.perf_counter() - t0) * 1000
    assert first.chains_written == 201 and first.rules_written == 2200
    one = table.apply(bulk(200, 10, changed=7), sweep=True)
    assert one.chains_written == 1 and one.rules_written == 10
    t0 = time.perf_counter()
    fresh = IptablesTable(4, "filter", runner)
    assert not fresh.apply(bulk(200, 10, changed=7), sweep=True).wrote
    restart_ms = (time.perf_counter() - t0) * 1000
    print(f"\nfirst apply {first_ms:.0f} ms (restore {first.ms:.0f} ms); one-chain change "
          f"restore {one.ms:.1f} ms; fresh reconciler read+diff, no write {restart_ms:.0f} ms")
    assert first_ms < 5000 and one.ms < 1000


# --- backend and drift schedule ------------------------------------------------------------

def test_backend_auto_detection_follows_kube_proxy(ns: str, runner: LoggingRunner) -> None:
    assert detect_backend(runner).mode == "nft"  # nothing anywhere: the Debian default
    sh("ip", "netns", "exec", ns, "iptables-legacy-restore", "--noflush",
       stdin="*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n")
    backend = detect_backend(runner)
    assert backend.mode == "legacy"
    assert detect_backend(runner, "nft").mode == "nft"  # explicit setting wins
    state = DataplaneState(runner, families=(4,), backend=backend)
    apply_dataplane(desired(4), state, sweep=True)
    legacy = sh("ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "filter")
    assert "cali-INPUT" in legacy and "cali-INPUT" not in save(ns, 4)
    assert not apply_dataplane(desired(4), DataplaneState(runner, (4,), backend), sweep=True).wrote
    stats = apply_dataplane(desired(4, allow_port=22), state, sweep=True)
    assert stats.chains_written == 1
    assert_programmed_legacy = kernel_hashes(
        sh("ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "filter"))
    chain = desired(4, allow_port=22).tables[(4, "filter")].chains["cali-pi-allow"]
    assert assert_programmed_legacy["cali-pi-allow"] == rule_hashes(chain)


def test_drift_checks_follow_writes_then_back_off(ns: str, runner: LoggingRunner) -> None:
    state = state_for(runner, 4)
    apply_dataplane(desired(4), state, sweep=True)
    now = time.monotonic()
    assert state.check_drift(now=now + 1) == []  # too soon after our write
    checked = state.check_drift(now=now + 6)  # post-write re-check (5 s)
    assert {s.table for s in checked} >= {"filter", "nat"} and not any(s.wrote for s in checked)
    assert state.check_drift(now=now + 12) == []  # backed off to 10 s
    assert state.check_drift(now=now + 17) != []


def test_a_failed_restore_reports_the_tool_error_and_rereads(ns: str, runner: LoggingRunner
                                                             ) -> None:
    table = IptablesTable(4, "filter", runner)
    table.apply(bulk(3, 2))
    bad = Table("filter", {"cali-bad": Chain("cali-bad", (Rule("--no-such-option", "-j DROP"),))})
    with pytest.raises(CommandError, match="iptables-nft-restore"):
        table.apply(bad)
    runner.calls.clear()
    assert not table.apply(bulk(3, 2)).wrote  # the write was atomic
    assert runner.calls[0].argv[0] == "iptables-nft-save"  # cache dropped: state re-read

"""The reconcilers' pure diff: parsed iptables-save / ipset save text vs desired state."""

from __future__ import annotations

import pytest

from felix.dataplane.ipsets import (
    MAXELEM,
    IPSetError,
    Meta,
    SetState,
    normalize_member,
    plan_ipsets,
)
from felix.dataplane.ipsets import parse_save as parse_ipset_save
from felix.dataplane.iptables import (
    APPENDS_SEED,
    IncompatibleTable,
    TableState,
    parse_save,
    plan_table,
    render_rule,
)
from felix.dataplane.runner import CommandError, Runner
from felix.model import Chain, Hook, IPSet, Rule, Table, rule_hashes

WL = Chain("cali-tw-cali1", (Rule("-p tcp --dport 81", "-j DROP", "deny 81"),
                             Rule(action="-j ACCEPT")))
DISPATCH = Chain("cali-FORWARD", (Rule("-o cali1", "-g cali-tw-cali1"),))
HOOKS = (Hook("FORWARD", Rule(action="-j cali-FORWARD")),
         Hook("FORWARD", Rule("-m mark --mark 0x10000/0x10000", "-j ACCEPT"), append=True))
DESIRED = Table("filter", {c.name: c for c in (WL, DISPATCH)}, HOOKS)

KUBE = [":KUBE-SERVICES - [0:0]",
        "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD",
        "-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -j KUBE-SVC-X"]


def kernel_text(table: Table, extra: list[str] = ()) -> str:
    """What iptables-save would print after a perfect apply of `table` plus foreign lines."""
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [x for x in extra if x.startswith(":")]
    lines += [f":{n} - [0:0]" for n in table.chains]
    for hook in table.hooks:
        if not hook.append:
            h = rule_hashes(Chain(hook.chain, (hook.rule,)))[0]
            lines.append(render_rule(f"-A {hook.chain}", hook.rule, h))
    lines += [x for x in extra if x.startswith("-A")]
    appended = tuple(h.rule for h in table.hooks if h.append)
    for rule, h in zip(appended, rule_hashes(Chain("FORWARD" + APPENDS_SEED, appended)),
                       strict=True):
        lines.append(render_rule("-A FORWARD", rule, h))
    for chain in table.chains.values():
        lines += [render_rule(f"-A {chain.name}", r, h)
                  for r, h in zip(chain.rules, rule_hashes(chain), strict=True)]
    return "\n".join([*lines, "COMMIT"]) + "\n"


def test_parse_reads_chains_hashes_and_hook_lines() -> None:
    state = parse_save(kernel_text(DESIRED, KUBE))
    assert state.chains["cali-tw-cali1"] == rule_hashes(WL)
    assert state.chains["KUBE-SERVICES"] == [""]
    assert state.chains["FORWARD"][1] == ""  # kube's rule between our insert and our append
    assert list(state.hook_lines) == ["FORWARD"]
    assert all("cali:" in ln for ln in state.hook_lines["FORWARD"])


def test_parse_refuses_nft_incompatible_table() -> None:
    with pytest.raises(IncompatibleTable):
        parse_save("# Table `filter' is incompatible, use 'nft' tool.\n")


def test_empty_kernel_gets_everything_in_one_transaction() -> None:
    plan = plan_table(DESIRED, parse_save(""), sweep=False)
    text = plan.restore_input()
    assert text.count("COMMIT") == 1 and text.startswith("*filter\n")
    assert sorted(plan.chains_written) == ["cali-FORWARD", "cali-tw-cali1"]
    assert plan.rules_written == 3 and plan.hooks_written == 2
    # declarations precede every rule, so jumps to chains created here resolve
    first_rule = min(i for i, ln in enumerate(plan.updates) if not ln.startswith(":"))
    assert all(ln.startswith(":") for ln in plan.updates[:first_rule])
    h = rule_hashes(WL)[0]
    assert (f'-A cali-tw-cali1 -m comment --comment "cali:{h}" -m comment --comment "deny 81" '
            "-p tcp --dport 81 -j DROP") in plan.updates
    assert any(ln.startswith("-I FORWARD 1 ") for ln in plan.updates)
    assert any(ln.startswith("-A FORWARD ") and "--mark" in ln for ln in plan.updates)


def test_kernel_matching_desired_means_no_write() -> None:
    plan = plan_table(DESIRED, parse_save(kernel_text(DESIRED, KUBE)), sweep=True)
    assert plan.empty, plan.restore_input()


def test_applying_a_plan_then_planning_again_is_empty() -> None:
    plan = plan_table(DESIRED, parse_save(""), sweep=True)
    assert plan_table(DESIRED, plan.new_state, sweep=True).empty


def test_one_changed_chain_is_the_only_one_written() -> None:
    changed = Chain(WL.name, (Rule("-p tcp --dport 82", "-j DROP"), *WL.rules[1:]))
    desired = Table("filter", {**DESIRED.chains, WL.name: changed}, HOOKS)
    plan = plan_table(desired, parse_save(kernel_text(DESIRED, KUBE)), sweep=True)
    assert plan.chains_written == [WL.name] and plan.hooks_written == 0
    assert plan.updates[0] == f":{WL.name} - [0:0]"  # flushed and refilled in one transaction
    assert not any("KUBE" in ln or "cali-FORWARD" in ln for ln in plan.updates)


def test_foreign_or_edited_rule_in_tabby_chain_rewrites_it() -> None:
    text = kernel_text(DESIRED).replace("COMMIT", "-A cali-FORWARD -j ACCEPT\nCOMMIT")
    plan = plan_table(DESIRED, parse_save(text), sweep=False)
    assert plan.chains_written == ["cali-FORWARD"]


def test_missing_hook_is_reinserted_without_touching_others() -> None:
    text = "\n".join(ln for ln in kernel_text(DESIRED, KUBE).splitlines()
                     if not (ln.startswith("-A FORWARD") and "cali-FORWARD" in ln))
    plan = plan_table(DESIRED, parse_save(text), sweep=False)
    assert not plan.chains_written
    # ours are removed by value and re-added in order; kube's FORWARD rule is never named
    assert [ln.split()[0] for ln in plan.updates] == ["-D", "-I", "-A"]
    assert not any("kubernetes" in ln for ln in plan.updates)


def test_hook_pushed_below_a_foreign_rule_moves_back_to_top() -> None:
    lines = kernel_text(DESIRED).splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.startswith("-A FORWARD"))
    lines.insert(at, KUBE[1])
    plan = plan_table(DESIRED, parse_save("\n".join(lines)), sweep=False)
    assert plan.hooks_removed == 2 and plan.hooks_written == 2


def test_append_mode_hook_goes_after_foreign_rules() -> None:
    table = Table("nat", {"cali-POSTROUTING": Chain("cali-POSTROUTING")},
                  (Hook("POSTROUTING", Rule(action="-j cali-POSTROUTING"), append=True),))
    plan = plan_table(table, TableState({"POSTROUTING": [""]}), sweep=False)
    assert any(ln.startswith("-A POSTROUTING ") for ln in plan.updates)
    assert plan.new_state.chains["POSTROUTING"][0] == ""


def test_stale_chain_kept_without_sweep_deleted_in_second_transaction_with() -> None:
    stale = Chain("cali-tw-gone", (Rule(action="-j DROP"),))
    text = kernel_text(Table("filter", {**DESIRED.chains, stale.name: stale}, HOOKS), KUBE)
    assert plan_table(DESIRED, parse_save(text), sweep=False).empty
    plan = plan_table(DESIRED, parse_save(text), sweep=True)
    assert plan.chains_deleted == ["cali-tw-gone"]
    assert plan.updates == [":cali-tw-gone - [0:0]"] and plan.deletes == ["-X cali-tw-gone"]
    assert plan.restore_input().count("COMMIT") == 2
    assert "cali-tw-gone" not in plan.new_state.chains


def test_stale_hook_is_removed_by_value() -> None:
    text = kernel_text(DESIRED, KUBE)
    plan = plan_table(Table("filter", DESIRED.chains), parse_save(text), sweep=False)
    assert plan.hooks_removed == 2 and plan.hooks_written == 0
    assert all(ln.startswith("-D FORWARD -m comment --comment \"cali:") for ln in plan.updates)
    assert "FORWARD" not in plan.new_state.hook_lines


def test_desired_chains_must_be_tabby_owned() -> None:
    with pytest.raises(ValueError):
        plan_table(Table("filter", {"KUBE-X": Chain("KUBE-X")}), TableState(), sweep=False)
    with pytest.raises(ValueError):
        plan_table(Table("filter", {}, (Hook("cali-x", Rule(action="-j ACCEPT")),)),
                   TableState(), sweep=False)


def test_comment_quotes_cannot_break_the_restore_line() -> None:
    line = render_rule("-A cali-x", Rule(action="-j ACCEPT", comment='say "hi"\n' + "x" * 300),
                       "abc")
    assert line.count('"') == 4 and "\n" not in line
    assert len(line.split('"')[3]) == 255  # xt_comment's limit


# --- ipsets --------------------------------------------------------------------------------

SAVE = """create cali40s:a hash:net family inet hashsize 1024 maxelem 1048576 bucketsize 12
add cali40s:a 10.0.0.1
add cali40s:a 10.1.0.0/16
create cali40s:old hash:net family inet hashsize 1024 maxelem 1048576
create KUBE-X hash:ip family inet hashsize 1024 maxelem 65536
add KUBE-X 1.2.3.4
create cali60s:b hash:net family inet6 hashsize 1024 maxelem 1048576
"""


def test_ipset_parse_keeps_only_this_familys_tabby_sets() -> None:
    v4 = parse_ipset_save(SAVE, 4)
    assert set(v4) == {"cali40s:a", "cali40s:old"}
    assert v4["cali40s:a"].members == {"10.0.0.1", "10.1.0.0/16"}
    assert set(parse_ipset_save(SAVE, 6)) == {"cali60s:b"}


def test_normalize_member_matches_ipset_spelling() -> None:
    assert normalize_member("hash:net", "10.0.0.1/32") == "10.0.0.1"
    assert normalize_member("hash:net", "10.1.2.3/16") == "10.1.0.0/16"
    assert normalize_member("hash:net", "FD00:0::1/128") == "fd00::1"
    assert normalize_member("hash:ip,port", "10.0.0.1,TCP:8080") == "10.0.0.1,tcp:8080"


def test_ipset_deltas_only() -> None:
    desired = [IPSet("cali40s:a", "hash:net", 4, frozenset({"10.0.0.1/32", "10.0.0.2/32"}))]
    plan = plan_ipsets(desired, parse_ipset_save(SAVE, 4), 4)
    assert plan.lines == ["del cali40s:a 10.1.0.0/16", "add cali40s:a 10.0.0.2"]
    assert plan.stale == ["cali40s:old"]


def test_ipset_create_and_noop() -> None:
    new = IPSet("cali40s:n", "hash:ip,port", 4, frozenset({"10.0.0.1,tcp:80"}))
    plan = plan_ipsets([new], {}, 4)
    assert plan.lines == [f"create cali40s:n hash:ip,port family inet maxelem {MAXELEM}",
                          "add cali40s:n 10.0.0.1,tcp:80"]
    assert not plan_ipsets([new], plan.new_state, 4).lines


def test_ipset_metadata_change_swaps_through_a_temp_set() -> None:
    actual = {"cali40s:a": SetState(Meta("hash:net", 4, 65536), {"10.0.0.1"}),
              "cali4t0": SetState(Meta("hash:net", 4), set())}
    plan = plan_ipsets([IPSet("cali40s:a", "hash:net", 4, frozenset({"10.0.0.1"}))], actual, 4)
    assert plan.lines[0].startswith("create cali4t1 hash:net")  # skips a leftover temp name
    assert plan.lines[-2:] == ["swap cali40s:a cali4t1", "destroy cali4t1"]


def test_ipset_type_change_recreates_only_when_unreferenced() -> None:
    actual = {"cali40s:a": SetState(Meta("hash:ip", 4), {"10.0.0.1"})}
    desired = [IPSet("cali40s:a", "hash:net", 4, frozenset({"10.0.0.0/24"}))]
    plan = plan_ipsets(desired, actual, 4)
    assert plan.lines[0] == "destroy cali40s:a" and plan.recreated == ["cali40s:a"]
    with pytest.raises(IPSetError):
        plan_ipsets(desired, actual, 4, referenced=["cali40s:a"])


def test_runner_error_carries_the_tools_stderr() -> None:
    with pytest.raises(CommandError) as err:
        Runner().run(["sh", "-c", "cat >/dev/null; echo 'Error in line 3' >&2; exit 2"],
                     stdin="x\n")
    assert err.value.returncode == 2 and "Error in line 3" in str(err.value)
    assert Runner(("env",)).run(["echo", "ok"]).stdout == "ok\n"

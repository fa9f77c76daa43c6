"""Who `fedbt server` runs as, and the control port's rule: decided and written without starting anything.
tests/test_operators_e2e.py applies the rule in a network namespace and tries it as other accounts."""

from __future__ import annotations

import grp
import os
import pwd

import pytest

from fedbt.cli import main
from fedbt.deployment.operators import control_port_ruleset, operator_accounts, plan_server_start
from fedbt.deployment.processes import DeploymentError

PORT = 9093


def plan(euid: int = 0, me: str = "root", user=None, operators=None, allow_root=False):
    return plan_server_start(euid, me, user, operators, allow_root, PORT)


def test_the_rule_admits_only_the_named_accounts_to_the_control_port_on_loopback_and_replaces_its_table():
    ruleset = control_port_ruleset(PORT, {"fedbt": 998, "alice": 1001, "bob": 1002})
    rules = [line.strip() for line in ruleset.splitlines()]
    opening = 'oif "lo" tcp dport 9093 tcp flags & (syn | ack) == syn'
    admit = f"{opening} meta skuid {{ 998, 1001, 1002 }} accept"
    assert rules[rules.index(admit) + 1] == f"{opening} reject with tcp reset"  # everyone else, after them
    assert "type filter hook output priority filter; policy accept;" in rules
    # A table left by a killed server is replaced, in the same transaction, not added to.
    assert rules[rules.index("table inet fedbt_9093") + 1] == "delete table inet fedbt_9093"
    assert "only alice, bob, fedbt may connect to the control port 9093" in ruleset


def test_the_operators_are_the_groups_members_and_the_accounts_whose_primary_group_it_is(monkeypatch):
    # nftables sees a connection's user and its primary group only: supplementary members must be named.
    group = grp.struct_group(("fedbt-operators", "x", 2000, ["alice"]))
    accounts = [
        pwd.struct_passwd((name, "x", uid, gid, "", "/nonexistent", "/usr/sbin/nologin"))
        for name, uid, gid in (("alice", 1001, 1001), ("bob", 1002, 2000), ("eve", 1003, 1003))
    ]
    monkeypatch.setattr(grp, "getgrnam", lambda name: group)
    monkeypatch.setattr(pwd, "getpwall", lambda: accounts)
    assert operator_accounts("fedbt-operators") == ["alice", "bob"]


def test_root_is_refused_without_a_service_account_unless_allowed():
    with pytest.raises(DeploymentError, match="as root: name its service account with --user"):
        plan()
    with pytest.raises(DeploymentError, match="as root"):
        plan(user="root", operators="ops")
    allowed = plan(allow_root=True, operators="ops")
    assert (allowed.run_as, allowed.install_rule, allowed.note) == (None, True, None)


def test_root_with_a_service_account_switches_to_it_and_guards_the_port_when_the_operators_are_named():
    guarded = plan(user="fedbt", operators="fedbt-operators")
    assert (guarded.run_as, guarded.install_rule, guarded.note) == ("fedbt", True, None)
    open_port = plan(user="fedbt")
    assert (open_port.run_as, open_port.install_rule) == ("fedbt", False)
    assert "is open to every account on this machine: name its operators with --operators" in open_port.note


def test_an_unprivileged_start_runs_as_itself_and_says_the_port_is_open_unless_root_installed_the_rule():
    start = plan(euid=1000, me="fedbt", user="fedbt", operators="ops")
    assert (start.run_as, start.install_rule) == (None, False)
    assert start.note.startswith("fedbt: note: as fedbt, this server can neither install nor check its control port's")
    assert "unless root installed it, the control port 127.0.0.1:9093 (submit, list and stop runs;" in start.note
    command = "fedbt server --print-firewall --user fedbt --operators ops --control-port 9093 | sudo nft -f -"
    assert start.note.endswith(f"is open to every account on this machine ({command})")
    with pytest.raises(DeploymentError, match="only root can start fedbt server as another account"):
        plan(euid=1000, me="alice", user="fedbt")


def test_fedbt_server_as_root_without_a_service_account_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert main(["server", "--certs", str(tmp_path), "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbt: error: fedbt server would run the SuperLink and every submitted ServerApp as root")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "state").exists()

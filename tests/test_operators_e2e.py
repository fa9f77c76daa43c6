"""On the server machine, only the service account and the operators' group reach the SuperLink's control port.

As root, in a network namespace of its own (the machine's own firewall is untouched), the test
creates a service account, an operators' group with one member and an outsider, starts
`fedbt server --user ... --operators ...` and runs Flower's own `flwr` as each account, with
the world-readable `ca.pem`. Accounts, group, namespace, folders and processes go at the end.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from local_accounts import (
    add_account,
    as_account,
    folder_every_account_reaches,
    missing_account_tools,
    python_for_every_account,
    remove_accounts,
    run_checked,
)
from test_netns_deploy import netns_available

from fedbt.config import PROJECT_ROOT
from fedbt.deployment.certs import CertLayout, make_deployment_certs, make_site_keys
from fedbt.deployment.control import CONNECTION, FlowerControl
from fedbt.deployment.nodes import LOOPBACK, SERVER_READY, SITE_READY, STARTUP_TIMEOUT
from fedbt.deployment.operators import NFT_DIRS, SERVER_STOP_GRACE, control_table
from fedbt.deployment.processes import ManagedProcess, flower_env

CONTROL_PORT = 9093  # the default: the namespace has its own ports
CALL_TIMEOUT = 120
RUN_TIMEOUT = 400
# A one-round run of the small CNN, tracked nowhere: the service account cannot write the operator's store.
RUN_SETTINGS = ["data.image_size=32", "model.name=cnn", "train.threads=1", "tracking.enabled=false"]
# Two interpreters import fedbt before the SuperLink starts (root's, then the service account's).
SERVER_STARTUP_TIMEOUT = 3 * STARTUP_TIMEOUT
# Root's half of the server waits this long for the service account's half to stop: wait longer.
STOP_GRACE = 2 * SERVER_STOP_GRACE
# Flower's answer when it cannot open a connection to the SuperLink.
UNREACHABLE = "Connection to the SuperLink is unavailable"


def missing_requirement() -> str | None:
    if not netns_available():
        return "needs root and ip netns"
    if not shutil.which("nft", path=os.pathsep.join(NFT_DIRS)):
        return "needs nft (apt-get install nftables; scripts/test.sh installs it)"
    return missing_account_tools()


MISSING = missing_requirement()
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


class Machine:
    """The accounts the test creates, and commands run as them in the namespace."""

    def __init__(self, work: Path):
        tag = uuid.uuid4().hex[:6]
        self.namespace = f"fedbt-operators-{tag}"
        self.service, self.operator, self.outsider = f"fbt{tag}svc", f"fbt{tag}op", f"fbt{tag}out"
        self.operators = f"fbt{tag}ops"
        self.work = work
        self.accounts: list[str] = []

    def create(self) -> None:
        run_checked("ip", "netns", "add", self.namespace)
        run_checked("ip", "-n", self.namespace, "link", "set", "lo", "up")
        run_checked("groupadd", "--system", self.operators)
        for name, groups in ((self.service, []), (self.operator, [self.operators]), (self.outsider, [])):
            add_account(name, *groups)
            self.accounts.append(name)

    def remove(self) -> None:
        """All that create() made; an account it could not remove (a process of it left running) fails the test."""
        kept = remove_accounts(self.accounts)
        subprocess.run(["groupdel", self.operators], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        assert not kept, f"accounts left on this machine: {kept}"

    def as_account(self, name: str, command: list[str]) -> list[str]:
        """`command` in the namespace, as the account with its groups, as a login gives them."""
        return ["ip", "netns", "exec", self.namespace, *as_account(name, command)]

    def flwr_home(self, account: str) -> Path:
        """The account's own folder: Flower's home with a connection to the control port, and a copy of ca.pem."""
        home = self.work / f"home-{account}"
        home.mkdir(exist_ok=True)
        shutil.copy(self.work / "certs" / "ca.pem", home / "ca.pem")
        FlowerControl(f"{LOOPBACK}:{CONTROL_PORT}", home / "ca.pem", home)
        for path in [home, *home.iterdir()]:
            shutil.chown(path, account)
        return home

    def flwr(self, account: str, *args: str) -> dict:
        """`flwr ARGS --format json` as the account, against the control port."""
        home = self.flwr_home(account)
        flwr = self.work / "python" / "bin" / "flwr"
        env = {**flower_env(home), "HOME": str(home)}
        command = self.as_account(account, [str(flwr), *args, "--format", "json"])
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CALL_TIMEOUT)
        assert "{" in done.stdout, done.stdout + done.stderr
        return json.loads(done.stdout[done.stdout.index("{") :])


@pytest.fixture(scope="module")
def machine():
    with folder_every_account_reaches("fedbt-operators-") as work:
        machine = Machine(work)
        try:
            machine.create()
            yield machine
        finally:
            machine.remove()


def nft_tables(machine: Machine) -> str:
    return subprocess.run(["ip", "netns", "exec", machine.namespace, "nft", "list", "tables"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


@pytest.fixture(scope="module")
def server(machine):
    """`fedbt server` started as root in the namespace, told to run as the service account and admit the
    operators; stopped at the end, when its rule must go with it."""
    work = machine.work
    certs = make_deployment_certs(work / "certs", [LOOPBACK], ["figshare"]).root
    # The server's certificate, key and site keys belong to its service account, which reads them.
    for path in [certs, *certs.rglob("*")]:
        shutil.chown(path, machine.service)
    python = python_for_every_account(work / "python")
    probe = subprocess.run(machine.as_account(machine.service, [str(python), "-c", "import fedbt.cli, flwr"]),
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"the service account cannot import fedbt here: install it where every account can read it "
                    f"({probe.stderr.strip().splitlines()[-1]})")  # fmt: skip
    command = ["ip", "netns", "exec", machine.namespace, str(python), "-m", "fedbt.cli", "server",
               "--certs", str(certs), "--state-dir", str(work / "server"),
               "--user", machine.service, "--operators", machine.operators]  # fmt: skip
    server = ManagedProcess("server", command, dict(os.environ), work / "server.out")
    try:
        server.wait_for(SERVER_READY, SERVER_STARTUP_TIMEOUT)
        assert control_table(CONTROL_PORT) in nft_tables(machine)
        yield server
    finally:
        server.stop(grace=STOP_GRACE)
    assert control_table(CONTROL_PORT) not in nft_tables(machine), "the server left its rule behind"


def test_an_account_outside_the_operators_group_can_neither_list_submit_stop_nor_register(machine, server):
    intruder = CertLayout(machine.work / "intruder")
    make_site_keys(intruder, "intruder")
    public_key = machine.work / "intruder.pub"
    shutil.copy(intruder.site_public_key("intruder"), public_key)
    attempts = {
        "list runs": ["ls", CONNECTION],
        "submit a run": ["run", str(PROJECT_ROOT), CONNECTION],
        "stop a run": ["stop", "1", CONNECTION],
        "register a site": ["supernode", "register", str(public_key), CONNECTION, "--name", "intruder"],
    }
    for attempt, args in attempts.items():
        answer = machine.flwr(machine.outsider, *args)
        assert not answer["success"] and UNREACHABLE in answer["error-message"], f"outsider could {attempt}"
    # A member of the operators' group reaches the SuperLink with the same tools: no intruder registered.
    assert machine.flwr(machine.operator, "ls", CONNECTION)["success"]
    nodes = machine.flwr(machine.operator, "supernode", "ls", CONNECTION)["nodes"]
    assert "intruder" not in json.dumps(nodes)
    # The SuperLink and the front run as the service account: its database and nginx's pid file are its own.
    service_uid = pwd.getpwnam(machine.service).pw_uid
    for path in ("server/superlink.db", "server/front/front.pid"):
        assert (machine.work / path).stat().st_uid == service_uid, path


def test_an_operators_fedbt_run_completes_and_writes_its_report_beside_what_the_service_account_wrote(
    machine, server, demo_root, site_files
):
    work = machine.work
    # Results go where the service account may write and the operators' group may read and add.
    runs = work / "runs"
    runs.mkdir(mode=0o770)
    shutil.chown(runs, machine.service, machine.operators)
    # One site, as root: the sites' machines are not what this test is about.
    site_command = ["ip", "netns", "exec", machine.namespace, sys.executable, "-m", "fedbt.cli", "site",
                    "--site", site_files[0], "--server", f"{LOOPBACK}:9092", "--certs", str(work / "certs"),
                    "--data-root", str(demo_root), "--cache-dir", str(work / "cache"),
                    "--state-dir", str(work / "site"), "--connect-timeout", "60"]  # fmt: skip
    site = ManagedProcess("site", site_command, dict(os.environ), work / "site.out")
    try:
        site.wait_for(SITE_READY, SERVER_STARTUP_TIMEOUT)
        home = machine.flwr_home(machine.operator)
        fedbt_run = [str(work / "python" / "bin" / "python"), "-m", "fedbt.cli", "run", "--ca", str(home / "ca.pem"),
                     "--out", str(runs / "results"), "--sites", "1", "--rounds", "1",
                     *[arg for setting in RUN_SETTINGS for arg in ("--set", setting)]]  # fmt: skip
        done = subprocess.run(machine.as_account(machine.operator, fedbt_run), env={**os.environ, "HOME": str(home)},
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "completed" in done.stdout
    finally:
        site.stop()
    results = runs / "results"
    assert results.stat().st_uid == pwd.getpwnam(machine.service).pw_uid  # written by the ServerApp
    assert (results / "report.md").stat().st_uid == pwd.getpwnam(machine.operator).pw_uid  # by `fedbt run`
    assert (results / "federated" / "final.pt").stat().st_mode & 0o077 == 0  # the weights stay the service's

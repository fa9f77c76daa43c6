"""Who may use the SuperLink's Control API on the server machine: its service account and the operators.

Flower's open-source SuperLink authorises nothing on its Control API (submit, list and stop runs,
read their logs, register sites), and `fedbt server` binds it to 127.0.0.1. So on the server
machine the kernel decides who may open a connection to that port: one nftables table of fedbt's
own lets the service account and the operators' Unix group in and resets everyone else's
attempt. `fedbt server` started as root installs it, runs everything else as the service account,
and deletes the table when it stops (docs/deployment.md#operators-who-may-submit-list-and-stop-runs).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from fedbt.deployment.nodes import LOOPBACK, ServerSettings, run_server
from fedbt.deployment.processes import DeploymentError, install_stop_handlers

# Where Debian installs nft, off a non-root user's PATH.
NFT_DIRS = ("/usr/sbin", "/sbin")
# Seconds the server started as the service account gets to stop its SuperLink and front.
SERVER_STOP_GRACE = 30
# What the server started as the service account writes: its own and the operators' group's, no one else's.
OPERATORS_UMASK = 0o007


@dataclass(frozen=True)
class ServerStart:
    """How `fedbt server` starts, decided before anything runs (plan_server_start)."""

    run_as: str | None  # the service account root starts the server as; None: this process's own account
    install_rule: bool  # root with --operators: install the control port's rule, delete it on exit
    note: str | None  # one line to print first: whether the control port is open to every account


def plan_server_start(
    euid: int, me: str, user: str | None, operators: str | None, allow_root: bool, control_port: int
) -> ServerStart:
    """Refuse to run the SuperLink (and every ServerApp an operator submits) as root unless told to;
    say whether the control port is guarded."""
    as_root = euid == 0 and user in (None, "root")
    if as_root and not allow_root:
        raise DeploymentError(
            "fedbt server would run the SuperLink and every submitted ServerApp as root: name its service "
            "account with --user (and the operators' group with --operators), or pass --allow-root"
        )
    if euid != 0 and user not in (None, me):
        raise DeploymentError(f"--user {user}: only root can start fedbt server as another account (this is {me})")
    control = f"the control port {LOOPBACK}:{control_port} (submit, list and stop runs; register sites)"
    open_to_all = f"{control} is open to every account on this machine"
    if euid != 0:
        command = (f"fedbt server --print-firewall --user {me} --operators {operators or 'GROUP'} "
                   f"--control-port {control_port} | sudo nft -f -")  # fmt: skip
        # Also the line of the server root started as the service account: true there too, and root's line
        # before it says the rule is in place.
        note = f"fedbt: note: as {me}, this server can neither install nor check its control port's rule: "
        note += f"unless root installed it, {open_to_all} ({command})"
    elif operators is None:
        note = f"fedbt: warning: {open_to_all}: name its operators with --operators"
    else:
        note = None
    run_as = user if euid == 0 and not as_root else None
    return ServerStart(run_as=run_as, install_rule=euid == 0 and operators is not None, note=note)


def account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise DeploymentError(f"no account {name!r} on this machine: create it (useradd --system {name})") from None


def operator_accounts(group: str) -> list[str]:
    """The group's accounts: its listed members and those whose primary group it is. The rule names their
    user ids, since nftables matches a socket's primary group only, not its supplementary groups."""
    try:
        entry = grp.getgrnam(group)
    except KeyError:
        raise DeploymentError(
            f"no group {group!r} on this machine: create it (groupadd {group}); add operators: usermod -aG {group} NAME"
        ) from None
    primary = {account.pw_name for account in pwd.getpwall() if account.pw_gid == entry.gr_gid}
    return sorted(set(entry.gr_mem) | primary)


def control_table(control_port: int) -> str:
    """fedbt's nftables table for one control port: one per server, so stopping one never opens another's."""
    return f"fedbt_{control_port}"


def control_port_ruleset(control_port: int, admitted: dict[str, int]) -> str:
    """nftables rules for `nft -f`: on loopback, a new connection to the control port from an account
    not in `admitted` (name: uid) is reset. It replaces fedbt's table for that port, left over or not."""
    table = control_table(control_port)
    uids = ", ".join(str(uid) for uid in sorted(set(admitted.values())))
    # A connection's first packet (SYN without ACK): established connections and their ends pass.
    opening = f'oif "lo" tcp dport {control_port} tcp flags & (syn | ack) == syn'
    return f"""\
# fedbt server: only {", ".join(sorted(admitted))} may connect to the control port {control_port}
# (remove: nft delete table inet {table})
table inet {table}
delete table inet {table}
table inet {table} {{
    chain control_port {{
        type filter hook output priority filter; policy accept;
        {opening} meta skuid {{ {uids} }} accept
        {opening} reject with tcp reset
    }}
}}
"""


def admitted_accounts(service_account: str, operators: str) -> dict[str, int]:
    """The service account and the operators' group as they are now (name: uid): a change to the group
    takes effect at the server's next start, as it does at an operator's next login."""
    return {name: account(name).pw_uid for name in [service_account, *operator_accounts(operators)]}


def nft(*args: str, ruleset: str | None = None) -> None:
    command = shutil.which("nft", path=os.pathsep.join([os.environ.get("PATH", ""), *NFT_DIRS]))
    if command is None:
        raise DeploymentError("nft not found: guarding the control port needs nftables (apt-get install nftables)")
    done = subprocess.run([command, *args], input=ruleset, capture_output=True, text=True)
    if done.returncode != 0:
        raise DeploymentError(f"nft {' '.join(args)} failed: {' '.join(done.stderr.split())}")


@contextmanager
def control_port_guarded(control_port: int, service_account: str, operators: str) -> Iterator[None]:
    """The control port's rule installed for the duration; a rule left by a killed server is replaced."""
    admitted = admitted_accounts(service_account, operators)
    nft("-f", "-", ruleset=control_port_ruleset(control_port, admitted))
    print(f"fedbt: only {', '.join(sorted(admitted))} may connect to the control port {control_port} "
          f"(nft table inet {control_table(control_port)}, removed when the server stops)", flush=True)  # fmt: skip
    try:
        yield
    finally:
        nft("delete", "table", "inet", control_table(control_port))


def server_arguments(settings: ServerSettings, operators: str | None) -> list[str]:
    """`fedbt server`'s arguments for these settings, to start it again as the service account."""
    arguments = [
        "--certs", str(settings.certs), "--state-dir", str(settings.state_dir), "--host", settings.host,
        "--port", str(settings.port), "--control-port", str(settings.control_port),
    ]  # fmt: skip
    if settings.site_keys:
        arguments += ["--site-keys", str(settings.site_keys)]
    if operators:
        arguments += ["--operators", operators]
    return arguments


def state_dir_for(name: str, state_dir: Path) -> None:
    """The server's state folder, made for the account if new: root writes nothing in it (the account
    could swap a file for a link to one of root's)."""
    entry = account(name)
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
        os.chown(state_dir, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    elif state_dir.stat().st_uid != entry.pw_uid:
        raise DeploymentError(f"{state_dir} does not belong to {name}, which writes there: chown -R {name} {state_dir}")


def serve_as(name: str, operators: str | None, arguments: list[str]) -> int:
    """`fedbt server ARGUMENTS` as the account, with its groups and home: the SuperLink, the ServerApps
    it starts and the front are its children and run as that account; this process only waits. The
    server has its own session, so a stop (Ctrl-C, SIGTERM) reaches it once: passed on from here.

    What it writes belongs to the operators' group, and to nobody else (umask 007): an operator reads
    a run's results, and `fedbt run` writes its report beside them. That gives the operators nothing
    new: whoever submits runs already runs code as this account. Private files (weights) stay 0600.
    """
    entry = account(name)
    env = {**os.environ, "HOME": entry.pw_dir, "USER": name, "LOGNAME": name}
    server = subprocess.Popen(
        [sys.executable, "-m", "fedbt.cli", "server", *arguments],
        user=entry.pw_uid,
        group=grp.getgrnam(operators).gr_gid if operators else entry.pw_gid,
        extra_groups=os.getgrouplist(name, entry.pw_gid),
        umask=OPERATORS_UMASK if operators else -1,
        env=env,
        start_new_session=True,
    )
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        try:
            return server.wait(timeout=SERVER_STOP_GRACE)
        except subprocess.TimeoutExpired:
            server.kill()
            return server.wait()


def current_account() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def start_server(settings: ServerSettings, user: str | None, operators: str | None, allow_root: bool) -> int:
    """`fedbt server`: as planned by plan_server_start, behind the control port's rule when root installs it."""
    me = current_account()
    start = plan_server_start(os.geteuid(), me, user, operators, allow_root, settings.control_port)
    if start.note:
        print(start.note, file=sys.stderr, flush=True)
    install_stop_handlers()  # a SIGTERM, like Ctrl-C, leaves through the rule's removal
    port = settings.control_port
    with control_port_guarded(port, start.run_as or me, operators) if start.install_rule else nullcontext():
        if start.run_as is None:
            return run_server(settings)
        state_dir_for(start.run_as, settings.state_dir)
        return serve_as(start.run_as, operators, server_arguments(settings, operators))

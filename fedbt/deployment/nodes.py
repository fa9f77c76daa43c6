"""`fedbt server` and `fedbt site`: a Flower SuperLink and a hospital's SuperNode, set up safely.

Both run until stopped (Ctrl-C or SIGTERM) and take their Flower processes down with them.
"""

from __future__ import annotations

import secrets
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fedbt.deployment.certs import CertLayout
from fedbt.deployment.control import FlowerControl
from fedbt.deployment.front import Front
from fedbt.deployment.processes import (
    ACTIVATION_REFUSED,
    DeploymentError,
    ManagedProcess,
    flower_command,
    flower_env,
    install_stop_handlers,
    wait_forever,
)
from fedbt.deployment.registry import register_sites
from fedbt.federated.flower_internals import (
    FLOWER_VERSION,
    SUPEREXEC_POLL_ENV,
    check_flower_internals,
    installed_flower_version,
)
from fedbt.fileio import atomic_write, make_private_folders
from fedbt.fl.protocol import NODE_CACHE_DIR, NODE_DATA_ROOT, NODE_SITE

SERVER_READY = "server ready"
SITE_READY = "connected to the server"
# Flower prints this once its SuperNode has authenticated and joined the federation.
SUPERNODE_JOINED = "SuperNode ID:"
STARTUP_TIMEOUT = 60.0
LOOPBACK = "127.0.0.1"
ACTIVATION_RETRY_SECONDS = 2.0
# The longest a site killed while connected stays online at the server, which refuses its key
# meanwhile: two heartbeat intervals (Flower's default 30 s; a tuned site beats every 10 s), and a margin.
STALE_CONNECTION_SECONDS = 65.0
# Present while a site is connected; left behind by a start that did not end cleanly.
CONNECTED_MARKER = "connected"
# `python -m FLOWER_INTERNALS supernode|superlink|executor` runs that Flower process tuned.
FLOWER_INTERNALS = "fedbt.federated.flower_internals"
# The secret a site's SuperNode and its executor authenticate the executor's task requests with.
SUPEREXEC_SECRET_FILE = "superexec.secret"
SUPEREXEC_SECRET_BYTES = 32


@dataclass
class ServerSettings:
    certs: Path  # a `fedbt certs` folder: ca.pem, server/server.pem, server/server.key
    state_dir: Path  # the SuperLink's database (runs, registered sites) and Flower home
    host: str = "127.0.0.1"  # where sites connect (the Fleet API only); 0.0.0.0: all interfaces
    port: int = 9092
    # The SuperLink's own port, on 127.0.0.1 only: `fedbt run` and site registration use it.
    control_port: int = 9093
    site_keys: Path | None = None  # folder of <site>.pub to register; default certs/sites
    # Plain `flower-superlink`, which writes every model transfer into its database: what runs
    # when the installed Flower is not the one fedbt's tuning was written for.
    flower_defaults: bool = False


@dataclass
class SiteSettings:
    site_file: Path
    server: str  # HOST:PORT of the SuperLink
    ca_cert: Path
    private_key: Path
    data_root: Path | None
    cache_dir: Path | None
    state_dir: Path  # this SuperNode's Flower home (installed apps) and log
    # The SuperNode's local Runtime API (loopback only), one per site on a machine; None: a free
    # port, chosen at start and printed, so several sites share a machine without flags.
    runtime_port: int | None = None
    connect_timeout: float = 300.0
    # Seconds between the SuperNode's checks for work; 3 s and a fresh interpreter per message
    # are Flower's defaults (flower_defaults=True), kept for measuring the difference. Either way
    # the site runs only its installed ClientApp.
    poll_interval: float = 0.2
    flower_defaults: bool = False


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DeploymentError(f"{what} not found: {path}")
    return path


def wait_for_port(host: str, port: int, process: ManagedProcess, timeout: float = STARTUP_TIMEOUT) -> None:
    probe = LOOPBACK if host in ("0.0.0.0", "") else host
    deadline = time.monotonic() + timeout
    while True:
        if process.process.poll() is not None:
            raise DeploymentError(process.failure())
        try:
            with socket.create_connection((probe, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise DeploymentError(f"{process.name} did not open port {port} within {timeout:.0f} s") from None
            time.sleep(0.2)


def flower_defaults_if_internals_differ(settings: ServerSettings) -> ServerSettings:
    """`settings`, switched to Flower's default SuperLink (with one warning) if the installed Flower's
    internals differ from those fedbt's tuned SuperLink patches: it would be slower, or fail, not faster.
    """
    if settings.flower_defaults:
        return settings
    problems = check_flower_internals()
    if not problems:
        return settings
    print(
        f"fedbt: warning: Flower {installed_flower_version()} differs from the {FLOWER_VERSION} this tuning "
        f"was written for ({problems[0]}); running Flower's defaults",
        file=sys.stderr,
        flush=True,
    )
    return replace(settings, flower_defaults=True)


def superlink_command(settings: ServerSettings, layout: CertLayout) -> list[str]:
    if settings.flower_defaults:
        superlink = [flower_command("flower-superlink")]
    else:
        # It leaves its ServerApps to fedbt's executor (serverapp_executor_command), which keeps their
        # tokens off every command line; it hands them out only with the secret.
        superlink = [sys.executable, "-m", FLOWER_INTERNALS, "superlink", "--isolation", "process",
                     "--superexec-auth-secret-file", str(superexec_secret_file(settings))]  # fmt: skip
    return [
        *superlink,
        "--ssl-certfile", str(_require_file(layout.server_cert, "server certificate")),
        "--ssl-keyfile", str(_require_file(layout.server_key, "server key")),
        "--ssl-ca-certfile", str(_require_file(layout.ca_cert, "CA certificate")),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(settings.state_dir / "superlink.db"),
        "--host", LOOPBACK,
        "--port", str(settings.control_port),
    ]  # fmt: skip


def public_front(settings: ServerSettings, layout: CertLayout) -> Front:
    if settings.port == settings.control_port:
        raise DeploymentError(f"the public port and the control port are both {settings.port}: choose two")
    return Front(
        public_host=settings.host,
        public_port=settings.port,
        superlink_port=settings.control_port,
        server_cert=layout.server_cert.resolve(),
        server_key=layout.server_key.resolve(),
        ca_cert=layout.ca_cert.resolve(),
        workdir=(settings.state_dir / "front").resolve(),
    )


def run_server(settings: ServerSettings) -> int:
    """Start the SuperLink on loopback, register the sites' keys, open the public front, serve until stopped."""
    layout = CertLayout(settings.certs)
    settings = flower_defaults_if_internals_differ(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    write_superexec_secret(settings)
    command = superlink_command(settings, layout)
    front = public_front(settings, layout)
    install_stop_handlers()
    env = flower_env(settings.state_dir / "flwr-home")
    processes = [ManagedProcess("superlink", command, env, settings.state_dir / "superlink.log", own_group=False)]
    try:
        wait_for_port(LOOPBACK, settings.control_port, processes[0])
        control_address = f"{LOOPBACK}:{settings.control_port}"
        control = FlowerControl(control_address, layout.ca_cert, settings.state_dir / "flwr-cli")
        registered = register_sites(control, settings.site_keys or layout.sites_dir, settings.state_dir)
        front_log = settings.state_dir / "front.log"
        processes.append(ManagedProcess("front", front.command(), env, front_log, own_group=False))
        wait_for_port(settings.host, settings.port, processes[1])
        if not settings.flower_defaults:
            executor = serverapp_executor_command(settings, layout, processes[0].process.pid)
            log = settings.state_dir / "executor.log"
            processes.append(ManagedProcess("serverapp executor", executor, env, log, own_group=False))
        sites = ", ".join(f"{name} ({state})" for name, state in registered.items())
        print(
            f"fedbt: {SERVER_READY} on {settings.host}:{settings.port} (sites only); "
            f"runs: `fedbt run --server {control_address}` on this machine; sites: {sites}",
            flush=True,
        )
        ended = wait_forever(processes)
        raise DeploymentError(ended.failure())
    except KeyboardInterrupt:
        print("fedbt: server stopped", flush=True)
        return 0
    finally:
        for managed in reversed(processes):
            managed.stop()


def require_site_guard() -> None:
    """Refuse to start a site on a Flower whose internals fedbt cannot check: its code guard (run only
    the installed ClientApp) replaces one of them, and without it the site would run the server's code."""
    problems = check_flower_internals()
    if problems:
        raise DeploymentError(
            f"this site cannot make sure it runs only its installed ClientApp on the installed Flower "
            f"({problems[0]}): install the Flower fedbt supports: pip install 'flwr[simulation]=={FLOWER_VERSION}'"
        )


def check_site_data(site_file: Path, data_root: Path | None) -> str:
    """The site's name, after making sure its YAML points at images: a clear error now, not mid-run."""
    from fedbt.data.readers import scan_site
    from fedbt.data.sites import load_site

    spec = load_site(site_file, data_root)
    scan = scan_site(spec)
    if not scan.records:
        raise DeploymentError(f"site {spec.name}: no images found under {spec.root}")
    print(f"fedbt: site {spec.name}: {len(scan.records)} images under {spec.root}", flush=True)
    return spec.name


def free_port() -> int:
    """A loopback port no one listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def with_runtime_port(settings: SiteSettings) -> SiteSettings:
    """The settings with a free Runtime API port where none was given."""
    if settings.runtime_port is not None:
        return settings
    return replace(settings, runtime_port=free_port())


def node_config(settings: SiteSettings) -> str:
    values = {NODE_SITE: settings.site_file.resolve()}
    if settings.data_root:
        values[NODE_DATA_ROOT] = settings.data_root.resolve()
    if settings.cache_dir:
        values[NODE_CACHE_DIR] = settings.cache_dir.resolve()
    return " ".join(f'{key}="{value}"' for key, value in values.items())


def superexec_secret_file(settings: ServerSettings | SiteSettings) -> Path:
    return settings.state_dir / SUPEREXEC_SECRET_FILE


def write_superexec_secret(settings: ServerSettings | SiteSettings) -> Path:
    """A new secret for this start of the site or server, readable by its owner alone."""
    return atomic_write(
        superexec_secret_file(settings), lambda fh: fh.write(secrets.token_bytes(SUPEREXEC_SECRET_BYTES)), private=True
    )


def supernode_command(settings: SiteSettings) -> list[str]:
    """The SuperNode, always with `--isolation process`: it never starts a ClientApp itself; the
    site's executor (executor_command) runs each task, with the installed ClientApp only."""
    flower_args = [
        "--superlink", settings.server,
        "--root-certificates", str(_require_file(settings.ca_cert, "CA certificate")),
        "--auth-supernode-private-key", str(_require_file(settings.private_key, "site key")),
        "--node-config", node_config(settings),
        "--port", str(settings.runtime_port),
        "--max-wait-time", str(settings.connect_timeout),
        "--isolation", "process",
        "--superexec-auth-secret-file", str(superexec_secret_file(settings)),
    ]  # fmt: skip
    if settings.flower_defaults:
        return [flower_command("flower-supernode"), *flower_args]
    tuned = [sys.executable, "-m", FLOWER_INTERNALS, "supernode", "--poll-interval", str(settings.poll_interval)]
    return [*tuned, *flower_args]


def serverapp_executor_command(settings: ServerSettings, layout: CertLayout, superlink_pid: int) -> list[str]:
    """fedbt's executor of the SuperLink's ServerApp tasks, through its Runtime API (TLS, on loopback)."""
    return [
        sys.executable, "-m", FLOWER_INTERNALS, "executor", "--task", "serverapp",
        "--runtime-api-address", f"{LOOPBACK}:{settings.control_port}",
        "--root-certificates", str(layout.ca_cert.resolve()),
        "--parent-pid", str(superlink_pid),
        "--superexec-auth-secret-file", str(superexec_secret_file(settings)),
    ]  # fmt: skip


def executor_command(settings: SiteSettings, supernode_pid: int) -> list[str]:
    command = [
        sys.executable, "-m", FLOWER_INTERNALS, "executor",
        "--runtime-api-address", f"{LOOPBACK}:{settings.runtime_port}",
        "--parent-pid", str(supernode_pid),
        "--superexec-auth-secret-file", str(superexec_secret_file(settings)),
    ]  # fmt: skip
    return [*command, "--no-preload"] if settings.flower_defaults else command


def join_server(settings: SiteSettings, name: str, env: dict[str, str]) -> ManagedProcess:
    """A SuperNode that has joined the server.

    A site that died is still online for the server until its heartbeats are overdue, and
    the server refuses a second activation meanwhile, with the same answer it gives an
    unregistered key: a site whose last start did not end cleanly retries until then; any
    other site stops at the first refusal, its key not registered.
    """
    write_superexec_secret(settings)
    retry_window = STALE_CONNECTION_SECONDS if (settings.state_dir / CONNECTED_MARKER).exists() else 0.0
    deadline = time.monotonic() + retry_window
    while True:
        log_file = settings.state_dir / "supernode.log"
        node = ManagedProcess(f"site {name}", supernode_command(settings), env, log_file, own_group=False)
        try:
            node.wait_for(SUPERNODE_JOINED, settings.connect_timeout + STARTUP_TIMEOUT)
            return node
        except DeploymentError:
            node.stop()
            if not node.saw(ACTIVATION_REFUSED) or time.monotonic() > deadline:
                raise
        except BaseException:
            node.stop()
            raise
        print(f"fedbt: site {name}: the server refused to activate this site yet; retrying", flush=True)
        time.sleep(ACTIVATION_RETRY_SECONDS)


def run_site(settings: SiteSettings) -> int:
    """Check the site's data, join the server, run ClientApps until stopped."""
    require_site_guard()
    name = check_site_data(settings.site_file, settings.data_root)
    settings = with_runtime_port(settings)
    print(f"fedbt: site {name} runtime API on {LOOPBACK}:{settings.runtime_port} (this machine only)", flush=True)
    # Its owner's alone (0700) when created here: the SuperExec secret, the logs and Flower's home of the site.
    make_private_folders(settings.state_dir)
    # How often the executor asks the SuperNode for a task (Flower's default: every second).
    poll = {} if settings.flower_defaults else {SUPEREXEC_POLL_ENV.get(): str(settings.poll_interval)}
    env = flower_env(settings.state_dir / "flwr-home", poll)
    install_stop_handlers()
    processes: list[ManagedProcess] = []
    try:
        node = join_server(settings, name, env)
        processes.append(node)
        (settings.state_dir / CONNECTED_MARKER).touch()
        processes.append(
            ManagedProcess(
                f"site {name} executor",
                executor_command(settings, node.process.pid),
                env,
                settings.state_dir / "executor.log",
                own_group=False,
            )
        )
        print(f"fedbt: site {name} {SITE_READY} at {settings.server}", flush=True)
        ended = wait_forever(processes)
        raise DeploymentError(ended.failure())
    except KeyboardInterrupt:
        print(f"fedbt: site {name} stopped", flush=True)
        return 0
    finally:
        for managed in reversed(processes):
            managed.stop()
        (settings.state_dir / CONNECTED_MARKER).unlink(missing_ok=True)

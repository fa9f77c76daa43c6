"""One server and its sites on this machine's loopback, as separate processes: for tests and the benchmark.

Every process is started through the real `fedbt server` / `fedbt site` commands and stopped
(its whole process group) by `close()`, which tests call in `finally`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedbt.data.sites import load_site
from fedbt.deployment.certs import make_deployment_certs
from fedbt.deployment.nodes import LOOPBACK, SERVER_READY, SITE_READY, STARTUP_TIMEOUT, free_port
from fedbt.deployment.processes import ManagedProcess, flower_env, stop_all
from fedbt.deployment.runs import RunOutcome, RunRequest, submit_and_follow


@dataclass
class LocalFederation:
    work: Path  # certificates, state, logs and results go here
    data_root: Path
    site_files: list[str]
    flower_defaults: bool = False
    connect_timeout: float = 60.0
    port: int = field(default_factory=free_port)  # the public front: sites only
    control_port: int = field(default_factory=free_port)  # the SuperLink itself: runs and registration
    server: ManagedProcess | None = None
    sites: dict[str, ManagedProcess] = field(default_factory=dict)

    def __post_init__(self):
        self.names = {load_site(path, self.data_root).name: path for path in self.site_files}
        self.certs = make_deployment_certs(self.work / "certs", [LOOPBACK], list(self.names)).root
        # Child processes: one torch thread each, so three sites and a server share few cores without thrashing.
        self.env = flower_env(self.work / "cli-home", {"OMP_NUM_THREADS": "1"})

    @property
    def address(self) -> str:
        """Where sites connect."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def control_address(self) -> str:
        """Where `fedbt run` submits, on the server machine."""
        return f"{LOOPBACK}:{self.control_port}"

    def _fedbt(self, name: str, args: list[str], log: str) -> ManagedProcess:
        return ManagedProcess(name, [sys.executable, "-m", "fedbt.cli", *args], self.env, self.work / log)

    def start_server(self) -> None:
        # --allow-root: a throw-away federation runs as whoever runs it, root in CI, with no service account.
        args = ["server", "--certs", str(self.certs), "--port", str(self.port),
                "--control-port", str(self.control_port), "--state-dir", str(self.work / "server"),
                "--allow-root"]  # fmt: skip
        self.server = self._fedbt("server", args, "server.out")
        self.server.wait_for(SERVER_READY, STARTUP_TIMEOUT)

    def start_site(self, name: str) -> ManagedProcess:
        # A fresh Runtime API port on every start: a killed site's old port may not be free yet.
        args = [
            "site", "--site", self.names[name], "--server", self.address, "--certs", str(self.certs),
            "--data-root", str(self.data_root), "--cache-dir", str(self.work / "cache" / name),
            "--state-dir", str(self.work / f"site-{name}"),
            "--connect-timeout", str(self.connect_timeout),
        ]  # fmt: skip
        if self.flower_defaults:
            args.append("--flower-defaults")
        site = self._fedbt(f"site {name}", args, f"site-{name}.out")
        self.sites[name] = site
        return site

    def start(self) -> LocalFederation:
        self.start_server()
        for name in self.names:
            self.start_site(name)
        for site in self.sites.values():
            site.wait_for(SITE_READY, STARTUP_TIMEOUT + self.connect_timeout)
        return self

    def run(self, out: Path, overrides: list[str]) -> RunOutcome:
        return submit_and_follow(RunRequest(self.control_address, self.certs / "ca.pem", out, overrides=overrides))

    def kill_site(self, name: str) -> None:
        self.sites.pop(name).stop(grace=0)

    def stop_server(self) -> None:
        if self.server:
            self.server.stop(grace=0)
            self.server = None

    def close(self) -> None:
        stop_all([*self.sites.values(), *([self.server] if self.server else [])])
        self.sites.clear()
        self.server = None


def rounds_overhead(metrics: dict) -> list[float]:
    """Seconds per round beyond the slowest site's training: the wait for replies, process start-up,
    transfers, aggregation, the sites' validation and the checkpoint.
    """
    history = metrics["history"]
    overheads, previous = [], 0.0
    for entry in history:
        wall = entry["elapsed_seconds"] - previous
        previous = entry["elapsed_seconds"]
        slowest = max(site["train_seconds"] for site in entry["train"].values())
        overheads.append(wall - slowest)
    return overheads


def measure_overhead(
    work: Path, data_root: Path, site_files: list[str], rounds: int, overrides: list[str], flower_defaults: bool
) -> dict:
    """Per-round overhead of a deployment on loopback: mean over rounds after the first (start-up)."""
    federation = LocalFederation(work, data_root, site_files, flower_defaults=flower_defaults)
    try:
        federation.start()
        poll = ["federated.poll_interval=3.0"] if flower_defaults else []
        outcome = federation.run(work / "results", [f"federated.rounds={rounds}", *overrides, *poll])
    finally:
        federation.close()
    if outcome.metrics is None:
        raise RuntimeError(f"the measured run ended as {outcome.status}: {outcome.details}")
    per_round = rounds_overhead(outcome.metrics)
    steady = per_round[1:] or per_round
    return {
        "flower_defaults": flower_defaults,
        "rounds": rounds,
        "per_round_seconds": per_round,
        "overhead_seconds_per_round": sum(steady) / len(steady),
    }

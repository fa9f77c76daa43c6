"""A simulation joins an existing Ray cluster (`ray start --head`) instead of starting its own."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from fedbt.cli import main

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_using(folder: Path) -> list[int]:
    """Pids whose command line names the folder: every process of the cluster started with it."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(folder).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return pids


def stop_cluster(folder: Path, grace: float = 10.0) -> None:
    """Stop this test's cluster only. (`ray stop` would also kill any other Ray on the machine,
    such as a simulation someone is running beside the tests.)"""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_using(folder):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while processes_using(folder) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture()
def ray_head():
    ray = Path(sys.executable).parent / "ray"
    port = free_port()
    # The cluster's own folder (its workers log there); short, as Ray's socket paths must be.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    start = [
        str(ray),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--node-ip-address=127.0.0.1",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"127.0.0.1:{port}", temp_dir
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_simulation_runs_its_clients_on_the_joined_cluster(ray_head, demo_args, tmp_path):
    address, temp_dir = ray_head
    code = main(["simulate", *demo_args, "--rounds", "1", "--ray-address", address,
                 "--skip-central", "--skip-local", "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 0
    assert (tmp_path / "out" / "federated" / "final.pt").is_file()
    # The clients ran in workers of the joined cluster: their progress lines are in its logs.
    worker_logs = "".join(p.read_text(errors="ignore") for p in temp_dir.glob("session_*/logs/worker-*.err"))
    worker_logs += "".join(p.read_text(errors="ignore") for p in temp_dir.glob("session_*/logs/worker-*.out"))
    assert "[client figshare] round 1/1" in worker_logs

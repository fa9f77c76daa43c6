"""A simulation joins an existing Ray cluster (`ray start --head`) instead of starting its own."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedbt.cli import main

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        subprocess.run([str(ray), "stop", "--force"], env=env, capture_output=True, timeout=120)
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

"""The deployment as separate hosts: scripts/netns_deploy.sh puts the server and each site in its own
network namespace with its own address. Runs where root and `ip netns` are available (CI with root)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns_deploy.sh"


def netns_available() -> bool:
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = f"fedbt-probe-{uuid.uuid4().hex[:6]}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


@pytest.mark.skipif(not netns_available(), reason="needs root and ip netns")
def test_server_and_three_sites_in_their_own_network_namespaces_complete_two_rounds(tmp_path):
    # The script cleans up its namespaces, bridge and processes itself, also when it fails.
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "work")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 rounds, 3 sites, each from its own namespace" in done.stdout

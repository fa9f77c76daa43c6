"""The `flwr` command line against one SuperLink: register sites, submit, follow and inspect runs."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

from fedbt.deployment.processes import DeploymentError, flower_command, flower_env

CONNECTION = "fedbt"
# Calls that only talk to the server: no reason to wait longer, whatever the run does.
CALL_TIMEOUT = 120


class FlowerControl:
    """`flwr` with a private FLWR_HOME whose only SuperLink connection is this server."""

    def __init__(self, address: str, ca_cert: str | Path, home: Path | None = None):
        self.address = address
        self.home = home or Path(tempfile.mkdtemp(prefix="fedbt-flwr-cli-"))
        ca = Path(ca_cert).expanduser().resolve()
        if not ca.is_file():
            raise DeploymentError(f"CA certificate not found: {ca}")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
        )
        self.env = flower_env(self.home)

    def call_json(self, *args: str, timeout: float = CALL_TIMEOUT) -> dict:
        """`flwr ARGS --format json`; its JSON answer, or a DeploymentError with Flower's message."""
        command = [flower_command("flwr"), *args, "--format", "json"]
        try:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(
                f"flwr {args[0]}: no answer from the server at {self.address} in {timeout} s"
            ) from None
        answer = _last_json(done.stdout)
        # flwr reports failures as {"success": false} and may still exit 0.
        if answer is None or not answer.get("success", False):
            message = (answer or {}).get("error-message") or done.stderr.strip() or done.stdout.strip()
            raise DeploymentError(f"flwr {args[0]} failed: {' '.join(message.split())}")
        return answer

    def register_site(self, name: str, public_key: Path) -> int | None:
        """Register a site's public key; the node id the server gave it, None if the key was registered before."""
        try:
            answer = self.call_json("supernode", "register", str(public_key), CONNECTION, "--name", name)
        except DeploymentError as err:
            if "already in use" in str(err):
                return None
            raise
        return int(answer["node-id"])

    def unregister_site(self, node_id: int) -> None:
        """From now on the server refuses the node's key (Flower keeps it, unregistered: never registered again)."""
        self.call_json("supernode", "unregister", str(node_id), CONNECTION)

    def submit(self, app_dir: Path, run_config: str) -> int:
        answer = self.call_json("run", str(app_dir), CONNECTION, "--run-config", run_config)
        return int(answer["run-id"])

    def stream_logs(self, run_id: int) -> int:
        """Print the run's log as it comes, until the run ends; the exit code of `flwr log`."""
        command = [flower_command("flwr"), "log", str(run_id), CONNECTION, "--stream"]
        return subprocess.run(command, env=self.env).returncode

    def run_status(self, run_id: int) -> tuple[str, str]:
        """(status, details) of a run, e.g. ('finished:completed', '')."""
        runs = self.call_json("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        if not runs:
            raise DeploymentError(f"the server does not know run {run_id}")
        return str(runs[0]["status"]), str(runs[0].get("status-details", ""))

    def stop(self, run_id: int) -> None:
        self.call_json("stop", str(run_id), CONNECTION)


def _last_json(text: str) -> dict | None:
    """The JSON object flwr prints last (it may print progress lines before it)."""
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None

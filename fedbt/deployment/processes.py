"""Flower processes as `fedbt server` / `fedbt site` run them: environment, logs, one-line failures."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

# Flower's SuperNode message when the server refuses it: an unknown key, or a node still online.
ACTIVATION_REFUSED = "Failed to activate SuperNode"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_TAIL_LINES = 80
# What a Flower failure says, and what it means for whoever started the process.
FAILURE_HINTS = (
    (ACTIVATION_REFUSED, "this site's public key is not registered with the server (or it is still connected)"),
    ("CERTIFICATE_VERIFY_FAILED", "the server's certificate is not signed by the given CA (wrong --ca?)"),
    ("Connection refused", "the server is unreachable (not started, wrong address or port, firewall?)"),
    ("Giving up reconnection", "the server is unreachable"),
    ("Name or service not known", "the server's host name does not resolve"),
    ("Unable to parse the private key", "the site key file is not an OpenSSH EC private key"),
    ("address already in use", "the port is already in use"),
    # What a connected SuperNode does when the server answers its heartbeat 401: it stops itself, saying no more.
    ("SuperNode terminated gracefully", "the server no longer accepts this site's key (was the site removed?)"),
)


class DeploymentError(RuntimeError):
    """A deployment step failed for a reason the user can act on; its message is one line."""


def flower_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every Flower process: its own FLWR_HOME, no telemetry, no `uv sync` at run time."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    env["PATH"] = flower_env_path()
    env.update(extra or {})
    return env


def flower_command(name: str) -> str:
    found = shutil.which(name, path=flower_env_path())
    if not found:
        raise DeploymentError(f"{name} not found: install fedbt's dependencies (pip install -e .)")
    return found


def flower_env_path() -> str:
    # Flower's console scripts live beside this interpreter; a venv need not be on PATH.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def open_private_log(path: Path) -> TextIO:
    """`path` opened for appending; created readable by its owner alone (0600): a site's log holds the
    detail of its failures, local paths included, and a server's the callers and runs."""
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a", encoding="utf-8")


class ManagedProcess:
    """A child process, its output echoed with a prefix and its last lines kept.

    `own_group=True` (tests, the benchmark): the child leads a new process group that stop()
    ends as a whole. `own_group=False` (Flower processes under `fedbt server`/`site`): the
    child stays in our group, so killing that group, even with SIGKILL, ends the whole site.
    """

    def __init__(
        self, name: str, command: list[str], env: dict[str, str], log_file: Path | None = None, own_group: bool = True
    ):
        self.name = name
        self.own_group = own_group
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self._log = open_private_log(log_file) if log_file else None
        self.process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=own_group,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for raw in self.process.stdout:
            line = ANSI.sub("", raw.rstrip("\n"))
            self.tail.append(line)
            if self._log:
                stamp = time.strftime("%H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
                self._log.write(f"{stamp} {line}\n")
                self._log.flush()
            print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def saw(self, text: str) -> bool:
        return any(text in line for line in list(self.tail))

    def wait_for(self, text: str, timeout: float) -> None:
        """Until `text` appears in the output; a DeploymentError if the process ends or time runs out."""
        deadline = time.monotonic() + timeout
        while not self.saw(text):
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                raise DeploymentError(self.failure())
            if time.monotonic() > deadline:
                raise DeploymentError(f"{self.name} did not get ready within {timeout:.0f} s")
            time.sleep(0.1)

    def failure(self) -> str:
        """One line: why the process ended, from Flower's exit message and known causes."""
        lines = [line.strip() for line in self.tail if line.strip()]
        return describe_failure(self.name, lines, self.process.returncode)

    def stop(self, grace: float = 5.0) -> None:
        if self.process.poll() is None:
            stop_process(self.process, grace, self.own_group)
            self.process.wait(timeout=grace + 5)
        self._reader.join(timeout=2)
        if self._log:
            self._log.close()


def stop_all(processes: Iterable[ManagedProcess], grace: float = 5.0) -> None:
    """Stop them side by side: each shutdown takes a few seconds of its own, and none waits for another's."""
    processes = list(processes)
    if processes:
        with ThreadPoolExecutor(len(processes)) as pool:
            list(pool.map(lambda process: process.stop(grace), processes))  # re-raises a failed stop


def stop_process(process: subprocess.Popen, grace: float, group: bool) -> None:
    """SIGTERM the process (group), SIGKILL what is left after `grace` seconds."""
    send = os.killpg if group else os.kill
    try:
        send(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        # Reaped, the child no longer answers signal 0: unreaped, it would for the whole grace.
        process.poll()
        try:
            send(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        send(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def describe_failure(name: str, lines: list[str], returncode: int | None) -> str:
    hinted = [(line, meaning) for marker, meaning in FAILURE_HINTS for line in lines if marker in line]
    # Flower's exit message, else the line that gave the hint, else the last line.
    reason = _flower_exit_reason(lines) or (hinted[0][0] if hinted else lines[-1] if lines else "no output")
    detail = f"{hinted[0][1]} ({reason})" if hinted else reason
    return f"{name} stopped (exit code {returncode}): {detail}"


def _flower_exit_reason(lines: list[str]) -> str | None:
    """The lines Flower prints after 'Exit Code: N', up to its help link, joined."""
    starts = [i for i, line in enumerate(lines) if "Exit Code:" in line]
    if not starts:
        return None
    reason = []
    for line in lines[starts[-1] + 1 :]:
        if line.startswith("For more information") or "FastAPI lifespan" in line or line.startswith("INFO:"):
            break
        reason.append(line)
    return " ".join(reason) or None


def wait_forever(processes: list[ManagedProcess]) -> ManagedProcess:
    """Block until one of the processes ends; return it."""
    while True:
        for managed in processes:
            if managed.process.poll() is not None:
                return managed
        time.sleep(0.5)


def install_stop_handlers() -> None:
    """SIGTERM ends a server or site like Ctrl-C does, so its `finally` stops the Flower processes."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)

"""Faster Flower processes: a warm ClientApp executor, a SuperNode that polls sooner, a
SuperLink that keeps model weights in memory.

With Flower's defaults every message a site receives costs a fresh `flwr-clientapp`
process that imports torch and the project again (about 5 s on a 2-core machine), the
SuperNode checks for messages every 3 s and for its ClientApp's reply every 0.5 s.
`fedbt site` instead starts the SuperNode with `--isolation process` and runs:

- `python -m fedbt.federated.flower_internals executor ...`: Flower's own SuperExec loop, whose
  executor forks each ClientApp task from this process, where torch and the ClientApp are
  already imported. Each task still runs in its own process (as Flower isolates it); only
  the imports are shared. The ClientApp that runs is the one installed at the site.
- `python -m fedbt.federated.flower_internals supernode ...`: `flower-supernode` with its idle waits
  capped at `--poll-interval` seconds, its first retry of a model part the server is
  still uploading after that long too (Flower's: 1 s, then doubling), and heartbeats every
  few seconds instead of 30 s (so a site that dies is marked offline, and can rejoin, after
  20 s instead of a minute).
- `python -m fedbt.federated.flower_internals superlink ...`: `flower-superlink` whose run state
  (registered sites, runs, messages) stays in its SQLite `--database`, so a restarted
  server knows its sites, while the arrays of the messages live in memory. Flower would
  write every 43 MB ResNet18 transfer into that SQLite file: it halved a round's overhead
  on loopback (49 s to 24 s). Weights in flight die with the server, as its run does.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from types import ModuleType


class CappedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop: waits at most `cap` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


# The shortest heartbeat interval a SuperLink accepts; a node counts as online for two of them.
HEARTBEAT_SECONDS = 10


def run_supernode(poll_interval: float, flower_args: list[str]) -> None:
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection, start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    # The loop's only sleeps are its idle waits (3 s between pulls, 0.5 s while a reply is computed).
    start_client_internal.time = CappedSleep(poll_interval)
    # A message is pulled as soon as it exists, often before the server has uploaded all of its arrays.
    start_client_internal.pull_objects = functools.partial(
        start_client_internal.pull_objects, initial_backoff=poll_interval
    )
    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # announced to the server
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_SECONDS  # and kept by the sender
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


def run_superlink(flower_args: list[str]) -> None:
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink import main as superlink_main
    from flwr.superlink.cli import flower_superlink

    def state_on_disk_objects_in_memory(database: str, federation_manager):
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    superlink_main.get_objectstore_linkstate_factories = state_on_disk_objects_in_memory
    sys.argv = ["flower-superlink", *flower_args]
    flower_superlink()


class ForkExecutor:
    """A SuperExec executor that forks ClientApp tasks instead of starting `flwr-clientapp`."""

    def __init__(self, run_clientapp):
        self._run_clientapp = run_clientapp
        self._children: set[int] = set()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return supported_task_types, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.superexec.executor.types import LaunchResult

        pid = os.fork()
        if pid == 0:
            os._exit(self._run_task(spec))
        self._children.add(pid)
        return LaunchResult.accepted()

    def _run_task(self, spec) -> int:
        from flwr.supercore.exit import exit_handler

        # The fork copied this loop's exit handlers (close its Runtime API connection, stop its
        # tasks); run by the task's own exit, they would break the loop and its other tasks.
        exit_handler.registered_exit_handlers.clear()
        self._children.clear()
        certificates = None
        if not spec.insecure and spec.root_certificates_path:
            with open(spec.root_certificates_path, "rb") as file:
                certificates = file.read()
        try:
            self._run_clientapp(
                runtime_api_address=spec.runtime_api_address,
                token=spec.token,
                insecure=spec.insecure,
                certificates=certificates,
                parent_pid=spec.parent_pid,
                runtime_dependency_install=False,
            )
        except SystemExit as done:  # run_clientapp always ends in sys.exit
            return done.code if isinstance(done.code, int) else 1
        return 0

    def reconcile(self) -> None:
        """Reap finished tasks (called once per SuperExec loop)."""
        for pid in list(self._children):
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                self._children.discard(pid)

    def close(self) -> None:
        for pid in self._children:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass


def preload() -> ModuleType:
    """Import what every task needs, once, before the first fork."""
    from flwr.supernode.runtime import run_clientapp

    import fedbt.federated.client_app  # noqa: F401  (torch, the data layer, the engine)

    return run_clientapp


def run_executor(runtime_api_address: str, supernode_pid: int) -> None:
    from flwr.supercore.superexec import run_superexec as superexec

    run_clientapp = preload().run_clientapp
    executor = ForkExecutor(run_clientapp)
    # Flower's loop picks its executor by type; hand it this one instead of a subprocess launcher.
    superexec.get_executor = lambda *args, **kwargs: executor
    superexec.run_superexec(
        runtime_api_address=runtime_api_address,
        insecure=True,  # the SuperNode's Runtime API listens on this machine's loopback only
        parent_pid=supernode_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedbt.federated.flower_internals")
    sub = parser.add_subparsers(dest="role", required=True)
    node = sub.add_parser("supernode", help="flower-supernode with shorter idle waits")
    node.add_argument("--poll-interval", type=float, required=True)
    sub.add_parser("superlink", help="flower-superlink with model weights kept in memory")
    executor = sub.add_parser("executor", help="SuperExec forking warm ClientApp tasks")
    executor.add_argument("--runtime-api-address", required=True)
    executor.add_argument("--supernode-pid", type=int, required=True)
    args, rest = parser.parse_known_args(argv)
    if args.role == "supernode":
        run_supernode(args.poll_interval, rest)
    elif args.role == "superlink":
        run_superlink(rest)
    else:
        run_executor(args.runtime_api_address, args.supernode_pid)


if __name__ == "__main__":
    main()

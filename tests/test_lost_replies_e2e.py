"""End to end: a site whose ClientApp tasks lose their connection to their own SuperNode mid-push.

Under load, a task's last request to its SuperNode (its context and final status) can die
half-sent: the SuperNode logs `[/v1/runtime/push-task-output][UnexpectedError:ClientDisconnect]`.
Flower sends that request once, and the task that never finished is later declared crashed. That
costs a site nothing: its state is in its own files, not in the context (fedbt's client_app), and
a task that has replied gets no crash reply (flower_internals.RepliedTasks), which would otherwise
land on the site's next message. Here a proxy between one site's tasks and its SuperNode cuts
every task's push of its output half way, and the run must still complete.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from fedbt.deployment.local import LocalFederation
from fedbt.deployment.nodes import LOOPBACK, SiteSettings, executor_command, free_port, join_server
from fedbt.deployment.processes import ManagedProcess, flower_env
from fedbt.federated.flower_internals import SUPEREXEC_POLL_ENV

pytestmark = pytest.mark.e2e

TINY = ["data.image_size=32", "model.name=cnn", "train.threads=1"]
PUSH_OUTPUT = b"POST /v1/runtime/push-task-output "
TOKEN_HEADER = b"flwr-task-token:"
HEADERS_END = b"\r\n\r\n"


class CuttingProxy:
    """Forwards TCP from tasks to a SuperNode's Runtime API, and cuts the connection the first time
    each task (told apart by its token) pushes its output: after the request's headers and the
    first part of its body, as a client that timed out would."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server((LOOPBACK, 0))
        self.port = self.listener.getsockname()[1]
        self.pushes: Counter[bytes] = Counter()  # attempts per task token
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            try:
                server = socket.create_connection((LOOPBACK, self.upstream_port))
            except OSError:  # the SuperNode has stopped
                client.close()
                continue
            threading.Thread(target=self._pump_requests, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def _first_push_of_its_task(self, request_start: bytes) -> bool:
        header = request_start.split(TOKEN_HEADER, 1)[1].split(b"\r\n", 1)[0].strip()
        with self.lock:
            self.pushes[header] += 1
            return self.pushes[header] == 1

    def _pump_requests(self, client: socket.socket, server: socket.socket) -> None:
        buffered = b""
        try:
            while chunk := client.recv(65536):
                buffered += chunk
                if PUSH_OUTPUT in buffered and HEADERS_END not in buffered.split(PUSH_OUTPUT, 1)[1]:
                    continue  # the request's headers are not all here yet
                cut = PUSH_OUTPUT in buffered and self._first_push_of_its_task(buffered.split(PUSH_OUTPUT, 1)[1])
                server.sendall(buffered)
                buffered = b""
                if cut:
                    return  # the SuperNode has the headers and part of the body: it sees the client go
        except OSError:
            pass
        finally:
            for end in (client, server):
                end.close()

    def close(self) -> None:
        self.listener.close()


def start_site_behind(federation: LocalFederation, name: str, proxy_for) -> tuple[list[ManagedProcess], CuttingProxy]:
    """What `fedbt site` starts (a SuperNode and its executor), with the executor's tasks reaching
    the SuperNode's Runtime API through `proxy_for(port)`."""
    settings = SiteSettings(
        site_file=Path(federation.names[name]), server=federation.address, ca_cert=federation.certs / "ca.pem",
        private_key=federation.certs / "sites" / f"{name}.key", data_root=federation.data_root,
        cache_dir=federation.work / "cache" / name, state_dir=federation.work / f"site-{name}",
        runtime_port=free_port(), connect_timeout=federation.connect_timeout,
    )  # fmt: skip
    settings.state_dir.mkdir(parents=True)
    env = flower_env(settings.state_dir / "flwr-home", {SUPEREXEC_POLL_ENV.get(): "0.2", "OMP_NUM_THREADS": "1"})
    node = join_server(settings, name, env)
    proxy = proxy_for(settings.runtime_port)
    behind = replace(settings, runtime_port=proxy.port)
    executor = ManagedProcess(f"site {name} executor", executor_command(behind, node.process.pid), env,
                              settings.state_dir / "executor.log")  # fmt: skip
    return [node, executor], proxy


def test_a_site_whose_tasks_lose_their_output_push_still_completes_every_round(tmp_path, demo_root, site_files):
    federation = LocalFederation(tmp_path, demo_root, site_files[:1], connect_timeout=30)
    processes, proxy = [], None
    try:
        federation.start_server()
        processes, proxy = start_site_behind(federation, "figshare", CuttingProxy)
        outcome = federation.run(tmp_path / "results", [*TINY, "federated.rounds=2", "federated.min_clients=1",
                                                        "federated.round_timeout=120"])  # fmt: skip
    finally:
        for process in processes:
            process.stop()
        if proxy:
            proxy.close()
        federation.close()
    assert outcome.status == "finished:completed", outcome.details
    assert [entry["round"] for entry in outcome.metrics["history"]] == [1, 2]
    # Every task's push was cut, and none was sent again (Flower sends it once).
    assert len(proxy.pushes) >= 3 and set(proxy.pushes.values()) == {1}, proxy.pushes

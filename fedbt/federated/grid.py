"""A Grid that polls for replies faster than Flower's and never waits for sites forever.

Flower's deployment Grid sleeps 3 s between checks for replies (on average 1.5 s lost per
message, twice a round), and its strategies wait for the minimum number of nodes without
any limit. This wrapper delegates everything else to the Grid Flower hands the ServerApp.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class SitesMissingError(RuntimeError):
    """Fewer sites than the minimum were connected for longer than the allowed wait."""


class PatientGrid(Grid):
    def __init__(self, inner: Grid, poll_interval: float, min_nodes: int, wait_timeout: float):
        self._inner = inner
        self.poll_interval = poll_interval
        self.min_nodes = min_nodes
        self.wait_timeout = wait_timeout
        self._short_since: float | None = None  # when the node count first fell below the minimum

    def set_run(self, run) -> None:
        self._inner.set_run(run)

    @property
    def run(self):
        return self._inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._inner.create_message(*args, **kwargs)

    def get_nodes(self):
        return self._inner.get_nodes()

    def get_node_ids(self) -> Iterable[int]:
        """Connected nodes; raises once fewer than the minimum have been connected for too long.

        Flower's strategies call this in a loop until enough nodes are online: the limit
        turns that endless wait into a clear failure of the run.
        """
        nodes = list(self._inner.get_node_ids())
        if len(nodes) >= self.min_nodes:
            self._short_since = None
            return nodes
        now = time.monotonic()
        self._short_since = self._short_since or now
        if now - self._short_since > self.wait_timeout:
            raise SitesMissingError(
                f"only {len(nodes)} of the required {self.min_nodes} sites connected "
                f"for {self.wait_timeout:.0f} s; stopping the run"
            )
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then collect replies until all arrived or `timeout` seconds passed."""
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            received = list(self.pull_messages(pending))
            replies.extend(received)
            pending -= {m.metadata.reply_to_message_id for m in received}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_interval)
        return replies

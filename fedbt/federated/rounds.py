"""The steps of a federated round that talk to the sites: wait for them, choose, send, collect, check.

Written against Flower's public Grid API (get_node_ids, push_messages, pull_messages) so that
the round never depends on the order in which a Flower strategy would call its hooks. Replies
are polled every `poll` seconds (Flower's deployment Grid waits 3 s between checks) and never
waited for beyond the round's timeout.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class SitesMissingError(RuntimeError):
    """Fewer sites than the experiment's minimum connected or answered in time; the run stops."""


def wait_for_sites(grid: Grid, minimum: int, timeout: float, poll: float) -> list[int]:
    """The connected sites' node ids once at least `minimum` are connected; SitesMissingError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() >= deadline:
            raise SitesMissingError(
                f"only {len(nodes)} of the required {minimum} sites connected for {timeout:g} s; stopping the run"
            )
        time.sleep(poll)
    return nodes


def choose_sites(nodes: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """A random `fraction` of the connected sites (at least `minimum`), in node order."""
    count = min(len(nodes), max(minimum, round(fraction * len(nodes))))
    return sorted(rng.sample(nodes, count))


def send_and_collect(grid: Grid, messages: Iterable[Message], timeout: float, poll: float) -> list[Message]:
    """Push the messages, then collect replies until all arrived or `timeout` seconds passed."""
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        received = list(grid.pull_messages(pending))
        replies.extend(received)
        pending -= {m.metadata.reply_to_message_id for m in received}
        if pending and time.monotonic() >= deadline:
            break
        if pending and not received:
            time.sleep(poll)
    return replies


def answered(replies: list[Message]) -> list[Message]:
    """The replies that carry content (a site whose ClientApp failed replies with an error)."""
    return [m for m in replies if not m.has_error()]


def site_name(reply: Message) -> str:
    return str(reply.content["site"]["name"])


def in_site_order(replies: list[Message], order: list[str]) -> list[Message]:
    """Replies sorted by the sites' place in `order` (unknown sites last, by name).

    Aggregation adds the sites' models in this order: a fixed order makes a run reproducible
    whichever site answers first.
    """
    rank = {name: i for i, name in enumerate(order)}
    return sorted(replies, key=lambda m: (rank.get(site_name(m), len(rank)), site_name(m)))

"""How the server reaches the sites: a small Transport, and the waiting and collecting over it.

A Transport lists the connected sites, sends requests and hands back the replies that have
arrived. The round never waits for a reply beyond its timeout and polls every `poll` seconds
(Flower's deployment Grid waits 3 s between checks). Time comes from a Clock, so tests play
late replies and timeouts on a clock of their own, without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedbt.fl.protocol import REFUSED_CODE, RUN_REFUSED, Reply, Request


class SitesMissingError(RuntimeError):
    """Fewer sites than the experiment's minimum connected or answered in time; the run stops."""


class RunRefusedError(RuntimeError):
    """Sites refused the run (their policy or their code guard); they would refuse every round."""


class Clock(Protocol):
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...


class WallClock:
    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class Transport(Protocol):
    def node_ids(self) -> list[int]:
        """The sites connected now."""

    def send(self, requests: list[Request]) -> list[str]:
        """Send the requests; one id for each, in order."""

    def receive(self, pending: set[str]) -> list[tuple[str, Reply]]:
        """The replies that arrived for these ids since the last call, each with the id it answers."""


def wait_for_sites(transport: Transport, minimum: int, timeout: float, poll: float, clock: Clock) -> list[int]:
    """The connected sites' node ids once at least `minimum` are connected; SitesMissingError after `timeout` s."""
    deadline = clock.now() + timeout
    while len(nodes := sorted(transport.node_ids())) < minimum:
        if clock.now() >= deadline:
            raise SitesMissingError(
                f"only {len(nodes)} of the required {minimum} sites connected for {timeout:g} s; stopping the run"
            )
        clock.sleep(poll)
    return nodes


def send_and_collect(
    transport: Transport, requests: list[Request], timeout: float, poll: float, clock: Clock
) -> list[Reply]:
    """Send the requests, then collect replies until all arrived or `timeout` seconds passed."""
    pending = set(transport.send(requests))
    deadline = clock.now() + timeout
    replies: list[Reply] = []
    while pending:
        received = transport.receive(pending)
        replies.extend(reply for _, reply in received)
        pending -= {answered_id for answered_id, _ in received}
        if pending and clock.now() >= deadline:
            break
        if pending and not received:
            clock.sleep(poll)
    return replies


def refusals(replies: list[Reply]) -> list[Reply]:
    """The replies in which a site refused the run (its policy, or its guard refused the app)."""
    return [r for r in replies if r.error_code == REFUSED_CODE or (r.failed and RUN_REFUSED in r.error_reason)]


def answered(replies: list[Reply], asked: int) -> list[Reply]:
    """The replies that carry content (a site whose work failed replies with an error).

    RunRefusedError when every site asked refused, or a site's guard refused the run's app: a
    run nobody will train is stopped now, with the reason, not after the round timeout.
    """
    refused = refusals(replies)
    if any(RUN_REFUSED in r.error_reason for r in refused) or (asked and len(refused) == asked):
        nodes = ", ".join(str(r.node) for r in refused)
        raise RunRefusedError(
            f"refused by {len(refused)} of {asked} sites (nodes {nodes}; their logs say why): "
            f"{refused[0].error_reason}; stopping the run"
        )
    return [r for r in replies if not r.failed]


@dataclass
class FakeClock:
    """A clock that moves only when slept on: a test's timeouts pass without waiting."""

    time: float = 0.0

    def now(self) -> float:
        return self.time

    def sleep(self, seconds: float) -> None:
        self.time += seconds


Site = Callable[[Request], Reply]


@dataclass
class InMemoryTransport:
    """Sites as functions in this process: a whole federation plays in milliseconds.

    `delays` holds a node's reply back for that many seconds of `clock` (a late site); a node
    in `offline` is not connected. A poisoned or failing site is a site function that says so.
    """

    sites: dict[int, Site]
    clock: Clock = field(default_factory=FakeClock)
    delays: dict[int, float] = field(default_factory=dict)
    offline: set[int] = field(default_factory=set)
    sent: list[Request] = field(default_factory=list)
    _waiting: dict[str, tuple[float, Reply]] = field(default_factory=dict)

    def node_ids(self) -> list[int]:
        return [node for node in self.sites if node not in self.offline]

    def send(self, requests: list[Request]) -> list[str]:
        ids = []
        for request in requests:
            message_id = f"m{len(self.sent)}"
            self.sent.append(request)
            if request.node in self.sites and request.node not in self.offline:
                ready = self.clock.now() + self.delays.get(request.node, 0.0)
                self._waiting[message_id] = (ready, self.sites[request.node](request))
            ids.append(message_id)
        return ids

    def receive(self, pending: set[str]) -> list[tuple[str, Reply]]:
        now = self.clock.now()
        arrived = [(mid, reply) for mid, (ready, reply) in self._waiting.items() if mid in pending and ready <= now]
        for mid, _ in arrived:
            del self._waiting[mid]
        return arrived

"""The steps of a federated round that talk to the sites: wait for them, choose, send, collect, check.

The server trusts no reply without checking it: a reply is aggregated only if it comes from the
node its site name is bound to, claims a plausible number of training images, and carries weights
of the global model's keys, shapes and kinds, all finite.

Written against Flower's public Grid API (get_node_ids, push_messages, pull_messages) so that
the round never depends on the order in which a Flower strategy would call its hooks. Replies
are polled every `poll` seconds (Flower's deployment Grid waits 3 s between checks) and never
waited for beyond the round's timeout.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedbt.federated.common import CONTROL_DELTA_KEY
from fedbt.federated.flower_internals import RUN_REFUSED


class SitesMissingError(RuntimeError):
    """Fewer sites than the experiment's minimum connected or answered in time; the run stops."""


class RunRefusedError(RuntimeError):
    """A site refused to run the submitted app; it would refuse every round, so the run stops."""


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
    """The replies that carry content (a site whose ClientApp failed replies with an error).

    A RunRefusedError when a site refused the run's app.
    """
    for reply in replies:
        if reply.has_error() and RUN_REFUSED in reply.error.reason:
            node = reply.metadata.src_node_id
            raise RunRefusedError(f"site node {node}: {RUN_REFUSED}: it runs only its own fedbt; stopping the run")
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


@dataclass
class SiteRegistry:
    """Which authenticated node speaks for which site, and how many training images each site has.

    A node's site name is bound at its first accepted reply and never changes; a name already
    bound to another node is refused. Training-set sizes come from the partitions when the
    server holds the catalog (simulation), else from the site's first accepted reply.
    """

    names: dict[int, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def identity_problem(self, node: int, claimed: str) -> str | None:
        bound = self.names.get(node)
        if bound is not None and bound != claimed:
            return f"node {node} is site {bound!r} but claims to be {claimed!r}"
        if bound is None and claimed in self.names.values():
            return f"claims the name of another site ({claimed!r})"
        return None

    def accept(self, node: int, name: str, examples: int) -> None:
        self.names[node] = name
        self.sizes.setdefault(name, examples)


def claimed_site(reply: Message) -> tuple[int, str]:
    return reply.metadata.src_node_id, str(reply.content["site"]["name"])


def train_reply_problem(reply: Message, global_state: dict[str, torch.Tensor], sites: SiteRegistry) -> str | None:
    """Why a site's training reply cannot be aggregated (None: it can)."""
    try:
        node, name = claimed_site(reply)
        examples = reply.content["metrics"]["num-examples"]
        state = reply.content["arrays"].to_torch_state_dict()
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed reply ({type(err).__name__}: {err})"
    return (
        sites.identity_problem(node, name)
        or examples_problem(examples, sites.sizes.get(name))
        or state_problem(state, global_state)
    )


def examples_problem(examples: object, known: int | None) -> str | None:
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        return f"num-examples {examples!r} is not a positive whole number"
    if known is not None and examples > known:
        return f"num-examples {examples} is more than the site's {known} training images"
    return None


def control_delta_problem(reply: Message, control: dict[str, torch.Tensor] | None) -> str | None:
    """SCAFFOLD: why a reply's change of its control variate cannot be used (None: it can, or no SCAFFOLD)."""
    if control is None:
        return None
    try:
        delta = reply.content[CONTROL_DELTA_KEY].to_torch_state_dict()
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed control variate ({type(err).__name__}: {err})"
    return state_problem(delta, control, "the control variate")


def state_problem(
    state: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor], what: str = "the global model"
) -> str | None:
    """Same keys, shapes and kinds of number as `what` (the global model), and every value finite."""
    missing, unexpected = sorted(set(global_state) - set(state)), sorted(set(state) - set(global_state))
    if missing or unexpected:
        return f"weights differ from {what}'s (missing {missing[:3]}, unexpected {unexpected[:3]})"
    for key, expected in global_state.items():
        value = state[key]
        if value.shape != expected.shape:
            return f"{key} has shape {tuple(value.shape)}, {what}'s is {tuple(expected.shape)}"
        if value.is_floating_point() != expected.is_floating_point():
            return f"{key} is {value.dtype}, {what}'s is {expected.dtype}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"{key} holds NaN or infinite values"
    return None


def update_norms(replies: list[Message], global_state: dict[str, torch.Tensor]) -> list[float]:
    """The L2 distance of each reply's floating weights from the global model."""
    norms = []
    for reply in replies:
        state = reply.content["arrays"].to_torch_state_dict()
        squares = sum(
            float(((state[k].float() - v.float()) ** 2).sum()) for k, v in global_state.items() if v.is_floating_point()
        )
        norms.append(squares**0.5)
    return norms


def outsized_updates(norms: list[float], ratio: float) -> list[int]:
    """Indices of updates larger than `ratio` times the median of the other updates (needs two others)."""
    outsized = []
    for i, norm in enumerate(norms):
        others = norms[:i] + norms[i + 1 :]
        if len(others) >= 2 and norm > ratio * statistics.median(others):
            outsized.append(i)
    return outsized

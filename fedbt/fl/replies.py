"""The server trusts no reply without checking it.

A training reply is aggregated only if it comes from the node its site name is bound to, claims
a plausible number of training images, and carries weights of the global model's keys, shapes
and kinds, all finite (and, under SCAFFOLD, a control variate change of the same kind). Replies
are aggregated in a fixed site order, so a run is reproducible whichever site answers first.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from fedbt.fl.protocol import CONTROL_DELTA, EXAMPLES_KEY, MODEL, SITE_NAME_KEY, Reply, TensorGroup


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

    def author(self, reply: Reply) -> str:
        """Who sent a reply, for the log: the site its node is bound to, else the node and the name it claims."""
        if reply.node in self.names:
            return self.names[reply.node]
        claimed = reply.site.get(SITE_NAME_KEY)
        return f"node {reply.node} ({claimed!r})" if claimed is not None else f"node {reply.node}"


def site_name(reply: Reply) -> str:
    name = reply.site.get(SITE_NAME_KEY)
    if not isinstance(name, str):
        raise ValueError(f"the reply names no site ({name!r})")
    return name


def in_site_order(replies: list[Reply], order: list[str]) -> list[Reply]:
    """Replies sorted by the sites' place in `order` (unknown sites last, by name)."""
    rank = {name: i for i, name in enumerate(order)}
    return sorted(replies, key=lambda r: (rank.get(site_name(r), len(rank)), site_name(r)))


def train_reply_problem(reply: Reply, global_state: TensorGroup, sites: SiteRegistry) -> str | None:
    """Why a site's training reply cannot be aggregated (None: it can)."""
    try:
        name = site_name(reply)
        examples = reply.metrics[EXAMPLES_KEY]
        state = reply.tensors[MODEL]
    except (KeyError, ValueError) as err:
        return f"malformed reply ({type(err).__name__}: {err})"
    return (
        sites.identity_problem(reply.node, name)
        or examples_problem(examples, sites.sizes.get(name))
        or state_problem(state, global_state)
    )


def examples_problem(examples: object, known: int | None) -> str | None:
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        return f"num-examples {examples!r} is not a positive whole number"
    if known is not None and examples > known:
        return f"num-examples {examples} is more than the site's {known} training images"
    return None


def control_delta_problem(reply: Reply, control: TensorGroup | None) -> str | None:
    """SCAFFOLD: why a reply's change of its control variate cannot be used (None: it can, or no SCAFFOLD)."""
    if control is None:
        return None
    if CONTROL_DELTA not in reply.tensors:
        return "malformed control variate (missing)"
    return state_problem(reply.tensors[CONTROL_DELTA], control, "the control variate")


def state_problem(state: TensorGroup, global_state: TensorGroup, what: str = "the global model") -> str | None:
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


def update_norm(state: TensorGroup, global_state: TensorGroup) -> float:
    """The L2 distance of a model's floating weights from the global model."""
    squares = sum(
        float((state[k].double() - v.double()).square().sum()) for k, v in global_state.items() if v.is_floating_point()
    )
    return squares**0.5


def outsized_updates(norms: list[float], ratio: float) -> list[int]:
    """Indices of updates larger than `ratio` times the median of the other updates (needs two others)."""
    outsized = []
    for i, norm in enumerate(norms):
        others = norms[:i] + norms[i + 1 :]
        if len(others) >= 2 and norm > ratio * statistics.median(others):
            outsized.append(i)
    return outsized


def well_formed_personalisation(personalised: object) -> bool:
    """Whether a site's personalisation JSON holds what the report reads: the kept candidate's name, each
    candidate's validation scores and the time it took."""
    if not isinstance(personalised, dict):
        return False
    candidates = personalised.get("candidates")
    return (
        isinstance(personalised.get("chosen"), str)
        and isinstance(personalised.get("wall_seconds"), int | float)
        and isinstance(candidates, dict)
        and all(isinstance(c, dict) and isinstance(c.get("val"), dict) for c in candidates.values())
    )

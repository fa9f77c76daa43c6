"""The server trusts no reply without checking it: each kind of bad reply gives its reason."""

import math

import pytest
import torch
from site_replies import train_reply as reply

from fedbt.fl.replies import SiteRegistry, outsized_updates, train_reply_problem, update_norm

GLOBAL = {"w": torch.zeros(2, 3), "b": torch.zeros(2), "count": torch.tensor(7)}


def good(**changes) -> dict:
    state = {"w": torch.ones(2, 3), "b": torch.ones(2), "count": torch.tensor(8)}
    return {**state, **changes}


@pytest.fixture()
def sites() -> SiteRegistry:
    registry = SiteRegistry(sizes={"figshare": 100, "sartaj": 80})
    registry.accept(node=1, name="figshare", examples=100)
    return registry


def test_an_honest_reply_passes(sites):
    assert train_reply_problem(reply("figshare", good(), 100, node=1), GLOBAL, sites) is None
    assert train_reply_problem(reply("sartaj", good(), 80, node=2), GLOBAL, sites) is None


@pytest.mark.parametrize(
    ("state", "examples", "reason"),
    [
        (good(w=torch.full((2, 3), math.nan)), 80, "w holds NaN or infinite values"),
        (good(b=torch.tensor([1.0, math.inf])), 80, "b holds NaN or infinite values"),
        (good(), 10**9, "num-examples 1000000000 is more than the site's 80 training images"),
        (good(), -5, "num-examples -5 is not a positive whole number"),
        (good(), 0, "num-examples 0 is not a positive whole number"),
        (good(), 2.5, "num-examples 2.5 is not a positive whole number"),
        (good(w=torch.ones(3, 2)), 80, "w has shape (3, 2), the global model's is (2, 3)"),
        (good(count=torch.tensor(8.0)), 80, "count is torch.float32, the global model's is torch.int64"),
        ({"w": torch.ones(2, 3), "count": torch.tensor(8)}, 80, "missing ['b'], unexpected []"),
        ({**good(), "extra": torch.ones(1)}, 80, "missing [], unexpected ['extra']"),
    ],
)
def test_a_bad_reply_is_refused_with_its_reason(sites, state, examples, reason):
    problem = train_reply_problem(reply("sartaj", state, examples, node=2), GLOBAL, sites)
    assert problem is not None and reason in problem


def test_a_site_cannot_speak_for_another(sites):
    # Node 2 is not figshare's node: it may not claim that name; node 1 may not change its own.
    assert "claims the name of another site ('figshare')" in train_reply_problem(
        reply("figshare", good(), 10, node=2), GLOBAL, sites
    )
    assert "node 1 is site 'figshare' but claims to be 'sartaj'" in train_reply_problem(
        reply("sartaj", good(), 10, node=1), GLOBAL, sites
    )


def test_without_known_sizes_the_first_accepted_count_is_the_sites_size():
    sites = SiteRegistry()
    assert train_reply_problem(reply("br35h", good(), 50, node=3), GLOBAL, sites) is None
    sites.accept(node=3, name="br35h", examples=50)
    assert "more than the site's 50" in train_reply_problem(reply("br35h", good(), 51, node=3), GLOBAL, sites)


def test_an_outsized_update_stands_out_against_the_others():
    base = {"w": torch.zeros(4)}
    updates = [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.2, 0, 0]), torch.tensor([0, 0, 100.0, 0])]
    norms = [update_norm({"w": u}, base) for u in updates]
    assert norms == pytest.approx([1.0, 1.2, 100.0])
    assert outsized_updates(norms, ratio=10) == [2]
    assert outsized_updates(norms[:2], ratio=10) == []  # two sites: no majority to compare with

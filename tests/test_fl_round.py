"""Whole federations played in memory: the round, dropouts, late, poisoned and refused replies,
resumes. No Flower, no process: the sites are functions (fedbt.fl.site.answer) on generated data."""

import functools
from dataclasses import replace

import pytest
import torch

from fedbt.config import ExperimentConfig, FederatedConfig, ModelConfig, TrainConfig
from fedbt.fl import server
from fedbt.fl.protocol import (
    FAILED_CODE,
    FAILED_REASON,
    MODEL,
    NUM_PARTITIONS,
    PARTITION_ID,
    REFUSED_CODE,
    REFUSED_REASON,
    Reply,
    Request,
)
from fedbt.fl.replies import in_site_order
from fedbt.fl.site import SiteContext, answer
from fedbt.fl.strategies import FedAdam
from fedbt.fl.task import LocalState, round_steps
from fedbt.fl.transport import FakeClock, InMemoryTransport, RunRefusedError, SitesMissingError
from fedbt.model.checkpoint import load_checkpoint

SITES = 3


@pytest.fixture()
def cfg(data_config, tmp_path) -> ExperimentConfig:
    """Two rounds of the small CNN on the generated sites at 32 px: a few seconds."""
    return ExperimentConfig(
        output_dir=str(tmp_path / "run"),
        data=data_config,
        model=ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=16, epochs=2),
        federated=FederatedConfig(rounds=2, round_timeout=60, poll_interval=1),
    )


def site(node: int) -> SiteContext:
    return SiteContext({PARTITION_ID: node - 1, NUM_PARTITIONS: SITES}, run_id=1)


def federation(**kwargs) -> InMemoryTransport:
    """Three honest sites, nodes 1 to 3 (`sites` replaces some of them)."""
    honest = {node: functools.partial(answer, context=site(node)) for node in range(1, SITES + 1)}
    return InMemoryTransport({**honest, **kwargs.pop("sites", {})}, **kwargs)


def trained_sites(result: dict) -> list[list[str]]:
    return [sorted(entry["train"]) for entry in result["history"]]


def test_a_whole_federation_plays_in_memory_and_scores_its_final_model(cfg):
    transport = federation()
    result = server.run_federated(transport, cfg, clock=transport.clock)
    assert trained_sites(result) == [["br35h", "figshare", "sartaj"]] * 2
    assert 0 <= result["test"]["pooled"]["accuracy"] <= 1
    assert load_checkpoint(server.federated_dir(cfg) / "final.pt")["progress"]["round"] == 2
    # Two training requests and one final validation request to each site.
    assert [r.kind for r in transport.sent].count("train") == 2 * SITES


def failing_from(round_number: int, node: int):
    """A site that answers with an error from `round_number` on (its ClientApp failed)."""
    honest = functools.partial(answer, context=site(node))

    def reply(request: Request) -> Reply:
        if request.round >= round_number:
            return Reply.error(request.node, FAILED_CODE, FAILED_REASON)
        return honest(request)

    return reply


def test_a_site_that_drops_out_stops_the_run_when_every_site_is_required(cfg):
    transport = federation(sites={2: failing_from(2, 2)})
    with pytest.raises(SitesMissingError, match="round 2: only 2 of the required 3 sites"):
        server.run_federated(transport, cfg, clock=transport.clock)


def test_a_site_that_drops_out_is_left_out_when_two_sites_suffice(cfg):
    cfg = replace(cfg, federated=replace(cfg.federated, min_clients=2))
    transport = federation(sites={2: failing_from(2, 2)})
    result = server.run_federated(transport, cfg, clock=transport.clock)
    assert len(result["history"][1]["train"]) == 2


def test_a_reply_later_than_the_round_timeout_is_not_waited_for(cfg):
    cfg = replace(cfg, federated=replace(cfg.federated, min_clients=2))
    clock = FakeClock()
    transport = federation(clock=clock, delays={3: 10 * cfg.federated.round_timeout})
    result = server.run_federated(transport, cfg, clock=clock)
    # Node 3 (Br35H) answered each round, but only after the round had gone on without it.
    assert all("br35h" not in entry["train"] for entry in result["history"])
    assert clock.now() >= 2 * cfg.federated.round_timeout


def poisoned(node: int):
    """A site whose trained model holds NaN."""
    honest = functools.partial(answer, context=site(node))

    def reply(request: Request) -> Reply:
        answer_ = honest(request)
        if request.kind == "train":
            answer_.tensors[MODEL] = {k: v * float("nan") if v.is_floating_point() else v
                                      for k, v in answer_.tensors[MODEL].items()}  # fmt: skip
        return answer_

    return reply


def test_a_nan_reply_is_dropped_with_its_reason(cfg):
    cfg = replace(cfg, federated=replace(cfg.federated, min_clients=2))
    transport = federation(sites={1: poisoned(1)})
    result = server.run_federated(transport, cfg, clock=transport.clock)
    dropped = result["history"][0]["dropped"]
    assert list(dropped) == ["node 1 ('figshare')"] and "NaN" in dropped["node 1 ('figshare')"]
    assert all(
        torch.isfinite(v).all()
        for v in load_checkpoint(server.federated_dir(cfg) / "final.pt")["model_state"].values()
        if v.is_floating_point()
    )


def test_a_run_refused_by_every_site_stops_at_once_and_says_so(cfg):
    refusing = {node: lambda request: Reply.error(request.node, REFUSED_CODE, REFUSED_REASON) for node in (1, 2, 3)}
    clock = FakeClock()
    transport = federation(sites=refusing, clock=clock)
    with pytest.raises(RunRefusedError, match="refused by 3 of 3 sites"):
        server.run_federated(transport, cfg, clock=clock)
    assert clock.now() == 0  # no round timeout was waited for


def test_a_resumed_run_continues_the_server_optimisers_state(cfg):
    adam = replace(cfg, federated=replace(cfg.federated, strategy="fedadam"))
    transport = federation()
    server.run_federated(transport, adam, clock=transport.clock)
    saved = load_checkpoint(server.federated_dir(cfg) / "last.pt")
    moments = saved["progress"]["server_optimizer"]
    assert set(moments) == {"m", "v"}
    longer = replace(adam, federated=replace(adam.federated, rounds=3, resume=True))
    run = server.FederatedRun(longer, server_has_data=True)
    assert run.last_round == 2 and isinstance(run.strategy, FedAdam)
    assert all(torch.equal(run.strategy.m[k], moments["m"][k]) for k in moments["m"])
    assert all(torch.equal(run.global_state[k], v) for k, v in saved["model_state"].items())
    result = server.run_federated(federation(), longer, clock=FakeClock())
    assert [entry["round"] for entry in result["history"]] == [1, 2, 3]


def test_a_non_finite_aggregate_stops_the_run_and_keeps_the_last_checkpoint(cfg, monkeypatch):
    real = server.make_strategy

    def exploding(*args, **kwargs):
        strategy = real(*args, **kwargs)
        honest = strategy.aggregate
        strategy.aggregate = lambda r, g, u: honest(r, g, u) if r == 1 else {k: v * float("inf") for k, v in g.items()}
        return strategy

    monkeypatch.setattr(server, "make_strategy", exploding)
    transport = federation()
    with pytest.raises(server.AggregationError, match="round 2: aggregation gave non-finite weights"):
        server.run_federated(transport, cfg, clock=transport.clock)
    assert load_checkpoint(server.federated_dir(cfg) / "last.pt")["progress"]["round"] == 1


def test_under_fedbn_the_server_scores_nothing_itself_and_takes_the_sites_scores(cfg):
    fedbn = replace(cfg, federated=replace(cfg.federated, fedbn=True, rounds=1))
    transport = federation()
    result = server.run_federated(transport, fedbn, clock=transport.clock)
    # The server holds the data, but its averaged BatchNorm layers are used by no site: the test
    # scores are the sites' own (their aggregates), and there is no pooled validation of its own.
    assert result["initial"] == {} and result["history"][0]["server"] == {}
    assert set(result["test"]["sites"]) == {"figshare", "sartaj", "br35h"}


def test_replies_are_aggregated_in_site_order_whatever_arrives_first():
    replies = [Reply(1, site={"name": name}) for name in ("br35h", "zeta", "figshare", "sartaj")]
    ordered = in_site_order(replies, ["figshare", "sartaj", "br35h"])
    assert [r.site["name"] for r in ordered] == ["figshare", "sartaj", "br35h", "zeta"]


def test_fednova_counts_a_sites_steps_from_its_examples_and_the_round_not_from_its_reply():
    cfg = ExperimentConfig(train=TrainConfig(batch_size=32), federated=FederatedConfig(rounds=8, local_epochs=0.25))
    # 100 images: 3 batches of 32 an epoch (the last, short one dropped), shared out over 4 rounds.
    steps = [round_steps(cfg, 100, r) for r in range(1, 9)]
    assert set(steps) == {0, 1} and sum(steps[:4]) == sum(steps[4:]) == 3
    assert round_steps(replace(cfg, federated=FederatedConfig(rounds=2)), 1963, 1) == 1963 // 32


def test_after_a_dropped_scaffold_reply_c_is_the_mean_of_the_c_i_the_sites_hold(cfg):
    scaffold = replace(cfg, federated=replace(cfg.federated, strategy="scaffold", min_clients=2))
    contexts = {node: site(node) for node in range(1, SITES + 1)}

    def nan_model_in_round_2(request: Request) -> Reply:
        reply = answer(request, contexts[2])
        if request.round == 2:
            reply.tensors[MODEL] = {k: v * float("nan") if v.is_floating_point() else v
                                    for k, v in reply.tensors[MODEL].items()}  # fmt: skip
        return reply

    sites = {node: functools.partial(answer, context=contexts[node]) for node in (1, 3)}
    transport = InMemoryTransport({**sites, 2: nan_model_in_round_2})
    run = server.FederatedRun(scaffold, server_has_data=True, clock=transport.clock)
    for server_round in (1, 2):
        server.play_round(transport, run, server_round)
    assert list(run.history[1]["dropped"]) == ["sartaj"]
    # What each site holds as its c_i once it hears which of its replies the server counted.
    held = [
        LocalState(**contexts[node].memory.read("local", {})).settled(run.accepted_rounds.get(node, 0)).control
        for node in contexts
    ]
    assert all(torch.allclose(run.control[k], sum(c[k] for c in held) / SITES, atol=1e-6) for k in run.control)


def test_sites_that_do_not_train_in_a_round_still_score_the_previous_model(cfg):
    sampled = replace(cfg, federated=replace(cfg.federated, fraction_train=1 / 3, min_clients=1, rounds=3))
    transport = federation()
    result = server.run_federated(transport, sampled, clock=transport.clock)
    assert all(len(entry["train"]) == 1 for entry in result["history"])
    # Each round's model is scored by all three sites, whichever one trained.
    assert all(set(entry["sites"]) == {"figshare", "sartaj", "br35h"} for entry in result["history"])


def test_a_model_too_large_to_hold_is_refused_before_the_server_builds_it(cfg):
    huge = replace(cfg, data=replace(cfg.data, image_size=4096))  # the small CNN's classifier grows with it
    with pytest.raises(ValueError, match="would hold 32.0 GiB of weights"):
        server.FederatedRun(huge, server_has_data=False)

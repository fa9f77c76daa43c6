"""Client-level differential privacy: clipping and noise on the trainable parameters only, at the
server and at the sites, its epsilon, and the server leaving out a site whose record-level budget
is spent (the federated core, played in memory)."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from fedbt.cli import main
from fedbt.config import ClientPrivacyConfig, ExperimentConfig, FederatedConfig, load_config
from fedbt.fl.privacy import client_level_epsilon, clipped_at_site
from fedbt.fl.protocol import MODEL, TRAIN, Request
from fedbt.fl.server import FederatedRun, play_round
from fedbt.fl.strategies import SiteUpdate, Strategy, make_strategy
from fedbt.fl.transport import FakeClock, InMemoryTransport, SitesMissingError
from tests.site_replies import train_reply

PARAMETERS = {"conv.weight"}


def model_state(weight: list[float], running_mean: list[float], batches: int) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.tensor(weight),
        "bn.running_mean": torch.tensor(running_mean),
        "bn.num_batches_tracked": torch.tensor(batches),
    }


GLOBAL = model_state([0.0, 0.0], [0.0, 0.0], 10)
SITE_STATES = [model_state([3.0, 4.0], [1.0, 2.0], 14), model_state([-1.0, 2.0], [5.0, 0.0], 12)]


def aggregate(strategy: Strategy, examples: list[int] = (20, 20)) -> dict[str, torch.Tensor]:
    """The strategy's new global model from the two sites' states (SITE_STATES) at `examples` images."""
    return strategy.aggregate(1, GLOBAL, [SiteUpdate(s, n) for s, n in zip(SITE_STATES, examples, strict=True)])


def private(clipping_norm: float, noise_multiplier: float, clipped_at: str = "server") -> Strategy:
    settings = ClientPrivacyConfig(
        enabled=True, clipping_norm=clipping_norm, noise_multiplier=noise_multiplier, clipped_at=clipped_at
    )
    return make_strategy(FederatedConfig(), PARAMETERS, settings)


def fedavg() -> Strategy:
    return make_strategy(FederatedConfig(), PARAMETERS)


def test_without_noise_and_with_a_loose_clip_it_is_fedavg():
    plain = aggregate(fedavg())
    dp = aggregate(private(clipping_norm=1e6, noise_multiplier=0.0))
    assert dp.keys() == plain.keys()
    for key in plain:
        assert torch.allclose(dp[key], plain[key]) and dp[key].dtype == plain[key].dtype, key


def test_each_update_is_clipped_and_the_sites_weigh_equally():
    # Updates of norm 5 and sqrt(5), clipped to 1, averaged with equal weights whatever their images.
    new = aggregate(private(clipping_norm=1.0, noise_multiplier=0.0), examples=[90, 10])
    clipped = [torch.tensor([3.0, 4.0]) / 5, torch.tensor([-1.0, 2.0]) / 5**0.5]
    assert torch.allclose(new["conv.weight"], (clipped[0] + clipped[1]) / 2)


def test_with_clipping_at_the_sites_the_server_still_clips_a_site_that_did_not():
    # The server trusts no site to have clipped: an update of norm 5 sent unclipped is clipped to 1
    # all the same, and an update already within the norm is left as it is.
    at_sites = aggregate(private(1.0, noise_multiplier=0.0, clipped_at="client"))
    at_server = aggregate(private(1.0, noise_multiplier=0.0, clipped_at="server"))
    assert torch.allclose(at_sites["conv.weight"], at_server["conv.weight"])
    within = private(10.0, noise_multiplier=0.0, clipped_at="client")
    assert torch.allclose(aggregate(within)["conv.weight"], torch.tensor([1.0, 3.0]))


def test_a_site_clips_its_parameters_update_and_leaves_its_buffers():
    clipped = clipped_at_site(SITE_STATES[0], GLOBAL, PARAMETERS, clipping_norm=1.0)
    assert torch.allclose(clipped["conv.weight"], torch.tensor([0.6, 0.8]))  # the update (3, 4) scaled to norm 1
    assert torch.equal(clipped["bn.running_mean"], SITE_STATES[0]["bn.running_mean"])
    assert torch.equal(clipped["bn.num_batches_tracked"], torch.tensor(14))


@pytest.mark.parametrize("clipped_at", ["server", "client"])
def test_noise_moves_the_parameters_and_leaves_batchnorm_buffers_and_counters_alone(clipped_at):
    plain = aggregate(fedavg())
    noisy = aggregate(private(1.0, noise_multiplier=1000.0, clipped_at=clipped_at))
    # Noise of standard deviation 1000 x 1 / 2 on each weight: far from the average.
    assert (noisy["conv.weight"] - plain["conv.weight"]).abs().max() > 10
    # Running statistics and counters are averaged as they are: neither clipped (the running
    # means' updates are larger than the clip) nor noised, and the counter stays an integer.
    assert torch.equal(noisy["bn.running_mean"], plain["bn.running_mean"])
    assert torch.equal(noisy["bn.num_batches_tracked"], torch.tensor(13))


def test_the_epsilon_is_opacus_rdp_accountant_over_the_rounds():
    settings = ClientPrivacyConfig(enabled=True, noise_multiplier=1.1, delta=1e-5)
    accountant = RDPAccountant()
    for _ in range(5):
        accountant.step(noise_multiplier=1.1, sample_rate=0.3)
    assert client_level_epsilon(settings, 0.3, 5) == pytest.approx(accountant.get_epsilon(1e-5))
    # Asking fewer of the sites each round spends less.
    assert client_level_epsilon(settings, 0.1, 5) < client_level_epsilon(settings, 0.3, 5)
    assert client_level_epsilon(ClientPrivacyConfig(noise_multiplier=0.0), 0.3, 5) == float("inf")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.enabled=true", "model.norm=group"], "two options, not one run"),
        (["federated.strategy=fedadam"], "needs federated.strategy fedavg or fedprox"),
        (["federated.strategy=krum"], "needs federated.strategy fedavg or fedprox"),
    ],
)
def test_client_level_privacy_refuses_what_it_is_not_calibrated_for(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config([], ["privacy.client_level.enabled=true", *overrides])


def budget_spent_at_node_2(request: Request):
    """A site of three that trains (its model moves by 1) but whose record-level budget is spent at node 2."""
    state = {k: v + 1 if v.is_floating_point() else v for k, v in request.tensors[MODEL].items()}
    answer = train_reply(f"site{request.node}", state, 20, node=request.node)
    if request.node == 2:
        answer.metrics["dp_budget_spent"] = 1
    return answer


def small_run(tmp_path, min_clients: int) -> tuple[FederatedRun, InMemoryTransport]:
    cfg = ExperimentConfig(output_dir=str(tmp_path))
    cfg.model.name = "cnn"
    cfg.tracking.enabled = False
    cfg.federated.num_clients, cfg.federated.min_clients = 3, min_clients
    cfg.federated.rounds, cfg.federated.evaluate_every = 5, 5  # no scoring in rounds 1 and 2
    clock = FakeClock()
    transport = InMemoryTransport(dict.fromkeys([1, 2, 3], budget_spent_at_node_2), clock=clock)
    return FederatedRun(cfg, server_has_data=False, clock=clock), transport


def asked_to_train(transport: InMemoryTransport) -> list[list[int]]:
    rounds = sorted({r.round for r in transport.sent})
    return [[r.node for r in transport.sent if r.kind == TRAIN and r.round == n] for n in rounds]


def test_a_site_whose_budget_is_spent_is_dropped_and_not_asked_again(tmp_path, capsys):
    run, transport = small_run(tmp_path, min_clients=2)
    play_round(transport, run, 1)
    play_round(transport, run, 2)
    assert asked_to_train(transport) == [[1, 2, 3], [1, 3]]
    assert set(run.history[0]["train"]) == {"site1", "site3"}
    assert "privacy budget is spent" in run.history[0]["dropped"]["site2"]
    assert capsys.readouterr().err.count("dropped the reply of site2") == 1


def test_without_enough_sites_left_the_minimum_sites_rule_stops_the_run(tmp_path):
    run, transport = small_run(tmp_path, min_clients=3)
    with pytest.raises(SitesMissingError, match="only 2 of the required 3"):
        play_round(transport, run, 1)


@pytest.mark.e2e
def test_a_two_round_simulation_with_client_level_privacy_logs_its_epsilon(demo_args, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["simulate", *demo_args, "--out", str(out), "--rounds", "2", "--skip-central", "--skip-local",
                 "--set", "privacy.client_level.enabled=true",
                 "--set", "privacy.client_level.noise_multiplier=0.5",
                 "--set", "privacy.client_level.clipped_at=client"])  # fmt: skip
    assert code == 0
    fed = json.loads((out / "federated" / "metrics.json").read_text())
    spent = [entry["client_privacy"]["epsilon"] for entry in fed["history"]]
    assert 0 < spent[0] < spent[1] == fed["client_privacy"]["epsilon"]
    assert fed["client_privacy"]["noise_multiplier"] == 0.5
    assert "client-level DP: noise multiplier 0.5, epsilon" in capsys.readouterr().err


def test_a_strategy_flag_is_checked_against_client_level_privacy_before_any_run(demo_args, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["simulate", *demo_args, "--out", str(out), "--strategy", "krum",
                 "--set", "privacy.client_level.enabled=true"])  # fmt: skip
    assert code == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "fedbt: error: settings: privacy.client_level needs federated.strategy fedavg or fedprox, not krum: "
            "its noise is calibrated to a plain average of the clipped updates"
        )
    )
    assert not out.exists()

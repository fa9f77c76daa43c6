"""Client-level differential privacy: Flower's clipping and noise on the trainable parameters only,
its epsilon, and the server leaving out a site whose record-level budget is spent."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord
from opacus.accountants import RDPAccountant

from fedbt.cli import main
from fedbt.config import ClientPrivacyConfig, ExperimentConfig, FederatedConfig, load_config
from fedbt.federated.client_privacy import client_level_epsilon, clipped_at_site
from fedbt.federated.rounds import SitesMissingError
from fedbt.federated.server_app import FederatedRun, play_round
from fedbt.federated.strategy import aggregate, make_strategy
from tests.flower_messages import reply

PARAMETERS = {"conv.weight"}


def model_state(weight: list[float], running_mean: list[float], batches: int) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.tensor(weight),
        "bn.running_mean": torch.tensor(running_mean),
        "bn.num_batches_tracked": torch.tensor(batches),
    }


GLOBAL = model_state([0.0, 0.0], [0.0, 0.0], 10)
SITE_STATES = [model_state([3.0, 4.0], [1.0, 2.0], 14), model_state([-1.0, 2.0], [5.0, 0.0], 12)]


def site_replies():
    return [reply(name, state, 20) for name, state in zip(("a", "b"), SITE_STATES)]


def private(clipping_norm: float, noise_multiplier: float, clipped_at: str = "server"):
    settings = ClientPrivacyConfig(
        enabled=True, clipping_norm=clipping_norm, noise_multiplier=noise_multiplier, clipped_at=clipped_at
    )
    return make_strategy(FederatedConfig(), settings)


def test_without_noise_and_with_a_loose_clip_it_is_fedavg():
    plain = aggregate(make_strategy(FederatedConfig()), 1, GLOBAL, site_replies(), PARAMETERS)
    dp = aggregate(private(clipping_norm=1e6, noise_multiplier=0.0), 1, GLOBAL, site_replies(), PARAMETERS)
    assert dp.keys() == plain.keys()
    for key in plain:
        assert torch.allclose(dp[key], plain[key]) and dp[key].dtype == plain[key].dtype, key


def test_each_update_is_clipped_and_the_sites_weigh_equally():
    # Updates of norm 5 and sqrt(5), clipped to 1, averaged with equal weights whatever their images.
    replies = [reply("a", SITE_STATES[0], 90), reply("b", SITE_STATES[1], 10)]
    new = aggregate(private(clipping_norm=1.0, noise_multiplier=0.0), 1, GLOBAL, replies, PARAMETERS)
    clipped = [torch.tensor([3.0, 4.0]) / 5, torch.tensor([-1.0, 2.0]) / 5**0.5]
    assert torch.allclose(new["conv.weight"], (clipped[0] + clipped[1]) / 2)


def test_with_clipping_at_the_sites_the_server_does_not_clip_again():
    new = aggregate(private(1.0, noise_multiplier=0.0, clipped_at="client"), 1, GLOBAL, site_replies(), PARAMETERS)
    assert torch.allclose(new["conv.weight"], torch.tensor([1.0, 3.0]))


def test_a_site_clips_its_parameters_update_with_flowers_mod_and_leaves_its_buffers():
    sent = reply("server", GLOBAL, 0)
    sent.content["config"] = ConfigRecord({"clipping_norm": 1.0})
    clipped = clipped_at_site(sent, None, SITE_STATES[0], PARAMETERS)
    assert torch.allclose(clipped["conv.weight"], torch.tensor([0.6, 0.8]))  # the update (3, 4) scaled to norm 1
    assert torch.equal(clipped["bn.running_mean"], SITE_STATES[0]["bn.running_mean"])
    assert torch.equal(clipped["bn.num_batches_tracked"], torch.tensor(14))


@pytest.mark.parametrize("clipped_at", ["server", "client"])
def test_noise_moves_the_parameters_and_leaves_batchnorm_buffers_and_counters_alone(clipped_at):
    plain = aggregate(make_strategy(FederatedConfig()), 1, GLOBAL, site_replies(), PARAMETERS)
    strategy = private(1.0, noise_multiplier=1000.0, clipped_at=clipped_at)
    noisy = aggregate(strategy, 1, GLOBAL, site_replies(), PARAMETERS)
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


class ScriptedGrid:
    """Flower's Grid for the server's round: three sites, node 2's record-level budget spent."""

    def __init__(self, global_state: dict[str, torch.Tensor]):
        self.global_state = global_state
        self.asked_to_train: list[list[int]] = []
        self.pushed: dict[str, int] = {}

    def get_node_ids(self):
        return [1, 2, 3]

    def push_messages(self, messages):
        messages = list(messages)
        self.asked_to_train.append([m.metadata.dst_node_id for m in messages if m.metadata.message_type == "train"])
        ids = [f"m{len(self.pushed) + i}" for i in range(len(messages))]
        self.pushed.update(zip(ids, (m.metadata.dst_node_id for m in messages)))
        return ids

    def pull_messages(self, ids):
        replies = []
        for message_id in ids:
            node = self.pushed[message_id]
            state = {k: v + 1 if v.is_floating_point() else v for k, v in self.global_state.items()}
            answer = reply(f"site{node}", state, 20, node=node, reply_to=message_id)
            if node == 2:
                answer.content["metrics"]["dp_budget_spent"] = 1
            replies.append(answer)
        return replies


def small_run(tmp_path, monkeypatch, min_clients: int) -> FederatedRun:
    cfg = ExperimentConfig(output_dir=str(tmp_path))
    cfg.model.name = "cnn"
    cfg.tracking.enabled = False
    cfg.federated.num_clients, cfg.federated.min_clients = 3, min_clients
    cfg.federated.rounds, cfg.federated.evaluate_every = 5, 5  # no scoring in rounds 1 and 2
    run = FederatedRun(cfg, server_has_data=False)
    # Only whom a message goes to matters here (a real one needs a running ServerApp's identity).
    monkeypatch.setattr(run, "message", lambda node, message_type, server_round, **config: SimpleNamespace(
        metadata=SimpleNamespace(dst_node_id=node, message_type=message_type)))  # fmt: skip
    return run


def test_a_site_whose_budget_is_spent_is_dropped_and_not_asked_again(tmp_path, monkeypatch, capsys):
    run = small_run(tmp_path, monkeypatch, min_clients=2)
    grid = ScriptedGrid(run.global_state)
    play_round(grid, run, 1)
    play_round(grid, run, 2)
    assert grid.asked_to_train == [[1, 2, 3], [1, 3]]
    assert set(run.history[0]["train"]) == {"site1", "site3"}
    assert "privacy budget is spent" in run.history[0]["dropped"]["site2"]
    assert capsys.readouterr().err.count("dropped the reply of site2") == 1


def test_without_enough_sites_left_the_minimum_sites_rule_stops_the_run(tmp_path, monkeypatch):
    run = small_run(tmp_path, monkeypatch, min_clients=3)
    grid = ScriptedGrid(run.global_state)
    with pytest.raises(SitesMissingError, match="only 2 of the required 3"):
        play_round(grid, run, 1)


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

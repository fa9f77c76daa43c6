"""Server-side arithmetic of every strategy, the transport precision and the evaluation schedule:
plain torch, no Flower, each against a case computed by hand."""

import io
import random
from dataclasses import replace
from typing import get_args

import numpy as np
import pytest
import torch

from fedbt.config import ClientPrivacyConfig, FederatedConfig, StrategyName
from fedbt.fl.server import choose_sites, evaluation_due
from fedbt.fl.strategies import ClientLevelDP, FedAdam, FedYogi, SiteUpdate, make_strategy
from fedbt.fl.task import transport_state
from fedbt.model.architectures import build_resnet18


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def aggregate(fc: FederatedConfig | object, states: list[dict], examples: list[int], global_state: dict, **kwargs):
    strategy = fc if not isinstance(fc, FederatedConfig) else make_strategy(fc, {"w"}, **kwargs)
    return strategy.aggregate(1, global_state, [SiteUpdate(s, n) for s, n in zip(states, examples)])


def test_float16_transport_halves_the_bytes_and_keeps_integer_buffers():
    state = build_resnet18(4).state_dict()
    wire = transport_state(state, "float16")
    assert wire.keys() == state.keys()
    assert state_bytes(wire) < 0.51 * state_bytes(state)
    counts = [k for k in state if k.endswith("num_batches_tracked")]
    assert counts and all(wire[k].dtype == torch.int64 for k in counts)
    weight = state["layer1.0.conv1.weight"]
    assert torch.allclose(wire["layer1.0.conv1.weight"].float(), weight, rtol=1e-3, atol=1e-4)
    back = transport_state(wire, "float32")
    assert all(back[k].dtype == state[k].dtype for k in state)


def test_values_beyond_float16_range_stay_float32_instead_of_becoming_inf():
    wire = transport_state({"running_var": torch.tensor([1.0, 1e6])}, "float16")
    assert wire["running_var"].dtype == torch.float32
    assert torch.isfinite(wire["running_var"]).all()


def test_sites_score_the_global_model_every_k_rounds_and_after_the_last():
    fc = FederatedConfig(rounds=7, evaluate_every=3)
    assert [r for r in range(1, 8) if evaluation_due(r, fc)] == [3, 6, 7]


def test_fedavg_weights_sites_by_their_examples_and_keeps_the_global_dtypes():
    global_state = {"w": torch.zeros(2), "count": torch.tensor(4)}
    sites = [
        {"w": torch.tensor([1.0, 1.0]), "count": torch.tensor(5)},
        {"w": torch.tensor([4.0, 0.0]), "count": torch.tensor(5)},
    ]
    new = aggregate(FederatedConfig(), sites, [30, 10], global_state)
    assert torch.allclose(new["w"], torch.tensor([1.75, 0.75]))
    assert new["count"].dtype == torch.int64 and new["w"].dtype == torch.float32
    # FedProx's server is FedAvg: its proximal term acts at the sites.
    assert torch.equal(aggregate(FederatedConfig(strategy="fedprox"), sites, [30, 10], global_state)["w"], new["w"])


def fedexp_round(updates: list[list[float]], examples: list[int]) -> dict:
    """FedExP's new global model when sites at `examples` move the weights w (from zeros) by `updates`;
    a BatchNorm statistic each site reports as 2 + its index."""
    global_state = {"w": torch.zeros(2), "bn.running_mean": torch.zeros(1)}
    sites = [{"w": torch.tensor(u), "bn.running_mean": torch.tensor([2.0 + i])} for i, u in enumerate(updates)]
    return aggregate(FederatedConfig(strategy="fedexp"), sites, examples, global_state)


def test_fedexp_is_fedavg_when_the_sites_agree():
    new = fedexp_round([[1.0, 2.0], [1.0, 2.0]], [10, 30])
    assert torch.allclose(new["w"], torch.tensor([1.0, 2.0]))


def test_fedexp_steps_further_along_the_mean_the_more_the_sites_disagree():
    # Updates (1, 0) and (-0.5, 0), equal weight: mean d = (0.25, 0), |d|^2 = 1/16,
    # sum p_i |d_i|^2 = (1 + 1/4) / 2 = 5/8, so eta = (5/8) / (2/16 + epsilon), about 5.
    new = fedexp_round([[1.0, 0.0], [-0.5, 0.0]], [20, 20])
    eta = (5 / 8) / (2 / 16 + 1e-3)
    assert torch.allclose(new["w"], torch.tensor([0.25 * eta, 0.0]))
    # Statistics of the sites' data are averaged, never extrapolated.
    assert torch.equal(new["bn.running_mean"], torch.tensor([2.5]))
    assert new["w"].dtype == torch.float32


def fednova_round(updates: list[list[float]], examples: list[int], steps: dict[int, int]) -> torch.Tensor:
    fc = FederatedConfig(strategy="fednova")
    sites = [{"w": torch.tensor(u)} for u in updates]
    return aggregate(fc, sites, examples, {"w": torch.zeros(2)}, local_steps=lambda n, server_round: steps[n])["w"]


def test_fednova_weighs_each_site_by_its_data_however_many_steps_it_took():
    # Shares 1/4 and 3/4; 1 and 3 steps. Per step (1, 0) and (0, 1), averaged by share: (1/4, 3/4),
    # times 1/4 * 1 + 3/4 * 3 = 2.5 steps. FedAvg would take (1/4, 9/4): the big site's share squared.
    new = fednova_round([[1.0, 0.0], [0.0, 3.0]], [10, 30], {10: 1, 30: 3})
    assert torch.allclose(new, torch.tensor([0.625, 1.875]))
    # With equal steps it is FedAvg.
    same_steps = fednova_round([[1.0, 0.0], [0.0, 3.0]], [10, 30], {10: 2, 30: 2})
    assert torch.allclose(same_steps, torch.tensor([0.25, 2.25]))
    # A site that took no step this round sent the global model back: the round is the other's.
    idle_site = fednova_round([[0.0, 0.0], [0.0, 3.0]], [10, 30], {10: 0, 30: 3})
    assert torch.allclose(idle_site, torch.tensor([0.0, 3.0]))
    assert torch.equal(fednova_round([[0.0, 0.0]], [10], {10: 0}), torch.zeros(2))


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save and torch.load(weights_only=True), as a checkpoint stores it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fedavgm_momentum_survives_a_checkpoint_as_plain_tensors():
    fc = FederatedConfig(strategy="fedavgm", server_momentum=0.9, server_lr=1.0)
    first = make_strategy(fc, {"w"})
    after_one = first.aggregate(1, {"w": torch.zeros(3)}, [SiteUpdate({"w": torch.ones(3)}, 1)])
    # Round 1: the pseudo-gradient is -1, the momentum starts there, the model moves to the site's.
    assert torch.allclose(after_one["w"], torch.ones(3))
    saved = first.state_dict()
    assert set(saved) == {"velocity"}
    restored = make_strategy(fc, {"w"})
    restored.load_state_dict(saved_and_loaded(saved))
    second = [SiteUpdate({"w": 2 * torch.ones(3)}, 1)]
    continued = restored.aggregate(2, after_one, second)
    uninterrupted = first.aggregate(2, after_one, second)
    assert torch.equal(continued["w"], uninterrupted["w"])
    # Round 2 by hand: pseudo-gradient 1 - 2 = -1, momentum 0.9 * -1 + -1 = -1.9, model 1 + 1.9 = 2.9.
    assert torch.allclose(continued["w"], torch.full((3,), 2.9))
    with pytest.raises(ValueError, match="checkpoint holds"):
        make_strategy(fc, {"w"}).load_state_dict({"momentum_vector": {}})


def test_fedadam_and_fedyogi_take_the_papers_steps():
    delta = torch.tensor([0.2, -0.4])
    updates = [SiteUpdate({"w": delta.clone()}, 1)]
    adam = FedAdam({"w"}, lr=0.1)
    new = adam.aggregate(1, {"w": torch.zeros(2)}, updates)
    # m = 0.1 d, v = 0.01 d^2; step 0.1 * sqrt(1 - 0.99^2) / (1 - 0.9^2) (Flower counts round + 1).
    m, v = 0.1 * delta, 0.01 * delta**2
    step = 0.1 * (1 - 0.99**2) ** 0.5 / (1 - 0.9**2)
    assert torch.allclose(new["w"], step * m / (v.sqrt() + 1e-3))
    assert set(adam.state_dict()) == {"m", "v"}
    yogi = FedYogi({"w"}, lr=0.01)
    new = yogi.aggregate(1, {"w": torch.zeros(2)}, updates)
    # v starts at 0: v - 0.01 d^2 sign(0 - d^2) = 0.01 d^2; no bias correction.
    assert torch.allclose(new["w"], 0.01 * m / (v.sqrt() + 1e-3))


def test_fedadam_steps_from_the_servers_float32_model_not_a_float16_copy():
    strategy = make_strategy(FederatedConfig(strategy="fedadam", server_lr=0.1), {"w"})
    kept = 1.0001  # float16 would round it to 1.0
    global_state = {"w": torch.tensor([0.5, kept])}
    # The site sent back the second weight unchanged: no update, so it must stay exactly as the server had it.
    new = strategy.aggregate(1, global_state, [SiteUpdate({"w": torch.tensor([0.7, kept])}, 1)])
    assert new["w"].dtype == torch.float32
    assert new["w"][1].item() == torch.tensor(kept).item()
    assert new["w"][0] > 0.5  # the first weight moved towards the site's


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm", "fedexp"])
def test_server_steps_move_the_parameters_and_average_the_batchnorm_buffers(name):
    strategy = make_strategy(FederatedConfig(strategy=name, server_momentum=0.9), {"w"})
    global_state = {"w": torch.zeros(2), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(4)}

    def site(variances: list[float], batches: int) -> dict:
        counter = torch.tensor(batches)
        return {"w": torch.ones(2), "bn.running_var": torch.tensor(variances), "bn.num_batches_tracked": counter}

    updates = [SiteUpdate(site([2.0, 4.0], 5), 10), SiteUpdate(site([6.0, 8.0], 6), 30)]
    first = strategy.aggregate(1, global_state, updates)
    second = strategy.aggregate(2, first, updates)
    # Statistics of the sites' data: their weighted average, whatever the optimiser's state.
    assert torch.equal(second["bn.running_var"], torch.tensor([5.0, 7.0]))
    # A batch count stays a count: the weighted mean 5.75, rounded.
    assert second["bn.num_batches_tracked"].item() == 6
    assert all(set(moments) == {"w"} for moments in strategy.state_dict().values())


def test_server_learning_rates_default_to_the_papers_and_flowers():
    assert make_strategy(FederatedConfig(strategy="fedadam"), set()).lr == 0.1
    assert make_strategy(FederatedConfig(strategy="fedyogi"), set()).lr == 0.01
    assert make_strategy(FederatedConfig(strategy="fedavgm"), set()).server_lr == 1.0
    assert make_strategy(FederatedConfig(strategy="fedadam", server_lr=0.03), set()).lr == 0.03


def test_fedmedian_and_trimmed_mean_ignore_one_outlying_site():
    values = [[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, -1000.0]]
    sites = [{"w": torch.tensor(v)} for v in values]
    median = aggregate(FederatedConfig(strategy="fedmedian"), sites, [1, 1, 1, 100], {"w": torch.zeros(2)})
    # Even count: the mean of the two middle values, unweighted.
    assert torch.allclose(median["w"], torch.tensor([2.5, 15.0]))
    trimmed = aggregate(
        FederatedConfig(strategy="fedtrimmedavg", trim_fraction=0.25), sites, [1] * 4, {"w": torch.zeros(2)}
    )
    # int(0.25 * 4) = 1 cut at each end of each coordinate: the mean of the middle two.
    assert torch.allclose(trimmed["w"], torch.tensor([2.5, 15.0]))


def test_krum_chooses_the_model_closest_to_its_nearest_others():
    values = [[0.0, 0.0], [0.1, 0.0], [0.0, 0.2], [9.0, 9.0]]
    sites = [{"w": torch.tensor(v)} for v in values]
    # f = 1: each model is scored by its n - f - 2 = 1 nearest other. Squared distances:
    # s0: 0.01 (s1), s1: 0.01 (s0), s2: 0.04 (s0), s3: far. s0 and s1 tie; the first is chosen.
    chosen = aggregate(FederatedConfig(strategy="krum", krum_malicious=1), sites, [1] * 4, {"w": torch.zeros(2)})
    assert torch.equal(chosen["w"], torch.tensor([0.0, 0.0]))


def test_scaffold_steps_c_by_the_replies_deltas_over_every_site():
    control = {"w": torch.zeros(2)}
    strategy = make_strategy(FederatedConfig(strategy="scaffold", num_clients=4), {"w"}, control=control)
    updates = [SiteUpdate({"w": torch.ones(2)}, 1, {"w": torch.tensor([4.0, 0.0])}),
               SiteUpdate({"w": torch.ones(2)}, 1, {"w": torch.tensor([0.0, 8.0])})]  # fmt: skip
    strategy.aggregate(1, {"w": torch.zeros(2)}, updates)
    # Two of four sites replied: c moves by their summed deltas over all four.
    assert torch.equal(strategy.control["w"], torch.tensor([1.0, 2.0]))


def test_client_level_dp_clips_each_update_averages_equally_and_adds_calibrated_noise():
    settings = ClientPrivacyConfig(enabled=True, noise_multiplier=0.0, clipping_norm=1.0)
    strategy = ClientLevelDP({"w"}, settings)
    global_state = {"w": torch.zeros(2), "bn.running_mean": torch.zeros(1)}
    updates = [SiteUpdate({"w": torch.tensor([3.0, 4.0]), "bn.running_mean": torch.tensor([1.0])}, 100),
               SiteUpdate({"w": torch.tensor([0.0, 0.5]), "bn.running_mean": torch.tensor([3.0])}, 1)]  # fmt: skip
    new = strategy.aggregate(1, global_state, updates)
    # (3, 4) has norm 5: clipped to (0.6, 0.8); (0, 0.5) is inside the bound. Equal weights, whatever n_i.
    assert torch.allclose(new["w"], torch.tensor([0.3, 0.65]))
    assert torch.equal(new["bn.running_mean"], torch.tensor([2.0]))
    noisy = ClientLevelDP({"w"}, replace(settings, noise_multiplier=2.0))
    draws = torch.stack(
        [noisy.aggregate(1, {"w": torch.zeros(4000)}, [SiteUpdate({"w": torch.zeros(4000)}, 1)] * 2)["w"]]
    )
    # sigma = noise_multiplier x clipping_norm / n = 2 x 1 / 2 = 1.
    assert 0.95 < float(draws.std()) < 1.05


@pytest.mark.parametrize("name", sorted(get_args(StrategyName)))
def test_every_strategy_keeps_a_float32_model_and_a_checkpointable_state(name):
    fc = FederatedConfig(strategy=name, server_momentum=0.9, num_clients=3)
    control = {"w": torch.zeros(2)}
    strategy = make_strategy(fc, {"w"}, local_steps=lambda n, r: 2, control=control)
    global_state = {"w": torch.zeros(2), "bn.running_var": torch.ones(2)}
    for server_round in (1, 2):
        updates = [
            SiteUpdate({"w": transport_state({"w": torch.full((2,), 0.1 * i)}, "float16")["w"].float(),
                        "bn.running_var": torch.ones(2)}, 10, {"w": torch.full((2,), 1e-3)})
            for i in (1, 2, 3)
        ]  # fmt: skip
        global_state = strategy.aggregate(server_round, global_state, updates)
    assert all(v.dtype == torch.float32 for v in global_state.values())
    state = saved_and_loaded(strategy.state_dict())
    make_strategy(fc, {"w"}, local_steps=lambda n, r: 2, control=control).load_state_dict(state)


def test_site_choice_takes_the_fraction_but_never_fewer_than_the_minimum():
    rng = random.Random(0)
    nodes = list(range(10, 20))
    assert len(choose_sites(nodes, 0.3, 1, rng)) == 3
    assert len(choose_sites(nodes, 0.1, 4, rng)) == 4
    assert choose_sites(nodes, 1.0, 1, rng) == nodes
    assert np.all(np.diff(choose_sites(nodes, 0.5, 1, rng)) > 0)  # in node order

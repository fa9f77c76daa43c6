"""The federation's wire format, evaluation schedule and server-side arithmetic, without starting Flower."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from flower_messages import reply
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from fedbt.config import DataConfig, ExperimentConfig, FederatedConfig, ModelConfig, TrainConfig
from fedbt.federated import server_app
from fedbt.federated.flower_internals import restore_strategy_state, strategy_state
from fedbt.federated.rounds import choose_sites, in_site_order
from fedbt.federated.server_app import FederatedRun, evaluation_due, screen_train_replies, update_global_model
from fedbt.federated.strategy import SERVER_OPTIMISERS, STRATEGIES, aggregate, make_strategy
from fedbt.federated.task import round_steps, transport_state
from fedbt.model.architectures import build_resnet18


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


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
    replies = [
        reply("a", {"w": torch.tensor([1.0, 1.0]), "count": torch.tensor(5)}, 30),
        reply("b", {"w": torch.tensor([4.0, 0.0]), "count": torch.tensor(5)}, 10),
    ]
    new = aggregate(make_strategy(FederatedConfig()), 1, global_state, replies, {"w"})
    assert torch.allclose(new["w"], torch.tensor([1.75, 0.75]))
    assert new["count"].dtype == torch.int64 and new["w"].dtype == torch.float32


def fedexp_round(updates: list[list[float]], examples: list[int]) -> dict:
    """FedExP's new global model when sites at `examples` move the weights w (from zeros) by `updates`;
    a BatchNorm statistic each site reports as 2 + its index."""
    global_state = {"w": torch.zeros(2), "bn.running_mean": torch.zeros(1)}
    replies = [
        reply(f"s{i}", {"w": torch.tensor(update), "bn.running_mean": torch.tensor([2.0 + i])}, n)
        for i, (update, n) in enumerate(zip(updates, examples))
    ]
    return aggregate(make_strategy(FederatedConfig(strategy="fedexp")), 1, global_state, replies, {"w"})


def test_fedexp_is_fedavg_when_the_sites_agree():
    new = fedexp_round([[1.0, 2.0], [1.0, 2.0]], [10, 30])
    assert torch.equal(new["w"], torch.tensor([1.0, 2.0]))


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
    strategy = make_strategy(FederatedConfig(strategy="fednova"), local_steps=lambda n, server_round: steps[n])
    replies = [reply(f"s{i}", {"w": torch.tensor(u)}, n) for i, (u, n) in enumerate(zip(updates, examples))]
    return aggregate(strategy, 1, {"w": torch.zeros(2)}, replies, {"w"})["w"]


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


def test_fednova_counts_a_sites_steps_from_its_examples_and_the_round_not_from_its_reply():
    cfg = ExperimentConfig(train=TrainConfig(batch_size=32), federated=FederatedConfig(rounds=8, local_epochs=0.25))
    # 100 images: 3 batches of 32 an epoch (the last, short one dropped), shared out over 4 rounds.
    steps = [round_steps(cfg, 100, r) for r in range(1, 9)]
    assert set(steps) == {0, 1} and sum(steps[:4]) == sum(steps[4:]) == 3
    assert round_steps(replace(cfg, federated=FederatedConfig(rounds=2)), 1963, 1) == 1963 // 32


def test_fedavgm_momentum_survives_a_checkpoint_as_plain_tensors():
    fc = FederatedConfig(strategy="fedavgm", server_momentum=0.9, server_lr=1.0)
    global_state = {"w": torch.zeros(3)}
    first = make_strategy(fc)
    after_one = aggregate(first, 1, global_state, [reply("a", {"w": torch.ones(3)}, 1)], {"w"})
    saved = strategy_state(first)
    assert set(saved) == {"momentum_vector"}
    assert all(isinstance(t, torch.Tensor) for t in saved["momentum_vector"].values())
    # Loadable with torch.load(weights_only=True): tensors in dicts only.
    buffer = __import__("io").BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    restored = make_strategy(fc)
    restore_strategy_state(restored, torch.load(buffer, weights_only=True))
    second_reply = [reply("a", {"w": 2 * torch.ones(3)}, 1)]
    continued = aggregate(restored, 2, after_one, second_reply, {"w"})
    uninterrupted = aggregate(first, 2, after_one, second_reply, {"w"})
    assert torch.equal(continued["w"], uninterrupted["w"])
    # Momentum carried over: round 2 moves further than plain averaging would (to 2.0).
    assert continued["w"][0] > 2.0


def test_fedadam_steps_from_the_servers_float32_model_not_a_float16_copy():
    strategy = make_strategy(FederatedConfig(strategy="fedadam", server_lr=0.1))
    kept = 1.0001  # float16 would round it to 1.0
    global_state = {"w": torch.tensor([0.5, kept])}
    # The site sent back the second weight unchanged: no update, so it must stay exactly as the server had it.
    new = aggregate(strategy, 1, global_state, [reply("a", {"w": torch.tensor([0.7, kept])}, 1)], {"w"})
    assert new["w"].dtype == torch.float32
    assert new["w"][1].item() == torch.tensor(kept).item()
    assert new["w"][0] > 0.5  # the first weight moved towards the site's
    assert set(strategy_state(strategy)) == {"m_t", "v_t"}


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimisers_step_the_parameters_and_average_the_batchnorm_buffers(name):
    strategy = make_strategy(FederatedConfig(strategy=name, server_momentum=0.9))
    global_state = {"w": torch.zeros(2), "bn.running_var": torch.ones(2), "bn.num_batches_tracked": torch.tensor(4)}

    def site(variances: list[float], batches: int) -> dict:
        counter = torch.tensor(batches)
        return {"w": torch.ones(2), "bn.running_var": torch.tensor(variances), "bn.num_batches_tracked": counter}

    replies = [reply("a", site([2.0, 4.0], 5), 10), reply("b", site([6.0, 8.0], 6), 30)]
    first = aggregate(strategy, 1, global_state, replies, {"w"})
    second = aggregate(strategy, 2, first, replies, {"w"})
    # Statistics of the sites' data: their weighted average, whatever the optimiser's state.
    assert torch.equal(second["bn.running_var"], torch.tensor([5.0, 7.0]))
    # A batch count stays a count: the weighted mean 5.75, rounded.
    assert second["bn.num_batches_tracked"].item() == 6
    assert all(set(moments) == {"w"} for moments in strategy_state(strategy).values())
    assert strategy_state(strategy)


def test_server_learning_rates_default_to_flowers_own():
    assert make_strategy(FederatedConfig(strategy="fedadam")).eta == FedAdam().eta
    assert make_strategy(FederatedConfig(strategy="fedyogi")).eta == FedYogi().eta
    assert make_strategy(FederatedConfig(strategy="fedavgm")).server_learning_rate == FedAvgM().server_learning_rate
    assert make_strategy(FederatedConfig(strategy="fedadam", server_lr=0.03)).eta == 0.03


def stored_arrays(strategy: object) -> list[np.ndarray]:
    """Every array a strategy object holds in its attributes (a model, moments, a momentum list)."""
    found = []

    def collect(value: object) -> None:
        if isinstance(value, np.ndarray):
            found.append(value)
        elif isinstance(value, ArrayRecord):
            found.extend(value.to_numpy_ndarrays())
        elif isinstance(value, dict | list | tuple):
            for item in value.values() if isinstance(value, dict) else value:
                collect(item)

    for attribute in vars(strategy).values():
        collect(attribute)
    return found


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_servers_copy_stays_float32_under_float16_transport(name, tmp_path):
    cfg = ExperimentConfig(
        output_dir=str(tmp_path),
        data=DataConfig(image_size=8),  # the smallest the CNN takes: a fast test
        model=ModelConfig(name="cnn"),
        federated=FederatedConfig(strategy=name, transport_dtype="float16", server_momentum=0.9),
    )
    run = FederatedRun(cfg, server_has_data=False)
    for server_round in (1, 2):
        replies = []
        for node, site in enumerate(("figshare", "sartaj", "br35h"), start=1):
            trained = {k: v + 1e-3 * node if v.is_floating_point() else v for k, v in run.global_state.items()}
            # SCAFFOLD's sites send their control variate's change as well, at the same precision.
            delta = {k: torch.full_like(v, 1e-3) for k, v in run.control.items()} if run.control else None
            wire_delta = transport_state(delta, "float16") if delta else None
            replies.append(reply(site, transport_state(trained, "float16"), 10, node=node, control_delta=wire_delta))
        accepted, dropped = screen_train_replies(run, replies)
        assert not dropped
        update_global_model(run, server_round, accepted)
    assert all(v.dtype == torch.float32 for v in run.global_state.values())
    assert all(v.dtype == torch.float32 for v in (run.control or {}).values())
    held = [a for a in stored_arrays(run.strategy) if np.issubdtype(a.dtype, np.floating)]
    assert all(a.dtype == np.float32 for a in held), sorted({str(a.dtype) for a in held})
    assert held or not isinstance(run.strategy, SERVER_OPTIMISERS)  # each server optimiser holds its model


def test_replies_are_aggregated_in_site_order_whatever_arrives_first():
    replies = [reply(name, {"w": torch.zeros(1)}, 1) for name in ("br35h", "zeta", "figshare", "sartaj")]
    ordered = in_site_order(replies, ["figshare", "sartaj", "br35h"])
    assert [str(m.content["site"]["name"]) for m in ordered] == ["figshare", "sartaj", "br35h", "zeta"]


def test_site_choice_takes_the_fraction_but_never_fewer_than_the_minimum():
    rng = __import__("random").Random(0)
    nodes = list(range(10, 20))
    assert len(choose_sites(nodes, 0.3, 1, rng)) == 3
    assert len(choose_sites(nodes, 0.1, 4, rng)) == 4
    assert choose_sites(nodes, 1.0, 1, rng) == nodes
    assert np.all(np.diff(choose_sites(nodes, 0.5, 1, rng)) > 0)  # in node order


def test_a_server_optimiser_is_refused_at_start_when_flower_moved_its_state(monkeypatch):
    from fedbt.federated import flower_internals

    assert flower_internals.InstanceState(("m_t",)).problem("FedAdam", flower_internals.FEDADAM_STATE.get()) is None
    missing = flower_internals.InstanceState(("moments",)).problem("FedAdam", flower_internals.FEDADAM_STATE.get())
    assert missing == "FedAdam objects have no attribute 'moments'"
    monkeypatch.setattr(flower_internals, "installed_flower_version", lambda: "9.9.9")
    with pytest.raises(ValueError, match="strategy fedadam cannot run on this Flower: flwr 9.9.9 is installed"):
        make_strategy(FederatedConfig(strategy="fedadam"))
    make_strategy(FederatedConfig(strategy="fedavg"))  # FedAvg keeps no server state: it still runs


def test_under_fedbn_the_server_scores_nothing_itself_and_takes_the_sites_scores(data_config, tmp_path, monkeypatch):
    cfg = ExperimentConfig(
        output_dir=str(tmp_path), data=data_config, model=ModelConfig(name="cnn"), federated=FederatedConfig(fedbn=True)
    )
    run = FederatedRun(cfg, server_has_data=True)
    sites_scores = {"pooled": {"accuracy": 0.5}, "sites": {}}
    monkeypatch.setattr(server_app, "site_test_results", lambda grid, run, temperature: sites_scores)
    monkeypatch.setattr(server_app, "final_validation_at_sites", lambda grid, run: {})
    # The server holds the data, but its averaged BatchNorm layers are used by no site: no pooled score of them.
    assert not server_app.scores_on_server(run)
    assert server_app.finish(grid=None, run=run)["test"] is sites_scores

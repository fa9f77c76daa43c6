"""SCAFFOLD (federated.strategy=scaffold): the sites' gradient correction, the server's control
variate step, its screening of the sites' changes, and its checkpoint: the federated core, no Flower."""

import pytest
import torch
from site_replies import train_reply
from torch import nn

from fedbt.config import DataConfig, ExperimentConfig, FederatedConfig, ModelConfig, load_config
from fedbt.data.transforms import to_device_batch
from fedbt.fl.local import DriftCorrection, drift_hook
from fedbt.fl.protocol import CONTROL, EVALUATE, TRAIN, Reply
from fedbt.fl.server import FederatedRun, screen_train_replies, update_global_model
from fedbt.fl.strategies import Scaffold, SiteUpdate
from fedbt.fl.task import LocalState, control_update
from fedbt.train.engine import train_one_epoch
from fedbt.train.losses import coarse_label_loss

CPU = torch.device("cpu")


def one_batch() -> list[tuple[torch.Tensor, torch.Tensor]]:
    images = torch.tensor([[[[10, 200], [30, 40]]], [[[250, 0], [60, 90]]]], dtype=torch.uint8)
    masks = torch.tensor([[True, False], [False, True]])
    return [(images, masks)]


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))


def gradients(model: nn.Module, batch: list) -> list[torch.Tensor]:
    """The batch's loss gradients at the model's weights, computed apart from the engine."""
    images, masks = batch[0]
    coarse_label_loss(model(to_device_batch(images, CPU)), masks).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("corrected", [False, True])
def test_a_step_moves_the_weights_by_the_gradient_plus_c_minus_c_i(corrected):
    model, batch = linear_model(), one_batch()
    start = [p.detach().clone() for p in model.parameters()]
    expected = gradients(linear_model(), batch)
    correction = [torch.full_like(p, 0.25) - 0.5 * torch.arange(p.numel()).view_as(p) for p in start]
    drift = DriftCorrection(correction) if corrected else None
    # SGD at lr 1 without momentum: the weights move by exactly the gradient the optimiser is given.
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    hook = drift_hook(model, drift, optimizer, None) if corrected else None
    train_one_epoch(model, coarse_label_loss, optimizer, batch, CPU, after_backward=hook)
    for before, after, gradient, shift in zip(start, model.parameters(), expected, correction, strict=True):
        moved = before - after.detach()
        assert torch.allclose(moved, gradient + shift if corrected else gradient, atol=1e-6)
    if corrected:
        # What the site learns of its data is the gradient as computed, not as corrected.
        assert drift.steps == 1
        assert all(torch.allclose(m, g, atol=1e-6) for m, g in zip(drift.mean_gradients(), expected, strict=True))


def test_a_sites_change_of_its_control_variate_starts_from_zeros():
    before, after = LocalState(), LocalState(control={"w": torch.tensor([1.0, 2.0])})
    assert control_update(before, after)["w"].tolist() == [1.0, 2.0]
    assert control_update(after, LocalState(control={"w": torch.tensor([0.5, 3.0])}))["w"].tolist() == [-0.5, 1.0]


def test_the_server_adds_the_sum_of_the_changes_over_every_site_of_the_federation():
    strategy = Scaffold({"w"}, control={"w": torch.tensor([1.0, 1.0])}, num_sites=4)
    model = {"w": torch.zeros(2)}
    updates = [
        SiteUpdate(model, 1, control_delta={"w": torch.tensor([3.0, 0.0])}),
        SiteUpdate(model, 1, control_delta={"w": torch.tensor([0.0, 6.0])}),
    ]
    strategy.aggregate(1, model, updates)
    # Four sites, two replied: c + (delta_a + delta_b) / 4.
    assert strategy.control["w"].tolist() == [1.75, 2.5]


def scaffold_run(tmp_path, **federated) -> FederatedRun:
    cfg = ExperimentConfig(
        output_dir=str(tmp_path),
        data=DataConfig(image_size=8),  # the smallest the CNN takes: a fast test
        model=ModelConfig(name="cnn"),
        federated=FederatedConfig(strategy="scaffold", **federated),
    )
    return FederatedRun(cfg, server_has_data=False)


def site_reply(run: FederatedRun, site: str, node: int, delta: dict) -> Reply:
    return train_reply(site, dict(run.global_state), 10, node=node, control_delta=delta)


def test_a_reply_whose_control_change_is_misshapen_or_not_finite_is_left_out(tmp_path):
    run = scaffold_run(tmp_path)
    ones = {k: torch.ones_like(v) for k, v in run.control.items()}
    key = next(iter(ones))
    nan = {**ones, key: torch.full_like(ones[key], float("nan"))}
    misshapen = {**ones, key: torch.ones(3)}
    replies = [
        site_reply(run, "figshare", 1, ones),
        site_reply(run, "sartaj", 2, nan),
        site_reply(run, "br35h", 3, misshapen),
    ]
    accepted, dropped = screen_train_replies(run, replies)
    assert [r.site["name"] for r in accepted] == ["figshare"]
    assert dropped == {
        "node 2 ('sartaj')": f"{key} holds NaN or infinite values",
        "node 3 ('br35h')": f"{key} has shape (3,), the control variate's is {tuple(ones[key].shape)}",
    }
    update_global_model(run, 1, accepted)
    # One of the three sites' changes, over the three: c moved by a third of it.
    assert all(torch.allclose(c, torch.full_like(c, 1 / 3)) for c in run.control.values())


def test_only_training_requests_carry_the_control_variate_at_the_transport_precision(tmp_path):
    run = scaffold_run(tmp_path, transport_dtype="float16")
    run.strategy.control = {k: v + 0.5 for k, v in run.control.items()}
    sent = run.request(1, TRAIN, 1).tensors[CONTROL]
    assert sent.keys() == run.control.keys() and all(v.dtype == torch.float16 for v in sent.values())
    assert all(torch.equal(sent[k].float(), run.control[k]) for k in sent)
    assert CONTROL not in run.request(1, EVALUATE, 1).tensors
    assert all(v.dtype == torch.float32 for v in run.control.values())  # the server's own copy


def test_a_resumed_run_restarts_the_control_variate_at_zeros_as_its_sites_do(tmp_path):
    # A resume is a new Flower run: every site starts its c_i at zeros, so c must too to stay their mean.
    run = scaffold_run(tmp_path)
    deltas = {k: torch.randn_like(v) for k, v in run.control.items()}
    replies = [site_reply(run, "figshare", 1, deltas)]
    accepted, _ = screen_train_replies(run, replies)
    update_global_model(run, 1, accepted)
    assert any(v.abs().sum() > 0 for v in run.control.values())
    run.last_round = 1
    run.checkpoint("last.pt")
    resumed = scaffold_run(tmp_path, resume=True)
    assert resumed.last_round == 1
    assert resumed.control.keys() == run.control.keys()
    assert all(not v.any() for v in resumed.control.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["privacy.enabled=true", "model.norm=group"], "scaffold cannot use privacy.enabled"),
        (["federated.fedbn=true"], "scaffold cannot use federated.fedbn"),
        (["privacy.client_level.enabled=true"], "needs federated.strategy fedavg or fedprox, not scaffold"),
    ],
)
def test_scaffold_refuses_what_it_cannot_correct(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config([], ["federated.strategy=scaffold", *overrides])

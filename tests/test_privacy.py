"""Record-level differential privacy: Opacus's accounting, the budget stopping a site, DP off untouched."""

import io

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier
from opacus.optimizers import DPOptimizer
from torch.utils.data import TensorDataset

import fedbt.train.setup as trainer
from fedbt.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, PrivacyConfig, TrainConfig, load_config
from fedbt.data.catalog import build_catalog
from fedbt.data.loader import make_loader
from fedbt.data.partition import make_partitions
from fedbt.fl.task import LocalState, train_partition
from fedbt.model.architectures import build_model
from fedbt.model.device import prepare_model, select_device
from fedbt.train.engine import build_optimizer, seed_everything, train_one_epoch
from fedbt.train.losses import coarse_label_loss
from fedbt.train.setup import make_private, train_epoch, training_setup

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Opacus: secure RNG off, largest RDP order


def generated_images(count: int, size: int = 16, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 1, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 4, (count,), generator=generator)
    return TensorDataset(images, torch.nn.functional.one_hot(labels, 4).bool())


def config(
    privacy: PrivacyConfig, model: ModelConfig | None = None, batch_size: int = 16, size: int = 16
) -> ExperimentConfig:
    return ExperimentConfig(
        data=DataConfig(image_size=size),
        model=model or ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=batch_size, threads=1, log_every=0),
        privacy=privacy,
    )


def test_spent_epsilon_is_opacus_own_computation_for_the_same_noise_and_sample_rate():
    dataset = generated_images(64)  # 64 images, batches of 16: 4 Poisson batches an epoch, sample rate 1/4
    cfg = config(PrivacyConfig(enabled=True, target_epsilon=3.0, delta=1e-5))
    setup = make_private(training_setup(cfg, 4), dataset, cfg, planned_epochs=3, saved=None)
    noise = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.25, steps=12, accountant="rdp")
    assert setup.privacy.noise_multiplier == noise
    assert isinstance(setup.optimizer, DPOptimizer)

    for epoch in range(2):
        stats = train_epoch(setup, dataset, cfg, None, seed=epoch, loader_seed=epoch)
    orders = RDPAccountant.DEFAULT_ALPHAS
    rdp = compute_rdp(q=0.25, noise_multiplier=noise, steps=8, orders=orders)
    assert stats["epsilon"] == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], abs=1e-6)
    assert 0 < stats["epsilon"] < 3.0


def test_a_site_stops_training_when_its_budget_is_spent(data_config):
    # A set noise with a small target: 3 of the first round's 4 steps fit (27 images, batches of 8).
    privacy = PrivacyConfig(enabled=True, target_epsilon=1.5, noise_multiplier=2.0)
    cfg = config(privacy, batch_size=8)
    cfg.data = data_config
    cfg.federated.rounds = 3
    catalog = build_catalog(cfg.data, progress=False)
    partition = make_partitions(catalog, 3, "origin", 0.5, 0)[0]
    global_state = build_model(cfg.model, 4, cfg.data.image_size).state_dict()

    state, _, first, local = train_partition(cfg, catalog, partition, global_state, 1, LocalState())
    assert first["dp_budget_spent"] == 0 and first["dp_epsilon"] <= 1.5
    assert any(not torch.equal(state[key], global_state[key]) for key in state)
    # The account travels in the site's local state as the client app keeps it.
    buffer = io.BytesIO()
    torch.save(local.as_tensors(), buffer)
    local = LocalState(**torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert local.privacy["history"] == [[2.0, 0.25, 3]]

    state, examples, second, _ = train_partition(cfg, catalog, partition, global_state, 2, local)
    assert second["dp_budget_spent"] == 1 and second["dp_epsilon"] == first["dp_epsilon"]
    assert all(torch.equal(state[key], global_state[key]) for key in global_state)
    assert examples == len(partition.indices["train"])


def test_the_last_steps_of_a_budget_are_taken_and_no_more():
    dataset = generated_images(64)
    cfg = config(PrivacyConfig(enabled=True, target_epsilon=2.0, noise_multiplier=2.0))
    setup = make_private(training_setup(cfg, 4), dataset, cfg, planned_epochs=100, saved=None)
    steps = 0
    while not setup.privacy.budget_spent():
        train_epoch(setup, dataset, cfg, None, seed=steps, loader_seed=steps)
        steps = sum(entry[2] for entry in setup.privacy.accountant.history)
    accountant = RDPAccountant()
    accountant.history = [(2.0, 0.25, steps)]
    assert accountant.get_epsilon(1e-5) <= 2.0
    accountant.history = [(2.0, 0.25, steps + 1)]
    assert accountant.get_epsilon(1e-5) > 2.0
    assert steps % 4 != 0  # the budget ran out within an epoch, which stopped early


def test_halves_of_an_epoch_draw_the_epochs_poisson_batches_and_spend_its_steps(monkeypatch):
    dataset = generated_images(64)  # 4 Poisson batches an epoch
    cfg = config(PrivacyConfig(enabled=True, target_epsilon=3.0, noise_multiplier=2.0))
    drawn, real_epoch = [], trainer.train_one_epoch

    def recording_epoch(model, criterion, optimizer, loader, *args, **kwargs):
        drawn.append([labels for _, labels in loader])
        return real_epoch(model, criterion, optimizer, loader, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_one_epoch", recording_epoch)
    whole = make_private(training_setup(cfg, 4), dataset, cfg, planned_epochs=1, saved=None)
    train_epoch(whole, dataset, cfg, None, seed=0, loader_seed=0)
    halves = make_private(training_setup(cfg, 4), dataset, cfg, planned_epochs=1, saved=None)
    for batches in (range(0, 2), range(2, 4)):
        train_epoch(halves, dataset, cfg, None, seed=0, loader_seed=0, batches=batches)

    epoch, first_half, second_half = drawn
    assert len(first_half) == len(second_half) == 2
    assert all(torch.equal(a, b) for a, b in zip(first_half + second_half, epoch, strict=True))
    assert halves.privacy.as_plain()["history"] == [[2.0, 0.25, 4]]  # one epoch of steps
    assert halves.privacy.epsilon() == pytest.approx(whole.privacy.epsilon())


def test_the_groupnorm_resnet18_trains_with_per_sample_gradients():
    dataset = generated_images(8, size=32)
    cfg = config(PrivacyConfig(enabled=True), ModelConfig(name="resnet18", norm="group"), batch_size=4, size=32)
    setup = make_private(training_setup(cfg, 4), dataset, cfg, planned_epochs=1, saved=None)
    before = {key: value.clone() for key, value in setup.model.state_dict().items()}
    stats = train_epoch(setup, dataset, cfg, None, seed=0, loader_seed=0)
    assert stats["images"] > 0 and stats["epsilon"] > 0
    assert not torch.equal(setup.model.conv1.weight, before["conv1.weight"])
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in setup.model.modules())


def test_without_privacy_the_set_up_trains_exactly_as_the_plain_engine():
    dataset = generated_images(40)
    cfg = config(PrivacyConfig(enabled=False, target_epsilon=0.5, noise_multiplier=3.0), ModelConfig(name="resnet18"))
    setup = training_setup(cfg, 4)
    assert setup.privacy is None and not isinstance(setup.optimizer, DPOptimizer)
    train_epoch(setup, dataset, cfg, None, seed=7, loader_seed=3)

    # The engine by hand: seeded model, Adam, the shuffled loader that drops the last partial batch.
    device = select_device("auto")
    seed_everything(cfg.training_seed)
    model = prepare_model(build_model(cfg.model, 4, cfg.data.image_size), device)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    seed_everything(7)
    train_one_epoch(model, coarse_label_loss, optimizer, make_loader(dataset, 16, True, device, seed=3), device)
    expected = model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in setup.model.state_dict().items())


def test_privacy_refuses_what_would_mix_the_images_of_a_batch_after_all_layers():
    # Rules between sections wait for the last layer: privacy first, the GroupNorm model after.
    cfg = load_config([], ["privacy.enabled=true", "model.norm=group"])
    assert cfg.privacy.enabled and cfg.model.norm == "group"
    for overrides, problem in [
        (["privacy.enabled=true"], "needs a model without BatchNorm"),
        (["privacy.enabled=true", "model.name=resnet50"], "needs a model without BatchNorm"),
        (["privacy.enabled=true", "model.norm=group", "train.class_weights=true"], "train.class_weights"),
        (["privacy.enabled=true", "model.norm=group", "federated.strategy=fedprox", "federated.proximal_mu=0.1"],
         "proximal term"),
        (["privacy.enabled=true", "model.norm=group", "federated.restricted_softmax=true"], "restricted_softmax"),
        (["model.name=cnn", "model.norm=group"], "norm 'group' is for resnet18 only"),
        (["privacy.delta=1"], "privacy.delta"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=problem):
            load_config([], overrides)

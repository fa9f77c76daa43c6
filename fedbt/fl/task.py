"""A site's federated work, free of Flower: local training and scoring of the global model.

The Flower apps only move state dicts and numbers in and out of these functions, so the
same training code runs in the simulation, at a hospital and in the tests.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedbt.config import ExperimentConfig, from_dict, to_dict
from fedbt.data.catalog import Catalog, build_catalog
from fedbt.data.loader import make_loader
from fedbt.data.partition import Partition, make_partitions
from fedbt.data.transforms import augmentation_for
from fedbt.eval.calibration import TemperatureLosses, temperature_losses
from fedbt.eval.inference import predict_log_probabilities
from fedbt.eval.metrics import classification_metrics
from fedbt.fl.local import DriftCorrection, drift_hook, site_criterion
from fedbt.model.device import prepare_model, select_device
from fedbt.train.privacy import PrivacyAccount
from fedbt.train.schedules import StepSchedule
from fedbt.train.setup import make_private, new_model, steps_per_epoch, train_epoch, training_setup


@lru_cache(maxsize=2)
def _catalog(data_json: str) -> Catalog:
    # One catalog per process: Ray reuses its actor for every client it runs.
    cfg = from_dict({"data": json.loads(data_json)})
    return build_catalog(cfg.data, progress=False)


def load_catalog(cfg: ExperimentConfig) -> Catalog:
    return _catalog(json.dumps(to_dict(cfg.data), sort_keys=True))


def client_partition(cfg: ExperimentConfig, partition_id: int, num_partitions: int) -> Partition:
    catalog = load_catalog(cfg)
    fc = cfg.federated
    return make_partitions(catalog, num_partitions, fc.partition, fc.dirichlet_alpha, cfg.data.seed)[partition_id]


TRANSPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FLOAT16_MAX = torch.finfo(torch.float16).max


def transport_state(state: dict[str, torch.Tensor], dtype_name: str) -> dict[str, torch.Tensor]:
    """Floating tensors in the wire precision; integer buffers (BN batch counts) as they are.

    A tensor with values beyond float16's range stays float32 rather than turning into inf.
    """
    dtype = TRANSPORT_DTYPES[dtype_name]

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.dtype == dtype:
            return tensor
        if dtype == torch.float16 and tensor.abs().max() > FLOAT16_MAX:
            return tensor.float()
        return tensor.to(dtype)

    return {key: cast(tensor) for key, tensor in state.items()}


def is_batchnorm_key(model: nn.Module, key: str) -> bool:
    module_name = key.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(module_name), nn.modules.batchnorm._BatchNorm)


def local_batchnorm(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if is_batchnorm_key(model, k)}


@dataclass
class LocalState:
    """What a client keeps between rounds: its BatchNorm layers (FedBN), its optimiser, its privacy
    account, its SCAFFOLD control variate c_i (by parameter name; None: zeros, it has not trained yet)
    and the c_i of its last reply, which becomes its own only once the server has counted that
    reply into c (`settled`)."""

    batchnorm: dict[str, torch.Tensor] | None = None
    optimizer: dict | None = None
    privacy: dict | None = None
    control: dict[str, torch.Tensor] | None = None
    pending_control: dict[str, torch.Tensor] | None = None
    pending_round: int = 0

    def as_tensors(self) -> dict:
        """Tensors, numbers and strings only, so it loads with torch.load(weights_only=True)."""
        return dataclasses.asdict(self)

    def settled(self, accepted_round: int) -> LocalState:
        """SCAFFOLD: the pending c_i becomes the site's own if the server accepted the reply that
        carried it (round `accepted_round`), else it is dropped, as the server dropped its change:
        c stays the mean of the c_i the sites hold."""
        if self.pending_control is None:
            return self
        control = self.pending_control if self.pending_round == accepted_round else self.control
        return dataclasses.replace(self, control=control, pending_control=None, pending_round=0)


def privacy_metrics(account: PrivacyAccount, trained: bool) -> dict[str, float]:
    """What a site reports of its privacy each round. dp_budget_spent=1: the budget was spent
    before this round, the site did not train, and its model is the global model unchanged."""
    return {
        "dp_epsilon": account.epsilon(),
        "dp_budget_spent": 0 if trained else 1,
        "dp_noise_multiplier": account.noise_multiplier,
    }


def starting_state(cfg: ExperimentConfig, global_state: dict[str, torch.Tensor], local: LocalState) -> dict:
    """The global model, with this site's own BatchNorm layers under FedBN."""
    if cfg.federated.fedbn and local.batchnorm is not None:
        return {**global_state, **local.batchnorm}
    return global_state


def zero_control(model: nn.Module) -> dict[str, torch.Tensor]:
    """SCAFFOLD's control variate at the start of a run: zeros, one float32 tensor per trainable parameter."""
    return {name: torch.zeros_like(p, dtype=torch.float32) for name, p in model.named_parameters()}


def drift_correction(
    model: nn.Module, server_control: dict[str, torch.Tensor], site_control: dict[str, torch.Tensor] | None
) -> DriftCorrection:
    """SCAFFOLD's c - c_i for each of the model's parameters, on its device."""
    parameters = dict(model.named_parameters())
    if server_control.keys() != parameters.keys() or any(
        server_control[name].shape != p.shape for name, p in parameters.items()
    ):
        raise ValueError("the server's control variate does not match the model's parameters")
    site_control = site_control or {}
    correction = []
    for name, parameter in parameters.items():
        c = server_control[name].to(parameter.device, torch.float32)
        c_i = site_control[name].to(parameter.device) if name in site_control else torch.zeros_like(c)
        correction.append(c - c_i)
    return DriftCorrection(correction)


def site_control(model: nn.Module, drift: DriftCorrection) -> dict[str, torch.Tensor]:
    """The site's new c_i: the mean of the minibatch gradients it computed this round, as computed.

    Not the paper's option II, (x - y_i) / (K * lr): under Adam and a one-cycle learning rate the
    distance travelled over K steps divided by a learning rate has no clean meaning, while the mean
    gradient is what option I estimates, at no extra pass over the data.
    """
    names = [name for name, _ in model.named_parameters()]
    return {name: mean.detach().cpu() for name, mean in zip(names, drift.mean_gradients(), strict=True)}


def control_update(before: LocalState, after: LocalState) -> dict[str, torch.Tensor]:
    """What a SCAFFOLD site sends back: delta_i = c_i(new) - c_i(old), by parameter name."""
    old = before.control or {}
    return {name: new - old[name] if name in old else new.clone() for name, new in after.control.items()}


def round_batches(local_epochs: float, server_round: int, steps: int) -> list[tuple[int, range]]:
    """(epoch of the run, its batches) that round `server_round` trains, for epochs of `steps` batches.

    The rounds cut the run's sequence of batches into equal consecutive parts: whole epochs for
    local_epochs >= 1, and for 1/k each epoch's batches over k rounds, in the epoch's own order.
    """
    # 1/3 as a float times 3 is not exactly 1: the exact fraction keeps round r's end round r+1's start.
    share = Fraction(local_epochs).limit_denominator(1000)
    first, last = round((server_round - 1) * share * steps), round(server_round * share * steps)
    pieces = []
    for epoch in range(first // steps, -(-last // steps)):
        start, stop = max(first - epoch * steps, 0), min(last - epoch * steps, steps)
        if stop > start:
            pieces.append((epoch, range(start, stop)))
    return pieces


def round_steps(cfg: ExperimentConfig, examples: int, server_round: int) -> int:
    """The optimiser steps a site with `examples` training images takes in round `server_round`
    (fewer only where its record-level privacy budget runs out)."""
    steps = steps_per_epoch(range(examples), cfg, torch.device("cpu"))
    return sum(len(batches) for _, batches in round_batches(cfg.federated.local_epochs, server_round, steps))


def train_partition(
    cfg: ExperimentConfig,
    catalog: Catalog,
    partition: Partition,
    global_state: dict[str, torch.Tensor],
    server_round: int,
    local: LocalState,
    server_control: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], int, dict[str, float], LocalState]:
    """Train the global model for its round's share of local epochs on the partition's training split.

    server_control: SCAFFOLD's c, which corrects every gradient by c - c_i; the new c_i is in the
    returned LocalState."""
    tc, fc = cfg.train, cfg.federated
    dataset = catalog.subset(partition.indices["train"], augment=augmentation_for(tc))
    setup = training_setup(cfg, catalog.task.num_classes, dataset.masks, starting_state(cfg, global_state, local))
    if cfg.privacy.enabled:
        # The noise is fixed for the whole run (rounds x local epochs) when the first round opens the account.
        setup = make_private(setup, dataset, cfg, fc.total_epochs, local.privacy)
        if setup.privacy.budget_spent():
            # Nothing more may be learnt from this site's records: the global model goes back as it came.
            return global_state, len(dataset), privacy_metrics(setup.privacy, trained=False), local
    if fc.keep_optimizer_state and local.optimizer is not None:
        setup.optimizer.load_state_dict(local.optimizer)
    present = dataset.masks.any(dim=0) if fc.restricted_softmax else None
    # FedProx pulls every local epoch towards the round's global model, not towards the previous epoch.
    proximal = fc.strategy == "fedprox" and fc.proximal_mu > 0
    anchor = [p.detach().clone() for p in setup.model.parameters()] if proximal else None
    drift = drift_correction(setup.model, server_control, local.control) if server_control is not None else None
    criterion = site_criterion(
        setup.model,
        setup.class_weights,
        tc.label_smoothing,
        setup.device,
        present_classes=present,
        anchor=anchor,
        proximal_mu=fc.proximal_mu,
    )
    after_backward = drift_hook(setup.model, drift, setup.optimizer, setup.scaler) if drift is not None else None
    steps = steps_per_epoch(dataset, cfg, setup.device)
    # The LR follows one curve over all rounds, as the central run's does over its epochs.
    total_steps = fc.total_epochs * steps
    epochs = []
    for global_epoch, batches in round_batches(fc.local_epochs, server_round, steps):
        if setup.privacy is not None and setup.privacy.budget_spent():
            break
        # Seeds differ per client (crc32 of its name: stable across processes, unlike hash()).
        seed = cfg.training_seed + 1000 * global_epoch + zlib.crc32(partition.name.encode()) % 1000
        schedule = StepSchedule(tc.lr, tc.schedule, total_steps, global_epoch * steps + batches.start)
        stats = train_epoch(
            setup,
            dataset,
            cfg,
            schedule,
            seed,
            cfg.training_seed + global_epoch,
            criterion=criterion,
            after_backward=after_backward,
            batches=batches,
        )
        epochs.append(stats)
    new_local = LocalState(
        batchnorm=local_batchnorm(setup.model) if fc.fedbn else None,
        optimizer=setup.optimizer.state_dict() if fc.keep_optimizer_state else None,
        privacy=setup.privacy.as_plain() if setup.privacy is not None else None,
        control=site_control(setup.model, drift) if drift is not None else None,
    )
    state = {k: v.detach().cpu() for k, v in setup.model.state_dict().items()}
    seconds = sum(e["seconds"] for e in epochs)
    images = sum(e["images"] for e in epochs)
    metrics = {
        # Over all local epochs: the mean loss per image seen, the time they took together.
        "train_loss": sum(e["loss"] * e["images"] for e in epochs) / max(images, 1),
        "train_seconds": seconds,
        "images_per_second": images / max(seconds, 1e-9),
    }
    if setup.privacy is not None:
        metrics.update(privacy_metrics(setup.privacy, trained=True))
    return state, len(dataset), metrics, new_local


def partition_log_probabilities(
    cfg: ExperimentConfig,
    catalog: Catalog,
    partition: Partition,
    global_state: dict[str, torch.Tensor],
    local: LocalState,
    split: str = "test",
) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of the global model (with the client's own BatchNorm under FedBN) and target masks."""
    device = select_device(cfg.train.device)
    model = new_model(cfg, catalog.task.num_classes)
    model.load_state_dict(starting_state(cfg, global_state, local))
    model = prepare_model(model, device)
    dataset = catalog.subset(partition.indices[split])
    return predict_log_probabilities(model, make_loader(dataset, cfg.train.batch_size, False, device), device)


def evaluate_partition(
    cfg: ExperimentConfig,
    catalog: Catalog,
    partition: Partition,
    global_state: dict[str, torch.Tensor],
    local: LocalState,
    split: str = "test",
) -> tuple[dict, TemperatureLosses]:
    """Metrics of the global model on one split of the partition, and its losses at every temperature of
    the calibration grid (what the server fits the temperature from, nothing per image)."""
    log_probs, masks = partition_log_probabilities(cfg, catalog, partition, global_state, local, split)
    metrics = classification_metrics(np.exp(log_probs), masks, catalog.task)
    metrics["class_counts"] = catalog.class_counts(partition.indices[split])
    return metrics, temperature_losses(log_probs, masks)

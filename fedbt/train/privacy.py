"""Record-level differential privacy for any trainer: DP-SGD through Opacus.

Each image's gradient is clipped to `max_grad_norm`, the clipped gradients of a batch are
summed and Gaussian noise of standard deviation `noise_multiplier x max_grad_norm` is added,
and batches are Poisson samples (each image joins each batch independently), as Opacus's
accountant assumes. The accountant adds up what every step spends. A trainer's account is
kept as plain numbers, so it outlives a federated round (in the site's local state) and a
restart (in a checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass

from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from fedbt.config import PrivacyConfig


@dataclass
class PrivacyAccount:
    """One trainer's privacy spending: the noise fixed for its run, Opacus's accountant of its steps."""

    settings: PrivacyConfig
    noise_multiplier: float
    # Chance that an image joins a batch: 1 / the number of batches in an epoch.
    sample_rate: float
    accountant: IAccountant

    def epsilon(self) -> float:
        """The epsilon spent so far, at the settings' delta."""
        return self._epsilon_of(self.accountant.history)

    def _epsilon_of(self, history: list) -> float:
        if not history:
            return 0.0
        scratch = create_accountant(self.accountant.mechanism())
        scratch.history = history
        return float(scratch.get_epsilon(self.settings.delta))

    def _history_after(self, steps: int) -> list:
        """The accountant's history once `steps` more steps are taken, recorded as training records them."""
        scratch = create_accountant(self.accountant.mechanism())
        scratch.history = list(self.accountant.history)
        for _ in range(steps):
            scratch.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return scratch.history

    def steps_within_budget(self, wanted: int) -> int:
        """How many of `wanted` more steps keep the spent epsilon within the target (epsilon grows with steps)."""
        target = self.settings.target_epsilon
        if self._epsilon_of(self._history_after(wanted)) <= target:
            return wanted
        fits, exceeds = 0, wanted
        while exceeds - fits > 1:
            middle = (fits + exceeds) // 2
            if self._epsilon_of(self._history_after(middle)) <= target:
                fits = middle
            else:
                exceeds = middle
        return fits

    def budget_spent(self) -> bool:
        """True when even one more step would spend more than the target."""
        return self.steps_within_budget(1) == 0

    def as_plain(self) -> dict:
        """Numbers, lists and strings only, so it loads with torch.load(weights_only=True)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "accountant": self.accountant.mechanism(),
            "history": [list(entry) for entry in self.accountant.history],
        }


def open_account(settings: PrivacyConfig, sample_rate: float, planned_steps: int) -> PrivacyAccount:
    """A fresh account. Without a set noise, the noise that spends the target over the planned steps."""
    noise = settings.noise_multiplier or get_noise_multiplier(
        target_epsilon=settings.target_epsilon,
        target_delta=settings.delta,
        sample_rate=sample_rate,
        steps=planned_steps,
        accountant=settings.accountant,
    )
    account = PrivacyAccount(settings, noise, sample_rate, create_accountant(settings.accountant))
    if account.budget_spent():
        raise ValueError(
            f"privacy: one step at noise multiplier {noise} already spends more than "
            f"epsilon {settings.target_epsilon}; raise privacy.noise_multiplier or privacy.target_epsilon"
        )
    return account


def restore_account(settings: PrivacyConfig, saved: dict) -> PrivacyAccount:
    """An account carried on from `as_plain`: its own noise and sample rate, its steps so far."""
    accountant = create_accountant(settings.accountant)
    # Opacus refuses a history kept by another kind of accountant.
    accountant.load_state_dict(
        {"mechanism": saved["accountant"], "history": [tuple(entry) for entry in saved["history"]]}
    )
    return PrivacyAccount(settings, float(saved["noise_multiplier"]), float(saved["sample_rate"]), accountant)


def private_optimizer(
    model: nn.Module, optimizer: Optimizer, loader: DataLoader, account: PrivacyAccount
) -> DPOptimizer:
    """Opacus on `model` and `optimizer`: per-sample gradients, clipping and noise, each step counted.

    The model is hooked, not wrapped, so its state dict keeps its own names. `loader` (an
    epoch's batches over the training data) tells Opacus the sample rate and the expected
    batch size; its Poisson version is made per epoch by `poisson_batches`.
    """
    engine = PrivacyEngine(accountant=account.settings.accountant)
    engine.accountant = account.accountant
    _, dp_optimizer, _ = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=account.noise_multiplier,
        max_grad_norm=account.settings.max_grad_norm,
        poisson_sampling=True,
        wrap_model=False,
    )
    return dp_optimizer


def poisson_batches(loader: DataLoader, steps: int) -> DPDataLoader:
    """`steps` Poisson-sampled batches over the loader's dataset, drawn from the loader's seeded generator.

    Each image joins each batch with probability 1 / len(loader): batches of the loader's
    size on average. Fewer than len(loader) steps when the budget runs out within the epoch.
    """
    batches = DPDataLoader.from_data_loader(loader)
    batches.batch_sampler.steps = steps
    return batches

"""Server-side aggregation: every strategy in plain torch, holding its own state for checkpoints.

A strategy turns the server's float32 global model and the round's checked site models into
the next global model (`aggregate`). Server optimisers (FedAvgM, FedAdam, FedYogi) and the
server steps of FedExP and FedNova move the trainable parameters only: BatchNorm's running
statistics are statistics of the sites' data, not weights a pseudo-gradient may move, so they
(and the integer batch counters) are weighted averages of the sites'. Whatever a strategy
keeps between rounds (momentum, Adam's moments) is in `state_dict()`, plain tensors, which the
checkpoint stores and `load_state_dict` restores on resume (as FLamby's strategies own theirs).

The arithmetic follows the papers and Flower's implementations of them (FedAdam's
bias-corrected step, FedYogi's sign rule, Krum's n - f - 2 nearest), so a run keeps the
meaning its configuration had.
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedbt.config import ClientPrivacyConfig, FederatedConfig
from fedbt.fl.protocol import TensorGroup
from fedbt.progress import log


@dataclass
class SiteUpdate:
    """One site's checked reply: its trained model (float32) and its training examples."""

    state: TensorGroup
    examples: int
    control_delta: TensorGroup | None = None  # SCAFFOLD's change of the site's c_i


def weighted_sum(states: list[TensorGroup], weights: list[float], keys: list[str]) -> TensorGroup:
    return {key: sum(w * s[key].double() for w, s in zip(weights, states, strict=True)) for key in keys}


def weighted_mean(states: list[TensorGroup], weights: list[float], keys: list[str]) -> TensorGroup:
    total = float(sum(weights))
    return {key: value / total for key, value in weighted_sum(states, weights, keys).items()}


def squared_norm(tensors: TensorGroup) -> float:
    return float(sum(value.double().square().sum() for value in tensors.values()))


def in_global_dtypes(state: TensorGroup, global_state: TensorGroup) -> TensorGroup:
    """The aggregate in the global model's key order and dtypes; a counter (an average of the sites'
    BatchNorm batch counts) rounded to the nearest whole number, not truncated."""
    new_state = {}
    for key, reference in global_state.items():
        value = state[key]
        if not reference.is_floating_point():
            value = value.double().round()
        new_state[key] = value.to(reference.dtype)
    return new_state


class Strategy(ABC):
    """Aggregates a round's site models into the next global model."""

    def __init__(self, parameter_keys: set[str]):
        # What a gradient moves; the rest of the state dict are BatchNorm statistics and counters.
        self.parameter_keys = parameter_keys

    @abstractmethod
    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        """The next global model, in the global model's dtypes."""

    def state_dict(self) -> dict[str, TensorGroup]:
        """What the strategy keeps between rounds, as plain tensors (nothing for a stateless one)."""
        return {}

    def load_state_dict(self, state: dict[str, TensorGroup]) -> None:
        self.check_names(state, ())

    def check_names(self, state: dict[str, TensorGroup], names: tuple[str, ...]) -> None:
        if unknown := sorted(set(state) - set(names)):
            raise ValueError(f"{type(self).__name__} keeps {list(names) or 'no state'}, the checkpoint holds {unknown}")

    def split_keys(self, global_state: TensorGroup) -> tuple[list[str], list[str]]:
        parameters = [key for key in global_state if key in self.parameter_keys]
        return parameters, [key for key in global_state if key not in self.parameter_keys]


class FedAvg(Strategy):
    """The sites' models averaged, each weighted by its training examples (McMahan et al., 2017).
    FedProx's server side is this too: its proximal term acts at the sites."""

    def weights(self, updates: list[SiteUpdate]) -> list[float]:
        return [float(u.examples) for u in updates]

    def average(
        self, global_state: TensorGroup, updates: list[SiteUpdate], keys: list[str] | None = None
    ) -> TensorGroup:
        return weighted_mean([u.state for u in updates], self.weights(updates), keys or list(global_state))

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        return in_global_dtypes(self.average(global_state, updates), global_state)


class ParameterStep(FedAvg):
    """FedAvg's average of the BatchNorm statistics, and a step of the strategy's own for the
    trainable parameters, from the global parameters and the sites' updates."""

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        parameters, buffers = self.split_keys(global_state)
        current = {key: global_state[key].float() for key in parameters}
        new_state = self.average(global_state, updates, buffers) if buffers else {}
        new_state |= self.step(server_round, current, updates)
        return in_global_dtypes(new_state, global_state)

    @abstractmethod
    def step(self, server_round: int, current: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        """The new trainable parameters."""


class FedAvgM(ParameterStep):
    """FedAvg with server momentum (Hsu, Qi and Brown, 2019): the pseudo-gradient
    (global - average) accumulates into a momentum the server steps along."""

    def __init__(self, parameter_keys: set[str], server_lr: float = 1.0, momentum: float = 0.0):
        super().__init__(parameter_keys)
        self.server_lr, self.momentum = server_lr, momentum
        self.velocity: TensorGroup = {}

    def step(self, server_round: int, current: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        average = self.average(current, updates)
        pseudo_gradient = {key: value - average[key] for key, value in current.items()}
        if self.momentum > 0:
            if self.velocity:
                pseudo_gradient = {k: self.momentum * self.velocity[k] + g for k, g in pseudo_gradient.items()}
            self.velocity = pseudo_gradient
        return {key: value - self.server_lr * pseudo_gradient[key] for key, value in current.items()}

    def state_dict(self) -> dict[str, TensorGroup]:
        return {"velocity": self.velocity} if self.velocity else {}

    def load_state_dict(self, state: dict[str, TensorGroup]) -> None:
        self.check_names(state, ("velocity",))
        self.velocity = dict(state.get("velocity", {}))


class FedAdaptive(ParameterStep):
    """FedAdam and FedYogi (Reddi et al., ICLR 2021): the averaged update delta is the server's
    gradient; m and v are its first and second moments."""

    def __init__(self, parameter_keys: set[str], lr: float, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        super().__init__(parameter_keys)
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: TensorGroup = {}
        self.v: TensorGroup = {}

    def step(self, server_round: int, current: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        average = self.average(current, updates)
        delta = {key: average[key] - value for key, value in current.items()}
        m = self.m or {key: torch.zeros_like(value) for key, value in delta.items()}
        v = self.v or {key: torch.zeros_like(value) for key, value in delta.items()}
        self.m = {key: self.beta1 * m[key] + (1 - self.beta1) * d for key, d in delta.items()}
        self.v = {key: self.second_moment(v[key], d) for key, d in delta.items()}
        lr = self.step_size(server_round)
        return {key: value + lr * self.m[key] / (self.v[key].sqrt() + self.tau) for key, value in current.items()}

    @abstractmethod
    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor: ...

    def step_size(self, server_round: int) -> float:
        return self.lr

    def state_dict(self) -> dict[str, TensorGroup]:
        return {"m": self.m, "v": self.v} if self.m else {}

    def load_state_dict(self, state: dict[str, TensorGroup]) -> None:
        self.check_names(state, ("m", "v"))
        self.m, self.v = dict(state.get("m", {})), dict(state.get("v", {}))


class FedAdam(FedAdaptive):
    def __init__(self, parameter_keys: set[str], lr: float = 0.1, **kwargs):
        super().__init__(parameter_keys, lr, **kwargs)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * delta.square()

    def step_size(self, server_round: int) -> float:
        # Adam's bias correction (Kingma and Ba, 2014), counted as Flower counts it (round + 1), so
        # that a configured server_lr keeps the step it had.
        t = server_round + 1
        return self.lr * math.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)


class FedYogi(FedAdaptive):
    def __init__(self, parameter_keys: set[str], lr: float = 0.01, **kwargs):
        super().__init__(parameter_keys, lr, **kwargs)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # Yogi grows v only as fast as the new squared update demands, never by a fixed fraction of v.
        squared = delta.square()
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)


def shares_of(examples: list[int]) -> list[float]:
    return [n / sum(examples) for n in examples]


def site_updates(current: TensorGroup, updates: list[SiteUpdate]) -> list[TensorGroup]:
    """d_i = (site's parameters) - (global parameters)."""
    return [{key: u.state[key].float() - value for key, value in current.items()} for u in updates]


class FedExP(ParameterStep):
    """FedAvg with FedExP's server step size (Jhunjhunwala, Wang and Joshi, ICLR 2023).

    Averaging updates that point different ways (sites with different label spaces) leaves a
    short mean step, shorter than any site's. FedExP lengthens the step along the mean d by
    eta = max(1, sum_i p_i |d_i|^2 / (2 |d|^2 + epsilon)), p_i = n_i / n: 1 (plain FedAvg)
    when the sites agree, more the more they disagree.
    """

    # The paper's epsilon keeps eta finite when the mean update is ~0; a ResNet18's |d|^2 per
    # round is orders of magnitude larger, so it matters only then.
    epsilon = 1e-3

    def step(self, server_round: int, current: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        shares = shares_of([u.examples for u in updates])
        deltas = site_updates(current, updates)
        mean = weighted_sum(deltas, shares, list(current))
        spread = sum(share * squared_norm(d) for share, d in zip(shares, deltas, strict=True))
        eta = max(1.0, spread / (2 * squared_norm(mean) + self.epsilon))
        log(f"[server] round {server_round}: FedExP server step {eta:.2f} x the sites' mean update")
        return {key: value + eta * mean[key] for key, value in current.items()}


class FedNova(ParameterStep):
    """FedNova's normalised averaging (Wang, Liu, Liang, Joshi and Poor, NeurIPS 2020).

    A site that takes tau_i local steps moves about tau_i times as far, so FedAvg's mean of the
    updates by p_i = n_i / n optimises the sites' losses weighted by p_i * tau_i, not p_i.
    FedNova averages the updates per step, d_i / tau_i, by p_i, and takes sum_i p_i tau_i steps
    of that mean: the pooled data's objective, the one central trains on. tau_i is the server's
    own count from the site's checked example count (`local_steps`), never a number a site reports.
    """

    def __init__(self, parameter_keys: set[str], local_steps: Callable[[int, int], int]):
        super().__init__(parameter_keys)
        self.local_steps = local_steps  # (a site's training examples, round) -> its optimiser steps

    def step(self, server_round: int, current: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        steps = [self.local_steps(u.examples, server_round) for u in updates]
        # A site with fewer batches an epoch than rounds an epoch takes no step in some rounds and
        # sends the global model back: it has no update per step, and the round is the others'.
        moved = [i for i, tau in enumerate(steps) if tau > 0]
        if not moved:
            return current
        shares = shares_of([updates[i].examples for i in moved])
        taus = [steps[i] for i in moved]
        deltas = site_updates(current, [updates[i] for i in moved])
        per_step = weighted_sum(deltas, [p / tau for p, tau in zip(shares, taus, strict=True)], list(current))
        effective_steps = sum(p * tau for p, tau in zip(shares, taus, strict=True))
        return {key: value + effective_steps * per_step[key] for key, value in current.items()}


def stacked(updates: list[SiteUpdate], key: str) -> torch.Tensor:
    return torch.stack([u.state[key].double() for u in updates])


class FedMedian(Strategy):
    """The coordinate-wise median of the sites' models (Yin et al., 2018): one outlying site
    cannot move a weight beyond the others'. With an even number of sites, the mean of the two
    middle values."""

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        n = len(updates)
        median = {}
        for key in global_state:
            ordered = stacked(updates, key).sort(dim=0).values
            median[key] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        return in_global_dtypes(median, global_state)


class FedTrimmedAvg(Strategy):
    """The coordinate-wise mean after cutting int(trim * n) values at each end (Yin et al., 2018)."""

    def __init__(self, parameter_keys: set[str], trim: float):
        super().__init__(parameter_keys)
        self.trim = trim

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        cut = int(self.trim * len(updates))
        kept = slice(cut, len(updates) - cut)
        mean = {key: stacked(updates, key).sort(dim=0).values[kept].mean(dim=0) for key in global_state}
        return in_global_dtypes(mean, global_state)


class Krum(Strategy):
    """The one site model closest to its n - f - 2 nearest others (Blanchard et al., NeurIPS 2017),
    f being how many sites may be malicious: a crafted model far from the honest ones is not chosen."""

    def __init__(self, parameter_keys: set[str], malicious: int):
        super().__init__(parameter_keys)
        self.malicious = malicious

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        flat = torch.stack([torch.cat([u.state[k].double().ravel() for k in global_state]) for u in updates])
        distances = torch.cdist(flat, flat).square()
        closest = max(1, len(updates) - self.malicious - 2)
        # Each row's smallest distance is to itself (0): skip it.
        scores = distances.sort(dim=1).values[:, 1 : closest + 1].sum(dim=1)
        chosen = int(scores.argmin())
        log(f"[server] round {server_round}: Krum chose site model {chosen + 1} of {len(updates)}")
        return in_global_dtypes(updates[chosen].state, global_state)


class Scaffold(FedAvg):
    """SCAFFOLD's server (Karimireddy et al., ICML 2020): FedAvg of the models, and the control
    variate c stepped by c + (sum of the replying sites' delta_i) / N.

    N is every site of the federation, not only those that replied: c stays the mean of all the
    sites' c_i, and a site that did not train this round still holds the c_i counted in it. c is
    not checkpointed: a resumed run is a new run whose sites start their c_i at zeros, and c must
    stay their mean.
    """

    def __init__(self, parameter_keys: set[str], control: TensorGroup, num_sites: int):
        super().__init__(parameter_keys)
        self.control, self.num_sites = control, num_sites

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        new_state = super().aggregate(server_round, global_state, updates)
        deltas = [u.control_delta for u in updates]
        self.control = {
            name: c + sum(delta[name].float() for delta in deltas) / self.num_sites for name, c in self.control.items()
        }
        return new_state


def clipped(update: TensorGroup, norm: float) -> TensorGroup:
    """The update scaled down to L2 norm `norm` (as it is when shorter)."""
    scale = min(1.0, norm / (math.sqrt(squared_norm(update)) + 1e-12))
    return {key: value * scale for key, value in update.items()}


class ClientLevelDP(Strategy):
    """Client-level differential privacy with fixed clipping (McMahan et al., ICLR 2018).

    Each site's update of the trainable parameters is clipped to `clipping_norm`, the clipped
    updates are averaged with equal weights (the noise is calibrated to them: one site moves the
    average by at most clipping_norm / n, whatever its number of images) and Gaussian noise of
    standard deviation noise_multiplier x clipping_norm / n is added. The server clips even when
    the sites clip their own (`clipped_at: client`, so that no unclipped update leaves a site):
    it trusts no site to have done so, and an honest site's update is unchanged. BatchNorm's
    statistics and counters are no weights a gradient moves; they are averaged as they are,
    outside the guarantee. The noise comes from a generator seeded by the OS's secure source:
    noise an observer could reproduce would protect nothing.
    """

    def __init__(self, parameter_keys: set[str], settings: ClientPrivacyConfig):
        super().__init__(parameter_keys)
        self.settings = settings
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def aggregate(self, server_round: int, global_state: TensorGroup, updates: list[SiteUpdate]) -> TensorGroup:
        parameters, buffers = self.split_keys(global_state)
        current = {key: global_state[key].float() for key in parameters}
        clipped_updates = [clipped(d, self.settings.clipping_norm) for d in site_updates(current, updates)]
        n = len(updates)
        mean = weighted_mean(clipped_updates, [1.0] * n, parameters)
        std = self.settings.noise_multiplier * self.settings.clipping_norm / n
        new_state = {
            key: value + mean[key] + std * torch.randn(value.shape, generator=self.generator, dtype=torch.float64)
            for key, value in current.items()
        }
        if buffers:
            new_state |= weighted_mean([u.state for u in updates], [1.0] * n, buffers)
        return in_global_dtypes(new_state, global_state)


def make_strategy(
    fc: FederatedConfig,
    parameter_keys: set[str],
    client_privacy: ClientPrivacyConfig | None = None,
    local_steps: Callable[[int, int], int] | None = None,
    control: TensorGroup | None = None,
) -> Strategy:
    """The configured strategy. local_steps: (a site's training examples, round) -> its optimiser
    steps, which FedNova needs; control: SCAFFOLD's starting c."""
    if client_privacy is not None and client_privacy.enabled:
        # The configuration allows client-level DP with fedavg and fedprox only: both average.
        return ClientLevelDP(parameter_keys, client_privacy)
    name = fc.strategy
    lr = {} if fc.server_lr is None else {"lr": fc.server_lr}
    if name in ("fedavg", "fedprox"):
        return FedAvg(parameter_keys)
    if name == "fedavgm":
        return FedAvgM(parameter_keys, fc.server_lr or 1.0, fc.server_momentum)
    if name == "fedadam":
        return FedAdam(parameter_keys, **lr)
    if name == "fedyogi":
        return FedYogi(parameter_keys, **lr)
    if name == "fedexp":
        return FedExP(parameter_keys)
    if name == "fednova":
        if local_steps is None:
            raise ValueError("FedNova needs the sites' local steps per round")
        return FedNova(parameter_keys, local_steps)
    if name == "fedmedian":
        return FedMedian(parameter_keys)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(parameter_keys, fc.trim_fraction)
    if name == "krum":
        return Krum(parameter_keys, fc.krum_malicious)
    if name == "scaffold":
        if control is None:
            raise ValueError("SCAFFOLD needs the server's starting control variate")
        return Scaffold(parameter_keys, control, fc.num_clients)
    raise ValueError(f"unknown strategy {name!r}")

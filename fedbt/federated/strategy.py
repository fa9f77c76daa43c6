"""Flower's own strategies, chosen by config, doing the aggregation arithmetic of each round.

The round itself (which sites, when, what is checked, when to score and checkpoint) is
written out in fedbt.federated.server_app; a strategy object is only asked to aggregate the
replies it is given (`aggregate_train`), with the server's float32 global model as its
starting point. A server optimiser (FedAdam, FedYogi, FedAvgM) steps the trainable parameters
only: BatchNorm's running statistics are statistics of the sites' data, not weights a
pseudo-gradient may move, so they (and the batch counters) are plain weighted averages of the
sites', by Flower's FedAvg. Server-side optimiser state (FedAdam's and FedYogi's moments,
FedAvgM's momentum) lives in Flower internals, which fedbt.federated.flower_internals reads
and restores as plain tensors for checkpoints. Client-level differential privacy puts Flower's
clipping wrapper around the averaging strategy (fedbt.federated.client_privacy). SCAFFOLD
averages the models as FedAvg does; its control variate's server step is `updated_control`.
FedExP and FedNova (not Flower's) average as FedAvg does and take their own step (`ServerStep`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from fedbt.config import ClientPrivacyConfig, FederatedConfig
from fedbt.federated.client_privacy import CLIPPING_WRAPPERS, EQUAL_WEIGHT_KEY, clipping_strategy, private_aggregate
from fedbt.federated.common import CONTROL_DELTA_KEY
from fedbt.federated.flower_internals import set_strategy_model, strategy_state_problem
from fedbt.progress import log


class ServerStep(FedAvg, ABC):
    """FedAvg's averaging of the BatchNorm statistics, and a step of its own for the trainable
    parameters, from the site updates d_i = (site's weights) - (global weights) and the sites'
    training examples n_i."""

    @abstractmethod
    def new_parameters(self, server_round: int, global_params: dict, updates: list[dict], examples: list[int]) -> dict:
        """The trainable parameters of the new global model."""


def weighted_sum(updates: list[dict], weights: list[float]) -> dict:
    return {key: sum(w * update[key] for w, update in zip(weights, updates, strict=True)) for key in updates[0]}


def squared_norm(update: dict) -> float:
    return float(sum(value.double().square().sum() for value in update.values()))


def shares_of(examples: list[int]) -> list[float]:
    return [n / sum(examples) for n in examples]


class FedExP(ServerStep):
    """FedAvg with FedExP's server step size (Jhunjhunwala, Wang and Joshi, ICLR 2023).

    Averaging updates that point different ways (sites with different label spaces) leaves a
    short mean step, shorter than any site's. FedExP lengthens the step along the mean d by
    eta = max(1, sum_i p_i |d_i|^2 / (2 |d|^2 + epsilon)), p_i = n_i / n: 1 (plain FedAvg)
    when the sites agree, more the more they disagree.
    """

    # The paper's epsilon keeps eta finite when the mean update is ~0; a ResNet18's |d|^2 per
    # round is orders of magnitude larger, so it matters only then.
    epsilon = 1e-3

    def new_parameters(self, server_round: int, global_params: dict, updates: list[dict], examples: list[int]) -> dict:
        shares = shares_of(examples)
        mean = weighted_sum(updates, shares)
        spread = sum(share * squared_norm(update) for share, update in zip(shares, updates, strict=True))
        eta = max(1.0, spread / (2 * squared_norm(mean) + self.epsilon))
        log(f"[server] round {server_round}: FedExP server step {eta:.2f} x the sites' mean update")
        return {key: value + eta * mean[key] for key, value in global_params.items()}


class FedNova(ServerStep):
    """FedNova's normalised averaging (Wang, Liu, Liang, Joshi and Poor, NeurIPS 2020).

    A site that takes tau_i local steps moves about tau_i times as far, so FedAvg's mean of the
    updates by p_i = n_i / n optimises the sites' losses weighted by p_i * tau_i, not p_i: with
    an epoch (or a share of one) a round tau_i grows with n_i, and a small site counts for less
    than its data. FedNova averages the updates per step, d_i / tau_i, by p_i, and takes
    sum_i p_i tau_i steps of that mean: the pooled data's objective, the one central trains on.
    tau_i is the server's own count from the site's checked example count and the run's
    settings (`local_steps`), never a number a site reports.
    """

    def __init__(self, local_steps: Callable[[int, int], int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.local_steps = local_steps  # (a site's training examples, round) -> its optimiser steps

    def new_parameters(self, server_round: int, global_params: dict, updates: list[dict], examples: list[int]) -> dict:
        steps = [self.local_steps(n, server_round) for n in examples]
        # A site with fewer batches an epoch than rounds an epoch takes no step in some rounds and
        # sends the global model back: it has no update per step, and the round is the others'.
        moved = [i for i, tau in enumerate(steps) if tau > 0]
        if not moved:
            return global_params
        shares = shares_of([examples[i] for i in moved])
        steps = [steps[i] for i in moved]
        per_step = weighted_sum([updates[i] for i in moved], [p / tau for p, tau in zip(shares, steps, strict=True)])
        effective_steps = sum(p * tau for p, tau in zip(shares, steps, strict=True))
        return {key: value + effective_steps * per_step[key] for key, value in global_params.items()}


STRATEGIES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
    "fedexp": FedExP,
    "fednova": FedNova,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    # The sites correct their gradients by control variates; the models are averaged as FedAvg does.
    "scaffold": FedAvg,
}
# The metric each reply carries for weighting the average (Flower's default key).
WEIGHT_KEY = "num-examples"
# Strategies that step the global model with a server optimiser: given the trainable parameters only.
SERVER_OPTIMISERS = (FedAdam, FedYogi, FedAvgM)


def make_strategy(
    fc: FederatedConfig,
    client_privacy: ClientPrivacyConfig | None = None,
    local_steps: Callable[[int, int], int] | None = None,
) -> FedAvg:
    """The configured strategy; behind Flower's clipping and noise when client-level DP is on.
    local_steps: (a site's training examples, round) -> its optimiser steps, which FedNova needs."""
    private = client_privacy is not None and client_privacy.enabled
    base = STRATEGIES[fc.strategy]
    kwargs: dict = {"weighted_by_key": EQUAL_WEIGHT_KEY if private else WEIGHT_KEY}
    if base is FedNova:
        if local_steps is None:
            raise ValueError("FedNova needs the sites' local steps per round")
        kwargs["local_steps"] = local_steps
    elif base is FedProx:
        kwargs["proximal_mu"] = fc.proximal_mu
    elif base in (FedAdam, FedYogi):
        # eta_l is only logged by Flower; the sites' learning rate is train.lr.
        kwargs.update(eta_l=0.0, **({} if fc.server_lr is None else {"eta": fc.server_lr}))
    elif base is FedAvgM:
        kwargs["server_momentum"] = fc.server_momentum
        if fc.server_lr is not None:
            kwargs["server_learning_rate"] = fc.server_lr
    elif base is FedTrimmedAvg:
        kwargs["beta"] = fc.trim_fraction
    elif base is Krum:
        kwargs["num_malicious_nodes"] = fc.krum_malicious
    strategy = base(**kwargs)
    # A server optimiser's state lives in Flower internals: refuse at start, not mid-run, if they moved.
    if problem := strategy_state_problem(strategy):
        raise ValueError(f"strategy {fc.strategy} cannot run on this Flower: {problem}")
    return clipping_strategy(strategy, client_privacy) if private else strategy


def aggregate(
    strategy: FedAvg, server_round: int, global_state: dict, replies: list[Message], parameter_keys: set[str]
) -> dict:
    """The new global model (a torch state dict) from the replies, by the strategy's arithmetic.

    Server optimisers step the trainable parameters (`parameter_keys`) from the server's own
    float32 model, never from a wire copy; the buffers are averaged. Under client-level DP only
    the trainable parameters are clipped and noised.
    """
    if isinstance(strategy, tuple(CLIPPING_WRAPPERS.values())):
        return private_aggregate(strategy, server_round, global_state, replies, parameter_keys)
    if isinstance(strategy, ServerStep):
        return stepped(strategy, server_round, global_state, replies, parameter_keys)
    if not isinstance(strategy, SERVER_OPTIMISERS):
        return in_global_dtypes(aggregate_arrays(strategy, server_round, replies), global_state)
    parameters = {key: value for key, value in global_state.items() if key in parameter_keys}
    set_strategy_model(strategy, parameters)
    new_state = aggregate_arrays(strategy, server_round, [only_arrays(r, parameter_keys) for r in replies])
    if buffer_keys := set(global_state) - parameter_keys:
        averaging = FedAvg(weighted_by_key=strategy.weighted_by_key)
        new_state |= aggregate_arrays(averaging, server_round, [only_arrays(r, buffer_keys) for r in replies])
    return in_global_dtypes(new_state, global_state)


def stepped(
    strategy: ServerStep, server_round: int, global_state: dict, replies: list[Message], parameter_keys: set[str]
) -> dict:
    """FedAvg's average, its trainable parameters replaced by the strategy's own step from the global model."""
    new_state = in_global_dtypes(aggregate_arrays(strategy, server_round, replies), global_state)
    parameters = {key: value for key, value in global_state.items() if key in parameter_keys}
    updates = []
    for reply in replies:
        state = reply.content["arrays"].to_torch_state_dict()
        updates.append({key: state[key].float() - value for key, value in parameters.items()})
    examples = [int(reply.content["metrics"][WEIGHT_KEY]) for reply in replies]
    return new_state | strategy.new_parameters(server_round, parameters, updates, examples)


def updated_control(control: dict, replies: list[Message], num_sites: int) -> dict:
    """SCAFFOLD's server step: c + (the sum of the replying sites' delta_i) / N.

    N is every site of the federation, not only those that replied: c stays the mean of all the
    sites' c_i, and a site that did not train this round still holds the c_i counted in it.
    """
    deltas = [reply.content[CONTROL_DELTA_KEY].to_torch_state_dict() for reply in replies]
    return {name: c + sum(delta[name] for delta in deltas) / num_sites for name, c in control.items()}


def aggregate_arrays(strategy: FedAvg, server_round: int, replies: list[Message]) -> dict:
    arrays, _ = strategy.aggregate_train(server_round, [model_and_metrics(reply) for reply in replies])
    return arrays.to_torch_state_dict()


def model_and_metrics(reply: Message) -> Message:
    """A reply as a Flower strategy takes it: one ArrayRecord (SCAFFOLD's second one, its control
    variate's change, is the server's own business) and its metrics."""
    content = RecordDict({"arrays": reply.content["arrays"], "metrics": reply.content["metrics"]})
    return Message(content, metadata=reply.metadata)


def only_arrays(reply: Message, keys: set[str]) -> Message:
    """A copy of a site's reply whose model holds only these keys (the original is left as it is)."""
    state = reply.content["arrays"].to_torch_state_dict()
    arrays = ArrayRecord(torch_state_dict={key: value for key, value in state.items() if key in keys})
    return Message(RecordDict({"arrays": arrays, "metrics": reply.content["metrics"]}), metadata=reply.metadata)


def in_global_dtypes(state: dict, global_state: dict) -> dict:
    """The aggregate in the global model's key order and dtypes; a counter (an average of the
    sites' BatchNorm batch counts) rounded to the nearest whole number, not truncated."""
    new_state = {}
    for key, reference in global_state.items():
        value = state[key]
        if not reference.is_floating_point():
            value = value.double().round()
        new_state[key] = value.to(reference.dtype)
    return new_state

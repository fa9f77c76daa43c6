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
"""

from __future__ import annotations

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

STRATEGIES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedavgm": FedAvgM,
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


def make_strategy(fc: FederatedConfig, client_privacy: ClientPrivacyConfig | None = None) -> FedAvg:
    """The configured strategy; behind Flower's clipping and noise when client-level DP is on."""
    private = client_privacy is not None and client_privacy.enabled
    base = STRATEGIES[fc.strategy]
    kwargs: dict = {"weighted_by_key": EQUAL_WEIGHT_KEY if private else WEIGHT_KEY}
    if base is FedProx:
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
    if not isinstance(strategy, SERVER_OPTIMISERS):
        return in_global_dtypes(aggregate_arrays(strategy, server_round, replies), global_state)
    parameters = {key: value for key, value in global_state.items() if key in parameter_keys}
    set_strategy_model(strategy, parameters)
    new_state = aggregate_arrays(strategy, server_round, [only_arrays(r, parameter_keys) for r in replies])
    if buffer_keys := set(global_state) - parameter_keys:
        averaging = FedAvg(weighted_by_key=strategy.weighted_by_key)
        new_state |= aggregate_arrays(averaging, server_round, [only_arrays(r, buffer_keys) for r in replies])
    return in_global_dtypes(new_state, global_state)


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

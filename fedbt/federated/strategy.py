"""Flower's own strategies, chosen by config, doing the aggregation arithmetic of each round.

The round itself (which sites, when, what is checked, when to score and checkpoint) is
written out in fedbt.federated.server_app; a strategy object is only asked to aggregate the
replies it is given (`aggregate_train`), with the server's float32 global model as its
starting point. Server-side optimiser state (FedAdam's and FedYogi's moments,
FedAvgM's momentum) lives in Flower internals, which fedbt.federated.flower_internals reads
and restores as plain tensors for checkpoints. Client-level differential privacy puts Flower's
clipping wrapper around the averaging strategy (fedbt.federated.client_privacy).
"""

from __future__ import annotations

from flwr.app import Message
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
}
# The metric each reply carries for weighting the average (Flower's default key).
WEIGHT_KEY = "num-examples"


def make_strategy(fc: FederatedConfig, client_privacy: ClientPrivacyConfig | None = None) -> FedAvg:
    """The configured strategy; behind Flower's clipping and noise when client-level DP is on."""
    private = client_privacy is not None and client_privacy.enabled
    base = STRATEGIES[fc.strategy]
    kwargs: dict = {"weighted_by_key": EQUAL_WEIGHT_KEY if private else WEIGHT_KEY}
    if base is FedProx:
        kwargs["proximal_mu"] = fc.proximal_mu
    elif base in (FedAdam, FedYogi):
        kwargs.update(eta=fc.server_lr, eta_l=0.0)
    elif base is FedAvgM:
        kwargs.update(server_learning_rate=fc.server_lr, server_momentum=fc.server_momentum)
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

    Server optimisers step from the server's own float32 model, never from a wire copy. Under
    client-level DP only the trainable parameters (`parameter_keys`) are clipped and noised.
    """
    if isinstance(strategy, tuple(CLIPPING_WRAPPERS.values())):
        return private_aggregate(strategy, server_round, global_state, replies, parameter_keys)
    set_strategy_model(strategy, global_state)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {key: value.to(global_state[key].dtype) for key, value in arrays.to_torch_state_dict().items()}

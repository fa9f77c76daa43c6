"""Flower's own strategies, chosen by config, doing the aggregation arithmetic of each round.

The round itself (which sites, when, what is checked, when to score and checkpoint) is
written out in fedbt.federated.server_app; a strategy object is only asked to aggregate the
replies it is given (`aggregate_train`), with the server's float32 global model as its
starting point. Server-side optimiser state (FedAdam's and FedYogi's moments, FedAvgM's
momentum) is read and restored as plain tensors for checkpoints.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedbt.config import FederatedConfig

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedavgm": FedAvgM}
# The metric each reply carries for weighting the average (Flower's default key).
WEIGHT_KEY = "num-examples"


def make_strategy(fc: FederatedConfig) -> FedAvg:
    if fc.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {fc.strategy!r}: choose from {', '.join(STRATEGIES)}")
    base = STRATEGIES[fc.strategy]
    kwargs: dict = {"weighted_by_key": WEIGHT_KEY}
    if base is FedProx:
        kwargs["proximal_mu"] = fc.proximal_mu
    elif base in (FedAdam, FedYogi):
        kwargs.update(eta=fc.server_lr, eta_l=0.0)
    elif base is FedAvgM:
        kwargs.update(server_learning_rate=fc.server_lr, server_momentum=fc.server_momentum)
    return base(**kwargs)


def aggregate(strategy: FedAvg, server_round: int, global_state: dict, replies: list[Message]) -> dict:
    """The new global model (a torch state dict) from the replies, by the strategy's arithmetic."""
    _set_current_model(strategy, global_state)
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {key: value.to(global_state[key].dtype) for key, value in arrays.to_torch_state_dict().items()}


def _set_current_model(strategy: FedAvg, global_state: dict) -> None:
    """Server optimisers step from the server's own float32 model, never from a wire copy."""
    if isinstance(strategy, (FedAdam, FedYogi)):
        strategy.current_arrays = {k: v.detach().cpu().numpy() for k, v in global_state.items()}
    elif isinstance(strategy, FedAvgM):
        strategy.current_arrays = ArrayRecord(torch_state_dict=global_state)


def server_optimizer_state(strategy: FedAvg, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The strategy's moments or momentum as {name: {parameter key: tensor}} (empty for FedAvg)."""
    state = {}
    for name in ("m_t", "v_t"):
        if isinstance(strategy, (FedAdam, FedYogi)) and getattr(strategy, name):
            state[name] = {k: torch.from_numpy(np.array(v)) for k, v in getattr(strategy, name).items()}
    if isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
        state["momentum_vector"] = {k: torch.from_numpy(np.array(v)) for k, v in zip(keys, strategy.momentum_vector)}
    return state


def restore_server_optimizer_state(strategy: FedAvg, state: dict[str, dict[str, torch.Tensor]]) -> None:
    for name, tensors in state.items():
        if name == "momentum_vector":
            strategy.momentum_vector = [t.numpy() for t in tensors.values()]
        else:
            setattr(strategy, name, {k: t.numpy() for k, t in tensors.items()})


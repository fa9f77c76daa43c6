"""Flower strategies chosen by config, extended to keep what Flower keeps only in aggregate.

``tracked(cls)`` subclasses any Flower strategy so that it
- records every site's own evaluation metrics each round (Flower keeps only the weighted mean),
- records every site's training metrics,
- numbers rounds after a resume from the checkpointed round, so LR schedules continue,
- asks the sites to score the global model only every `evaluate_every` rounds,
- sends the global model in the transport precision and aggregates in float32.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from fedbt.config import FederatedConfig
from fedbt.federated.grid import SitesMissingError
from fedbt.federated.task import TRANSPORT_DTYPES, transport_state

STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi, "fedavgm": FedAvgM}
# Server-side optimiser state worth checkpointing, by attribute name.
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


class RoundTracker:
    """Mixin: per-site metrics of every round, round numbering that survives a resume."""

    round_offset = 0

    def _init_tracking(self, fc: FederatedConfig, round_offset: int) -> None:
        self.site_train: dict[int, dict[str, dict]] = {}
        self.site_eval: dict[int, dict[str, dict]] = {}
        self.round_offset = round_offset
        self.total_rounds = fc.rounds
        self.evaluate_every = fc.evaluate_every
        self.transport_dtype = fc.transport_dtype

    def evaluation_due(self, absolute_round: int) -> bool:
        return absolute_round % self.evaluate_every == 0 or absolute_round >= self.total_rounds

    def _on_the_wire(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.transport_dtype == "float32":  # the server's own precision: nothing to convert
            return arrays
        return ArrayRecord(torch_state_dict=transport_state(arrays.to_torch_state_dict(), self.transport_dtype))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        return super().configure_train(server_round + self.round_offset, self._on_the_wire(arrays), config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if not self.evaluation_due(server_round + self.round_offset):
            return []
        return super().configure_evaluate(server_round, self._on_the_wire(arrays), config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        answered = [m for m in replies if not m.has_error()]
        absolute_round = server_round + self.round_offset
        if len(answered) < self.min_train_nodes:
            # A site dropped or timed out: averaging fewer sites than agreed would silently change the experiment.
            raise SitesMissingError(
                f"round {absolute_round}: only {len(answered)} of the required {self.min_train_nodes} sites "
                "returned a model within the round timeout; stopping the run"
            )
        self.site_train[absolute_round] = {m.content["site"]["name"]: dict(m.content["metrics"]) for m in answered}
        if self.transport_dtype != "float32":
            for m in answered:
                # The server's copy (and FedAdam's or FedAvgM's arithmetic on it) stays float32.
                m.content["arrays"] = ArrayRecord(
                    torch_state_dict=transport_state(m.content["arrays"].to_torch_state_dict(), "float32")
                )
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        if not replies:  # not an evaluation round
            return None
        self.site_eval[server_round + self.round_offset] = {
            m.content["site"]["name"]: json.loads(str(m.content["site"]["metrics-json"]))
            for m in replies
            if not m.has_error()
        }
        return super().aggregate_evaluate(server_round, replies)

    def optimizer_state(self) -> dict:
        return {k: getattr(self, k) for k in STATE_ATTRIBUTES if getattr(self, k, None) is not None}

    def restore_optimizer_state(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def make_strategy(fc: FederatedConfig, num_clients: int, round_offset: int = 0):
    if fc.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {fc.strategy!r}: choose from {', '.join(STRATEGIES)}")
    base = STRATEGIES[fc.strategy]
    minimum = fc.min_clients or num_clients
    if minimum > num_clients:
        raise ValueError(f"min_clients {minimum} is more than the {num_clients} clients")
    if fc.evaluate_every < 1:
        raise ValueError(f"evaluate_every must be at least 1, not {fc.evaluate_every}")
    if fc.transport_dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"unknown transport_dtype {fc.transport_dtype!r}: choose {' or '.join(TRANSPORT_DTYPES)}")
    # Explicit minimums: Flower's defaults would otherwise wait for nodes that never come.
    kwargs = dict(
        fraction_train=fc.fraction_train,
        fraction_evaluate=1.0,
        min_train_nodes=max(1, min(minimum, round(fc.fraction_train * num_clients))),
        min_evaluate_nodes=minimum,
        min_available_nodes=minimum,
    )
    if base is FedProx:
        kwargs["proximal_mu"] = fc.proximal_mu
    elif base in (FedAdam, FedYogi):
        kwargs.update(eta=fc.server_lr, eta_l=0.0)
    elif base is FedAvgM:
        kwargs.update(server_learning_rate=fc.server_lr, server_momentum=fc.server_momentum)
    tracked = type(f"Tracked{base.__name__}", (RoundTracker, base), {})
    strategy = tracked(**kwargs)
    strategy._init_tracking(fc, round_offset)
    return strategy

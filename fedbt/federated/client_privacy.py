"""Client-level differential privacy: Flower's server-side fixed-clipping wrapper around the average.

Each site's update (its trained model minus the global model) is clipped to `clipping_norm`,
the clipped updates are averaged with equal weights, and Gaussian noise of standard deviation
noise_multiplier x clipping_norm / n is added to the average of the n updates: Flower's
`DifferentialPrivacyServerSideFixedClipping`, arithmetic and noise. Equal weights because the
noise is calibrated to them: one site moves the average by at most clipping_norm / n, whatever
its number of images.

Only the trainable parameters go through the wrapper. BatchNorm's running statistics and its
integer batch counters are no weights a gradient moves, and scaling or noising a counter makes
no sense, so they are averaged as they are, outside the privacy guarantee (a model with
model.norm=group has neither).

Flower 1.41's wrappers account for the spent privacy only through the `dp-accounting` package
(not a dependency of fedbt) and then without the amplification that asking only a share of the
sites gives; the epsilon here comes from Opacus's RDP accountant instead: one sampled Gaussian
release per round, at sampling rate = the share of the sites asked to train.
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from opacus.accountants import RDPAccountant

from fedbt.config import ClientPrivacyConfig
from fedbt.federated.flower_internals import server_clipping_problem, set_clipping_round

# The metric every update is weighted by under client-level DP: 1 for each site.
EQUAL_WEIGHT_KEY = "equal-weight"


def clipping_strategy(strategy: FedAvg, settings: ClientPrivacyConfig) -> DifferentialPrivacyServerSideFixedClipping:
    """`strategy` (which weighs by EQUAL_WEIGHT_KEY) behind Flower's clipping and noise."""
    if problem := server_clipping_problem():
        raise ValueError(f"privacy.client_level cannot run on this Flower: {problem}")
    # The number of updates is set every round, to the number of sites actually averaged.
    return DifferentialPrivacyServerSideFixedClipping(
        strategy, settings.noise_multiplier, settings.clipping_norm, num_sampled_clients=1
    )


def equal_weight_reply(reply: Message, arrays: dict[str, torch.Tensor]) -> Message:
    """A copy of a site's reply carrying only `arrays` and the equal weight (the original is left as it is)."""
    weight = MetricRecord({EQUAL_WEIGHT_KEY: 1})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "metrics": weight})
    return Message(content=content, metadata=reply.metadata)


def private_aggregate(
    wrapper: DifferentialPrivacyServerSideFixedClipping,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    replies: list[Message],
    parameter_keys: set[str],
) -> dict[str, torch.Tensor]:
    """The new global state: trainable parameters clipped, averaged and noised; buffers averaged as they are."""
    states = [reply.content["arrays"].to_torch_state_dict() for reply in replies]
    parameters = [key for key in global_state if key in parameter_keys]
    buffers = [key for key in global_state if key not in parameter_keys]
    set_clipping_round(wrapper, ArrayRecord(torch_state_dict={k: global_state[k] for k in parameters}), len(replies))
    private = [equal_weight_reply(r, {k: s[k] for k in parameters}) for r, s in zip(replies, states)]
    arrays, _ = wrapper.aggregate_train(server_round, private)
    new_state = arrays.to_torch_state_dict()
    if buffers:
        plain = [equal_weight_reply(r, {k: s[k] for k in buffers}) for r, s in zip(replies, states)]
        arrays, _ = wrapper.strategy.aggregate_train(server_round, plain)
        new_state.update(arrays.to_torch_state_dict())
    return {key: new_state[key].to(value.dtype) for key, value in global_state.items()}


def client_level_epsilon(settings: ClientPrivacyConfig, sample_rate: float, releases: int) -> float:
    """The epsilon (at settings.delta) of `releases` noised averages, each of a `sample_rate` share of the sites."""
    if settings.noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(settings.noise_multiplier, sample_rate, releases)]
    return float(accountant.get_epsilon(settings.delta))

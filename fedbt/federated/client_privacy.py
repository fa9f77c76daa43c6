"""Client-level differential privacy: Flower's fixed-clipping wrappers around the average.

Each site's update (its trained model minus the global model) is clipped to `clipping_norm`,
the clipped updates are averaged with equal weights, and Gaussian noise of standard deviation
noise_multiplier x clipping_norm / n is added to the average of the n updates: Flower's
`DifferentialPrivacyServerSideFixedClipping` (the server clips), or
`DifferentialPrivacyClientSideFixedClipping` with Flower's `fixedclipping_mod` run by each site
on its own update before it is sent. Equal weights because the noise is calibrated to them: one
site moves the average by at most clipping_norm / n, whatever its number of images.

Only the trainable parameters are clipped and noised. BatchNorm's running statistics and its
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
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
)
from opacus.accountants import RDPAccountant

from fedbt.config import ClientPrivacyConfig
from fedbt.federated.flower_internals import CLIPPING_NORM_KEY, clipping_problem, set_clipping_round

# The metric every update is weighted by under client-level DP: 1 for each site.
EQUAL_WEIGHT_KEY = "equal-weight"
CLIPPING_WRAPPERS = {
    "server": DifferentialPrivacyServerSideFixedClipping,
    "client": DifferentialPrivacyClientSideFixedClipping,
}
ClippingWrapper = DifferentialPrivacyServerSideFixedClipping | DifferentialPrivacyClientSideFixedClipping


def clipping_strategy(strategy: FedAvg, settings: ClientPrivacyConfig) -> ClippingWrapper:
    """`strategy` (which weighs by EQUAL_WEIGHT_KEY) behind Flower's clipping and noise."""
    if problem := clipping_problem():
        raise ValueError(f"privacy.client_level cannot run on this Flower: {problem}")
    # The number of updates is set every round, to the number of sites actually averaged.
    return CLIPPING_WRAPPERS[settings.clipped_at](
        strategy, settings.noise_multiplier, settings.clipping_norm, num_sampled_clients=1
    )


def train_config(settings: ClientPrivacyConfig) -> dict[str, float]:
    """What a train message carries for the sites to clip their own update (as the client-side wrapper sends it)."""
    if settings.enabled and settings.clipped_at == "client":
        return {CLIPPING_NORM_KEY.get(): settings.clipping_norm}
    return {}


def clipped_at_site(
    msg: Message, context: Context, trained: dict[str, torch.Tensor], parameter_keys: set[str]
) -> dict[str, torch.Tensor]:
    """A site's trained state with its parameters' update clipped by Flower's `fixedclipping_mod`
    against the global model in `msg`; BatchNorm buffers and counters stay as trained."""
    sent = msg.content["arrays"].to_torch_state_dict()
    keys = [key for key in sent if key in parameter_keys]
    # The mod sees the parameters only, as if the server had sent and the site trained nothing else.
    content = RecordDict(
        {"arrays": ArrayRecord(torch_state_dict={k: sent[k] for k in keys}), "config": msg.content["config"]}
    )
    parameters_only = Message(content=content, metadata=msg.metadata)

    def trained_parameters(message: Message, _: Context) -> Message:
        arrays = ArrayRecord(torch_state_dict={k: trained[k].to(sent[k].dtype) for k in keys})
        return Message(content=RecordDict({"arrays": arrays}), reply_to=message)

    clipped = fixedclipping_mod(parameters_only, context, trained_parameters)
    if clipped.has_error():
        raise RuntimeError(f"fixedclipping_mod refused the update: {clipped.error.reason}")
    return {**trained, **clipped.content["arrays"].to_torch_state_dict()}


def equal_weight_reply(reply: Message, arrays: dict[str, torch.Tensor]) -> Message:
    """A copy of a site's reply carrying only `arrays` and the equal weight (the original is left as it is)."""
    weight = MetricRecord({EQUAL_WEIGHT_KEY: 1})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=arrays), "metrics": weight})
    return Message(content=content, metadata=reply.metadata)


def private_aggregate(
    wrapper: ClippingWrapper,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    replies: list[Message],
    parameter_keys: set[str],
) -> dict[str, torch.Tensor]:
    """The new global state: trainable parameters clipped (here or at the sites), averaged and noised;
    buffers averaged as they are."""
    states = [reply.content["arrays"].to_torch_state_dict() for reply in replies]
    parameters = [key for key in global_state if key in parameter_keys]
    buffers = [key for key in global_state if key not in parameter_keys]
    clipped_here = isinstance(wrapper, DifferentialPrivacyServerSideFixedClipping)
    reference = ArrayRecord(torch_state_dict={k: global_state[k] for k in parameters}) if clipped_here else None
    set_clipping_round(wrapper, len(replies), reference)
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

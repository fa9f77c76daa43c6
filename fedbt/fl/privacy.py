"""Client-level differential privacy outside the server's aggregation: the site's own clipping,
and the privacy the noised rounds spend.

Flower's DP wrappers account for the spent privacy only through the `dp-accounting` package and
then without the amplification that asking only a share of the sites gives; the epsilon here
comes from Opacus's RDP accountant: one sampled Gaussian release per round, at sampling rate =
the share of the sites asked to train.
"""

from __future__ import annotations

import math

from opacus.accountants import RDPAccountant

from fedbt.config import ClientPrivacyConfig
from fedbt.fl.protocol import CLIPPING_NORM_KEY, TensorGroup
from fedbt.fl.strategies import clipped


def train_config(settings: ClientPrivacyConfig) -> dict[str, float]:
    """What a train request carries for the sites to clip their own update."""
    if settings.enabled and settings.clipped_at == "client":
        return {CLIPPING_NORM_KEY: settings.clipping_norm}
    return {}


def clipped_at_site(
    trained: TensorGroup, sent: TensorGroup, parameter_keys: set[str], clipping_norm: float
) -> TensorGroup:
    """A site's trained state whose parameters' update (against the model it was sent) is clipped to
    `clipping_norm`, so that no unclipped update leaves the site; BatchNorm buffers stay as trained."""
    keys = [key for key in sent if key in parameter_keys]
    update = {key: trained[key].float() - sent[key].float() for key in keys}
    clipped_update = clipped(update, clipping_norm)
    return {**trained, **{key: (sent[key].float() + clipped_update[key]).to(trained[key].dtype) for key in keys}}


def client_level_epsilon(settings: ClientPrivacyConfig, sample_rate: float, releases: int) -> float:
    """The epsilon (at settings.delta) of `releases` noised averages, each of a `sample_rate` share of the sites."""
    if settings.noise_multiplier == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(settings.noise_multiplier, sample_rate, releases)]
    return float(accountant.get_epsilon(settings.delta))

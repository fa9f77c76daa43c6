"""What the server and a site say to each other, as plain Python: a Request and its Reply.

Each is a few named groups of tensors (a model, a control variate, a site's score sums) and
a few flat dicts of numbers and strings. The Flower adapters carry every tensor group as an
ArrayRecord under its name and the dicts as Config/Metric records, so the names below are
also the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names alone: the SuperNode and the server's control processes import them without torch
    import torch

TensorGroup = dict[str, "torch.Tensor"]
Scalar = int | float | str | bool

TRAIN, EVALUATE = "train", "evaluate"

# Tensor groups. A request: the global model (MODEL) and, under SCAFFOLD, the server's control
# variate c (CONTROL). A reply: the site's model (MODEL), its change of its own c_i
# (CONTROL_DELTA), its validation losses at every calibration temperature (TEMPERATURE_LOSSES),
# its test scoring's counts and histograms (TEST_AGGREGATES): never a value of one image.
# Under personalisation, a final reply also holds the personalised model's test scoring, in the
# same aggregates (PERSONALISED_AGGREGATES).
MODEL, CONTROL, CONTROL_DELTA = "arrays", "control", "control-delta"
TEMPERATURE_LOSSES, TEST_AGGREGATES = "temperature-losses", "test-aggregates"
PERSONALISED_AGGREGATES = "personalised-test-aggregates"

# Request config keys. The server sends the experiment inside every request, so sites need no
# shared file: Ray workers or a hospital's SuperNode learn the run's settings from the server.
EXPERIMENT_KEY = "fedbt-experiment"
# The round a request belongs to (a site continues its LR curve and seeds from it).
ROUND_KEY = "server-round"
# Which split an evaluate request asks for: "val", or "test" once at the end of a deployment.
SPLIT_KEY = "split"
# A training request that asks the site to score the model it brings on its validation split
# before training on it: round r's global model is scored on round r+1's request, so the model
# crosses the wire once per round, not twice.
SCORE_FIRST_KEY = "score-first"
# The temperature a test scoring divides the logits by; 1 when not sent.
TEMPERATURE_KEY = "temperature"
# A final test request that asks the site to personalise the final model too (fedbt.train.personalise):
# the site keeps that model and answers with its scores only.
PERSONALISE_KEY = "personalise"
# SCAFFOLD: the last round whose reply from this site the server counted into c (0: none yet).
ACCEPTED_ROUND_KEY = "accepted-round"
# Client-level DP clipped at the sites: the norm each site clips its update to.
CLIPPING_NORM_KEY = "fedbt-clipping-norm"

# A hospital node's config names its own site file, data root and decode cache (`fedbt site`);
# a simulated site's names its partition instead.
NODE_SITE, NODE_DATA_ROOT, NODE_CACHE_DIR = "site", "data-root", "cache-dir"
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"

# Reply keys: the examples a site trained on (what FedAvg weighs it by), its name, and its
# validation metrics as JSON (they hold nested dicts).
EXAMPLES_KEY = "num-examples"
SITE_NAME_KEY, SITE_METRICS_KEY = "name", "metrics-json"
# The personalisation a site made, as JSON: which candidate it kept, each one's validation scores,
# its training images and time (numbers only; its test scores are in PERSONALISED_AGGREGATES).
PERSONALISED_KEY = "personalised-json"

# What the server learns when a site will not or cannot do what it asked: no exception text,
# which carries local paths and file names (the detail goes to the site's log).
REFUSED_CODE, FAILED_CODE, MALFORMED_CODE = 100, 101, 102
REFUSED_REASON = "refused by the site's policy (the reason is in the site's log)"
FAILED_REASON = "the site could not do this (the reason is in the site's log)"
# A site's guard refused to run a server-sent app: it would refuse every round.
RUN_REFUSED = "refused to run the app"


@dataclass
class Request:
    """What the server asks one site (node) to do in a round."""

    node: int
    kind: str  # TRAIN or EVALUATE
    round: int
    config: dict[str, Scalar] = field(default_factory=dict)
    tensors: dict[str, TensorGroup] = field(default_factory=dict)


@dataclass
class Reply:
    """A site's answer to a Request: content, or an error code and reason (then nothing else)."""

    node: int
    tensors: dict[str, TensorGroup] = field(default_factory=dict)
    metrics: dict[str, int | float] = field(default_factory=dict)
    site: dict[str, str] = field(default_factory=dict)
    error_code: int | None = None
    error_reason: str = ""

    @property
    def failed(self) -> bool:
        return self.error_code is not None

    @classmethod
    def error(cls, node: int, code: int, reason: str) -> Reply:
        return cls(node, error_code=code, error_reason=reason)

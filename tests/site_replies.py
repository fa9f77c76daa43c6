"""Site replies as the federated core's server receives them (fedbt.fl.protocol.Reply), without a site."""

import torch

from fedbt.fl.protocol import CONTROL_DELTA, EXAMPLES_KEY, MODEL, SITE_NAME_KEY, Reply


def train_reply(
    site: str,
    state: dict[str, torch.Tensor],
    examples: object,
    node: int = 1,
    control_delta: dict[str, torch.Tensor] | None = None,
) -> Reply:
    """A site's training reply; with `control_delta`, a SCAFFOLD site's change of its control variate."""
    tensors = {MODEL: state}
    if control_delta is not None:
        tensors[CONTROL_DELTA] = control_delta
    return Reply(node, tensors, {EXAMPLES_KEY: examples}, {SITE_NAME_KEY: site})

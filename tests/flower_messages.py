"""Site replies as the server receives them, built without a Flower run (explicit metadata)."""

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedbt.federated.common import CONTROL_DELTA_KEY


def reply(
    site: str,
    state: dict[str, torch.Tensor],
    examples: int,
    node: int = 1,
    reply_to: str = "sent",
    control_delta: dict[str, torch.Tensor] | None = None,
) -> Message:
    """A site's training reply; with `control_delta`, a SCAFFOLD site's change of its control variate."""
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord({"num-examples": examples}),
            "site": ConfigRecord({"name": site}),
        }
    )
    if control_delta is not None:
        content[CONTROL_DELTA_KEY] = ArrayRecord(torch_state_dict=control_delta)
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=0.0,
        ttl=60,
        message_type="train",
    )
    return Message(content, metadata=metadata)


def server_request(
    message_type: str, config: dict, arrays: ArrayRecord, node: int = 5, message_id: str = "sent"
) -> Message:
    """A message from the server as a site's ClientApp receives it."""
    metadata = Metadata(
        run_id=7,
        message_id=message_id,
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600,
        message_type=message_type,
    )
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), metadata=metadata)

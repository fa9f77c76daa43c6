"""Site replies as the server receives them, built without a Flower run (explicit metadata)."""

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from fedbt.federated.packing import CONFIG_RECORD, METRICS_RECORD, SITE_RECORD
from fedbt.fl.protocol import CONTROL_DELTA, EXAMPLES_KEY, MODEL, SITE_NAME_KEY


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
            MODEL: ArrayRecord(torch_state_dict=state),
            METRICS_RECORD: MetricRecord({EXAMPLES_KEY: examples}),
            SITE_RECORD: ConfigRecord({SITE_NAME_KEY: site}),
        }
    )
    if control_delta is not None:
        content[CONTROL_DELTA] = ArrayRecord(torch_state_dict=control_delta)
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
    return Message(RecordDict({MODEL: arrays, CONFIG_RECORD: ConfigRecord(config)}), metadata=metadata)


def in_a_server_app(monkeypatch, run_id: int = 7) -> None:
    """This process as Flower's ServerApp process: a Message addressed to a node takes its run and
    sender from the task identity Flower sets there (Message(..., dst_node_id=...) fails without it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in {"_run_id": run_id, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, field, value)

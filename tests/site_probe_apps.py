"""ServerApps a test ships in a bundle named fedbt at fedbt's version, in place of fedbt's own.

A site checks a run's app by name and version, then runs its own installed ClientApp; the
ServerApp is whatever the submitter put in the bundle. These two are what a curious or an
overreaching server could run:

- `recording`: fedbt's federated run as it is, keeping every reply the sites send (what the
  Grid pulls from the SuperLink: each site's message as it pushed it, its packed arrays cut back
  into the records they were packed from) in <out>/site-replies.json.
- `overreaching`: asks every site for what its policy keeps from a server (another data root,
  a second test scoring) and writes what each answered in <out>/answers.json.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedbt.data.labels import get_task
from fedbt.federated.packing import unpacked_reply
from fedbt.federated.server_app import GridTransport, experiment_from_context
from fedbt.fileio import write_json
from fedbt.fl.policy import settable_part
from fedbt.fl.protocol import EVALUATE, EXPERIMENT_KEY, MODEL, ROUND_KEY, SPLIT_KEY, Request
from fedbt.fl.server import run_federated
from fedbt.fl.transport import WallClock, send_and_collect, wait_for_sites
from fedbt.train.setup import new_model

REPLIES_FILE, ANSWERS_FILE = "site-replies.json", "answers.json"


def plain(value):
    """A record's value as JSON holds it; bytes as base64."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def record_dump(record) -> dict:
    if isinstance(record, ArrayRecord):
        # Array.data: the bytes that crossed the wire for this array.
        arrays = {key: {"shape": list(a.shape), "dtype": a.dtype, **plain(a.data)} for key, a in record.items()}
        return {"arrays": arrays}
    return {"values": {key: plain(value) for key, value in record.items()}}


def message_dump(message: Message) -> dict:
    dump = {"type": message.metadata.message_type, "node": message.metadata.src_node_id}
    if message.has_error():
        return {**dump, "error": {"code": message.error.code, "reason": message.error.reason}}
    return {**dump, "content": {name: record_dump(record) for name, record in message.content.items()}}


class RecordingGrid:
    """The run's Grid, keeping every reply it pulls, unpacked (its values, in the records they were packed from)."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.replies: list[Message] = []

    def __getattr__(self, name: str):
        return getattr(self.grid, name)

    def pull_messages(self, message_ids):
        received = list(self.grid.pull_messages(message_ids))
        self.replies.extend(unpacked_reply(message) for message in received)
        return received


recording = ServerApp()


@recording.main()
def record(grid: Grid, context: Context) -> None:
    cfg = experiment_from_context(context)
    recorder = RecordingGrid(grid)
    try:
        run_federated(GridTransport(recorder), cfg, server_has_data=cfg.data.data_root is not None)
    finally:
        write_json(Path(cfg.output_dir) / REPLIES_FILE, [message_dump(m) for m in recorder.replies])


# What the overreaching server asks every site, in this order: the split, and its change to the experiment.
OVERREACHES = {
    "another data root": ("val", {"data": {"data_root": "/elsewhere"}}),
    "a first test scoring": ("test", {}),
    "a second test scoring": ("test", {}),
}

overreaching = ServerApp()


@overreaching.main()
def overreach(grid: Grid, context: Context) -> None:
    cfg = experiment_from_context(context)
    fc, clock = cfg.federated, WallClock()
    recorder = RecordingGrid(grid)
    transport = GridTransport(recorder)
    nodes = wait_for_sites(transport, fc.num_clients, fc.round_timeout, fc.poll_interval, clock)
    model = new_model(cfg, get_task(cfg.data.task).num_classes).state_dict()
    answers = {}
    for asked, (split, change) in OVERREACHES.items():
        experiment = settable_part(cfg)
        for section, values in change.items():
            experiment.setdefault(section, {}).update(values)
        config = {ROUND_KEY: 1, EXPERIMENT_KEY: json.dumps(experiment), SPLIT_KEY: split}
        recorder.replies.clear()
        requests = [Request(node, EVALUATE, 1, config, {MODEL: model}) for node in nodes]
        send_and_collect(transport, requests, fc.round_timeout, fc.poll_interval, clock)
        answers[asked] = [message_dump(m) for m in recorder.replies]
    write_json(Path(cfg.output_dir) / ANSWERS_FILE, answers)

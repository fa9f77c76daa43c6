"""Flower ClientApp: a hospital site. Flower's Message in, the core's Request; the site's Reply out
(the site's work is fedbt.fl.site)."""

from __future__ import annotations

import io
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp

from fedbt.federated.packing import UNREADABLE, packing_mod, reply_message, request_of
from fedbt.fl.protocol import MALFORMED_CODE
from fedbt.fl.site import SiteContext, answer
from fedbt.progress import log

# packing_mod first, so it is outermost: the handlers see the request unpacked and the reply is
# packed after them (fedbt.federated.packing).
app = ClientApp(mods=[packing_mod])
STATE_PREFIX = "fedbt-"


class ContextStore:
    """A simulated site's state in the run's Flower context, which the simulation engine keeps
    in memory between the site's messages."""

    def __init__(self, context: Context):
        self.state = context.state

    def read(self, what: str, default: Any) -> Any:
        key = STATE_PREFIX + what
        if key not in self.state:
            return default
        return torch.load(io.BytesIO(self.state[key]["blob"]), weights_only=True)

    def write(self, what: str, value: Any) -> None:
        buffer = io.BytesIO()
        torch.save(value, buffer)
        self.state[STATE_PREFIX + what] = ConfigRecord({"blob": buffer.getvalue()})


def handle(msg: Message, context: Context) -> Message:
    try:
        request = request_of(msg)
    except UNREADABLE as err:
        reason = f"malformed request ({type(err).__name__}: {err})"
        log(f"[site] refused the server's {msg.metadata.message_type} request of run {msg.metadata.run_id}: {reason}")
        return Message(Error(MALFORMED_CODE, reason), reply_to=msg)
    site = SiteContext(context.node_config, context.run_id, ContextStore(context))
    return reply_message(answer(request, site), msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return handle(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return handle(msg, context)

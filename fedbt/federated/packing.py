"""The wire: the federated core's Requests and Replies as Flower Messages, their arrays packed.

A Request or Reply maps onto a Message one to one (`request_message`, `request_of`,
`reply_message`, `reply_of`): every tensor group is an ArrayRecord under its name, a request's
settings the ConfigRecord "config", a reply's numbers the MetricRecord "metrics" and its site
name and validation metrics the ConfigRecord "site"; a failed reply is a Flower Error. A reply
that cannot be read becomes a failed Reply that says why: the round treats it as a site that
did not answer.

Packing: a message's ArrayRecords cross the wire as one flat array per dtype.

Flower sends a message as a tree of objects, one HTTP request each, on every hop
(ServerApp to SuperLink, SuperLink to SuperNode and back). A ResNet18 state dict is about 210
objects, most of them small BatchNorm tensors, and in a deployment each request costs more in
HTTP framing, SQLite and TLS than its bytes do. Packed, the same model is about a dozen objects.

The packing sits at the transport boundary only: the server's GridTransport packs what it
sends and unpacks what it receives (fedbt.federated.server_app), and the ClientApp's outermost
mod (packing_mod) unpacks what arrives and packs what leaves, so no other code or mod sees a
packed record. A message is unpacked only
when it carries a layout, and a site packs its reply only when the request came packed:
handlers called with plain messages (tests, probe apps) work as before.

A layout is trusted no more than the weights it describes: unpacking checks it whole (unique
names, allowed dtypes, non-negative whole dimensions, sizes that add up to each flat array's
length exactly) before a tensor is cut out. A reply that fails becomes an error reply, which
the round treats as a site that did not answer; a site refuses a request that fails.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedbt.fl.protocol import EVALUATE, MALFORMED_CODE, ROUND_KEY, TRAIN, Reply, Request
from fedbt.progress import log

# The packed content: the flat arrays, keyed by dtype name, and the layout that cuts them back.
FLAT_KEY, LAYOUT_KEY = "fedbt-packed-arrays", "fedbt-packed-layout"
LAYOUT_FIELD = "layout"
# Every dtype a model, a control variate or a site's score sums can hold; object arrays never.
ALLOWED_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})
# A request's settings, a reply's numbers, a reply's site name and metrics.
CONFIG_RECORD, METRICS_RECORD, SITE_RECORD = "config", "metrics", "site"
MESSAGE_TYPES = {TRAIN: MessageType.TRAIN, EVALUATE: MessageType.EVALUATE}
# What reading a message that is not what it claims raises (numpy's EOFError: an array with no bytes).
UNREADABLE = (KeyError, TypeError, ValueError, EOFError)


class PackingError(ValueError):
    """A packed message whose layout and flat arrays do not fit together; the text says why."""


class TensorSpec(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]


def is_packed(message: Message) -> bool:
    return message.has_content() and LAYOUT_KEY in message.content


def pack_content(content: RecordDict) -> RecordDict:
    """`content` with its ArrayRecords replaced by one flat array per dtype and their layout;
    other records as they are."""
    packed, layout, pieces = RecordDict(), [], defaultdict(list)
    for key, record in content.items():
        if not isinstance(record, ArrayRecord):
            packed[key] = record
            continue
        specs = []
        for name, array in record.items():
            values = array.numpy()
            specs.append([name, values.dtype.name, list(values.shape)])
            pieces[values.dtype.name].append(values.ravel())
        layout.append([key, specs])
    packed[FLAT_KEY] = ArrayRecord({dtype: Array(np.concatenate(parts)) for dtype, parts in pieces.items()})
    packed[LAYOUT_KEY] = ConfigRecord({LAYOUT_FIELD: json.dumps(layout)})
    return packed


def unpack_content(content: RecordDict) -> RecordDict:
    """The content as it was before packing; PackingError when the layout and the flat arrays disagree."""
    layout = read_layout(content)
    sizes: dict[str, int] = defaultdict(int)
    for _, specs in layout:
        for spec in specs:
            sizes[spec.dtype] += math.prod(spec.shape)
    flat = flat_arrays(content, sizes)
    offsets = dict.fromkeys(flat, 0)
    unpacked = RecordDict({key: record for key, record in content.items() if key not in (FLAT_KEY, LAYOUT_KEY)})
    for key, specs in layout:
        unpacked[key] = ArrayRecord({spec.name: Array(cut(flat, offsets, spec)) for spec in specs})
    return unpacked


def cut(flat: dict[str, np.ndarray], offsets: dict[str, int], spec: TensorSpec) -> np.ndarray:
    """The next tensor of `spec`'s dtype from its flat array (the sizes were checked to add up)."""
    start, size = offsets[spec.dtype], math.prod(spec.shape)
    offsets[spec.dtype] = start + size
    try:
        return flat[spec.dtype][start : start + size].reshape(spec.shape)
    except ValueError as err:  # a zero-size tensor with a dimension beyond numpy's limits
        raise PackingError(f"tensor {spec.name!r} of shape {spec.shape}: {err}") from None


def read_layout(content: RecordDict) -> list[tuple[str, list[TensorSpec]]]:
    """The layout's records in order, each with its tensors; checked against the content's other keys."""
    record = content.get(LAYOUT_KEY)
    text = record.get(LAYOUT_FIELD) if isinstance(record, ConfigRecord) else None
    if not isinstance(text, str):
        raise PackingError("the layout is not a text field of a config record")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise PackingError(f"the layout is not JSON ({err})") from None
    if not isinstance(entries, list):
        raise PackingError("the layout is not a list of records")
    layout = [layout_entry(entry) for entry in entries]
    keys = [key for key, _ in layout]
    if duplicate := first_duplicate(keys):
        raise PackingError(f"the layout lists record {duplicate!r} twice")
    if clash := sorted(set(keys) & set(content.keys())):
        raise PackingError(f"the layout's record {clash[0]!r} is also sent unpacked")
    return layout


def layout_entry(entry: object) -> tuple[str, list[TensorSpec]]:
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)):
        raise PackingError(f"a layout record is not [name, tensors]: {str(entry)[:80]}")
    key, specs = entry[0], [tensor_spec(item) for item in entry[1]]
    if duplicate := first_duplicate([spec.name for spec in specs]):
        raise PackingError(f"record {key!r} lists tensor {duplicate!r} twice")
    return key, specs


def tensor_spec(item: object) -> TensorSpec:
    if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)):
        raise PackingError(f"a tensor is not [name, dtype, shape]: {str(item)[:80]}")
    name, dtype, shape = item
    if dtype not in ALLOWED_DTYPES:
        raise PackingError(f"tensor {name!r} has dtype {str(dtype)[:20]!r}, not one of {sorted(ALLOWED_DTYPES)}")
    # bool is an int to Python, never a dimension.
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise PackingError(f"tensor {name!r} has shape {str(shape)[:40]}, not a list of non-negative whole numbers")
    return TensorSpec(name, dtype, tuple(shape))


def first_duplicate(names: list[str]) -> str | None:
    seen = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def flat_arrays(content: RecordDict, sizes: dict[str, int]) -> dict[str, np.ndarray]:
    """The flat arrays, one for each dtype of the layout and no other, each exactly as long as its tensors."""
    record = content.get(FLAT_KEY)
    if not isinstance(record, ArrayRecord):
        raise PackingError("the packed arrays are missing")
    if set(record.keys()) != set(sizes):
        raise PackingError(f"the packed arrays are {sorted(record.keys())}, the layout's dtypes {sorted(sizes)}")
    return {dtype: flat_array(record[dtype], dtype, size) for dtype, size in sizes.items()}


def flat_array(array: Array, dtype: str, size: int) -> np.ndarray:
    expected = f"the layout's {dtype} tensors hold {size} values"
    # The declared dtype and shape first: they are read without decoding the bytes.
    if array.dtype != dtype or tuple(array.shape) != (size,):
        raise PackingError(f"the packed {dtype} array is {array.dtype} of shape {tuple(array.shape)}; {expected}")
    try:
        values = array.numpy()
    except (ValueError, TypeError, EOFError) as err:  # the bytes are not a plain .npy array
        raise PackingError(f"the packed {dtype} array does not decode ({err})") from None
    if values.dtype != np.dtype(dtype) or values.shape != (size,):
        raise PackingError(f"the packed {dtype} array decodes to {values.dtype} of shape {values.shape}; {expected}")
    return values


def packed(message: Message) -> Message:
    """The message with its arrays packed; as it is when it carries an error or no ArrayRecord."""
    if not message.has_content() or not message.content.array_records:
        return message
    return Message(content=pack_content(message.content), metadata=message.metadata)


def unpacked_reply(reply: Message) -> Message:
    """A site's reply as it was before packing; an error reply, logged, when it does not unpack."""
    if not is_packed(reply):
        return reply
    try:
        return Message(content=unpack_content(reply.content), metadata=reply.metadata)
    except PackingError as err:
        reason = f"malformed packed reply: {err}"
        log(f"[federated] the reply of node {reply.metadata.src_node_id} is not used: {reason}")
        return Message(Error(MALFORMED_CODE, reason), metadata=reply.metadata)


def packing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A ClientApp mod, to run outermost: unpacks a packed request before anything else sees it and
    packs the reply last. A request that does not unpack is refused with the reason."""
    if not is_packed(msg):
        return call_next(msg, context)
    try:
        request = Message(content=unpack_content(msg.content), metadata=msg.metadata)
    except PackingError as err:
        reason = f"malformed packed request: {err}"
        log(f"[site] refused the server's {msg.metadata.message_type} request of run {msg.metadata.run_id}: {reason}")
        return Message(Error(MALFORMED_CODE, reason), reply_to=msg)
    return packed(call_next(request, context))


def tensor_records(tensors: dict) -> RecordDict:
    return RecordDict({key: ArrayRecord(torch_state_dict=group) for key, group in tensors.items()})


def request_message(request: Request) -> Message:
    content = tensor_records(request.tensors)
    content[CONFIG_RECORD] = ConfigRecord(dict(request.config))
    message_type = MESSAGE_TYPES[request.kind]
    return Message(content, dst_node_id=request.node, message_type=message_type, group_id=str(request.round))


def request_of(message: Message) -> Request:
    """The Request a message carries (ValueError, KeyError or TypeError when it carries none)."""
    kinds = {value: key for key, value in MESSAGE_TYPES.items()}
    config = dict(message.content[CONFIG_RECORD])
    tensors = {key: record.to_torch_state_dict() for key, record in message.content.array_records.items()}
    node = message.metadata.dst_node_id
    return Request(node, kinds[message.metadata.message_type], int(config.get(ROUND_KEY, 0)), config, tensors)


def reply_message(reply: Reply, request: Message) -> Message:
    if reply.failed:
        return Message(Error(reply.error_code, reply.error_reason), reply_to=request)
    content = tensor_records(reply.tensors)
    if reply.metrics:
        content[METRICS_RECORD] = MetricRecord(dict(reply.metrics))
    content[SITE_RECORD] = ConfigRecord(dict(reply.site))
    return Message(content, reply_to=request)


def reply_of(message: Message) -> Reply:
    """The Reply a site's message carries; a failed Reply, logged, when it cannot be read."""
    node = message.metadata.src_node_id
    if message.has_error():
        return Reply.error(node, message.error.code, message.error.reason)
    content = message.content
    try:
        tensors = {key: record.to_torch_state_dict() for key, record in content.array_records.items()}
        metrics = dict(content[METRICS_RECORD]) if METRICS_RECORD in content else {}
        site = dict(content[SITE_RECORD]) if SITE_RECORD in content else {}
    except UNREADABLE as err:
        reason = f"malformed reply ({type(err).__name__}: {err})"
        log(f"[federated] the reply of node {node} is not used: {reason}")
        return Reply.error(node, MALFORMED_CODE, reason)
    return Reply(node, tensors, metrics, site)

"""Packed transport: a message's ArrayRecords cross the wire as one flat array per dtype.

Flower 1.41 sends a message as a tree of objects, one HTTP request each, on every hop
(ServerApp to SuperLink, SuperLink to SuperNode and back). A ResNet18 state dict is about 210
objects, most of them small BatchNorm tensors, and in a deployment each request costs more in
HTTP framing, SQLite and TLS than its bytes do. Packed, the same model is about a dozen objects.

The packing sits at the transport boundary only: the server's Grid is wrapped (PackingGrid)
and the ClientApp's outermost mod (packing_mod) unpacks what arrives and packs what leaves, so
no fedbt code, Flower strategy or other mod sees a packed record. A message is unpacked only
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
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid

if TYPE_CHECKING:
    # The types in Grid's own signatures, which Flower does not export: read by type checkers
    # only, so nothing at run time depends on where Flower keeps them.
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.supercore.run import Run

from fedbt.progress import log

# The packed content: the flat arrays, keyed by dtype name, and the layout that cuts them back.
FLAT_KEY, LAYOUT_KEY = "fedbt-packed-arrays", "fedbt-packed-layout"
LAYOUT_FIELD = "layout"
# Every dtype a model, a control variate or a site's score sums can hold; object arrays never.
ALLOWED_DTYPES = frozenset({"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool"})
# fedbt's error code for a packed message that does not unpack (after the ClientApp's 100 and 101).
MALFORMED_PACKING_CODE = 102


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
        return Message(Error(MALFORMED_PACKING_CODE, reason), metadata=reply.metadata)


class PackingGrid(Grid):
    """The run's Grid, packing the messages it sends and unpacking the replies it pulls; all else
    is the wrapped Grid's."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages([packed(message) for message in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [unpacked_reply(reply) for reply in self.grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = self.grid.send_and_receive([packed(message) for message in messages], timeout=timeout)
        return [unpacked_reply(reply) for reply in replies]


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
        return Message(Error(MALFORMED_PACKING_CODE, reason), reply_to=msg)
    return packed(call_next(request, context))

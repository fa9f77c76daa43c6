"""A site's replies stay with their messages when a ClientApp task's token expires after it replied.

Driven through the SuperNode's own state and Runtime API handlers, in the order a SuperNode,
its tasks and their heartbeats meet them: a task replies, the SuperNode sends that reply and
pulls the run's next message, another task starts on it, and the first task's token expires
while it is still pushing its output (its heartbeats starved under load).
"""

from __future__ import annotations

from datetime import timedelta

from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_to_proto
from flwr.proto.runtime_pb2 import PushAppMessagesRequest
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, TaskType
from flwr.supercore.date import now
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
from flwr.supernode.servicer.runtime import runtime_handlers

from fedbt.federated.flower_internals import reply_once_per_message

RUN = 7


def supernode_state(monkeypatch, patched: bool) -> InMemoryNodeState:
    """A SuperNode's state, as Flower's SuperNode process has it or as `fedbt site` patches it."""
    # Restored after the test: the patch replaces a handler and a method of Flower's class.
    monkeypatch.setattr(runtime_handlers, "push_messages", runtime_handlers.push_messages)
    monkeypatch.setattr(InMemoryNodeState, "_on_task_tokens_expired", InMemoryNodeState._on_task_tokens_expired)
    if patched:
        reply_once_per_message()
    return InMemoryNodeState(ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME).store())


def running_task(state: InMemoryNodeState):
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN, fab_hash="fab")
    state.claim_task(task_id)
    assert state.activate_task(task_id)
    return state.get_tasks(task_ids=[task_id])[0]


def message_pulled_by_a_task(state: InMemoryNodeState, name: str) -> Message:
    """A message from the server, stored by the SuperNode and pulled by a task (Runtime.PullMessages)."""
    metadata = Metadata(run_id=RUN, message_id=name, src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="1", created_at=now().timestamp(), ttl=600, message_type="train")  # fmt: skip
    state.store_message(Message(RecordDict({"config": ConfigRecord({"x": 1})}), metadata=metadata))
    (pulled,) = state.get_messages_legacy(run_ids=[RUN], is_reply=False, limit=1)
    state.record_message_processing_start(pulled.metadata.message_id)
    return pulled


def push_reply(state: InMemoryNodeState, task, message: Message) -> None:
    """The task's Runtime.PushMessages of its reply, as flwr-clientapp sends it."""
    reply = Message(RecordDict({"metrics": ConfigRecord({"done": 1})}), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    request = PushAppMessagesRequest(
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[get_object_tree(reply)],
    )
    assert runtime_handlers.push_messages(request, state, task).message_ids[0]


def send_replies(state: InMemoryNodeState) -> list[Message]:
    """What the SuperNode's loop sends the server next, and then forgets with the messages they answer."""
    replies = state.get_messages_legacy(is_reply=True)
    for reply in replies:
        state.delete_messages(message_ids=[reply.metadata.message_id, reply.metadata.reply_to_message_id])
    return replies


def expire(state: InMemoryNodeState, task) -> None:
    """The task's heartbeats are overdue: its token's lifetime ends now (Flower checks at its next state call)."""
    state.task_token_store[task.task_id].active_until = now() - timedelta(seconds=1)


def second_message_while_the_first_task_expires(state: InMemoryNodeState):
    """The first task replied and its reply was sent; the second task works on the run's next message
    when the first task's token expires (still pushing its output, its heartbeats starved).
    Returns the second task, its message and what the SuperNode sends then."""
    first = running_task(state)
    push_reply(state, first, message_pulled_by_a_task(state, "first"))
    assert [r.metadata.reply_to_message_id for r in send_replies(state)] == ["first"]
    second = running_task(state)
    second_message = message_pulled_by_a_task(state, "second")
    expire(state, first)
    return second, second_message, send_replies(state)


def test_flowers_supernode_answers_the_next_message_as_crashed_when_a_task_expires_after_its_reply(monkeypatch):
    # Why fedbt patches it: the second message is answered as crashed while its task works on; that
    # task's reply then answers a message already answered, and every later reply the one before it.
    _, _, sent = second_message_while_the_first_task_expires(supernode_state(monkeypatch, patched=False))
    assert [(r.metadata.reply_to_message_id, r.error.code) for r in sent] == [("second", ErrorCode.CLIENT_APP_CRASHED)]


def test_at_a_fedbt_site_a_task_expiring_after_its_reply_leaves_the_next_message_to_its_own_task(monkeypatch):
    state = supernode_state(monkeypatch, patched=True)
    second, second_message, sent = second_message_while_the_first_task_expires(state)
    assert sent == []
    push_reply(state, second, second_message)
    assert [r.metadata.reply_to_message_id for r in send_replies(state)] == ["second"]


def test_at_a_fedbt_site_a_task_expiring_before_its_reply_still_gets_a_crash_reply(monkeypatch):
    state = supernode_state(monkeypatch, patched=True)
    task = running_task(state)
    message_pulled_by_a_task(state, "only")
    expire(state, task)
    sent = send_replies(state)
    assert [(r.metadata.reply_to_message_id, r.error.code) for r in sent] == [("only", ErrorCode.CLIENT_APP_CRASHED)]

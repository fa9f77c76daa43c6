"""A site's replies stay with their messages when a ClientApp task's token expires late.

Driven through the SuperNode's own state and Runtime API handlers, in the order a SuperNode,
its tasks and their heartbeats meet them: a task's token expires (its heartbeats starved under
load) after it replied, while it is still pushing its output, or while its reply is still being
uploaded, and another task answers the run's next message.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
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
    monkeypatch.setattr(
        InMemoryNodeState, "store_message_and_object_tree", InMemoryNodeState.store_message_and_object_tree
    )
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


def push_reply(state: InMemoryNodeState, task, message: Message) -> bool:
    """The task's Runtime.PushMessages of its reply, as flwr-clientapp sends it; whether it was stored."""
    reply = Message(RecordDict({"metrics": ConfigRecord({"done": 1})}), reply_to=message)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    request = PushAppMessagesRequest(
        messages_list=[message_to_proto(remove_content_from_message(reply))],
        message_object_trees=[get_object_tree(reply)],
    )
    return runtime_handlers.push_messages(request, state, task).message_ids[0] != ""


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
    assert push_reply(state, first, message_pulled_by_a_task(state, "first"))
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
    assert push_reply(state, second, second_message)
    assert [r.metadata.reply_to_message_id for r in send_replies(state)] == ["second"]


def test_at_a_fedbt_site_a_task_expiring_before_its_reply_still_gets_a_crash_reply(monkeypatch):
    state = supernode_state(monkeypatch, patched=True)
    task = running_task(state)
    message_pulled_by_a_task(state, "only")
    expire(state, task)
    sent = send_replies(state)
    assert [(r.metadata.reply_to_message_id, r.error.code) for r in sent] == [("only", ErrorCode.CLIENT_APP_CRASHED)]


def answers(replies: list[Message]) -> list[tuple[str, int | None]]:
    """Each reply's message and error code (None: the task's own reply)."""
    return [(r.metadata.reply_to_message_id, r.error.code if r.has_error() else None) for r in replies]


def a_reply_landing_after_its_crash_reply(state: InMemoryNodeState, crash_reply_sent: bool):
    """A task's token expires while its reply to the run's first message is uploading (the push
    was admitted before): the SuperNode's next state call stores a crash reply, which it sends
    before the reply lands or with it. Then it pulls the run's next message and another task
    answers it. Returns whether the late reply was stored and what the SuperNode sends, in order."""
    first = running_task(state)
    first_message = message_pulled_by_a_task(state, "first")
    expire(state, first)
    state.get_tasks(task_ids=[first.task_id])  # any state call processes the expiry
    sent = send_replies(state) if crash_reply_sent else []
    stored = push_reply(state, first, first_message)  # the task authenticated before its token expired
    if not crash_reply_sent:
        sent += send_replies(state)
    second = running_task(state)
    second_message = message_pulled_by_a_task(state, "second")
    sent += send_replies(state)  # right after a pull the SuperNode sends any reply it holds
    assert push_reply(state, second, second_message)
    return stored, sent + send_replies(state)


@pytest.mark.parametrize("crash_reply_sent", [False, True], ids=["crash-reply-held", "crash-reply-sent"])
def test_flowers_supernode_stores_a_reply_landing_after_its_crash_reply(monkeypatch, crash_reply_sent):
    # Why fedbt patches it: the first message is answered twice; once the crash reply was sent, the
    # late one goes out after the next pull, in place of that message's reply.
    state = supernode_state(monkeypatch, patched=False)
    stored, sent = a_reply_landing_after_its_crash_reply(state, crash_reply_sent)
    assert stored
    assert answers(sent) == [("first", ErrorCode.CLIENT_APP_CRASHED), ("first", None), ("second", None)]


@pytest.mark.parametrize("crash_reply_sent", [False, True], ids=["crash-reply-held", "crash-reply-sent"])
def test_at_a_fedbt_site_a_reply_landing_after_its_crash_reply_is_not_stored(monkeypatch, crash_reply_sent):
    state = supernode_state(monkeypatch, patched=True)
    stored, sent = a_reply_landing_after_its_crash_reply(state, crash_reply_sent)
    assert answers(sent) == [("first", ErrorCode.CLIENT_APP_CRASHED), ("second", None)]
    assert not stored

"""Every private Flower name fedbt uses, declared in one registry and checked before use.

Flower's public API does not reach what fedbt tunes, so the tuned processes below call and
replace names inside flwr. Each such name is declared here (`declare`) with what this code
relies on: a function's parameters, a constant's type, a class's methods or fields. Code reaches
a name only through its declaration (`.get()`, `.replace()`), and `check_flower_internals()`
compares all declarations, and the flwr version they were read from, with the installed flwr
without changing anything. On any difference `fedbt site` refuses to start: its code guard (the
site runs only the ClientApp it installed) is one of these patches, and a site without it would
run whatever the server sends. `fedbt server` runs Flower's default processes instead (its
patches only change speed). tests/test_flower_internals.py shows, on stock Flower, the behaviour
each patch changes: the day a Flower release changes it, that test says which patch can go.

The tuned processes. With Flower's defaults every message a site receives costs a fresh
`flwr-clientapp` process that imports torch and the project again (about 5 s on a 2-core
machine), the SuperNode checks for messages every 3 s and for its ClientApp's reply every 0.5 s.
`fedbt site` instead starts the SuperNode with `--isolation process` and runs:

- `python -m fedbt.federated.flower_internals executor ...`: Flower's own SuperExec loop, whose
  executor starts each ClientApp task as a child of a forkserver, a fresh interpreter that
  imported torch and the ClientApp once. Each task still runs in its own process (as Flower
  isolates it) and inherits none of the loop's threads or connections; only the imports are
  shared. The ClientApp that runs is the one installed at the site, and only for a run of
  fedbt's own app at the site's version: any other run is refused (`installed_clientapp_loader`).
  The loop and the SuperNode share the SuperExec secret (`--superexec-auth-secret-file`, an
  owner-only file): without it another local account cannot acquire a task at the SuperNode's
  Runtime API, so it gets no task token, cannot run the site's task or push its output.
  `fedbt site --flower-defaults` runs this same executor, guard and secret included, with
  nothing preloaded (each task imports torch and fedbt afresh, as `flwr-clientapp` does) and
  under plain `flower-supernode --isolation process`.
- `python -m fedbt.federated.flower_internals supernode ...`: `flower-supernode` with its idle
  waits capped at `--poll-interval` seconds, its first retry of a model part the server is still
  uploading after that long too (Flower's: 1 s, then doubling), and heartbeats at the shortest
  interval a SuperLink accepts instead of 30 s (so a site that dies is marked offline, and can
  rejoin, after 20 s instead of a minute). Each message gets one reply: a task whose token
  expires after it replied (its heartbeats starved while it finishes) gets no "crashed" reply,
  which Flower would send in place of the run's next reply, shifting every later one
  (`RepliedTasks`); a reply still uploading when its task's token expires, which Flower would
  store after the crash reply with the same effect, is not stored (`storing_open_replies_only`).
  A run the server no longer runs (`flwr stop`) ends the site's unanswered tasks of it within
  seconds, not after their training (`StoppedRunWatcher`).
- `python -m fedbt.federated.flower_internals executor --task serverapp ...`, beside the SuperLink,
  which `fedbt server` starts with `--isolation process` and the SuperExec secret: the same loop and
  executor for the server's ServerApp tasks. Flower's own executor starts each as
  `flwr-serverapp ... --token TOKEN`, readable in `ps` by every local account; here a forkserver
  child receives the token through its pipe and starts Flower's `flwr-serverapp` with it in an
  owner-only file (`--token-file`), removed when the task ends. The ServerApp still runs in a fresh
  interpreter, as Flower's does: it is the submitted bundle's code, and a child of the forkserver
  would already hold fedbt's installed modules in place of the bundle's.
- `python -m fedbt.federated.flower_internals superlink ...`: `flower-superlink` whose run state
  (registered sites, runs, messages) stays in its SQLite `--database`, so a restarted server
  knows its sites, while the arrays of the messages live in memory. Flower would write every
  43 MB ResNet18 transfer into that SQLite file: it halved a round's overhead on loopback (49 s
  to 24 s). Weights in flight die with the server, as its run does.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import logging
import multiprocessing
import multiprocessing.forkserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from flwr.app import Error

from fedbt.fileio import atomic_write
from fedbt.fl.protocol import FAILED_CODE, RUN_REFUSED

# The flwr whose source the declarations below were read from: `fedbt site` refuses any other
# version (its code guard is checked against this one), `fedbt server` runs Flower's defaults.
FLOWER_VERSION = "1.42.0"


def parameter_problem(path: str, signature: inspect.Signature, relied_on: tuple[str, ...]) -> str | None:
    """A call by these parameter names still works if they all exist and no other one is required."""
    parameters = signature.parameters
    for name in relied_on:
        if name not in parameters:
            return f"{path}() has no parameter {name!r}"
    for name, parameter in parameters.items():
        variadic = parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        if name not in relied_on and parameter.default is parameter.empty and not variadic:
            return f"{path}() requires a parameter {name!r}"
    return None


@dataclass(frozen=True)
class Function:
    """A function called, wrapped or replaced: it takes `params` (by these names) and needs no other."""

    params: tuple[str, ...] = ()

    def problem(self, path: str, value: object) -> str | None:
        if not callable(value):
            return f"{path} is not a function"
        return parameter_problem(path, inspect.signature(value), self.params)


@dataclass(frozen=True)
class Constant:
    """A module-level constant read or replaced: a value of this type."""

    kind: type

    def problem(self, path: str, value: object) -> str | None:
        if not isinstance(value, self.kind):
            return f"{path} is {type(value).__name__}, not {self.kind.__name__}"
        return None


@dataclass(frozen=True)
class Module:
    """A module a Flower module imported, replaced in that module's namespace."""

    name: str

    def problem(self, path: str, value: object) -> str | None:
        if not isinstance(value, ModuleType) or value.__name__ != self.name:
            return f"{path} is not the {self.name} module"
        return None


@dataclass(frozen=True)
class Class:
    """A class: constructed with `params` (None: fedbt never constructs it), with these methods and dataclass fields."""

    params: tuple[str, ...] | None = None
    methods: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()

    def problem(self, path: str, value: object) -> str | None:
        if not inspect.isclass(value):
            return f"{path} is not a class"
        for method in self.methods:
            if not callable(getattr(value, method, None)):
                return f"{path} has no method {method!r}"
        fields = {field.name for field in dataclasses.fields(value)} if dataclasses.is_dataclass(value) else set()
        for field in self.fields:
            if field not in fields:
                return f"{path} has no field {field!r}"
        if self.params is not None:
            return parameter_problem(path, inspect.signature(value), self.params)
        return None


@dataclass(frozen=True)
class InstanceState:
    """A class whose instances keep their state in these attributes (made with no arguments, or by
    `make`), with these methods."""

    attributes: tuple[str, ...]
    make: Callable[[type], object] | None = None
    methods: tuple[str, ...] = ()

    def problem(self, path: str, value: object) -> str | None:
        if not inspect.isclass(value):
            return f"{path} is not a class"
        for method in self.methods:
            if not callable(getattr(value, method, None)):
                return f"{path} has no method {method!r}"
        instance = self.make(value) if self.make is not None else value()
        for attribute in self.attributes:
            if not hasattr(instance, attribute):
                return f"{path} objects have no attribute {attribute!r}"
        return None


Expected = Function | Constant | Module | Class | InstanceState


@dataclass(frozen=True)
class FlowerInternal:
    module: str
    name: str
    expected: Expected
    why: str  # what fedbt does with it

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}"

    def get(self):
        return getattr(importlib.import_module(self.module), self.name)

    def replace(self, value: object) -> None:
        setattr(importlib.import_module(self.module), self.name, value)

    def problem(self) -> str | None:
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            return f"no module {self.module}"
        if not hasattr(module, self.name):
            return f"{self.path} is missing"
        return self.expected.problem(self.path, getattr(module, self.name))


FLOWER_INTERNALS: list[FlowerInternal] = []


def declare(module: str, name: str, expected: Expected, why: str) -> FlowerInternal:
    """Register a private Flower name, so that `check_flower_internals` verifies it before any use."""
    internal = FlowerInternal(module, name, expected, why)
    FLOWER_INTERNALS.append(internal)
    return internal


def installed_flower_version() -> str:
    return importlib.metadata.version("flwr")


def check_flower_internals() -> list[str]:
    """What differs between the installed flwr and the declarations (empty: all match). Patches nothing."""
    installed = installed_flower_version()
    problems = [] if installed == FLOWER_VERSION else [f"flwr {installed} is installed"]
    for internal in FLOWER_INTERNALS:
        problem = internal.problem()
        if problem:
            problems.append(problem)
    return problems


# The SuperNode (`supernode`).
SUPERNODE_LOOP_TIME = declare(
    "flwr.supernode.start_client_internal",
    "time",
    Module("time"),
    "replaced by CappedSleep: the loop's only sleeps are its idle waits (3 s between pulls, 0.5 s for a reply)",
)
SUPERNODE_PULL_OBJECTS = declare(
    "flwr.supernode.start_client_internal",
    "pull_objects",
    Function(("object_ids", "pull_object_fn", "initial_backoff")),
    "wrapped with a shorter first retry: a message is pulled before the server has uploaded all its arrays",
)
ANNOUNCED_HEARTBEAT = declare(
    "flwr.supernode.fleet_http_connection",
    "HEARTBEAT_DEFAULT_INTERVAL",
    Constant(int),
    "replaced: the heartbeat interval a SuperNode announces to the SuperLink",
)
SENT_HEARTBEAT = declare(
    "flwr.supercore.heartbeat",
    "HEARTBEAT_DEFAULT_INTERVAL",
    Constant(int),
    "replaced: the interval the SuperNode's heartbeat sender keeps, and each ClientApp task's",
)
SHORTEST_HEARTBEAT = declare(
    "flwr.common.constant",
    "HEARTBEAT_MIN_INTERVAL",
    Constant(int),
    "read: the shortest heartbeat interval a SuperLink accepts (a node counts as online for two)",
)
SUPERNODE_REPLY_HANDLER = declare(
    "flwr.supernode.servicer.runtime.runtime_handlers",
    "push_messages",
    Function(("request", "state", "task")),
    "wrapped: notes which ClientApp tasks have stored their reply",
)


def _in_memory_node_state(state_class: type) -> object:
    # The object store logs its creation at DEBUG on Flower's logger; a check prints nothing of its own.
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    flower_logger.setLevel(logging.WARNING)
    try:
        return state_class(OBJECT_STORE_FACTORY.get()(IN_MEMORY_DATABASE.get()).store())
    finally:
        flower_logger.setLevel(level)


SUPERNODE_STATE = declare(
    "flwr.supernode.nodestate.in_memory_nodestate",
    "InMemoryNodeState",
    InstanceState(
        ("msg_store", "lock_msg_store", "_lock_object_push_sessions"),
        make=_in_memory_node_state,
        methods=(
            "_on_task_tokens_expired",
            "store_message_and_object_tree",
            "get_tasks",
            "finish_task",
            "get_messages_legacy",
            "_store_error_replies",
        ),
    ),
    "its _on_task_tokens_expired wrapped: a task whose token expired after it replied gets no crash reply; "
    "its store_message_and_object_tree (Runtime.PushMessages' only store) wrapped: a reply to a message "
    "already answered, or no longer held, is not stored; for that, its msg_store (the messages and "
    "replies it holds, by message id) read under both its locks, taken in Flower's order; "
    "called by StoppedRunWatcher: get_tasks (the tasks not finished), finish_task (ends one, its token "
    "revoked), get_messages_legacy (takes a run's messages no task has taken) and _store_error_replies "
    "(answers a run's taken messages, which the SuperNode's loop awaits)",
)
SUPERNODE_MESSAGE_ENTRY = declare(
    "flwr.supernode.nodestate.in_memory_nodestate",
    "MessageEntry",
    Class(fields=("message",)),
    "read: the message each of msg_store's values holds (answers_an_open_message)",
)
SUPERNODE_PULL_MESSAGE = declare(
    "flwr.supernode.start_client_internal",
    "_pull_and_store_message",
    Function(
        (
            "state",
            "object_store",
            "node_config",
            "receive",
            "get_run",
            "get_fab",
            "pull_object",
            "confirm_message_received",
            "trusted_entities",
        )
    ),
    "wrapped: hands the SuperNode's state and its Fleet connection's get_run, by keyword, to StoppedRunWatcher",
)
RUN_NOT_RUNNING = declare(
    "flwr.supercore.run",
    "RunNotRunningException",
    Class(),
    "caught: what the Fleet connection's get_run raises for a run the SuperLink no longer runs",
)
TASK_STATUS = declare(
    "flwr.common.constant",
    "Status",
    Class(),
    "read: PENDING, STARTING and RUNNING, a SuperNode task not finished",
)
TASK_SUB_STATUS = declare(
    "flwr.common.constant",
    "SubStatus",
    Class(),
    "read: STOPPED, how StoppedRunWatcher finishes a task",
)
FLOWER_SUPERNODE = declare(
    "flwr.supernode.cli.flower_supernode",
    "flower_supernode",
    Function(),
    "called: `flower-supernode`, run in the patched process",
)

# The SuperLink (`superlink`).
SUPERLINK_FACTORIES = declare(
    "flwr.superlink.main",
    "get_objectstore_linkstate_factories",
    Function(("database", "federation_manager")),
    "replaced: run state in the --database, message arrays in memory",
)
OBJECT_STORE_FACTORY = declare(
    "flwr.supercore.object_store",
    "ObjectStoreFactory",
    Class(params=("database",), methods=("store",)),
    "constructed: the in-memory object store",
)
LINK_STATE_FACTORY = declare(
    "flwr.server.superlink.linkstate",
    "LinkStateFactory",
    Class(params=("database", "federation_manager", "objectstore_factory"), methods=("state",)),
    "constructed: the run state in the --database",
)
IN_MEMORY_DATABASE = declare(
    "flwr.supercore.constant",
    "FLWR_IN_MEMORY_DB_NAME",
    Constant(str),
    "read: the database name of Flower's in-memory object store",
)
FLOWER_SUPERLINK = declare(
    "flwr.superlink.cli",
    "flower_superlink",
    Function(),
    "called: `flower-superlink`, run in the patched process",
)

# The SuperExec executor (`executor`).
GET_EXECUTOR = declare(
    "flwr.supercore.superexec.run_superexec",
    "get_executor",
    Function(("executor_type", "executor_config", "insecure", "root_certificates_path")),
    "replaced: the SuperExec loop takes its executor from it",
)
RUN_SUPEREXEC = declare(
    "flwr.supercore.superexec.run_superexec",
    "run_superexec",
    Function(
        ("runtime_api_address", "insecure", "root_certificates_path", "superexec_auth_secret", "parent_pid",
         "runtime_dependency_install")
    ),  # fmt: skip
    "called: Flower's SuperExec loop",
)
SUPEREXEC_POLL_ENV = declare(
    "flwr.supercore.superexec.run_superexec",
    "_TASK_POLL_INTERVAL_ENV",
    Constant(str),
    "read: the environment variable the SuperExec loop takes its poll interval from",
)
EXECUTOR = declare(
    "flwr.supercore.superexec.executor.types",
    "Executor",
    Class(methods=("get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close")),
    "implemented by ForkserverExecutor: what the loop calls on its executor",
)
TASK_TYPE = declare(
    "flwr.supercore.constant",
    "TaskType",
    Class(),
    "read: CLIENT_APP and SERVER_APP, the one kind of task each ForkserverExecutor asks for",
)
EXECUTION_SPEC = declare(
    "flwr.supercore.superexec.executor.types",
    "ExecutionSpec",
    Class(fields=("task_id", "runtime_api_address", "token", "insecure", "root_certificates_path", "parent_pid")),
    "read by ForkserverExecutor.launch: the task it starts",
)
LAUNCH_RESULT = declare(
    "flwr.supercore.superexec.executor.types",
    "LaunchResult",
    Class(methods=("accepted",)),
    "returned by a launch",
)
RUN_CLIENTAPP = declare(
    "flwr.supernode.runtime.run_clientapp",
    "run_clientapp",
    Function(("runtime_api_address", "token", "insecure", "certificates", "parent_pid", "runtime_dependency_install")),
    "called in each task: the body of `flwr-clientapp`",
)
CLIENTAPP_LOADER = declare(
    "flwr.supernode.runtime.run_clientapp",
    "get_load_client_app_fn",
    Function(("default_app_ref", "app_path", "multi_app")),
    "replaced in each task: the site's installed ClientApp for fedbt's own app, a refusal for any other",
)


class CappedSleep:
    """Stands in for the `time` module inside Flower's SuperNode loop: waits at most `cap` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


class RepliedTasks:
    """The ClientApp tasks that have stored their reply at this SuperNode, by task id.

    When a task's token expires (its heartbeats overdue), Flower replies "ClientApp stopped
    responding" to every message of its run that a task has pulled and not answered. A task
    that has already replied is then only finishing (pushing its output, starved of CPU), and
    the message it answered is gone: the crash reply would go to the run's next message, which
    another task is working on. That task's own reply then answers a message already answered,
    every later reply answers the message before it, and the last one of a run is never sent
    (the SuperNode pushes replies only after pulling a message). Such a task gets no crash reply.
    """

    def __init__(self):
        self._ids: set[int] = set()

    def has_replied(self, task_id: int) -> bool:
        return task_id in self._ids

    def noting_replies(self, flower_push_messages: Callable) -> Callable:
        def push_messages(request, state, task):
            response = flower_push_messages(request, state, task)
            if any(response.message_ids):  # stored: Flower answers "" for a reply it did not store
                self._ids.add(task.task_id)
            return response

        return push_messages

    def crash_replies_for_unanswered(self, flower_on_expired: Callable) -> Callable:
        def on_task_tokens_expired(state, tasks):
            unanswered = [task for task in tasks if task.task_id not in self._ids]
            self._ids.difference_update(task.task_id for task in tasks)
            flower_on_expired(state, unanswered)

        return on_task_tokens_expired


def answers_an_open_message(state, reply) -> bool:
    """Whether the SuperNode still holds the message this reply answers, answered by no other reply."""
    answered = reply.metadata.reply_to_message_id
    if answered not in state.msg_store:
        return False  # its reply was sent, and the message forgotten with it
    others = (entry.message for msg_id, entry in state.msg_store.items() if msg_id != reply.metadata.message_id)
    return all(other.metadata.reply_to_message_id != answered for other in others)


def storing_open_replies_only(flower_store: Callable) -> Callable:
    """A ClientApp's reply is stored only while its message is held and unanswered.

    A task whose token expires while its reply is still being uploaded (the request admitted
    before the expiry) has a crash reply stored for its message first. Flower then stores the
    real reply too: a second answer to that message or, once the crash reply was sent, an answer
    to a message that is gone, sent after the SuperNode's next pull in place of that message's
    reply, shifting every later one. Such a reply is not stored; Flower answers the task as for
    any reply it did not store (no message id, no objects to upload), and the task goes on.
    """

    def store_message_and_object_tree(state, message, *args, **kwargs):
        # The crash replies are stored under lock_msg_store (_store_error_replies): holding it
        # from the check to the store leaves exactly one reply per message. The push-session
        # lock first, as Flower's own store takes them (both reentrant).
        with state._lock_object_push_sessions, state.lock_msg_store:
            if not answers_an_open_message(state, message):
                return False, []  # Flower's "not stored"
            return flower_store(state, message, *args, **kwargs)

    return store_message_and_object_tree


def reply_once_per_message() -> RepliedTasks:
    """Patch this process's SuperNode so that each message gets one reply: an expired task that has
    replied gets no crash reply (RepliedTasks), a reply landing after its crash reply is not stored."""
    replied = RepliedTasks()
    SUPERNODE_REPLY_HANDLER.replace(replied.noting_replies(SUPERNODE_REPLY_HANDLER.get()))
    state_class = SUPERNODE_STATE.get()
    state_class._on_task_tokens_expired = replied.crash_replies_for_unanswered(state_class._on_task_tokens_expired)
    state_class.store_message_and_object_tree = storing_open_replies_only(state_class.store_message_and_object_tree)
    return replied


# How often a SuperNode holding an unanswered task asks the SuperLink whether its run still runs
# (one Fleet GetRun per such run): a stopped run's task ends within this and one task heartbeat.
RUN_CHECK_SECONDS = 5.0
RUN_ENDED = "the run is no longer running on the server"


def end_tasks_of_run(state, run_id: int, task_ids: list[int]) -> None:
    """Finish these tasks of a run the server no longer runs, and answer the run's open messages.

    Finishing a task revokes its token: the ClientApp's next heartbeat is refused, and Flower's own
    handling of that refusal interrupts the process (SIGINT), which ends as on Ctrl-C. The SuperNode's
    loop waits for a reply to the message it pulled: the run's messages no task has taken yet are taken
    here, and each taken, unanswered one gets an error reply, which the loop sends and the SuperLink
    refuses, as it would have refused the real one.
    """
    stopped = TASK_SUB_STATUS.get().STOPPED
    for task_id in task_ids:
        state.finish_task(task_id, stopped, RUN_ENDED)
    state.get_messages_legacy(run_ids=[run_id], is_reply=False)
    state._store_error_replies({run_id}, Error(FAILED_CODE, RUN_ENDED))
    # One write, so that Flower's log lines from the SuperNode's other threads cannot land inside it.
    sys.stderr.write(f"fedbt: site: run {run_id}: {RUN_ENDED}; its task here was stopped\n")
    sys.stderr.flush()


class StoppedRunWatcher:
    """Ends this SuperNode's tasks of runs the server no longer runs: `flwr stop`, an interrupted
    `fedbt run`, or a run that failed or finished without this site's reply.

    Flower's SuperNode asks about a run only when a message of a run it does not know arrives, and
    while a ClientApp trains its loop only waits for the reply: the task would train on for minutes,
    then its reply be refused. A thread asks instead, every `interval` seconds, about each run with
    an unfinished task that has not replied; a task that has replied is only finishing (its context,
    which the site's next message reads, is still to be stored) and is left alone.
    """

    def __init__(self, replied: RepliedTasks, interval: float = RUN_CHECK_SECONDS):
        self._replied = replied
        self._interval = interval
        self._thread: threading.Thread | None = None

    def watching(self, flower_pull_and_store: Callable) -> Callable:
        def pull_and_store_message(*, state, get_run, **kwargs):
            # The loop passes the same state and connection on every pull, for the SuperNode's lifetime.
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, args=(state, get_run), daemon=True)
                self._thread.start()
            return flower_pull_and_store(state=state, get_run=get_run, **kwargs)

        return pull_and_store_message

    def _watch(self, state, get_run: Callable) -> None:
        while True:
            time.sleep(self._interval)
            try:
                self.end_tasks_of_ended_runs(state, get_run)
            except Exception as err:  # the server out of reach past the connection's retries: ask again later
                print(f"fedbt: site: could not ask the server whether a run runs: {err}", file=sys.stderr, flush=True)

    def end_tasks_of_ended_runs(self, state, get_run: Callable) -> list[int]:
        """The runs whose tasks it ended: those with an unanswered task that the SuperLink no longer runs."""
        status = TASK_STATUS.get()
        unfinished = state.get_tasks(statuses=[status.PENDING, status.STARTING, status.RUNNING])
        unanswered = [task for task in unfinished if not self._replied.has_replied(task.task_id)]
        ended = []
        for run_id in sorted({task.run_id for task in unanswered}):
            try:
                get_run(run_id)
            except RUN_NOT_RUNNING.get():
                end_tasks_of_run(state, run_id, [task.task_id for task in unanswered if task.run_id == run_id])
                ended.append(run_id)
        return ended


def run_supernode(poll_interval: float, flower_args: list[str]) -> None:
    SUPERNODE_LOOP_TIME.replace(CappedSleep(poll_interval))
    SUPERNODE_PULL_OBJECTS.replace(functools.partial(SUPERNODE_PULL_OBJECTS.get(), initial_backoff=poll_interval))
    ANNOUNCED_HEARTBEAT.replace(SHORTEST_HEARTBEAT.get())
    SENT_HEARTBEAT.replace(SHORTEST_HEARTBEAT.get())
    watcher = StoppedRunWatcher(reply_once_per_message())
    SUPERNODE_PULL_MESSAGE.replace(watcher.watching(SUPERNODE_PULL_MESSAGE.get()))
    sys.argv = ["flower-supernode", *flower_args]
    FLOWER_SUPERNODE.get()()


def not_a_run_check(record: logging.LogRecord) -> bool:
    """Whether a SuperLink log line is other than the one it logs for each Fleet GetRun: a training
    site asks every RUN_CHECK_SECONDS (StoppedRunWatcher), which would flood the server's log."""
    return not str(record.msg).startswith("[Fleet.GetRun]")


def run_superlink(flower_args: list[str]) -> None:
    def state_on_disk_objects_in_memory(database: str, federation_manager):
        objects = OBJECT_STORE_FACTORY.get()(IN_MEMORY_DATABASE.get())
        return objects, LINK_STATE_FACTORY.get()(database, federation_manager, objects)

    SUPERLINK_FACTORIES.replace(state_on_disk_objects_in_memory)
    logging.getLogger("flwr").addFilter(not_a_run_check)
    sys.argv = ["flower-superlink", *flower_args]
    FLOWER_SUPERLINK.get()()


# The site's installed ClientApp, named as Flower names apps (module, attribute): this module
# sits below the app, which uses its declarations, so it loads the app by name, not by import.
INSTALLED_CLIENTAPP = ("fedbt.federated.client_app", "app")
# Imported once by the forkserver, before any task: what each `flwr-clientapp` would import afresh.
TASK_PRELOAD = [INSTALLED_CLIENTAPP[0], RUN_CLIENTAPP.module]
# The app id a run of fedbt carries: pyproject.toml's [tool.flwr.app] publisher, then its [project] name.
FEDBT_APP_ID = "fedbt/fedbt"
# What the server reads in a site's error reply when the site would not run the submitted app;
# no part of the reply a site's policy refusal gives (client_app.REFUSED_REASON), which fails a request, not the run.


class RunRefused(Exception):
    """The run's app is not the fedbt installed at this site."""


def app_refusal(fab_id: str, fab_version: str) -> str | None:
    """Why this site will not run a run's app (None: it is the installed fedbt, name and version)."""
    installed = f"{FEDBT_APP_ID} {importlib.metadata.version('fedbt')}"
    submitted = f"{fab_id} {fab_version}"
    if submitted == installed:
        return None
    return f"the run's app {submitted!r} is not this site's installed {installed!r}"


def installed_clientapp_loader(default_app_ref: str, app_path, multi_app: bool):
    """Stands in for Flower's loader, which imports the ClientApp the submitted bundle names with the
    bundle first on sys.path: whatever a run carries, a site runs its own installed code or nothing."""

    def load(fab_id: str, fab_version: str, fab_hash: str):
        problem = app_refusal(fab_id, fab_version)
        if problem:
            print(f"fedbt: site: {RUN_REFUSED}: {problem}", file=sys.stderr, flush=True)
            # The server learns that the site refused, not what it has installed.
            raise RunRefused(f"{RUN_REFUSED}: it runs only its installed fedbt")
        module, attribute = INSTALLED_CLIENTAPP
        return getattr(importlib.import_module(module), attribute)

    return load


def run_clientapp_task(spec) -> None:
    """One ClientApp task, in a forkserver child: what `flwr-clientapp` does, without its imports."""
    certificates = None
    if not spec.insecure and spec.root_certificates_path:
        certificates = Path(spec.root_certificates_path).read_bytes()
    CLIENTAPP_LOADER.replace(installed_clientapp_loader)
    # A task learns at its next heartbeat that the SuperNode ended it (StoppedRunWatcher): every 4 s, not 20.
    SENT_HEARTBEAT.replace(SHORTEST_HEARTBEAT.get())
    # Ends in sys.exit with the task's exit code, which becomes this process's.
    RUN_CLIENTAPP.get()(
        runtime_api_address=spec.runtime_api_address,
        token=spec.token,
        insecure=spec.insecure,
        certificates=certificates,
        parent_pid=spec.parent_pid,
        runtime_dependency_install=False,
    )


def run_serverapp_task(spec) -> None:
    """One ServerApp task, in a forkserver child: Flower's `flwr-serverapp`, its token in an owner-only file."""
    with tempfile.TemporaryDirectory(prefix="fedbt-serverapp-") as folder:  # made 0700
        token_file = atomic_write(Path(folder) / "token", lambda fh: fh.write(spec.token.encode()), private=True)
        command = [
            str(Path(sys.executable).with_name("flwr-serverapp")),
            "--runtime-api-address", spec.runtime_api_address,
            "--token-file", str(token_file),
            "--parent-pid", str(spec.parent_pid),
        ]  # fmt: skip
        command += ["--insecure"] if spec.insecure else ["--root-certificates", spec.root_certificates_path]
        returncode = subprocess.run(command).returncode
    sys.exit(returncode)


# What an executor runs for each kind of task (`executor --task`): the task's function, its TaskType member.
TASKS = {"clientapp": (run_clientapp_task, "CLIENT_APP"), "serverapp": (run_serverapp_task, "SERVER_APP")}


class ForkserverExecutor:
    """A SuperExec executor that starts each task of one kind as a forkserver child, its token sent
    through the child's pipe, never on a command line (Flower's executor starts `flwr-clientapp` or
    `flwr-serverapp` with `--token TOKEN`).

    A plain fork of the SuperExec process would copy its threads and its open connection to the
    SuperNode into every task; the forkserver holds neither. `preload`: what the forkserver
    imports once for every task (TASK_PRELOAD; nothing: each task imports afresh). `task`: a key of TASKS.
    """

    def __init__(self, preload: list[str], task: str = "clientapp"):
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(preload)
        self._run_task, task_type = TASKS[task]
        self._task_type = getattr(TASK_TYPE.get(), task_type)
        self._tasks: set[multiprocessing.process.BaseProcess] = set()

    def start(self) -> None:
        """Start the forkserver now, so it imports while the site waits for its first message."""
        multiprocessing.forkserver.ensure_running()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return supported_task_types & {self._task_type}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        task = self._context.Process(target=self._run_task, args=(spec,), name=f"task {spec.task_id}")
        task.start()
        self._tasks.add(task)
        return LAUNCH_RESULT.get().accepted()

    def reconcile(self) -> None:
        """Let go of finished tasks (called once per SuperExec loop)."""
        for task in [task for task in self._tasks if not task.is_alive()]:
            task.close()  # its pipe from the forkserver
            self._tasks.discard(task)

    def close(self) -> None:
        for task in self._tasks:
            task.terminate()


def superexec_secret(secret_file: Path) -> bytes:
    """The SuperExec secret the SuperNode was given (read as Flower reads it: the file's bytes)."""
    secret = secret_file.read_bytes()
    if not secret:
        raise SystemExit(f"fedbt: error: the SuperExec secret file {secret_file} is empty")
    return secret


def run_executor(args: argparse.Namespace) -> None:
    problems = check_flower_internals()
    if problems:  # `fedbt site` and `fedbt server` checked already; this process is the one that starts tasks
        raise SystemExit(f"fedbt: error: the executor's Flower internals cannot be checked ({problems[0]})")
    # A site's tasks preload its installed ClientApp; a ServerApp is the run's bundle, imported by its own process.
    preload = TASK_PRELOAD if args.task == "clientapp" and not args.no_preload else []
    executor = ForkserverExecutor(preload, args.task)
    executor.start()
    # Flower's loop picks its executor by type; hand it this one instead of a subprocess launcher.
    GET_EXECUTOR.replace(lambda *_, **__: executor)
    certificates = args.root_certificates
    RUN_SUPEREXEC.get()(
        runtime_api_address=args.runtime_api_address,
        # A site's SuperNode serves its Runtime API on loopback in plain HTTP; the SuperLink's is TLS.
        insecure=certificates is None,
        root_certificates_path=None if certificates is None else str(certificates),
        superexec_auth_secret=superexec_secret(args.superexec_auth_secret_file),
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedbt.federated.flower_internals")
    sub = parser.add_subparsers(dest="role", required=True)
    node = sub.add_parser("supernode", help="flower-supernode with shorter idle waits")
    node.add_argument("--poll-interval", type=float, required=True)
    sub.add_parser("superlink", help="flower-superlink with model weights kept in memory")
    executor = sub.add_parser("executor", help="SuperExec starting tasks as forkserver children")
    executor.add_argument("--task", choices=sorted(TASKS), default="clientapp")
    executor.add_argument("--runtime-api-address", required=True)
    executor.add_argument("--root-certificates", type=Path, help="the Runtime API's CA (none: plain HTTP)")
    executor.add_argument("--parent-pid", type=int, required=True, help="the SuperNode or SuperLink; ends with it")
    executor.add_argument("--superexec-auth-secret-file", type=Path, required=True)
    executor.add_argument("--no-preload", action="store_true", help="each ClientApp imports torch and fedbt afresh")
    args, rest = parser.parse_known_args(argv)
    if args.role == "supernode":
        run_supernode(args.poll_interval, rest)
    elif args.role == "superlink":
        run_superlink(rest)
    else:
        run_executor(args)


if __name__ == "__main__":
    main()

"""The guard over Flower's private names: it passes on the installed flwr, reports each kind of
difference, and a difference makes `fedbt site` / `fedbt server` build Flower's default commands.
"""

from __future__ import annotations

import ast
import importlib.metadata
import inspect
import logging
import signal
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import flwr.common.args
import flwr.superlink.main
import flwr.supernode.runtime.run_clientapp
import flwr.supernode.start_client_internal
import httpx
import pytest
import tomli
from flwr.app import Message, Metadata, RecordDict
from flwr.proto.task_pb2 import Task
from flwr.supercore import heartbeat
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.retry import http_retry
from flwr.supercore.superexec.executor import subprocess_executor
from flwr.supercore.superexec.executor import types as executor_types
from flwr.superlink.cli.flwr_serverapp import _parse_args_run_flwr_serverapp
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.supernode.nodestate import in_memory_nodestate

from fedbt.deployment.certs import CertLayout
from fedbt.deployment.nodes import (
    ServerSettings,
    SiteSettings,
    executor_command,
    flower_defaults_if_internals_differ,
    require_site_guard,
    serverapp_executor_command,
    superlink_command,
    supernode_command,
    write_superexec_secret,
)
from fedbt.deployment.processes import DeploymentError
from fedbt.federated import flower_internals
from fedbt.federated.flower_internals import ForkserverExecutor, check_flower_internals


def test_the_guard_finds_nothing_on_the_installed_flower():
    assert check_flower_internals() == []


def a_clientapp_runner_without_certificates(runtime_api_address, token, insecure, parent_pid=None):
    """What a later flwr could make of run_clientapp: the tasks would fail on `certificates=`."""


def pull_objects_needing_a_budget(object_ids, pull_object_fn, budget, *, initial_backoff=1.0):
    """A pull_objects with a new required parameter: the SuperNode's calls would fail."""


class NodeStateWithoutItsMessages(in_memory_nodestate.InMemoryNodeState):
    """What a later flwr could make of the SuperNode's state: the messages it holds kept elsewhere."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.msg_store


@dataclass(frozen=True)
class SpecWithoutTaskId:
    runtime_api_address: str
    token: str


def mismatches():
    run_clientapp = flwr.supernode.runtime.run_clientapp
    loop = flwr.supernode.start_client_internal
    return {
        "another flwr": (
            lambda patch: patch.setattr(flower_internals, "FLOWER_VERSION", "1.40.0"),
            f"flwr {importlib.metadata.version('flwr')} is installed",
        ),
        "a parameter gone": (
            lambda patch: patch.setattr(run_clientapp, "run_clientapp", a_clientapp_runner_without_certificates),
            "run_clientapp() has no parameter 'certificates'",
        ),
        "a new required parameter": (
            lambda patch: patch.setattr(loop, "pull_objects", pull_objects_needing_a_budget),
            "pull_objects() requires a parameter 'budget'",
        ),
        "a function gone": (
            lambda patch: patch.delattr(flwr.superlink.main, "get_objectstore_linkstate_factories"),
            "flwr.superlink.main.get_objectstore_linkstate_factories is missing",
        ),
        "a module gone": (
            lambda patch: patch.setitem(sys.modules, "flwr.supernode.cli.flower_supernode", None),
            "no module flwr.supernode.cli.flower_supernode",
        ),
        "a constant of another type": (
            lambda patch: patch.setattr(heartbeat, "HEARTBEAT_DEFAULT_INTERVAL", 30.0),
            "heartbeat.HEARTBEAT_DEFAULT_INTERVAL is float, not int",
        ),
        "a method gone": (
            lambda patch: patch.delattr(executor_types.LaunchResult, "accepted"),
            "LaunchResult has no method 'accepted'",
        ),
        "a field gone": (
            lambda patch: patch.setattr(executor_types, "ExecutionSpec", SpecWithoutTaskId),
            "ExecutionSpec has no field 'task_id'",
        ),
        "an instance attribute gone": (
            lambda patch: patch.setattr(in_memory_nodestate, "InMemoryNodeState", NodeStateWithoutItsMessages),
            "InMemoryNodeState objects have no attribute 'msg_store'",
        ),
        "no longer the time module": (
            lambda patch: patch.setattr(loop, "time", inspect),
            "start_client_internal.time is not the time module",
        ),
    }


@pytest.mark.parametrize("case", list(mismatches()))
def test_the_guard_reports_what_differs(case, monkeypatch):
    change, expected = mismatches()[case]
    change(monkeypatch)
    problems = check_flower_internals()
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.fixture()
def site_settings(tmp_path) -> SiteSettings:
    for name in ("ca.pem", "site.key"):
        (tmp_path / name).write_text("unused")
    return SiteSettings(
        site_file=tmp_path / "site.yaml",
        server="127.0.0.1:9092",
        ca_cert=tmp_path / "ca.pem",
        private_key=tmp_path / "site.key",
        data_root=None,
        cache_dir=None,
        state_dir=tmp_path / "state",
    )


@pytest.fixture()
def server_certs(tmp_path) -> CertLayout:
    layout = CertLayout(tmp_path / "certs")
    for path in (layout.ca_cert, layout.server_cert, layout.server_key):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("unused")
    return layout


def test_matching_flower_runs_the_tuned_processes_without_a_warning(site_settings, server_certs, tmp_path, capsys):
    require_site_guard()
    server = flower_defaults_if_internals_differ(ServerSettings(server_certs.root, tmp_path / "server"))
    assert supernode_command(site_settings)[1:4] == ["-m", "fedbt.federated.flower_internals", "supernode"]
    assert superlink_command(server, server_certs)[1:4] == ["-m", "fedbt.federated.flower_internals", "superlink"]
    assert capsys.readouterr().err == ""


def test_a_different_flower_runs_the_default_superlink_with_one_warning_and_no_site(
    server_certs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(flwr.supernode.runtime.run_clientapp, "run_clientapp", a_clientapp_runner_without_certificates)
    server = flower_defaults_if_internals_differ(ServerSettings(server_certs.root, tmp_path / "server"))

    assert Path(superlink_command(server, server_certs)[0]).name == "flower-superlink"
    version = importlib.metadata.version("flwr")
    assert capsys.readouterr().err.splitlines() == [
        f"fedbt: warning: Flower {version} differs from the {flower_internals.FLOWER_VERSION} this tuning was "
        "written for (flwr.supernode.runtime.run_clientapp.run_clientapp() has no parameter 'certificates'); "
        "running Flower's defaults"
    ]
    # A site's code guard is one of the patches: the site refuses to start instead of running without it.
    with pytest.raises(DeploymentError) as refused:
        require_site_guard()
    assert str(refused.value) == (
        "this site cannot make sure it runs only its installed ClientApp on the installed Flower "
        "(flwr.supernode.runtime.run_clientapp.run_clientapp() has no parameter 'certificates'): "
        f"install the Flower fedbt supports: pip install 'flwr[simulation]=={flower_internals.FLOWER_VERSION}'"
    )


@pytest.mark.parametrize("flower_defaults", [False, True])
def test_every_site_command_leaves_clientapps_to_the_guarded_executor_and_shares_a_secret_with_it(
    site_settings, flower_defaults
):
    """`--isolation process`: the SuperNode never starts a ClientApp itself (Flower's default,
    subprocess isolation, runs `flwr-clientapp`, which loads the code the server's bundle names)."""
    settings = replace(site_settings, runtime_port=9094, flower_defaults=flower_defaults)
    node = supernode_command(settings)
    executor = executor_command(settings, supernode_pid=1)
    assert node[node.index("--isolation") + 1] == "process"
    assert executor[1:4] == ["-m", "fedbt.federated.flower_internals", "executor"]
    secret = str(settings.state_dir / "superexec.secret")
    assert node[node.index("--superexec-auth-secret-file") + 1] == secret
    assert executor[executor.index("--superexec-auth-secret-file") + 1] == secret
    # Flower's defaults: its own SuperNode, and each task imports afresh; the guard stays either way.
    assert (Path(node[0]).name == "flower-supernode") is flower_defaults
    assert ("--no-preload" in executor) is flower_defaults


def test_the_tuned_server_leaves_serverapps_to_fedbts_executor_and_shares_a_secret_with_it(server_certs, tmp_path):
    """`--isolation process`: the SuperLink never starts `flwr-serverapp --token ...` itself."""
    settings = ServerSettings(server_certs.root, tmp_path / "server")
    link = superlink_command(settings, server_certs)
    executor = serverapp_executor_command(settings, server_certs, superlink_pid=1)
    assert link[link.index("--isolation") + 1] == "process"
    assert executor[1:4] == ["-m", "fedbt.federated.flower_internals", "executor"]
    assert executor[executor.index("--task") + 1] == "serverapp"
    secret = str(settings.state_dir / "superexec.secret")
    assert link[link.index("--superexec-auth-secret-file") + 1] == secret
    assert executor[executor.index("--superexec-auth-secret-file") + 1] == secret


def serverapp_spec(**changes):
    fields = dict(
        task_type=TaskType.SERVER_APP, runtime_api_address="127.0.0.1:9093", token="the-task-token", insecure=False,
        root_certificates_path="/certs/ca.pem", runtime_dependency_install=False, parent_pid=7, suppress_output=False,
        task_id=1,
    )  # fmt: skip
    return flower_internals.EXECUTION_SPEC.get()(**{**fields, **changes})


def test_a_serverapp_task_reads_its_token_from_an_owner_only_file_never_from_its_command_line(monkeypatch):
    seen = {}

    def run(command):
        token_file = Path(command[command.index("--token-file") + 1])
        seen.update(command=command, file=token_file, token=token_file.read_text(), mode=token_file.stat().st_mode)
        return SimpleNamespace(returncode=3)

    monkeypatch.setattr(flower_internals.subprocess, "run", run)
    with pytest.raises(SystemExit) as ended:
        flower_internals.run_serverapp_task(serverapp_spec())
    assert ended.value.code == 3  # the ServerApp's exit code is the task's
    assert Path(seen["command"][0]).name == "flwr-serverapp"
    assert "--token" not in seen["command"] and "the-task-token" not in seen["command"]
    assert seen["token"] == "the-task-token" and stat.S_IMODE(seen["mode"]) == 0o600
    assert not seen["file"].exists()  # gone with its task


@pytest.mark.parametrize(("task", "task_type"), [
    ("clientapp", TaskType.CLIENT_APP),
    ("serverapp", TaskType.SERVER_APP),
])
def test_an_executor_asks_only_for_its_own_kind_of_task(task, task_type):
    offered = {TaskType.CLIENT_APP, TaskType.SERVER_APP, TaskType.SIMULATION}
    assert ForkserverExecutor([], task).get_eligible_capacity(offered) == ({task_type}, set())


def test_stock_flwr_serverapp_reads_its_token_from_a_file(tmp_path):
    """What run_serverapp_task relies on: `flwr-serverapp --token-file` (Flower's public command line)."""
    (tmp_path / "token").write_text("the-task-token")
    args = _parse_args_run_flwr_serverapp().parse_args(["--token-file", str(tmp_path / "token")])
    assert flwr.common.args.try_obtain_flwr_app_token(args) == "the-task-token"


def test_a_sites_superexec_secret_is_new_at_each_start_and_its_owners_alone(site_settings):
    first = write_superexec_secret(site_settings).read_bytes()
    path = write_superexec_secret(site_settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32 and path.read_bytes() != first


def test_the_forkserver_executor_takes_what_flowers_executor_protocol_passes():
    for method in flower_internals.EXECUTOR.expected.methods:
        ours = inspect.signature(getattr(ForkserverExecutor, method)).parameters
        flowers = inspect.signature(getattr(executor_types.Executor, method)).parameters
        assert list(ours) == list(flowers), method


def test_a_site_loads_its_installed_clientapp_for_fedbts_own_run_and_refuses_any_other(capsys):
    from fedbt.federated.client_app import app as installed

    load = flower_internals.installed_clientapp_loader(default_app_ref="", app_path=None, multi_app=True)
    version = importlib.metadata.version("fedbt")
    assert load("fedbt/fedbt", version, "any hash") is installed  # never the bundle's own code
    for fab_id, fab_version in [("someone/else", version), ("fedbt/fedbt", "0.0.1"), ("fedbt/not-fedbt", version)]:
        with pytest.raises(flower_internals.RunRefused) as refused:
            load(fab_id, fab_version, "any hash")
        # The server reads that the site refused; what it runs instead stays in the site's log.
        assert flower_internals.RUN_REFUSED in str(refused.value) and version not in str(refused.value)
        assert f"the run's app '{fab_id} {fab_version}' is not this site's installed" in capsys.readouterr().err


def test_the_app_id_a_site_accepts_is_the_one_fedbts_pyproject_gives_its_runs():
    project = tomli.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    app_id = f"{project['tool']['flwr']['app']['publisher']}/{project['project']['name']}"
    assert flower_internals.FEDBT_APP_ID == app_id
    assert project["project"]["version"] == importlib.metadata.version("fedbt")


# What each patch changes, shown on stock Flower: when one of these fails on a new Flower
# release, that release changed the behaviour, and the patch named in the test can go.


def sleeps_and_pull_calls(module) -> tuple[set[float], list[ast.Call]]:
    """The literal waits of `time.sleep(...)` in a module's source, and its calls of pull_objects."""
    tree = ast.parse(inspect.getsource(module))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    sleeps = {
        call.args[0].value
        for call in calls
        if ast.unparse(call.func) == "time.sleep" and isinstance(call.args[0], ast.Constant)
    }
    pulls = [call for call in calls if ast.unparse(call.func) == "pull_objects"]
    return sleeps, pulls


def test_stock_supernode_waits_fixed_seconds_between_pulls_and_retries_a_pull_after_a_second():
    """CappedSleep (SUPERNODE_LOOP_TIME) and the shorter first retry (SUPERNODE_PULL_OBJECTS)."""
    sleeps, pulls = sleeps_and_pull_calls(flwr.supernode.start_client_internal)
    assert sleeps == {3, 0.5}  # between pulls, and while a ClientApp's reply is awaited: no option sets them
    assert pulls and all("initial_backoff" not in {kw.arg for kw in call.keywords} for call in pulls)
    pull_objects = flower_internals.SUPERNODE_PULL_OBJECTS.get()
    assert inspect.signature(pull_objects).parameters["initial_backoff"].default == 1.0


def test_stock_supernode_announces_and_keeps_a_heartbeat_slower_than_a_superlink_accepts():
    """ANNOUNCED_HEARTBEAT and SENT_HEARTBEAT, replaced by SHORTEST_HEARTBEAT."""
    shortest = flower_internals.SHORTEST_HEARTBEAT.get()
    assert flower_internals.ANNOUNCED_HEARTBEAT.get() == flower_internals.SENT_HEARTBEAT.get() == 30 > shortest


def node_state_with_two_pulled_messages():
    """A SuperNode's state holding two messages of one run, both pulled (each by its own task)."""
    objects = flower_internals.OBJECT_STORE_FACTORY.get()(flower_internals.IN_MEMORY_DATABASE.get())
    state = flower_internals.SUPERNODE_STATE.get()(objects.store())
    messages = [
        with_its_id(Message(RecordDict(), metadata=Metadata(run_id=7, message_id="", src_node_id=0, dst_node_id=1,
                                                            reply_to_message_id="", group_id=group, created_at=0.0,
                                                            ttl=1e12, message_type="train")))
        for group in ("1", "2")
    ]  # fmt: skip
    for message in messages:
        state.store_message(message)
    assert len(state.get_messages_legacy(run_ids=[7], is_reply=False)) == 2
    return state, messages


def with_its_id(message: Message) -> Message:
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink names it
    return message


def store_reply(state, message: Message) -> bool:
    reply = with_its_id(Message(RecordDict(), reply_to=message))
    stored, _ = state.store_message_and_object_tree(reply, get_object_tree(reply), state.start_session(7))
    return stored


def replies_to(state, message: Message) -> list[Message]:
    answered = message.metadata.message_id
    return [e.message for e in state.msg_store.values() if e.message.metadata.reply_to_message_id == answered]


def test_stock_supernode_answers_another_tasks_message_with_a_crash_when_a_task_that_replied_expires():
    """RepliedTasks (SUPERNODE_REPLY_HANDLER, SUPERNODE_STATE._on_task_tokens_expired): with it, the
    task that replied gets no crash reply, and the other task's message keeps its own answer."""
    state, (first, second) = node_state_with_two_pulled_messages()
    assert store_reply(state, first)  # task 1 answered the first message and is finishing
    expired = Task(task_id=1, run_id=7, type=TaskType.CLIENT_APP)

    state._on_task_tokens_expired([expired])
    [crash] = replies_to(state, second)  # task 2 is still working on the second message
    assert crash.has_error()

    state, (first, second) = node_state_with_two_pulled_messages()
    replied = flower_internals.RepliedTasks()
    stored_reply = SimpleNamespace(message_ids=["its reply"])
    replied.noting_replies(lambda request, state, task: stored_reply)(None, state, expired)
    assert store_reply(state, first)
    replied.crash_replies_for_unanswered(type(state)._on_task_tokens_expired)(state, [expired])
    assert replies_to(state, second) == []


def test_stock_supernode_stores_a_second_reply_to_a_message_already_answered_by_a_crash():
    """storing_open_replies_only (SUPERNODE_STATE.store_message_and_object_tree, MessageEntry)."""
    state, (_, second) = node_state_with_two_pulled_messages()
    state._on_task_tokens_expired([Task(task_id=2, run_id=7, type=TaskType.CLIENT_APP)])
    assert store_reply(state, second)  # the task's reply, admitted before its token expired
    assert len(replies_to(state, second)) == 2

    state, (_, second) = node_state_with_two_pulled_messages()
    state._on_task_tokens_expired([Task(task_id=2, run_id=7, type=TaskType.CLIENT_APP)])
    patched_store = flower_internals.storing_open_replies_only(type(state).store_message_and_object_tree)
    reply = with_its_id(Message(RecordDict(), reply_to=second))
    assert patched_store(state, reply, get_object_tree(reply), state.start_session(7)) == (False, [])
    assert len(replies_to(state, second)) == 1


def test_stock_supernode_asks_about_a_run_only_when_a_message_of_a_run_it_does_not_know_arrives():
    """SUPERNODE_PULL_MESSAGE, wrapped by StoppedRunWatcher: the loop's one question about a run is in
    _pull_and_store_message, so while a ClientApp trains nothing there learns that its run was stopped."""
    tree = ast.parse(inspect.getsource(flwr.supernode.start_client_internal))
    asking = [
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for call in ast.walk(function)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "get_run"
    ]
    assert asking == ["_pull_and_store_message"]


def refused_with(status_code: int) -> httpx.HTTPStatusError:
    request = httpx.Request("POST", "https://superlink.test/")
    return httpx.HTTPStatusError("refused", request=request, response=httpx.Response(status_code, request=request))


def test_stock_flower_raises_run_not_running_for_a_refused_run_and_interrupts_a_task_whose_token_is_refused(
    monkeypatch,
):
    """RUN_NOT_RUNNING: how the Fleet connection's get_run reports a stopped run (the SuperLink answers 403);
    and how a ClientApp ends once StoppedRunWatcher revoked its token: its Runtime client, on the 401 its
    next heartbeat gets, sends its own process SIGINT (Flower's exit handlers then end the task)."""
    signals = []
    monkeypatch.setattr(http_retry, "os", SimpleNamespace(kill=lambda pid, sig: signals.append((pid, sig)),
                                                         getpid=lambda: 1234))  # fmt: skip
    monkeypatch.setattr(http_retry, "time", SimpleNamespace(sleep=lambda seconds: None))
    should_giveup = http_retry.make_simple_http_retry_invoker().should_giveup
    with pytest.raises(flower_internals.RUN_NOT_RUNNING.get()):
        should_giveup(refused_with(403))
    assert signals == []
    should_giveup(refused_with(401))
    assert signals == [(1234, signal.SIGINT)]


def node_state_with_tasks(state, count: int) -> list[tuple[int, str]]:
    """`count` running ClientApp tasks of run 7 in the state: (task id, token) each."""
    tasks = []
    for _ in range(count):
        task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=7)
        token = state.claim_task(task_id)
        assert state.activate_task(task_id)
        tasks.append((task_id, token))
    return tasks


def stopped_on_the_server(run_id: int):
    raise flower_internals.RUN_NOT_RUNNING.get()


def test_a_stopped_runs_unanswered_task_is_ended_and_its_message_answered_the_task_that_replied_is_left(capsys):
    """StoppedRunWatcher (SUPERNODE_STATE's get_tasks, finish_task, get_messages_legacy, _store_error_replies;
    TASK_STATUS, TASK_SUB_STATUS)."""
    state, (first, second) = node_state_with_two_pulled_messages()
    (replied_id, replied_token), (training_id, training_token) = node_state_with_tasks(state, 2)
    replied = flower_internals.RepliedTasks()
    replied.noting_replies(lambda request, state, task: SimpleNamespace(message_ids=["its reply"]))(
        None, state, Task(task_id=replied_id, run_id=7)
    )
    assert store_reply(state, first)
    watcher = flower_internals.StoppedRunWatcher(replied)

    assert watcher.end_tasks_of_ended_runs(state, get_run=lambda run_id: "running") == []
    assert replies_to(state, second) == [] and capsys.readouterr().err == ""

    assert watcher.end_tasks_of_ended_runs(state, get_run=stopped_on_the_server) == [7]
    [ended] = state.get_tasks(task_ids=[training_id])
    assert (ended.status.status, ended.status.sub_status) == ("finished", "stopped")
    assert state.get_task_by_token(training_token) is None  # its next heartbeat is refused: the process ends
    [answer] = replies_to(state, second)  # the SuperNode's loop, awaiting it, moves on
    assert answer.has_error() and answer.error.reason == flower_internals.RUN_ENDED
    assert state.get_task_by_token(replied_token) is not None  # still storing its context
    assert len(replies_to(state, first)) == 1
    assert f"run 7: {flower_internals.RUN_ENDED}" in capsys.readouterr().err


def test_a_stopped_runs_message_no_task_has_taken_yet_is_answered_too():
    """end_tasks_of_run: a message still waiting for its task also frees the SuperNode's loop."""
    objects = flower_internals.OBJECT_STORE_FACTORY.get()(flower_internals.IN_MEMORY_DATABASE.get())
    state = flower_internals.SUPERNODE_STATE.get()(objects.store())
    waiting = with_its_id(Message(RecordDict(), metadata=Metadata(
        run_id=7, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=1e12, message_type="train")))  # fmt: skip
    state.store_message(waiting)
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=7)  # pending: no executor took it
    flower_internals.end_tasks_of_run(state, 7, [task_id])
    assert state.claim_task(task_id) is None  # no executor will start it
    [answer] = replies_to(state, waiting)
    assert answer.has_error()


def test_the_tuned_superlink_leaves_the_sites_run_checks_out_of_its_log():
    """not_a_run_check: stock Flower logs each Fleet GetRun at INFO, which a training site now calls every 5 s."""
    logged = "[Fleet.GetRun] Requesting `Run` for run_id=%s"
    assert f'log(INFO, "{logged}"' in inspect.getsource(fleet_handlers.get_run)
    records = [logging.LogRecord("flwr", logging.INFO, "", 0, text, (7,), None) for text in (logged, "[Fleet.X] %s")]
    assert [flower_internals.not_a_run_check(record) for record in records] == [False, True]


def test_stock_superlink_keeps_message_arrays_in_its_database_file(tmp_path):
    """SUPERLINK_FACTORIES, replaced: arrays in memory (OBJECT_STORE_FACTORY with IN_MEMORY_DATABASE),
    run state in the file (LINK_STATE_FACTORY)."""
    database = tmp_path / "superlink.db"
    objects, _ = flower_internals.SUPERLINK_FACTORIES.get()(str(database), federation_manager=None)
    assert objects.database == str(database) != flower_internals.IN_MEMORY_DATABASE.get()


@pytest.mark.parametrize(("task_type", "process"), [(TaskType.CLIENT_APP, "flwr-clientapp"),
                                                     (TaskType.SERVER_APP, "flwr-serverapp")])  # fmt: skip
def test_stock_superexec_starts_each_task_as_a_fresh_process_with_its_token_on_the_command_line(
    monkeypatch, task_type, process
):
    """GET_EXECUTOR, replaced by ForkserverExecutor (EXECUTOR, EXECUTION_SPEC, LAUNCH_RESULT, TASK_TYPE,
    RUN_CLIENTAPP): a task is a forkserver child (for a ClientApp, one that imported torch and fedbt once)
    that gets its token through a pipe."""
    started = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **kwargs: started.append(args))
    executor = flower_internals.GET_EXECUTOR.get()(ExecutorType.SUBPROCESS)
    executor.launch(serverapp_spec(task_type=task_type))
    [command] = started
    assert command[0] == process and "the-task-token" in command


def flower_app_folder(folder: Path, clientapp: str) -> Path:
    """An app folder as Flower installs a run's bundle: fedbt's name and version, another ClientApp."""
    folder.mkdir()
    project = tomli.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "fedbt"\nversion = "{project["project"]["version"]}"\n\n'
        f'[tool.flwr.app]\npublisher = "fedbt"\n\n[tool.flwr.app.components]\n'
        f'serverapp = "fedbt.federated.server_app:app"\nclientapp = "{clientapp}"\n'
    )
    return folder


def test_stock_clientapp_loader_runs_the_code_a_bundle_names_under_fedbts_own_name(tmp_path, monkeypatch):
    """CLIENTAPP_LOADER, replaced by installed_clientapp_loader: the site's installed ClientApp or none."""
    app = flower_app_folder(tmp_path / "app", "their_code:app")
    (app / "their_code.py").write_text("from flwr.clientapp import ClientApp\napp = ClientApp()\napp.theirs = True\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # Flower puts the bundle first on the path
    monkeypatch.delitem(sys.modules, "their_code", raising=False)
    load = flower_internals.CLIENTAPP_LOADER.get()(default_app_ref="", app_path=str(app), multi_app=True)
    version = importlib.metadata.version("fedbt")
    assert getattr(load("fedbt/fedbt", version, "any hash"), "theirs", False)

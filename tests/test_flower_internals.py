"""The guard over Flower's private names: it passes on the installed flwr, reports each kind of
difference, and a difference makes `fedbt site` / `fedbt server` build Flower's default commands.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import flwr.supercore.retry
import flwr.superlink.main
import flwr.supernode.runtime.run_clientapp
import flwr.supernode.start_client_internal
import httpx
import pytest
import tomli
from flwr.supercore import heartbeat
from flwr.supercore.superexec.executor import types as executor_types
from flwr.supernode.nodestate import in_memory_nodestate

from fedbt.deployment.certs import CertLayout
from fedbt.deployment.nodes import (
    ServerSettings,
    SiteSettings,
    flower_defaults_if_internals_differ,
    superlink_command,
    supernode_command,
)
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
        "another flwr": (lambda patch: patch.setattr(flower_internals, "FLOWER_VERSION", "1.40.0"), "flwr 1.41.0"),
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
    site = flower_defaults_if_internals_differ(site_settings)
    server = flower_defaults_if_internals_differ(ServerSettings(server_certs.root, tmp_path / "server"))
    assert supernode_command(site)[1:4] == ["-m", "fedbt.federated.flower_internals", "supernode"]
    assert superlink_command(server, server_certs)[1:4] == ["-m", "fedbt.federated.flower_internals", "superlink"]
    assert capsys.readouterr().err == ""


def test_a_different_flower_runs_flower_defaults_with_one_warning(
    site_settings, server_certs, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(flwr.supernode.runtime.run_clientapp, "run_clientapp", a_clientapp_runner_without_certificates)
    site = flower_defaults_if_internals_differ(site_settings)
    server = flower_defaults_if_internals_differ(ServerSettings(server_certs.root, tmp_path / "server"))

    node = supernode_command(site)
    assert Path(node[0]).name == "flower-supernode" and "--isolation" not in node
    assert Path(superlink_command(server, server_certs)[0]).name == "flower-superlink"
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2  # one per command started
    assert warnings[0] == (
        "fedbt: warning: Flower 1.41.0 differs from the 1.41.0 this tuning was written for "
        "(flwr.supernode.runtime.run_clientapp.run_clientapp() has no parameter 'certificates'); "
        "running Flower's defaults"
    )


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


class SuperNodeDroppingFirstPush:
    """A task's Runtime API client whose first push of the task's output dies half-sent."""

    def __init__(self, first_failure: Exception):
        self.first_failure = first_failure
        self.pushes = []

    def PushTaskOutput(self, request):  # Flower's name
        self.pushes.append(request)
        if len(self.pushes) == 1:
            raise self.first_failure
        return "landed"


def test_a_tasks_output_push_is_retried_after_an_interrupted_request_but_not_when_its_supernode_is_gone(monkeypatch):
    monkeypatch.setattr(flwr.supercore.retry, "exponential", lambda max_delay: itertools.repeat(0.0))
    push = flower_internals.output_push_retried(flwr.supernode.runtime.run_clientapp.push_task_output)

    cut = SuperNodeDroppingFirstPush(httpx.WriteError("cut mid-body"))
    push(client=cut, context=None, sub_status="completed", details="")
    assert [request.sub_status for request in cut.pushes] == ["completed", "completed"]

    gone = SuperNodeDroppingFirstPush(httpx.ConnectError("connection refused"))
    push(client=gone, context=None, sub_status="completed", details="")  # Flower logs the failure and exits
    assert len(gone.pushes) == 1

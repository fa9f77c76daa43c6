"""The guard over Flower's private names: it passes on the installed flwr, reports each kind of
difference, and a difference makes `fedbt site` / `fedbt server` build Flower's default commands.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import stat
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import flwr.serverapp.strategy
import flwr.superlink.main
import flwr.supernode.runtime.run_clientapp
import flwr.supernode.start_client_internal
import pytest
import tomli
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore import heartbeat
from flwr.supercore.superexec.executor import types as executor_types

from fedbt.deployment.certs import CertLayout
from fedbt.deployment.nodes import (
    ServerSettings,
    SiteSettings,
    executor_command,
    flower_defaults_if_internals_differ,
    require_site_guard,
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


class ClippingWithoutItsModel(DifferentialPrivacyServerSideFixedClipping):
    """What a later flwr could make of the wrapper: the model to clip against kept elsewhere."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        del self.current_arrays


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
            lambda patch: patch.setattr(
                flwr.serverapp.strategy, "DifferentialPrivacyServerSideFixedClipping", ClippingWithoutItsModel
            ),
            "DifferentialPrivacyServerSideFixedClipping objects have no attribute 'current_arrays'",
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

"""End to end, a site runs only the ClientApp it installed, and only its own executor takes its tasks.

- On a Flower whose internals fedbt cannot check (here a dist-info reporting flwr 9.9.9 first on
  the path), `fedbt site` refuses to start, with or without `--flower-defaults`, where it used to
  fall back to Flower's stock SuperNode, which loads whatever ClientApp the server's bundle names.
- `--flower-defaults` turns the tuning off and keeps the guard: a run whose bundle carries its own
  ClientApp under fedbt's name runs the site's installed one.
- The SuperNode's Runtime API, on the site's loopback, answers a task request only with the
  SuperExec secret: a local account without it gets no task (and so no task token).
- Another local account, created by the test as root, can neither take the site's tasks nor read
  the site's secret, logs, ledger, test quota or decoded images, though it reaches the folder that
  holds them all.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
import site_intruder
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from local_accounts import (
    add_account,
    as_account,
    folder_every_account_reaches,
    missing_account_tools,
    python_for_every_account,
    remove_accounts,
)
from test_deployment_e2e import RUN_TIMEOUT, TINY, app_bundle, fedbt, wait_for, wait_for_the_run_to_end

from fedbt.deployment.control import FlowerControl
from fedbt.deployment.local import LocalFederation
from fedbt.deployment.nodes import SUPEREXEC_SECRET_FILE
from fedbt.deployment.runs import RunRequest, run_config_arg
from fedbt.federated.flower_internals import FLOWER_VERSION
from fedbt.fl.site import SITE_STATE_FOLDER

pytestmark = pytest.mark.e2e

FEDBT_CLIENT_APP = 'clientapp = "fedbt.federated.client_app:app"'
ONE_SITE_RUN = [*TINY, "tracking.enabled=false", "federated.rounds=1", "federated.min_clients=1"]
# A run that leaves every kind of file a site keeps: a privacy ledger, a test quota, decoded images.
PRIVATE_ONE_SITE_RUN = [*ONE_SITE_RUN, "train.batch_size=8", "privacy.enabled=true", "privacy.target_epsilon=2"]
RUNTIME_API = re.compile(r"runtime API on (127\.0\.0\.1:\d+)")
TASK_REFUSED_AT_SITE = "SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask"
MISSING_ACCOUNT_TOOLS = missing_account_tools()


def flower_reporting_version(folder: Path, version: str) -> Path:
    """A folder that, first on the path, makes importlib.metadata report flwr `version`."""
    dist_info = folder / f"flwr-{version}.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: flwr\nVersion: {version}\n")
    return folder


@pytest.mark.parametrize("flags", [[], ["--flower-defaults"]], ids=["tuned", "flower-defaults"])
def test_a_site_refuses_to_start_on_a_flower_it_cannot_check(tmp_path, demo_root, site_files, flags):
    path = f"{flower_reporting_version(tmp_path / 'newer-flower', '9.9.9')}:{Path(__file__).resolve().parent.parent}"
    state = tmp_path / "state"
    args = ["site", "--site", site_files[0], "--server", "127.0.0.1:9", "--data-root", str(demo_root),
            "--certs", str(tmp_path / "certs"), "--state-dir", str(state), *flags]  # fmt: skip
    result = fedbt(args, timeout=120, PYTHONPATH=path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "fedbt: error: this site cannot make sure it runs only its installed ClientApp on the installed Flower "
        "(flwr 9.9.9 is installed): install the Flower fedbt supports: "
        f"pip install 'flwr[simulation]=={FLOWER_VERSION}'"
    ]
    assert not state.exists()  # refused before any Flower process or file


@pytest.fixture(scope="module")
def federation(demo_root, site_files):
    """One site with Flower's default timings (`fedbt site --flower-defaults`), in a folder every
    local account may enter: only the modes the site gives its own files keep the others out."""
    with folder_every_account_reaches("fedbt-guard-") as work:
        federation = LocalFederation(work, demo_root, site_files[:1], flower_defaults=True, connect_timeout=30)
        try:
            yield federation.start()
        finally:
            federation.close()


def bundle_with_its_own_clientapp(folder: Path, marker: Path) -> Path:
    """fedbt's bundle under fedbt's name and version, whose ClientApp is the server's own code: whatever
    a site asks it, it leaves `marker`."""
    their_code = folder.parent / "their_clientapp.py"
    their_code.write_text(
        "from pathlib import Path\n\nfrom flwr.clientapp import ClientApp\n\napp = ClientApp()\n\n\n"
        "@app.train()\n@app.evaluate()\n@app.query()\ndef handle(msg, context):\n"
        f"    Path({str(marker)!r}).write_text('the server-sent ClientApp ran at the site')\n"
        "    raise RuntimeError('the server-sent ClientApp ran at the site')\n"
    )
    return app_bundle(folder, {FEDBT_CLIENT_APP: 'clientapp = "their_clientapp:app"'}, their_code)


def test_under_flower_defaults_a_site_runs_its_installed_clientapp_not_the_servers(federation, tmp_path):
    marker = tmp_path / "server-code-ran"
    operator = FlowerControl(federation.control_address, federation.certs / "ca.pem", tmp_path / "operator")
    request = RunRequest(federation.control_address, federation.certs / "ca.pem", tmp_path / "results",
                         overrides=ONE_SITE_RUN)  # fmt: skip
    run_id = operator.submit(bundle_with_its_own_clientapp(tmp_path / "app", marker), run_config_arg(request))
    status, details = wait_for_the_run_to_end(operator, run_id)
    assert status == "finished:completed", (status, details)
    assert not marker.exists()


def runtime_api(federation: LocalFederation, name: str) -> str:
    """Where the site's Runtime API listens, as `fedbt site` printed it."""
    return RUNTIME_API.search((federation.work / f"site-{name}.out").read_text()).group(1)


def test_a_sites_runtime_api_gives_no_task_to_a_caller_without_its_secret(federation):
    """What another local account can do: Flower's own SuperExec client, without the secret file."""
    [name] = federation.sites
    address = runtime_api(federation, name)
    intruder = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    site_log = federation.work / f"site-{name}.out"
    refusals = site_log.read_text().count(TASK_REFUSED_AT_SITE)
    # Refused as unauthenticated (HTTP 401), and the site says why in its own log (echoed there a moment later).
    with pytest.raises(Exception, match="SuperExec authentication failed|401 Unauthorized"):
        intruder.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    wait_for(lambda: site_log.read_text().count(TASK_REFUSED_AT_SITE) > refusals, 30, "the site to log the refusal")


@pytest.fixture()
def intruder():
    """Another local account on the site's machine, created by the test as root, and a Python it can run."""
    name = f"fbt{uuid.uuid4().hex[:6]}out"
    with folder_every_account_reaches("fedbt-intruder-") as folder:
        python = python_for_every_account(folder / "python")
        add_account(name)
        try:
            yield name, python
        finally:
            assert not remove_accounts([name]), f"account left on this machine: {name}"


def what_the_site_keeps(federation: LocalFederation, name: str) -> list[str]:
    """site_intruder's attempts on the site's own files after a run: its state folder (the SuperExec
    secret, its logs, Flower's home), its ledger and quota, and its cache of decoded images."""
    state = federation.work / f"site-{name}"
    cache = federation.work / "cache" / name
    own = cache / SITE_STATE_FOLDER / name
    [ledger] = own.glob("privacy-ledger-*.json")
    [quota] = own.glob("test-quota-*.json")
    image = next(cache.rglob("*.npy"))
    return [
        f"read:{state / SUPEREXEC_SECRET_FILE}",
        f"list:{state}",
        f"read:{state / 'supernode.log'}",
        f"read:{state / 'executor.log'}",
        f"list:{own}",
        f"read:{ledger}",
        f"read:{quota}",
        f"list:{cache}",
        f"read:{image}",
    ]


def as_intruder(intruder: tuple[str, Path], address: str, attempts: list[str]) -> dict[str, str]:
    name, python = intruder
    command = as_account(name, [str(python), "-c", Path(site_intruder.__file__).read_text(), address, *attempts])
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "FLWR_TELEMETRY_ENABLED": "0"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(MISSING_ACCOUNT_TOOLS is not None, reason=str(MISSING_ACCOUNT_TOOLS))
def test_another_local_account_can_neither_take_a_sites_tasks_nor_read_its_secret_logs_ledger_or_images(
    federation, intruder, tmp_path
):
    """Refused for the right reason: no task without the secret (401, and the site logs it), and
    PermissionError, not FileNotFoundError, on each of the site's files and folders."""
    [name] = federation.sites
    finished = federation.run(tmp_path / "results", PRIVATE_ONE_SITE_RUN)
    assert finished.status == "finished:completed", (finished.status, finished.details)
    attempts = what_the_site_keeps(federation, name)
    # The site's own account (root here, which any mode lets read) reads each: every path is there.
    as_the_site = {attempt: site_intruder.outcome(site_intruder.file_attempt(attempt)) for attempt in attempts}
    assert as_the_site == dict.fromkeys(attempts, "done")
    site_log = federation.work / f"site-{name}.out"
    refusals = site_log.read_text().count(TASK_REFUSED_AT_SITE)
    # The other account reaches the folder that holds them all, and no further.
    reach = f"list:{federation.work}"
    outcomes = as_intruder(intruder, runtime_api(federation, name), [reach, *attempts])
    assert re.search("SuperExec authentication failed|401 Unauthorized", outcomes.pop(site_intruder.TAKE_A_TASK))
    assert {a: result.split(":")[0] for a, result in outcomes.items()} == {
        reach: "done",
        **dict.fromkeys(attempts, "PermissionError"),
    }
    wait_for(lambda: site_log.read_text().count(TASK_REFUSED_AT_SITE) > refusals, 30, "the site to log the refusal")

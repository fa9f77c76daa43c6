"""End to end, a site runs only the ClientApp it installed, and only its own executor takes its tasks.

- On a Flower whose internals fedbt cannot check (here a dist-info reporting flwr 9.9.9 first on
  the path), `fedbt site` refuses to start, with or without `--flower-defaults`, where it used to
  fall back to Flower's stock SuperNode, which loads whatever ClientApp the server's bundle names.
- `--flower-defaults` turns the tuning off and keeps the guard: a run whose bundle carries its own
  ClientApp under fedbt's name runs the site's installed one.
- The SuperNode's Runtime API, on the site's loopback, answers a task request only with the
  SuperExec secret: a local account without it gets no task (and so no task token).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.runtime import RuntimeHttpClient
from test_deployment_e2e import RUN_TIMEOUT, TINY, app_bundle, fedbt, wait_for

from fedbt.deployment.control import FlowerControl
from fedbt.deployment.local import LocalFederation
from fedbt.deployment.runs import RunRequest, run_config_arg
from fedbt.federated.flower_internals import FLOWER_VERSION

pytestmark = pytest.mark.e2e

FEDBT_CLIENT_APP = 'clientapp = "fedbt.federated.client_app:app"'
ONE_SITE_RUN = [*TINY, "tracking.enabled=false", "federated.rounds=1", "federated.min_clients=1"]
RUNTIME_API = re.compile(r"runtime API on (127\.0\.0\.1:\d+)")


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
        f"(flwr 9.9.9 is installed): install the Flower fedbt supports: pip install 'flwr[simulation]=={FLOWER_VERSION}'"
    ]
    assert not state.exists()  # refused before any Flower process or file


@pytest.fixture(scope="module")
def federation(tmp_path_factory, demo_root, site_files):
    """One site with Flower's default timings (`fedbt site --flower-defaults`)."""
    work = tmp_path_factory.mktemp("guard")
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
    wait_for(lambda: operator.run_status(run_id)[0].startswith("finished"), RUN_TIMEOUT, "the run to end")
    assert operator.run_status(run_id)[0] == "finished:completed", operator.run_status(run_id)
    assert not marker.exists()


def test_a_sites_runtime_api_gives_no_task_to_a_caller_without_its_secret(federation):
    """What another local account can do: Flower's own SuperExec client, without the secret file."""
    [name] = federation.sites
    address = RUNTIME_API.search((federation.work / f"site-{name}.out").read_text()).group(1)
    intruder = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    # Refused as unauthenticated (HTTP 401), and the site says why in its own log.
    with pytest.raises(Exception, match="SuperExec authentication failed|401 Unauthorized"):
        intruder.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    log = (federation.work / f"site-{name}.out").read_text()
    assert "SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask" in log

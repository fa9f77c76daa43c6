"""Shared fixtures: generated data for unit tests, the shared real data for integration tests;
and the test tiers (docs/design.md#tests)."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedbt.cli import main
from fedbt.config import DataConfig
from fedbt.data.synthetic import generate_demo_data

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "brain-mri"
SITE_FILES = [str(PROJECT_ROOT / "sites" / f"{name}.yaml") for name in ("figshare", "sartaj", "br35h")]

pytest_plugins = ["pytester"]  # test_tiers.py runs sessions of its own with this file


# Test tiers (docs/design.md#tests). The fast tier, `pytest --fast`, is what a developer runs
# between edits: generated data, no process of Ray, Flower, a browser or nginx, no long training.
# It leaves out these marks:
NOT_IN_FAST_TIER = ("e2e", "real_data", "slow")
# Fixtures that start processes (a whole simulation starts Ray): every test using one is e2e.
PROCESS_FIXTURES = {"finished_run"}
# An e2e test's limit: above the longest wait one sets itself (test_deployment_trust's 900 s run).
E2E_TIMEOUT_SECONDS = 1200
# What the fast tier never starts: Ray's services and workers (programs and scripts inside its
# package), Flower's processes (fedbt's own commands start them), a browser, nginx.
RAY_PACKAGE = importlib.util.find_spec("ray").submodule_search_locations[0]
HEAVY_PROGRAMS = ("flower-", "flwr", "fedbt", "chromium", "google-chrome", "nginx")
HEAVY_MODULES = ("ray", "flwr", "fedbt")


def pytest_addoption(parser):
    tier = "the fast tier: no test marked e2e, real_data or slow; one that starts Ray, Flower, a browser or nginx fails"
    parser.addoption("--fast", action="store_true", help=tier)


@pytest.hookimpl(tryfirst=True)  # before -m selects: the marks added here count there too
def pytest_collection_modifyitems(config, items):
    kept, left_out = [], []
    for item in items:
        if PROCESS_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.e2e)
        if item.get_closest_marker("e2e") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_SECONDS))
        slower = any(item.get_closest_marker(mark) for mark in NOT_IN_FAST_TIER)
        (left_out if slower and config.getoption("--fast") else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


def heavy_program(args) -> str | None:
    """The name of what a command would start, if the fast tier must never start it."""
    words = shlex.split(args) if isinstance(args, str) else [os.fsdecode(word) for word in args]
    if any(word.startswith(RAY_PACKAGE) for word in words):
        return "ray"
    if "-m" in words[:-1]:
        module = words[words.index("-m") + 1].split(".")[0]
        return module if module in HEAVY_MODULES else None
    program = Path(words[0]).name
    return program if program.startswith(HEAVY_PROGRAMS) else None


class HeavyProcessInFastTier(RuntimeError):
    pass


refused_in_fast_tier: list[str] = []


@pytest.fixture(autouse=True, scope="session")
def _fast_tier_starts_no_heavy_process(request):
    """Under --fast, starting Ray, Flower, a browser or nginx raises instead, and is remembered
    for when the library that tried catches the error (see pytest_runtest_makereport)."""
    if not request.config.getoption("--fast"):
        yield
        return
    start = subprocess.Popen.__init__

    def start_unless_heavy(self, args, *rest, **kwargs):
        if program := heavy_program(args):
            refused_in_fast_tier.append(program)
            raise HeavyProcessInFastTier(f"the fast tier starts no {program}: mark the test e2e")
        start(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", start_unless_heavy)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that passed although it tried to start a heavy process (the library that tried
    caught the refusal) fails, naming the program: no such test joins the fast tier unnoticed."""
    report = yield
    if refused_in_fast_tier:
        programs = ", ".join(sorted(set(refused_in_fast_tier)))
        refused_in_fast_tier.clear()
        if report.passed:
            report.outcome = "failed"
            report.longrepr = f"this test tried to start {programs}, which the fast tier never starts: mark it e2e"
    return report


@pytest.fixture(autouse=True, scope="session")
def _quiet_flower(tmp_path_factory):
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    os.environ["FLWR_HOME"] = str(tmp_path_factory.mktemp("flwr-home"))
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"


@pytest.fixture(autouse=True, scope="session")
def _private_tracking_store(tmp_path_factory):
    """Every run the tests start is tracked, into a store of the session's own: never the
    project's results/mlflow.db, nor a tracking server the environment may name."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    os.environ.pop("FEDBT_TRACKING", None)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Small generated data in the three real layouts (with cross-site duplicates)."""
    return generate_demo_data(tmp_path_factory.mktemp("demo"), per_class=12, seed=0, duplicates=3)


@pytest.fixture()
def data_config(demo_root, tmp_path) -> DataConfig:
    return DataConfig(data_root=str(demo_root), sites=SITE_FILES, image_size=32, cache_dir=str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def site_files() -> list[str]:
    return list(SITE_FILES)


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The shared real data. CI always has it: there a missing folder is a failure, not a skip."""
    if not REAL_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"real data expected beside the checkout at {REAL_DATA}")
        pytest.skip("../shared/data/brain-mri not present")
    return REAL_DATA


@pytest.fixture()
def demo_args(demo_root, tmp_path) -> list[str]:
    """Command-line options every CLI test shares: demo profile and data, a private cache, 32 px."""
    return ["--config", "configs/demo.yaml", "--data-root", str(demo_root),
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.image_size=32"]  # fmt: skip


@dataclass
class FinishedRun:
    out: Path  # the simulation's results folder (report.html, federated/, central/)
    evaluation: Path  # `fedbt evaluate` of its central model
    store: str  # the MLflow store both were tracked in (experiment "finished")
    terminal: str  # what run_simulation.py printed (stdout and stderr)


@pytest.fixture(scope="session")
def finished_run(demo_root, tmp_path_factory) -> FinishedRun:
    """A 2-round simulation on generated data (federated and central, no local-only), run as a user
    runs it (`python run_simulation.py`, in its own process), then an evaluation of its central
    model, both tracked in a store of their own."""
    work = tmp_path_factory.mktemp("finished")
    run = FinishedRun(work / "results", work / "evaluation", f"sqlite:///{work / 'mlflow.db'}", "")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", run.store)  # evaluate has no --set: it tracks where this machine does
        env.setenv("FEDBT_CACHE", str(work / "cache"))  # the checkpoint's cache, where evaluate decodes
        settings = ["--set", "data.image_size=32", "--set", f"data.cache_dir={work / 'cache'}"]
        simulate = ["--config", "configs/demo.yaml", "--data-root", str(demo_root), *settings, "--set", "name=finished"]
        simulate += ["--rounds", "2", "--skip-local", "--out", str(run.out)]
        command = [sys.executable, "run_simulation.py", *simulate]
        done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
        run.terminal = done.stdout + done.stderr
        assert done.returncode == 0, run.terminal[-3000:]
        evaluate = ["evaluate", "--checkpoint", str(run.out / "central" / "final.pt"), "--bootstrap", "20"]
        assert main([*evaluate, "--device", "cpu", "--out", str(run.evaluation)]) == 0
    return run

"""Shared fixtures: generated data for unit tests, the shared real data for integration tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedbt.cli import main
from fedbt.config import DataConfig
from fedbt.data.synthetic import generate_demo_data

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REAL_DATA = PROJECT_ROOT.parent / "shared" / "data" / "brain-mri"
SITE_FILES = [str(PROJECT_ROOT / "sites" / f"{name}.yaml") for name in ("figshare", "sartaj", "br35h")]


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


@pytest.fixture(scope="session")
def finished_run(demo_root, tmp_path_factory) -> FinishedRun:
    """A 2-round simulation on generated data (federated and central, no local-only), then an
    evaluation of its central model, both tracked in a store of their own."""
    work = tmp_path_factory.mktemp("finished")
    run = FinishedRun(work / "results", work / "evaluation", f"sqlite:///{work / 'mlflow.db'}")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", run.store)  # evaluate has no --set: it tracks where this machine does
        env.setenv("FEDBT_CACHE", str(work / "cache"))  # the checkpoint's cache, where evaluate decodes
        settings = ["--set", "data.image_size=32", "--set", f"data.cache_dir={work / 'cache'}"]
        simulate = ["simulate", "--config", "configs/demo.yaml", "--data-root", str(demo_root), *settings]
        simulate += ["--set", "name=finished"]
        assert main([*simulate, "--rounds", "2", "--skip-local", "--out", str(run.out)]) == 0
        evaluate = ["evaluate", "--checkpoint", str(run.out / "central" / "final.pt"), "--bootstrap", "20"]
        assert main([*evaluate, "--device", "cpu", "--out", str(run.evaluation)]) == 0
    return run

"""A run killed while writing leaves nothing half-written that the next run trips over:
outputs are replaced whole, and an unreadable earlier result is made again, not a crash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedbt.config import ExperimentConfig, FederatedConfig, ModelConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.partition import make_partitions
from fedbt.federated import simulation
from fedbt.fileio import PROCESS_STARTED, TEMP_SUFFIX, atomic_write, read_json, remove_stale_temps, write_json

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Writes half a JSON file with the helper, then is killed as by the OOM killer or a power cut.
KILLED_WRITER = """
import os, signal, sys
from fedbt.fileio import atomic_write

def write_half_then_die(fh):
    fh.write(b'{"kind": "central", "te')
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], write_half_then_die)
"""
NEXT_WRITER = "import sys\nfrom fedbt.fileio import write_json\nwrite_json(sys.argv[1], {'kind': 'central'})\n"


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)


def temps_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def test_a_writer_killed_mid_write_leaves_the_old_file_and_the_next_writer_cleans_up(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"kind": "central", "test": {"accuracy": 0.9}})
    killed = run_python(KILLED_WRITER, str(target))
    assert killed.returncode == -9
    assert read_json(target) == {"kind": "central", "test": {"accuracy": 0.9}}  # the old file, whole
    assert len(temps_in(tmp_path)) == 1  # what the killed writer had written
    assert run_python(NEXT_WRITER, str(target)).returncode == 0
    assert read_json(target) == {"kind": "central"}
    assert temps_in(tmp_path) == []


def test_only_temporary_files_of_finished_writers_that_predate_this_process_are_stale(tmp_path):
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    before = PROCESS_STARTED - 60
    stale = tmp_path / f".a.json.{finished.pid}.0123abcd{TEMP_SUFFIX}"
    still_writing = tmp_path / f".b.json.{os.getpid()}.0123abcd{TEMP_SUFFIX}"
    new = tmp_path / f".c.json.{finished.pid}.0123abcd{TEMP_SUFFIX}"  # from after this process started
    not_ours = tmp_path / f"d.json.{finished.pid}.tmp"
    for path in (stale, still_writing, new, not_ours):
        path.write_text("{")
    for path in (stale, still_writing, not_ours):
        os.utime(path, (before, before))
    assert new.stat().st_mtime >= PROCESS_STARTED
    assert remove_stale_temps(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (still_writing, new, not_ours))


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "comparison.json"
    write_json(target, {"round": 1})

    def interrupted(fh):
        fh.write(b'{"round"')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert read_json(target) == {"round": 1}
    assert temps_in(tmp_path) == []


def test_nan_and_infinite_metrics_are_written_as_null_in_strict_json(tmp_path):
    target = write_json(tmp_path / "metrics.json", {"auc": float("nan"), "loss": [1.5, float("inf")], "n": 3})

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(target.read_text(), parse_constant=refuse) == {"auc": None, "loss": [1.5, None], "n": 3}


@pytest.fixture(scope="module")
def finished(demo_root, site_files, tmp_path_factory):
    """A simulation's finished baselines (central, one local-only): one epoch of a small CNN at 32 px."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("recovery")
    cfg = ExperimentConfig(model=ModelConfig(name="cnn"), federated=FederatedConfig(rounds=1))
    cfg.data.data_root, cfg.data.sites = str(demo_root), site_files
    cfg.data.image_size, cfg.data.cache_dir = 32, str(work / "cache")
    cfg.train = TrainConfig(batch_size=16, threads=1, log_every=0)
    catalog = build_catalog(cfg.data, progress=False)
    partition = make_partitions(catalog, 3, "origin", 0.5, cfg.data.seed)[0]
    baselines = {
        "central": lambda: simulation.central_baseline(cfg, catalog, work / "run", reuse=True),
        "local": lambda: simulation.local_only(cfg, catalog, partition, work / "run", reuse=True),
    }
    for run in baselines.values():
        run()
    return baselines, {"central": work / "run" / "central", "local": work / "run" / "local" / partition.name}


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")


def count_trainings(monkeypatch) -> list[str]:
    """Records every central or local-only training from here on."""
    calls: list[str] = []
    for name in ("run_central", "train_model"):
        train = getattr(simulation, name)

        def counted(*args, _train=train, _name=name, **kwargs):
            calls.append(_name)
            return _train(*args, **kwargs)

        monkeypatch.setattr(simulation, name, counted)
    return calls


@pytest.mark.parametrize(
    ("kind", "name", "how"),
    [
        ("central", "metrics.json", "truncated"),
        ("central", "metrics.json", "empty"),
        ("central", "fingerprint.json", "truncated"),
        ("local", "metrics.json", "truncated"),
    ],
)
def test_a_damaged_earlier_result_is_trained_again_then_reused(finished, monkeypatch, kind, name, how):
    baselines, folders = finished
    trainings = count_trainings(monkeypatch)
    damage(folders[kind] / name, how)
    again = baselines[kind]()
    assert len(trainings) == 1  # trained again instead of failing on the damaged file
    assert read_json(folders[kind] / name) is not None
    assert read_json(folders[kind] / "metrics.json") == json.loads(json.dumps(again))
    assert baselines[kind]() == read_json(folders[kind] / "metrics.json")
    assert len(trainings) == 1  # the rewritten files are reused


def test_a_local_model_is_reused_across_runtime_settings_but_not_across_partitionings(tmp_path):
    iid = ExperimentConfig(federated=FederatedConfig(partition="iid"))
    write_json(tmp_path / "metrics.json", {"kind": "local"})
    (tmp_path / "fingerprint.json").write_text(simulation._fingerprint(iid, "client0"))

    def variant(**sections) -> ExperimentConfig:
        return replace(iid, **{name: replace(getattr(iid, name), **changes) for name, changes in sections.items()})

    runtime = variant(train={"threads": 7, "device": "cpu", "num_workers": 2, "log_every": 0}, data={"cache_dir": "/x"})
    assert simulation._reusable(tmp_path, runtime, "client0") == {"kind": "local"}
    assert simulation._reusable(tmp_path, variant(federated={"partition": "dirichlet"}), "client0") is None
    assert simulation._reusable(tmp_path, variant(federated={"num_clients": 4}), "client0") is None
    assert simulation._reusable(tmp_path, iid, "client1") is None
    assert simulation._reusable(tmp_path, variant(train={"lr": 0.1}), "client0") is None
    # Alpha shapes Dirichlet partitions only.
    assert simulation._reusable(tmp_path, variant(federated={"dirichlet_alpha": 9.0}), "client0") is not None
    dirichlet = variant(federated={"partition": "dirichlet"})
    (tmp_path / "fingerprint.json").write_text(simulation._fingerprint(dirichlet, "client0"))
    other_alpha = variant(federated={"partition": "dirichlet", "dirichlet_alpha": 9.0})
    assert simulation._reusable(tmp_path, other_alpha, "client0") is None

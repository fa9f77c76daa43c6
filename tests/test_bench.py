"""`fedbt bench` on tiny generated data, timed by a clock that ticks once per reading, and its overhead reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedbt import bench
from fedbt.bench import DEPLOYMENT_UNAVAILABLE, federated_overhead, format_table, profile_training, run_bench
from fedbt.cli import main
from fedbt.config import ExperimentConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.eval import timing

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def tiny(data_config):
    cfg = ExperimentConfig(data=data_config)  # ResNet18, the reference's model, at 32 px
    cfg.train = TrainConfig(batch_size=8, threads=1, log_every=0)
    return cfg, build_catalog(cfg.data, progress=False)


def write_metrics(run_dir, history):
    (run_dir / "federated").mkdir(parents=True)
    (run_dir / "federated" / "metrics.json").write_text(json.dumps({"kind": "federated", "history": history}))


@pytest.fixture()
def sim_run(tmp_path):
    # Two rounds, two clients: 2+3 and 4+3 s of training in 16 s of rounds -> 16/12 x, (16-12)/2 s per round.
    # The rounds differ, so summing only one round, or only each round's slowest client, gives another answer.
    history = [
        {"round": 1, "elapsed_seconds": 6.0, "train": {"a": {"train_seconds": 2.0}, "b": {"train_seconds": 3.0}}},
        {"round": 2, "elapsed_seconds": 16.0, "train": {"a": {"train_seconds": 4.0}, "b": {"train_seconds": 3.0}}},
    ]
    write_metrics(tmp_path / "sim", history)
    return tmp_path / "sim"


class TickingClock:
    """Stands in for the time module in fedbt.bench: every reading is one second after the previous one.

    Every timed stretch then lasts exactly 1 s, so each rate must equal the work its stretch did.
    """

    def __init__(self):
        self.readings = 0

    def perf_counter(self) -> float:
        self.readings += 1
        return float(self.readings)


def test_bench_rates_are_the_images_each_timed_second_processed(tiny, sim_run, tmp_path, monkeypatch):
    clock = TickingClock()
    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(timing, "time", clock)  # the latency measurement lives with the other inference timings
    cfg, catalog = tiny
    result = run_bench(cfg, catalog, steps=2, warmup=1, images=16, sim_run=sim_run, scratch=tmp_path)

    assert result.reference_images_per_second == 2 * 8  # two timed steps of batch 8; the warm-up step is not timed
    assert result.eval_images_per_second == 16  # images, not batches, per second
    assert result.latency_ms == 1000  # one second per single-image prediction, reported in milliseconds
    assert (result.cache.decode_seconds, result.cache.load_seconds) == (1.0, 1.0)
    # The engine epoch (timed by the engine's own clock) saw exactly the requested images: the warm-up
    # batch before it is not counted, and 16 is two full batches of 8, so none was dropped.
    assert result.engine_images == result.cache.images == 16
    assert not any(tmp_path.glob("tmp*")), "the cold cache must be removed afterwards"

    assert result.federated.overhead_ratio == pytest.approx(16 / 12)
    assert result.deployment_overhead_seconds_per_round is None
    table = format_table(result)
    assert result.device in table and DEPLOYMENT_UNAVAILABLE in table and "1.33 x" in table


def test_federated_overhead_from_a_known_history(sim_run):
    fed = federated_overhead(sim_run)
    assert (fed.rounds, fed.wall_seconds, fed.train_seconds) == (2, 16.0, 12.0)
    assert fed.overhead_ratio == pytest.approx(16 / 12)
    assert fed.overhead_seconds_per_round == pytest.approx(2.0)
    # Round 2 alone: 16 - 6 s of wall for 4 + 3 s of training, without round 1's start-up.
    assert fed.later_overhead_seconds_per_round == pytest.approx(3.0)


def test_federated_overhead_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        federated_overhead(tmp_path)
    write_metrics(tmp_path / "sim", [{"round": 1, "train": {}}])
    with pytest.raises(ValueError, match="elapsed_seconds"):
        federated_overhead(tmp_path / "sim")


def test_profile_writes_a_trace_and_an_operator_table(tiny, tmp_path):
    cfg, catalog = tiny
    table, trace = profile_training(cfg, catalog, tmp_path / "out", steps=1)
    assert trace.is_file() and trace.stat().st_size > 0
    assert "convolution" in table


def test_table_shows_the_deployment_overhead_before_and_after_when_measured(tiny, tmp_path):
    cfg, catalog = tiny
    result = run_bench(cfg, catalog, steps=1, warmup=0, images=8, scratch=tmp_path)
    result.deployment_overhead_seconds_per_round = 2.54
    result.deployment_flower_defaults_seconds_per_round = 21.0
    table = format_table(result)
    assert "deployment per-round overhead" in table and "2.5 s" in table
    assert "deployment overhead, Flower defaults" in table and "21.0 s" in table


@pytest.mark.e2e
def test_the_quick_device_check_measures_every_step_on_a_pack(demo_args, tmp_path, capsys):
    """`scripts/device_check.sh --quick` on CPU, on a pack of generated data: every step of the
    full check (the two simulations and the whole experiment included) at tiny sizes."""
    pack = tmp_path / "demo.npz"
    assert main(["data", "pack", *demo_args, str(pack)]) == 0
    out = tmp_path / "check"
    completed = subprocess.run(
        ["bash", str(PROJECT_ROOT / "scripts" / "device_check.sh"), "--out", str(out), "--quick", "--pack", str(pack)],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((out / "device-check.json").read_text())
    assert results["data"]["source"] == "generated" and results["data"]["images"] > 0  # the pack was read
    assert [row["image_size"] for row in results["engine"]] == [32, 48]
    assert all(row["engine_over_bare_step"] > 0 for row in results["engine"])
    assert results["inference"]["batch1_ms"] > 0 and results["inference"]["batch64_ms"] > 0
    assert sum(results["round_costs"].values()) > 0
    for name in ("concurrent", "sequential"):
        assert results["simulation"][name]["rounds"] == 4 and results["simulation"][name]["client_train_seconds"] > 0
    experiment = results["experiment"]
    assert experiment["rounds"] == 4 and set(experiment["pooled_test_accuracy"]) == {
        "federated", "central", "local figshare", "local sartaj", "local br35h"}  # fmt: skip
    table = (out / "device-check.md").read_text()
    for measure in ("bare ResNet18 step, 32 px", "inference latency, batch 64", "clients concurrent",
                    "whole experiment", "commit"):  # fmt: skip
        assert measure in table and measure in completed.stdout


def test_device_check_reports_steps_a_machine_cannot_run_and_measures_the_others(tmp_path, monkeypatch):
    """A lent GPU machine may lack Flower and Ray: their steps say so, the others are in the table."""
    from fedbt.bench import device_check

    def missing(package):
        def step(*_):
            raise ModuleNotFoundError(f"No module named {package!r}", name=package)

        return step

    engine = [{"image_size": 128, "bare_step_images_per_second": 4000.0, "engine_images_per_second": 3600.0,
               "engine_over_bare_step": 0.9}]  # fmt: skip
    monkeypatch.setattr(device_check, "generate_demo_data", lambda root, **_: root)
    monkeypatch.setattr(device_check, "engine_against_bare_step", lambda *_: engine)
    monkeypatch.setattr(device_check, "inference_latency", missing("pydicom"))
    monkeypatch.setattr(device_check, "fixed_round_costs", missing("flwr"))
    monkeypatch.setattr(device_check, "concurrent_against_sequential", missing("ray"))
    monkeypatch.setattr(device_check, "whole_experiment", missing("ray"))
    results = device_check.run_device_check(tmp_path / "out", quick=True, commit="abc1234")

    table = (tmp_path / "out" / "device-check.md").read_text()
    assert "| engine, 128 px (engine / bare step) | 3600 img/s (0.90) |" in table
    assert "| commit | abc1234 |" in table and "generated images at 32 px" in table
    assert "| whole experiment | not run: the Python package ray is not installed here |" in table
    assert "| fixed pieces of a round | not run: the Python package flwr is not installed here |" in table
    saved = json.loads((tmp_path / "out" / "device-check.json").read_text())
    assert saved["simulation"] == results["simulation"] == {"skipped": "not run: the Python package ray is not installed here"}
    assert saved["engine"] == engine

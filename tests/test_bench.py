"""`fedbt bench` on tiny generated data, timed by a clock that ticks once per reading, and its overhead reader."""

from __future__ import annotations

import json

import pytest

from fedbt import bench
from fedbt.bench import DEPLOYMENT_UNAVAILABLE, federated_overhead, format_table, profile_training, run_bench
from fedbt.config import ExperimentConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.eval import timing


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

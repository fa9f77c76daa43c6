"""`fedbt bench` on tiny generated data: the structure and sanity of its numbers, not their size."""

from __future__ import annotations

import json

import pytest

from fedbt.bench import DEPLOYMENT_UNAVAILABLE, federated_overhead, format_table, profile_training, run_bench
from fedbt.config import ExperimentConfig, TrainConfig
from fedbt.data.catalog import build_catalog


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
    # Two rounds, two clients: 2+3 and 4+1 s of training in 14 s of rounds -> 1.4 x, 2 s per round.
    history = [
        {"round": 1, "elapsed_seconds": 6.0, "train": {"a": {"train_seconds": 2.0}, "b": {"train_seconds": 3.0}}},
        {"round": 2, "elapsed_seconds": 14.0, "train": {"a": {"train_seconds": 4.0}, "b": {"train_seconds": 1.0}}},
    ]
    write_metrics(tmp_path / "sim", history)
    return tmp_path / "sim"


def test_bench_measures_every_rate_on_the_real_path(tiny, sim_run, tmp_path):
    cfg, catalog = tiny
    result = run_bench(cfg, catalog, steps=2, warmup=1, images=16, sim_run=sim_run, scratch=tmp_path)

    assert result.reference_images_per_second > 0 and result.engine_images_per_second > 0
    assert result.engine_over_reference == pytest.approx(
        result.engine_images_per_second / result.reference_images_per_second
    )
    assert result.engine_images == 16  # two full batches of 8, no partial batch dropped
    assert result.engine_images_per_second == pytest.approx(result.engine_images / result.engine_seconds)
    assert result.eval_images_per_second > 0 and result.latency_ms > 0

    cache = result.cache
    assert cache.images == 16 and cache.decode_seconds > 0 and cache.load_seconds > 0
    assert cache.epoch_seconds == result.engine_seconds
    assert cache.cold_over_warm == pytest.approx(
        (cache.decode_seconds + cache.epoch_seconds) / (cache.load_seconds + cache.epoch_seconds)
    )
    assert not any(tmp_path.glob("tmp*")), "the cold cache must be removed afterwards"

    assert result.federated.overhead_ratio == pytest.approx(1.4)
    assert result.deployment_overhead_seconds_per_round is None
    table = format_table(result)
    assert result.device in table and DEPLOYMENT_UNAVAILABLE in table and "1.40 x" in table


def test_federated_overhead_from_a_known_history(sim_run):
    fed = federated_overhead(sim_run)
    assert (fed.rounds, fed.wall_seconds, fed.train_seconds) == (2, 14.0, 10.0)
    assert fed.overhead_ratio == pytest.approx(1.4)
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

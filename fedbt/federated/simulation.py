"""The main job: a Flower simulation over the sites, then central and local-only baselines
at the same budget, then the comparison report."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from fedbt.config import ExperimentConfig, to_dict
from fedbt.data.catalog import Catalog, build_catalog
from fedbt.data.partition import Partition, make_partitions
from fedbt.data.synthetic import is_generated_data
from fedbt.data.transforms import augmentation_for
from fedbt.federated.common import EXPERIMENT_ENV
from fedbt.fileio import read_json, write_json, write_text
from fedbt.model.device import select_device
from fedbt.progress import library_output_to, log
from fedbt.reports.comparison import GENERATED_DATA_NOTE, write_report
from fedbt.tracking import experiment_run
from fedbt.train.central import TrainData, evaluate_everywhere, run_central, train_model


def budget_matched(cfg: ExperimentConfig) -> ExperimentConfig:
    """Same number of passes over every training image as the federation: rounds x local epochs."""
    train = replace(cfg.train, epochs=cfg.federated.total_epochs)
    return replace(cfg, train=train)


def client_resources(cfg: ExperimentConfig, cores: int, cuda: bool) -> dict:
    """What each client asks Ray for: never more CPUs than exist (Ray would wait for them forever)."""
    if not cuda:
        # Every core: on CPU the clients train one after another, each at full speed.
        return {"num_cpus": cores, "num_gpus": 0.0}
    # A share of the GPU, so that the sites train at once instead of queueing for a whole card
    # each; the cores are shared out the same way.
    together = min(cfg.federated.clients_per_gpu or cfg.federated.num_clients, cfg.federated.num_clients)
    return {"num_cpus": max(1, cores // together), "num_gpus": 1.0 / together}


def backend_config(cfg: ExperimentConfig) -> dict:
    cores = os.cpu_count() or 1
    resources = client_resources(cfg, cores, torch.cuda.is_available())
    init_args: dict = {"num_cpus": cores, "include_dashboard": False}
    if cfg.federated.ray_address:
        init_args = {"address": cfg.federated.ray_address}
    return {"client_resources": resources, "init_args": init_args}


@contextlib.contextmanager
def experiment_in_environment(experiment_file: Path) -> Iterator[None]:
    """The experiment for the ServerApp of this process to read (it sends it on to the clients in
    its messages), for this run only: a deployment later started from this process must not
    inherit it (its ServerApp would run this experiment instead of the one submitted)."""
    previous = os.environ.get(EXPERIMENT_ENV)
    os.environ[EXPERIMENT_ENV] = str(experiment_file)
    try:
        yield
    finally:
        if previous is None:
            del os.environ[EXPERIMENT_ENV]
        else:
            os.environ[EXPERIMENT_ENV] = previous


# Flower's and Ray's output during the federated run, in the run's folder (--verbose: on the terminal).
LIBRARY_LOG = "flower.log"


@contextlib.contextmanager
def without_the_run_simulation_notice() -> Iterator[None]:
    """Flower (1.41 and 1.42) logs run_simulation as deprecated in favour of `flwr run`; why the
    main job keeps it is in docs/simulation.md#why-run_simulation. The notice would only alarm a user."""

    def not_the_notice(record: logging.LogRecord) -> bool:
        return "The `run_simulation` function is deprecated" not in record.getMessage()

    flower_logger = logging.getLogger("flwr")
    flower_logger.addFilter(not_the_notice)
    try:
        yield
    finally:
        flower_logger.removeFilter(not_the_notice)


def run_flower_simulation(cfg: ExperimentConfig, out: Path, client_app=None) -> dict:
    """Run the ServerApp and N ClientApps on Flower's Ray-backed simulation engine.

    `client_app` stands in for the sites' own ClientApp (the tests pass a faulty site's).
    """
    from flwr.simulation import run_simulation

    from fedbt.federated.client_app import app as sites_app
    from fedbt.federated.server_app import app as server_app

    client_app = client_app or sites_app

    # Absolute paths: Ray workers (of a joined cluster, too) need not share our working directory.
    cfg = replace(cfg, output_dir=str(out.resolve()))
    cfg.data = replace(
        cfg.data,
        data_root=str(Path(cfg.data.data_root).resolve()),
        cache_dir=str(Path(cfg.data.cache_dir).expanduser().resolve()),
    )
    experiment_file = out / "experiment.json"
    write_json(experiment_file, to_dict(cfg))
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Ray would report usage statistics from the driver and every worker it starts.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at niceness 15 (its RayConfig worker_niceness, read from this variable
    # by every worker; Ray's job server sets it to 0 the same way): the clients would otherwise
    # crawl behind any other work on the machine while the driver waits for them.
    os.environ.setdefault("RAY_worker_niceness", "0")
    backend = backend_config(cfg)
    fc = cfg.federated
    log(f"[federated] {fc.num_clients} clients, {fc.rounds} rounds, strategy {fc.strategy}")
    with (
        experiment_in_environment(experiment_file.resolve()),
        without_the_run_simulation_notice(),
        library_output_to(out / LIBRARY_LOG),
    ):
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federated.num_clients,
            backend_config=backend,
        )
    metrics = read_json(out / "federated" / "metrics.json")
    if metrics is None:
        where = f"{out / LIBRARY_LOG}, or above with --verbose"
        raise RuntimeError(f"the federated run ended without results; see Flower's output ({where})")
    return metrics


# Settings that change where or how fast a run goes, never its result.
RUNTIME_ONLY = {"data": ("cache_dir",), "train": ("threads", "device", "num_workers", "log_every")}


def _fingerprint(cfg: ExperimentConfig, partition_name: str | None = None) -> str:
    """What decides a baseline's result: data, model, training and record-level privacy settings
    and, for a local-only model, which client of which partitioning it trained on."""
    settings = {section: to_dict(getattr(cfg, section)) for section in ("data", "model", "train", "privacy")}
    for section, keys in RUNTIME_ONLY.items():
        for key in keys:
            del settings[section][key]
    del settings["privacy"]["client_level"]  # the federation's, not a baseline's
    if partition_name is not None:
        fc = cfg.federated
        settings["partition"] = {"scheme": fc.partition, "clients": fc.num_clients, "name": partition_name}
        if fc.partition == "dirichlet":
            settings["partition"]["dirichlet_alpha"] = fc.dirichlet_alpha
    return json.dumps(settings, sort_keys=True)


def _reusable(out: Path, cfg: ExperimentConfig, partition_name: str | None = None) -> dict | None:
    """An earlier run's results with the same settings; None (train again) when there is none,
    or its files are missing, cut short by a killed run or not JSON."""
    if read_json(out / "fingerprint.json") != json.loads(_fingerprint(cfg, partition_name)):
        return None
    metrics = read_json(out / "metrics.json")
    return metrics if isinstance(metrics, dict) else None


def central_baseline(cfg: ExperimentConfig, catalog: Catalog, out: Path, reuse: bool) -> dict:
    central_cfg = budget_matched(cfg)
    target = out / "central"
    if reuse and (earlier := _reusable(target, central_cfg)):
        log("[central] reusing the earlier central run with the same settings")
        return earlier
    result = run_central(central_cfg, catalog, target)
    write_text(target / "fingerprint.json", _fingerprint(central_cfg))
    return result


def local_only(cfg: ExperimentConfig, catalog: Catalog, partition: Partition, out: Path, reuse: bool) -> dict:
    """A model trained on one client's data alone, scored on every site's test split."""
    local_cfg = budget_matched(cfg)
    target = out / "local" / partition.name
    target.mkdir(parents=True, exist_ok=True)
    if reuse and (earlier := _reusable(target, local_cfg, partition.name)):
        log(f"[local {partition.name}] reusing the earlier run with the same settings")
        return earlier
    data = TrainData(
        train=catalog.subset(partition.indices["train"], augment=augmentation_for(local_cfg.train)),
        val=catalog.subset(partition.indices["val"]),
    )
    log(f"[local {partition.name}] {len(data.train)} training images")
    kind = f"local {partition.name}"
    with experiment_run(local_cfg, kind) as tracker:
        start = time.perf_counter()
        model, history = train_model(local_cfg, data, target, kind, tracker=tracker)
        result = {
            "kind": "local",
            "partition": partition.name,
            "train_images": len(data.train),
            "wall_seconds": time.perf_counter() - start,
            "history": history,
            "test": evaluate_everywhere(model, catalog, select_device(cfg.train.device), cfg.train.batch_size),
        }
        write_json(target / "metrics.json", result)
        write_text(target / "fingerprint.json", _fingerprint(local_cfg, partition.name))
        tracker.log_result(result, target / "metrics.json", target / "final.pt")
    return result


def run_experiment(
    cfg: ExperimentConfig, skip_central: bool = False, skip_local: bool = False, reuse: bool = True
) -> dict:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with experiment_run(cfg, "simulate") as tracker:
        # The federated, central and local-only runs are logged under this one.
        cfg = replace(cfg, tracking=replace(cfg.tracking, parent_run_id=tracker.run_id))
        started = time.perf_counter()
        generated = is_generated_data(cfg.data.data_root)
        if generated:
            log(GENERATED_DATA_NOTE)
        # Decode into the cache here, once, before Ray's workers start and all want it.
        catalog = build_catalog(cfg.data)
        partitions = make_partitions(
            catalog, cfg.federated.num_clients, cfg.federated.partition, cfg.federated.dirichlet_alpha, cfg.data.seed
        )
        for p in partitions:
            log(f"[data] client {p.name}: " + ", ".join(f"{s} {len(p.indices[s])}" for s in ("train", "val", "test")))
        results: dict = {"federated": run_flower_simulation(cfg, out)}
        if not skip_central:
            results["central"] = central_baseline(cfg, catalog, out, reuse)
        if not skip_local:
            results["local"] = {p.name: local_only(cfg, catalog, p, out, reuse) for p in partitions}
        results["wall_seconds_total"] = time.perf_counter() - started
        results["held_out_test"] = catalog.held_out_test_names()
        write_report(results, cfg, list(catalog.task.classes), out, generated)
        tracker.log_metrics({"wall_seconds": results["wall_seconds_total"]})
        tracker.log_files(*sorted(out.iterdir()))  # the report, its figures and the resolved experiment.json
    return results

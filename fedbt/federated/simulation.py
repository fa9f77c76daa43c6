"""The main job: a Flower simulation over the sites, then central and local-only baselines
at the same budget, then the comparison report."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedbt.config import RUNTIME, ExperimentConfig, keys_in_scope, load_config, to_dict
from fedbt.data.catalog import Catalog, MRIDataset, build_catalog
from fedbt.data.labels import get_task
from fedbt.data.loader import make_loader
from fedbt.data.partition import Partition, make_partitions
from fedbt.data.sites import load_sites
from fedbt.data.synthetic import is_generated_data
from fedbt.data.transforms import augmentation_for
from fedbt.eval.clinical import mcnemar
from fedbt.eval.evaluate import fine_correct, set_correct
from fedbt.eval.inference import metrics_of, predict_log_probabilities
from fedbt.federated.server_app import EXPERIMENT_ENV
from fedbt.fileio import atomic_write, read_json, to_json, write_json, write_text
from fedbt.model.checkpoint import load_checkpoint, model_from_checkpoint, temperature_of
from fedbt.model.device import prepare_model, select_device
from fedbt.progress import library_output_to, log
from fedbt.reports.comparison import GENERATED_DATA_NOTE, write_report
from fedbt.reports.held_out import write_held_out_report
from fedbt.tracking import experiment_run
from fedbt.train.central import TrainData, evaluate_everywhere, run_central, train_model
from fedbt.train.personalise import SiteData, personalise_site


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


def with_absolute_paths(cfg: ExperimentConfig, out: Path) -> ExperimentConfig:
    """cfg writing to `out`, every path absolute: Ray workers (of a joined cluster, too) need not share
    our working directory. What the run's experiment.json holds."""
    data = replace(
        cfg.data,
        data_root=str(Path(cfg.data.data_root).resolve()),
        cache_dir=str(Path(cfg.data.cache_dir).expanduser().resolve()),
    )
    return replace(cfg, output_dir=str(out.resolve()), data=data)


def without_runtime(settings: dict) -> dict:
    """Settings (a config's to_dict, or some of its sections) less where or how fast a run goes (never its result)."""
    settings = copy.deepcopy(settings)
    for key in keys_in_scope(RUNTIME):
        section, name = key.split(".")
        settings.get(section, {}).pop(name, None)
    return settings


def result_settings(settings: dict) -> dict:
    """What decides a simulation's results, from its config (to_dict or a file's): everything but its name,
    folder and tracking, the runtime settings, and whether the federated run was resumed."""
    kept = without_runtime({k: v for k, v in settings.items() if k not in ("name", "output_dir", "tracking")})
    data = kept.get("data", {})
    if data.get("data_root"):  # as given or resolved, the same folder
        data["data_root"] = str(Path(data["data_root"]).resolve())
    kept.get("federated", {}).pop("resume", None)
    return json.loads(to_json(kept))


def same_settings(written: object, cfg: ExperimentConfig) -> bool:
    """Whether a config an earlier run wrote (experiment.json, comparison.json's) is cfg's, as far as results go."""
    return isinstance(written, dict) and result_settings(written) == result_settings(to_dict(cfg))


def run_flower_simulation(cfg: ExperimentConfig, out: Path, client_app=None) -> dict:
    """Run the ServerApp and N ClientApps on Flower's Ray-backed simulation engine.

    `client_app` stands in for the sites' own ClientApp (the tests pass a faulty site's).
    """
    from flwr.simulation import run_simulation

    from fedbt.federated.client_app import app as sites_app
    from fedbt.federated.server_app import app as server_app

    client_app = client_app or sites_app

    cfg = with_absolute_paths(cfg, out)
    experiment_file = out / "experiment.json"
    write_json(experiment_file, to_dict(cfg))
    # The results read back below are this run's, never an earlier run's left in the folder.
    (out / "federated" / "metrics.json").unlink(missing_ok=True)
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


def _fingerprint(cfg: ExperimentConfig, partition_name: str | None = None) -> str:
    """What decides a baseline's result: data, model, training and record-level privacy settings
    and, for a local-only model, which client of which partitioning it trained on."""
    sections = ("data", "model", "train", "privacy")
    settings = without_runtime({section: to_dict(getattr(cfg, section)) for section in sections})
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


def personalised_models(
    cfg: ExperimentConfig, catalog: Catalog, partitions: list[Partition], run: Path, out: Path
) -> dict:
    """Every site's personalised model (fedbt.train.personalise) from the federation's final model in
    `run`, its local-only model there the 'local' candidate, scored on the site's own test split only:
    out/personalised/<site>/ (final.pt, metrics.json)."""
    state = load_checkpoint(run / "federated" / "final.pt")["model_state"]
    results = {}
    for p in partitions:
        target = out / "personalised" / p.name
        data = SiteData.of(catalog, p, cfg.train)
        local = run / "local" / p.name / "final.pt"
        local_state = load_checkpoint(local)["model_state"] if local.is_file() else None
        results[p.name] = personalise_site(cfg, state, data, target, f"personalise {p.name}", local_state)
        write_json(target / "metrics.json", results[p.name])
    return results


def loaded_model(checkpoint: Path, device: torch.device) -> tuple[torch.nn.Module, float]:
    """A final model and its temperature."""
    payload = load_checkpoint(checkpoint)
    return prepare_model(model_from_checkpoint(payload), device), temperature_of(payload)


def paired_tests(cfg: ExperimentConfig, catalog: Catalog, run: Path, out: Path) -> dict:
    """McNemar's test of the federated against the central final model on the pooled test split (and
    with the held-out images), from each image's correctness: right 4-class prediction of a
    fine-labelled image, what pooled 4-class accuracy counts. Each image's correctness is kept in
    out/paired.json, owner-only, on this machine; the counts and p-values go in the report."""
    device = select_device(cfg.train.device)
    models = {name: loaded_model(run / name / "final.pt", device)[0] for name in ("federated", "central")}
    splits = {"pooled": catalog.dataset(split="test", pooled=True)}
    if catalog.held_out_test:
        splits["pooled_with_held_out"] = catalog.dataset(split="test", pooled=True, keep_held_out=True)
    per_image, summary = {}, {}
    for split, dataset in splits.items():
        loader = make_loader(dataset, cfg.train.batch_size, False, device)
        correct = {name: fine_correct(*predict_log_probabilities(m, loader, device)) for name, m in models.items()}
        per_image[split] = {name: c.tolist() for name, c in correct.items()}
        summary[split] = {
            "a": "federated",
            "b": "central",
            **{f"{name}_accuracy": float(c.mean()) for name, c in correct.items()},
            **mcnemar(correct["federated"], correct["central"]),
        }
    atomic_write(out / "paired.json", lambda fh: fh.write(to_json(per_image).encode()), private=True)
    return summary


def score_checkpoint(checkpoint: Path, dataset: MRIDataset, cfg: ExperimentConfig) -> tuple[dict, np.ndarray]:
    """A final model's metrics on the dataset at its temperature, and whether each image's prediction is a
    class its label allows (the temperature changes no prediction), from one pass over the images."""
    device = select_device(cfg.train.device)
    model, temperature = loaded_model(checkpoint, device)
    loader = make_loader(dataset, cfg.train.batch_size, False, device)
    log_probs, masks = predict_log_probabilities(model, loader, device)
    return metrics_of(log_probs, masks, get_task(cfg.data.task), temperature), set_correct(log_probs, masks)


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
        partitions = site_partitions(cfg, catalog)
        for p in partitions:
            log(f"[data] client {p.name}: " + ", ".join(f"{s} {len(p.indices[s])}" for s in ("train", "val", "test")))
        results: dict = {"federated": run_flower_simulation(cfg, out)}
        if not skip_central:
            results["central"] = central_baseline(cfg, catalog, out, reuse)
        if not skip_local:
            results["local"] = {p.name: local_only(cfg, catalog, p, out, reuse) for p in partitions}
        results.update(after_the_federation(cfg, catalog, partitions, out, out))
        results["wall_seconds_total"] = time.perf_counter() - started
        results["held_out_test"] = catalog.held_out_test_names()
        write_report(results, cfg, list(catalog.task.classes), out, generated)
        tracker.log_metrics({"wall_seconds": results["wall_seconds_total"]})
        tracker.log_files(*sorted(out.iterdir()))  # the report, its figures and the resolved experiment.json
    return results


def site_partitions(cfg: ExperimentConfig, catalog: Catalog) -> list[Partition]:
    fc = cfg.federated
    return make_partitions(catalog, fc.num_clients, fc.partition, fc.dirichlet_alpha, cfg.data.seed)


def after_the_federation(
    cfg: ExperimentConfig, catalog: Catalog, partitions: list[Partition], run: Path, out: Path
) -> dict:
    """What is computed from a finished run's final models without training the federation again: each
    site's personalised model (under personalise.enabled) and, when there is a central model, the
    per-image paired test against it. `run` holds the models, `out` gets the results."""
    results: dict = {}
    if cfg.personalise.enabled:
        results["personalised"] = personalised_models(cfg, catalog, partitions, run, out)
    if (run / "central" / "final.pt").is_file():
        results["paired"] = paired_tests(cfg, catalog, run, out)
    return results


def complete_run(run: Path, out: Path, overrides: list[str] | None = None) -> dict:
    """Personalised models and the paired test for a finished simulation's folder, from its resolved
    experiment.json (with `overrides`, e.g. personalise.epochs=2) and final models; results and the
    run's report, rewritten with them, go to `out` (the run folder itself, or another)."""
    finished = read_json(run / "comparison.json")
    if not (run / "experiment.json").is_file() or not isinstance(finished, dict):
        raise ValueError(f"{run}: not a finished simulation (it has no experiment.json or comparison.json)")
    cfg = load_config([run / "experiment.json"], overrides)
    cfg.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    catalog = build_catalog(cfg.data)
    results = {**finished["results"], **after_the_federation(cfg, catalog, site_partitions(cfg, catalog), run, out)}
    write_report(results, cfg, list(catalog.task.classes), out, is_generated_data(cfg.data.data_root))
    return results


def held_out_site_config(cfg: ExperimentConfig, site: str) -> ExperimentConfig:
    """cfg federating every site but `site`, into <out>/held-out-<site>/: its site file left out of
    data.sites (the others' splits stay: a site splits its own images), as many clients a site."""
    specs = load_sites(cfg.data.sites, cfg.data.data_root)
    names = [spec.name for spec in specs]
    if site not in names:
        raise ValueError(f"--held-out-site {site}: not a site of this run ({', '.join(names)})")
    fc = cfg.federated
    if fc.partition != "origin" or fc.num_clients % len(specs):
        raise ValueError("leaving a site out needs partition 'origin' with as many clients at every site")
    kept = [path for path, spec in zip(cfg.data.sites, specs, strict=True) if spec.name != site]
    clients = fc.num_clients // len(specs) * len(kept)
    federated = replace(fc, num_clients=clients, min_clients=min(fc.min_clients or clients, clients))
    return replace(
        cfg,
        data=replace(cfg.data, sites=kept),
        federated=federated,
        personalise=replace(cfg.personalise, enabled=False),  # the question is the site that never joined
        output_dir=str(Path(cfg.output_dir) / f"held-out-{site}"),
    )


def run_held_out_site(cfg: ExperimentConfig, site: str, reuse: bool = True) -> dict:
    """Federate the other sites and train central on the same sites, then score both on `site`'s test split."""
    trained = held_out_site_config(cfg, site)
    trained_on = [spec.name for spec in load_sites(trained.data.sites, trained.data.data_root)]
    log(f"[held out {site}] federating {', '.join(trained_on)}; scoring on {site}")
    run_experiment(trained, skip_local=True, reuse=reuse)
    # The held-out site's test split, leakage control included, as when it federates.
    held_out = build_catalog(cfg.data).dataset(site=site, split="test")
    run = Path(trained.output_dir)
    scored = {name: score_checkpoint(run / name / "final.pt", held_out, cfg) for name in ("federated", "central")}
    (federated, federated_correct), (central, central_correct) = scored.values()
    return {
        "site": site,
        "trained_on": trained_on,
        "test": {"federated": federated, "central": central},
        # McNemar's test on set accuracy, image by image; only the counts are kept.
        "paired": {"a": "federated", "b": "central", **mcnemar(federated_correct, central_correct)},
    }


def run_held_out_study(cfg: ExperimentConfig, sites: list[str], reuse: bool = True) -> dict:
    """Leave each of `sites` out in turn; held-out.json and a report in cfg.output_dir."""
    started = time.perf_counter()
    results = {site: run_held_out_site(cfg, site, reuse) for site in sites}
    write_held_out_report(results, cfg, Path(cfg.output_dir), is_generated_data(cfg.data.data_root))
    return {"held_out": results, "wall_seconds_total": time.perf_counter() - started}

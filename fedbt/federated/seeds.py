"""A seed study: the simulation's federated and central runs repeated over training seeds, the split
fixed, so the federated - central gap is reported with the spread the training seed alone causes."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from fedbt.config import ExperimentConfig
from fedbt.data.synthetic import is_generated_data
from fedbt.federated.simulation import run_experiment
from fedbt.progress import log
from fedbt.reports.seeds import write_seed_report


def training_seeds(cfg: ExperimentConfig, count: int) -> list[int]:
    """The configured training seed and the next count - 1."""
    return [cfg.training_seed + k for k in range(count)]


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """cfg trained with `seed` (data.seed, hence the split, unchanged), into its own folder: a
    baseline reused from there was trained with this seed."""
    tracking = cfg.tracking
    if tracking.parent is None and tracking.parent_run_id is None:
        # The seeds' runs side by side under one run in the tracking UI.
        tracking = replace(tracking, parent=f"seeds {Path(cfg.output_dir).name}")
    return replace(
        cfg,
        output_dir=str(Path(cfg.output_dir) / f"seed-{seed}"),
        train=replace(cfg.train, seed=seed),
        tracking=tracking,
    )


def run_seed_study(cfg: ExperimentConfig, count: int, skip_local: bool = False, reuse: bool = True) -> dict:
    """Federated, central and (unless skipped) local-only once per training seed, each seed in
    <out>/seed-<seed>/ with its own report; then seeds.json and the summary report in <out>.
    Whether a site gains by joining is judged seed by seed: a local-only model varies with the
    seed as much as a federated one."""
    if count < 2:
        raise ValueError(f"a seed study needs at least 2 seeds to measure a spread, got {count}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = training_seeds(cfg, count)
    tests, local_tests = {}, {}
    for number, seed in enumerate(seeds, 1):
        log(f"[seeds] seed {number} of {count}: train.seed={seed}, split seed data.seed={cfg.data.seed}")
        results = run_experiment(seed_config(cfg, seed), skip_local=skip_local, reuse=reuse)
        tests[seed] = {model: results[model]["test"] for model in ("federated", "central")}
        if not skip_local:
            local_tests[seed] = {site: result["test"] for site, result in results["local"].items()}
    summary = write_seed_report(tests, cfg, out, local_tests, is_generated_data(cfg.data.data_root))
    return {"seeds": seeds, "summary": summary, "wall_seconds_total": time.perf_counter() - started}

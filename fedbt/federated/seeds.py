"""A seed study: the simulation's federated and central runs repeated over training seeds, the split
fixed, so the federated - central gap is reported with the spread the training seed alone causes."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from fedbt.config import ExperimentConfig, load_config
from fedbt.data.synthetic import is_generated_data
from fedbt.federated.simulation import complete_run, run_experiment
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
    runs = {}
    for number, seed in enumerate(seeds, 1):
        log(f"[seeds] seed {number} of {count}: train.seed={seed}, split seed data.seed={cfg.data.seed}")
        runs[seed] = run_experiment(seed_config(cfg, seed), skip_local=skip_local, reuse=reuse)
    summary = write_seed_report(runs, cfg, out, is_generated_data(cfg.data.data_root))
    return {"seeds": seeds, "summary": summary, "wall_seconds_total": time.perf_counter() - started}


def finished_seeds(study: Path) -> dict[int, Path]:
    """The seed folders of a seed study whose simulation has finished (its comparison.json written), by seed."""
    folders = {int(f.name.removeprefix("seed-")): f for f in study.glob("seed-*") if f.name[5:].isdigit()}
    return {seed: folders[seed] for seed in sorted(folders) if (folders[seed] / "comparison.json").is_file()}


def complete_seed_study(study: Path, out: Path, overrides: list[str] | None = None) -> dict:
    """Personalised models and paired tests for every finished seed of a seed study (fedbt.federated.
    simulation.complete_run, into out/seed-<seed>/), then the seed report over those seeds in out."""
    seeds = finished_seeds(study)
    if not seeds:
        raise ValueError(f"{study}: no finished seed (seed-<k>/comparison.json) in this seed study")
    started = time.perf_counter()
    runs = {}
    for number, (seed, folder) in enumerate(seeds.items(), 1):
        log(f"[seeds] completing seed {seed} ({number} of {len(seeds)} finished)")
        runs[seed] = complete_run(folder, out / folder.name, overrides)
    cfg = load_config([seeds[min(seeds)] / "experiment.json"], overrides)
    cfg.output_dir = str(out)
    summary = write_seed_report(runs, cfg, out, is_generated_data(cfg.data.data_root)) if len(runs) > 1 else {}
    return {"seeds": list(runs), "summary": summary, "wall_seconds_total": time.perf_counter() - started}

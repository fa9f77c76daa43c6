"""A seed study: the simulation's federated and central runs repeated over training seeds, the split
fixed, so the federated - central gap is reported with the spread the training seed alone causes.

A study outlasts a working session: run again into the same folder, it reuses every seed that finished
with the same settings and resumes the federated run of one that did not from its checkpoint (its
central and local-only models are reused by fingerprint, fedbt.federated.simulation). Other global
strategies can run beside the default at every seed, against the same seed's central model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fedbt.config import ExperimentConfig, load_config
from fedbt.data.synthetic import is_generated_data
from fedbt.federated.simulation import complete_run, run_experiment, run_flower_simulation, same_settings
from fedbt.fileio import read_json
from fedbt.fl.server import federated_dir
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


def run_seed_study(
    cfg: ExperimentConfig, count: int, skip_local: bool = False, reuse: bool = True, also: Sequence[str] = ()
) -> dict:
    """Federated, central and (unless skipped) local-only once per training seed, each seed in
    <out>/seed-<seed>/ with its own report, and the federated run under each strategy of `also` in
    <out>/seed-<seed>/federated-<strategy>/; then seeds.json and the summary report in <out>.
    Whether a site gains by joining is judged seed by seed: a local-only model varies with the
    seed as much as a federated one. With `reuse`, what finished earlier with the same settings is
    reused and an unfinished federated run resumed."""
    if count < 2:
        raise ValueError(f"a seed study needs at least 2 seeds to measure a spread, got {count}")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seeds = training_seeds(cfg, count)
    runs = {}
    for number, seed in enumerate(seeds, 1):
        log(f"[seeds] seed {number} of {count}: train.seed={seed}, split seed data.seed={cfg.data.seed}")
        seed_cfg = seed_config(cfg, seed)
        runs[seed] = seed_run(seed_cfg, skip_local, reuse)
        if also:
            runs[seed]["strategies"] = {strategy: strategy_run(seed_cfg, strategy, reuse) for strategy in also}
    summary = write_seed_report(runs, cfg, out, is_generated_data(cfg.data.data_root))
    return {"seeds": seeds, "summary": summary, "wall_seconds_total": time.perf_counter() - started}


def seed_run(cfg: ExperimentConfig, skip_local: bool, reuse: bool) -> dict:
    """One seed's simulation results: reused when it finished with these settings, else run (resumed if it can be)."""
    earlier = earlier_results(cfg, skip_local) if reuse else None
    if earlier is not None:
        return earlier
    return run_experiment(resumable(cfg, reuse), skip_local=skip_local, reuse=reuse)


def earlier_results(cfg: ExperimentConfig, skip_local: bool) -> dict | None:
    """The seed's results when it finished earlier with these settings (its comparison.json), local-only
    models included unless skipped; None: run it."""
    finished = read_json(Path(cfg.output_dir) / "comparison.json")
    if not isinstance(finished, dict) or not same_settings(finished.get("config"), cfg):
        return None
    results = finished.get("results")
    if not isinstance(results, dict) or not (skip_local or "local" in results):
        return None
    log(f"[seeds] {Path(cfg.output_dir).name} finished earlier with these settings: reusing its results")
    return results


def resumable(cfg: ExperimentConfig, reuse: bool) -> ExperimentConfig:
    """cfg resuming its federated run from the checkpoint an earlier run with the same settings left in
    its folder (as --resume does); starting afresh where there is none, or it is another experiment's."""
    out = Path(cfg.output_dir)
    resume = (
        reuse
        and (federated_dir(cfg) / "last.pt").is_file()
        and same_settings(read_json(out / "experiment.json"), cfg)
    )
    if resume:
        log(f"[seeds] {out.name}: resuming the federated run from its checkpoint")
    return replace(cfg, federated=replace(cfg.federated, resume=resume))


def strategy_run(cfg: ExperimentConfig, strategy: str, reuse: bool) -> dict:
    """The seed's federated run under another global strategy, in <seed folder>/federated-<strategy>/ (the
    seed's central model is its baseline); reused when it finished with these settings, else resumed or run."""
    folder = Path(cfg.output_dir) / f"federated-{strategy}"
    other = replace(cfg, federated=replace(cfg.federated, strategy=strategy), output_dir=str(folder))
    finished = read_json(federated_dir(other) / "metrics.json")
    if reuse and isinstance(finished, dict) and same_settings(read_json(folder / "experiment.json"), other):
        log(f"[seeds] {Path(cfg.output_dir).name}/{folder.name} finished earlier with these settings: reusing it")
        return finished
    folder.mkdir(parents=True, exist_ok=True)
    return run_flower_simulation(resumable(other, reuse), folder)


def finished_seeds(study: Path) -> dict[int, Path]:
    """The seed folders of a seed study whose simulation has finished (its comparison.json written), by seed."""
    folders = {int(f.name.removeprefix("seed-")): f for f in study.glob("seed-*") if f.name[5:].isdigit()}
    return {seed: folders[seed] for seed in sorted(folders) if (folders[seed] / "comparison.json").is_file()}


def with_other_strategies(results: dict, seed_folder: Path) -> dict:
    """A seed's results with its finished federated runs under the study's further strategies
    (--also-strategy) beside them, as run_seed_study holds them: the metrics.json that
    run_flower_simulation writes when a run ends. Rerunning the study replaces a run left by other
    settings; until then it is read as it is."""
    runs = {
        run.name.removeprefix("federated-"): run / "federated" / "metrics.json"
        for run in seed_folder.glob("federated-*")
    }
    if strategies := {strategy: read_json(runs[strategy]) for strategy in sorted(runs) if runs[strategy].is_file()}:
        results["strategies"] = strategies
    return results


def study_config(seeds: dict[int, Path], out: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The study's settings, from its first finished seed, writing to out."""
    cfg = load_config([seeds[min(seeds)] / "experiment.json"], overrides)
    cfg.output_dir = str(out)
    return cfg


def report_seed_study(study: Path, out: Path) -> dict:
    """The seed report over a seed study's finished seeds as they stand, while the study may still be
    running: read from each seed's comparison.json and its further strategies' runs; nothing is trained."""
    seeds = finished_seeds(study)
    if len(seeds) < 2:
        finished = f"{len(seeds)} so far"
        raise ValueError(f"{study}: a seed report needs 2 finished seeds (seed-<k>/comparison.json); {finished}")
    runs = {
        seed: with_other_strategies(read_json(folder / "comparison.json")["results"], folder)
        for seed, folder in seeds.items()
    }
    cfg = study_config(seeds, out)
    out.mkdir(parents=True, exist_ok=True)
    return write_seed_report(runs, cfg, out, is_generated_data(cfg.data.data_root), seed_pages=study)


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
        runs[seed] = with_other_strategies(complete_run(folder, out / folder.name, overrides), folder)
    cfg = study_config(seeds, out, overrides)
    summary = write_seed_report(runs, cfg, out, is_generated_data(cfg.data.data_root)) if len(runs) > 1 else {}
    return {"seeds": list(runs), "summary": summary, "wall_seconds_total": time.perf_counter() - started}

"""The device check: everything worth timing on a lent GPU, in one run (`scripts/device_check.sh`).

A GPU is lent now and then for minutes, so one command measures, in this order (the cheap and
sure first; the JSON and Markdown are rewritten after each step, so a run cut short keeps what
it measured):

1. the device, torch and CUDA versions, the commit, and which data the runs use;
2. the bare ResNet18 step against the engine (`fedbt bench`'s two measurements), at 128 and
   224 px, AMP on CUDA;
3. inference latency at batch 1 and batch 64, host to host;
4. the 3-site simulation at 128 px twice, the clients sharing the GPU and one at a time: wall
   time, and wall over the clients' summed training;
5. the main job as the README runs it (3 sites, the GPU profile's rounds, central, local-only,
   report) at the pack's size: its wall time, on the real images when a pack of them is
   present (`fedbt data pack`), else on generated data of about their number.

`quick` runs the same steps at tiny sizes on any device (the test does, on CPU).
"""

from __future__ import annotations

import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedbt.bench import bench_indices, describe_device, engine_rate, federated_overhead, reference_rate
from fedbt.config import ExperimentConfig, load_config
from fedbt.data.catalog import build_catalog
from fedbt.data.pack import is_pack, pack_summary
from fedbt.data.synthetic import generate_demo_data
from fedbt.eval.timing import measure_latency
from fedbt.fileio import write_json, write_text
from fedbt.model.device import select_device
from fedbt.progress import log
from fedbt.reports.comparison import test_results
from fedbt.train.setup import training_setup

PROJECT_ROOT = Path(__file__).resolve().parents[2]
GPU_PROFILE = PROJECT_ROOT / "configs" / "gpu.yaml"
DEFAULT_PACK = PROJECT_ROOT / "packs" / "brain-mri-128px.npz"
# The shared data's 7,249 images: generated data stands in with as many (10 per `per_class`).
REAL_IMAGES = 7249


@dataclass(frozen=True)
class Plan:
    """How big each step is: the full check for a lent GPU, or a quick one of the same steps."""

    engine_sizes: tuple[int, ...]
    batch_size: int
    steps: int
    warmup: int
    engine_images: int
    latency_repeats: int
    simulation_size: int
    simulation_rounds: int
    experiment_rounds: int | None  # None: the GPU profile's
    generated_per_class: int
    device: str
    threads: int | None = None  # None: every core


FULL = Plan(
    engine_sizes=(128, 224),
    batch_size=64,
    steps=30,
    warmup=5,
    engine_images=1536,
    latency_repeats=50,
    simulation_size=128,
    simulation_rounds=8,
    experiment_rounds=None,
    generated_per_class=REAL_IMAGES // 10,
    device="auto",
)
QUICK = Plan(
    engine_sizes=(32, 48),
    batch_size=8,
    steps=2,
    warmup=1,
    engine_images=16,
    latency_repeats=3,
    simulation_size=32,
    # The GPU profile's rounds are a quarter epoch each: 4 rounds make the whole epoch it requires.
    simulation_rounds=4,
    experiment_rounds=4,
    # Enough for every site to hold validation and test images (a local-only model is scored on them).
    generated_per_class=8,
    device="cpu",
    # One thread: at tiny sizes a second one adds only synchronisation, which a busy machine
    # (a test run beside others) turns into seconds a step.
    threads=1,
)


def environment(commit: str | None) -> dict:
    device = select_device("auto")
    return {
        "device": describe_device(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "python": platform.python_version(),
        "commit": commit or git_commit(),
    }


def git_commit() -> str:
    """HEAD, marked when the tree has changes; a machine given the tree without .git says so."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git here: pass --commit)"


def profile_config(plan: Plan, work: Path, data_root: str, size: int, overrides: list[str] = ()) -> ExperimentConfig:
    """The GPU profile at `size` px on `data_root`, its files and tracking under `work`."""
    settings = [
        f"data.data_root={data_root}",
        f"data.image_size={size}",
        f"data.cache_dir={work / 'cache'}",
        f"train.device={plan.device}",
        f"train.threads={'null' if plan.threads is None else plan.threads}",
        f"train.batch_size={plan.batch_size}",
        "train.log_every=0",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        f"output_dir={work / 'runs'}",
        *overrides,
    ]
    return load_config([str(GPU_PROFILE)], settings)


def engine_against_bare_step(plan: Plan, work: Path, generated: Path) -> list[dict]:
    """`fedbt bench`'s reference and engine rates at each size, on generated images."""
    rows = []
    for size in plan.engine_sizes:
        cfg = profile_config(plan, work, str(generated), size)
        catalog = build_catalog(cfg.data, progress=False)
        indices = bench_indices(catalog, plan.engine_images)
        setup = training_setup(cfg, catalog.task.num_classes)
        log(f"[device check] {size} px: bare step and engine, batch {plan.batch_size}")
        bare = reference_rate(
            catalog.task.num_classes, size, plan.batch_size, setup.device, plan.steps, plan.warmup, cfg.train.lr
        )
        engine = engine_rate(setup, cfg, catalog, indices, plan.warmup)["images_per_second"]
        rows.append({"image_size": size, "bare_step_images_per_second": bare,
                     "engine_images_per_second": engine, "engine_over_bare_step": engine / bare})  # fmt: skip
    return rows


def inference_latency(plan: Plan, work: Path, generated: Path) -> dict:
    """Host-to-host inference of an untrained model at the simulation's size: batch 1 and batch 64."""
    cfg = profile_config(plan, work, str(generated), plan.simulation_size)
    catalog = build_catalog(cfg.data, progress=False)
    setup = training_setup(cfg, catalog.task.num_classes)
    timed = measure_latency(setup.model, catalog.pixels[:64], setup.device, 64, plan.latency_repeats, plan.warmup)
    return {
        "image_size": plan.simulation_size,
        "batch1_ms": timed["ms_per_image_batch1"],
        "batch64_ms": 64 * 1000 / timed["images_per_second_batched"],
        "batch64_images_per_second": timed["images_per_second_batched"],
    }


def fixed_round_costs(plan: Plan, work: Path, data_root: str) -> dict[str, float]:
    """Each fixed piece of a round of the experiment below (`fedbt bench --round-costs`)."""
    from fedbt.bench.round_costs import round_costs  # Flower's records: not needed by the steps before

    cfg = profile_config(plan, work, data_root, plan.simulation_size)
    log("[device check] the fixed pieces of a simulation round")
    return round_costs(cfg, build_catalog(cfg.data, progress=False), repeats=max(plan.steps // 10, 1))


def simulation_wall(cfg: ExperimentConfig, out: Path) -> dict:
    from fedbt.federated.simulation import run_flower_simulation

    start = time.perf_counter()
    run_flower_simulation(cfg, out)
    fed = federated_overhead(out)
    return {
        "rounds": fed.rounds,
        "wall_seconds": fed.wall_seconds,
        "client_train_seconds": fed.train_seconds,
        "wall_over_client_training": fed.overhead_ratio,
        "overhead_seconds_per_round": fed.overhead_seconds_per_round,
        "later_overhead_seconds_per_round": fed.later_overhead_seconds_per_round,
        "seconds_with_startup": time.perf_counter() - start,
    }


def concurrent_against_sequential(plan: Plan, work: Path, data_root: str) -> dict:
    """The 3-site federation with the clients sharing the device, then one client at a time."""
    rounds = f"federated.rounds={plan.simulation_rounds}"
    runs = {}
    for name, together in (("concurrent", "null"), ("sequential", "1")):
        log(f"[device check] simulation, {plan.simulation_rounds} rounds, clients {name}")
        cfg = profile_config(plan, work, data_root, plan.simulation_size, [rounds, f"federated.clients_per_gpu={together}"])
        build_catalog(cfg.data, progress=False)  # decoded once, before Ray's workers all want it
        runs[name] = simulation_wall(cfg, work / f"simulation-{name}")
    runs["concurrent_over_sequential_wall"] = runs["concurrent"]["wall_seconds"] / runs["sequential"]["wall_seconds"]
    return runs


def whole_experiment(plan: Plan, work: Path, data_root: str, size: int) -> dict:
    """The main job, `run_simulation.py --clients 3 --config configs/gpu.yaml`, at `size` px
    (the GPU profile's 224 px would not travel: a pack of the real images at 224 px is over 64 MiB)."""
    from fedbt.federated.simulation import run_experiment

    overrides = [] if plan.experiment_rounds is None else [f"federated.rounds={plan.experiment_rounds}"]
    cfg = profile_config(plan, work, data_root, size, overrides)
    log(f"[device check] the whole experiment: {cfg.federated.rounds} rounds, central, local-only, report")
    results = run_experiment(replace(cfg, output_dir=str(work / "experiment")), reuse=False)
    fed = federated_overhead(work / "experiment")
    return {
        "image_size": size,
        "rounds": fed.rounds,
        "wall_seconds": results["wall_seconds_total"],
        "federated_wall_seconds": fed.wall_seconds,
        "federated_wall_over_client_training": fed.overhead_ratio,
        "federated_overhead_seconds_per_round": fed.overhead_seconds_per_round,
        "federated_later_overhead_seconds_per_round": fed.later_overhead_seconds_per_round,
        "central_wall_seconds": results["central"]["wall_seconds"],
        "local_wall_seconds": {name: run["wall_seconds"] for name, run in results["local"].items()},
        "pooled_test_accuracy": {model: test["pooled"]["accuracy"] for model, test in test_results(results).items()},
    }


def experiment_data(plan: Plan, work: Path, pack: Path | None) -> dict:
    """The pack when one of the simulation's size is given, else generated data of about the real size."""
    if pack is not None:
        summary = pack_summary(pack)
        if summary["image_size"] == plan.simulation_size:
            return {"root": str(pack), **summary}
        log(f"[device check] {pack} holds {summary['image_size']} px images, not {plan.simulation_size}: not used")
    log(f"[device check] generating data: {plan.generated_per_class} images per class and site")
    root = generate_demo_data(work / "experiment-data", per_class=plan.generated_per_class, seed=1)
    return {"root": str(root), "source": "generated", "image_size": plan.simulation_size}


def run_device_check(out: Path, quick: bool = False, pack: Path | None = None, commit: str | None = None) -> dict:
    """Every step in order; DIR/device-check.json and .md rewritten after each."""
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    results: dict = {"mode": "quick" if quick else "full", "environment": environment(commit)}
    out.mkdir(parents=True, exist_ok=True)

    def step(name: str, measure) -> None:
        try:
            results[name] = measure()
        except ModuleNotFoundError as err:
            # A lent machine has torch but may lack Flower and Ray (docs/performance.md#the-device-check):
            # the steps that need them are reported as not run, and the others still measure.
            log(f"[device check] {name}: not run, the Python package {err.name} is not installed here")
            results[name] = {"skipped": f"not run: the Python package {err.name} is not installed here"}
        results["seconds_so_far"] = time.perf_counter() - started
        write_results(out, results)

    with tempfile.TemporaryDirectory(prefix="fedbt-device-check-") as tmp:
        work = Path(tmp)
        # About 70% of generated images land in the training split the engine epoch draws from.
        engine_data = generate_demo_data(work / "engine-data", per_class=plan.engine_images // 7 + 1, seed=0)
        data = experiment_data(plan, work, pack)
        results["data"] = {key: value for key, value in data.items() if key != "root"}
        write_results(out, results)
        step("engine", lambda: engine_against_bare_step(plan, work, engine_data))
        step("inference", lambda: inference_latency(plan, work, engine_data))
        step("round_costs", lambda: fixed_round_costs(plan, work, data["root"]))
        step("simulation", lambda: concurrent_against_sequential(plan, work, data["root"]))
        step("experiment", lambda: whole_experiment(plan, work, data["root"], plan.simulation_size))
    return results


STEP_NAMES = {
    "engine": "engine against the bare step",
    "inference": "inference latency",
    "round_costs": "fixed pieces of a round",
    "simulation": "simulation, clients concurrent and sequential",
    "experiment": "whole experiment",
}


def result_rows(results: dict) -> list[tuple[str, str]]:
    """(measure, value) for the table, from whatever steps finished."""
    skipped = {name: step["skipped"] for name, step in results.items() if isinstance(step, dict) and "skipped" in step}
    measured = {name: step for name, step in results.items() if name not in skipped}
    return measured_rows(measured) + [(STEP_NAMES[name], why) for name, why in skipped.items()]


def measured_rows(results: dict) -> list[tuple[str, str]]:
    env = results["environment"]
    rows = [
        ("device", env["device"]),
        ("torch / CUDA / cuDNN", f"{env['torch']} / {env['cuda'] or '-'} / {env['cudnn'] or '-'}"),
        ("commit", env["commit"]),
    ]
    if data := results.get("data"):
        rows.append(("data of the simulation and the experiment", describe_data(data)))
    for row in results.get("engine", []):
        size = row["image_size"]
        rows.append((f"bare ResNet18 step, {size} px", f"{row['bare_step_images_per_second']:.0f} img/s"))
        rows.append((f"engine, {size} px (engine / bare step)",
                     f"{row['engine_images_per_second']:.0f} img/s ({row['engine_over_bare_step']:.2f})"))  # fmt: skip
    if inference := results.get("inference"):
        px = inference["image_size"]
        rows.append((f"inference latency, batch 1, {px} px", f"{inference['batch1_ms']:.1f} ms"))
        rows.append((f"inference latency, batch 64, {px} px",
                     f"{inference['batch64_ms']:.1f} ms ({inference['batch64_images_per_second']:.0f} img/s)"))  # fmt: skip
    if costs := results.get("round_costs"):
        pieces = sorted(costs.items(), key=lambda item: -item[1])[:3]
        rows.append(("fixed pieces of a round, sum (largest three)",
                     f"{sum(costs.values()):.2f} s (" + "; ".join(f"{name} {s:.2f} s" for name, s in pieces) + ")"))  # fmt: skip
    if simulation := results.get("simulation"):
        for name in ("concurrent", "sequential"):
            run = simulation[name]
            rows.append((f"simulation, {run['rounds']} rounds, clients {name}: wall (wall / summed client training)",
                         f"{run['wall_seconds']:.1f} s ({run['wall_over_client_training']:.2f}), "
                         f"{run['overhead_seconds_per_round']:.2f} s overhead a round, "
                         f"{run['later_overhead_seconds_per_round']:.2f} s after the first"))  # fmt: skip
        rows.append(("simulation wall, concurrent / sequential", f"{simulation['concurrent_over_sequential_wall']:.2f}"))
    if experiment := results.get("experiment"):
        local = sum(experiment["local_wall_seconds"].values())
        rows.append((f"whole experiment, {experiment['image_size']} px, {experiment['rounds']} rounds: wall",
                     f"{experiment['wall_seconds']:.0f} s (federated {experiment['federated_wall_seconds']:.0f}, "
                     f"central {experiment['central_wall_seconds']:.0f}, local-only {local:.0f})"))  # fmt: skip
        rows.append(("whole experiment: federated overhead a round, after the first (wall / client training)",
                     f"{experiment['federated_overhead_seconds_per_round']:.2f} s, "
                     f"{experiment['federated_later_overhead_seconds_per_round']:.2f} s "
                     f"({experiment['federated_wall_over_client_training']:.2f})"))  # fmt: skip
    rows.append(("device check wall time", f"{results.get('seconds_so_far', 0):.0f} s ({results['mode']})"))
    return rows


def describe_data(data: dict) -> str:
    if "sha256" not in data:
        return f"generated images at {data['image_size']} px (no pack of the real images given)"
    return f"{data['source']} images from pack {data['sha256'][:12]} ({data['images']} images, {data['image_size']} px)"


def format_rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {value}" for label, value in rows)


def markdown(rows: list[tuple[str, str]]) -> str:
    lines = ["# Device check", "", "| measure | value |", "|---|---|"]
    return "\n".join(lines + [f"| {label} | {value} |" for label, value in rows]) + "\n"


def write_results(out: Path, results: dict) -> None:
    rows = result_rows(results)
    write_json(out / "device-check.json", results)
    write_text(out / "device-check.md", markdown(rows))


def run_and_print(out: str, quick: bool, pack: str | None, commit: str | None) -> int:
    """The `fedbt bench --device-check` command."""
    chosen = Path(pack) if pack else (DEFAULT_PACK if DEFAULT_PACK.is_file() else None)
    if pack and not is_pack(chosen):
        raise ValueError(f"--pack {pack}: not a pack file (*.npz); make one with `fedbt data pack`")
    results = run_device_check(Path(out), quick, chosen, commit)
    print(format_rows(result_rows(results)))
    print(f"\nwritten: {Path(out) / 'device-check.json'}, {Path(out) / 'device-check.md'}")
    return 0

"""`fedbt bench`: how fast this machine trains, evaluates and predicts, measured in one run.

The reference rate is a bare ResNet18 step on random tensors already in memory: the
best the hardware does for this model, image size and batch.  The engine rate runs the
project's real path (catalog -> cached uint8 -> augmentation -> DataLoader ->
train_one_epoch); their ratio says how much the pipeline around the model costs.
Every number comes from this run; nothing is carried over from elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from fedbt.config import DataConfig, ExperimentConfig
from fedbt.data.cache import ImageCache, fill_cache, load_pixels
from fedbt.data.catalog import Catalog, MRIDataset, build_catalog
from fedbt.data.images import ImageLimits
from fedbt.data.loader import make_loader
from fedbt.data.transforms import augmentation_for
from fedbt.eval.inference import predict_probabilities
from fedbt.eval.timing import latency_ms
from fedbt.fileio import write_json
from fedbt.model.architectures import build_model, build_resnet18
from fedbt.model.device import autocast_for, configure_threads, prepare_model, select_device
from fedbt.progress import log
from fedbt.train.engine import seed_everything
from fedbt.train.schedules import StepSchedule
from fedbt.train.setup import TrainingSetup, steps_per_epoch, train_epoch, training_setup

# Evaluation batches: large enough to amortise per-batch overhead, small enough for any device.
EVAL_BATCH_SIZE = 64
# Training steps recorded by --profile (after one unrecorded warm-up step).
PROFILE_STEPS = 5
PROFILE_ROWS = 15
DEPLOYMENT_UNAVAILABLE = "not measured (pass --deployment)"


@dataclass
class CacheTiming:
    """Decode cache for the benchmark epoch's images: filled from scratch vs read back."""

    images: int
    decode_seconds: float
    load_seconds: float
    epoch_seconds: float
    # First epoch with a cold cache (decode + train) over an epoch with a warm one (load + train).
    cold_over_warm: float


@dataclass
class FederatedOverhead:
    """A finished simulation's wall time of its rounds against its clients' training time."""

    rounds: int
    wall_seconds: float
    train_seconds: float
    overhead_ratio: float
    overhead_seconds_per_round: float
    # Rounds 2 onwards: without the first round's start-up (Ray's client actors importing and
    # loading the catalog), what every further round adds. None for a one-round run.
    later_overhead_seconds_per_round: float | None = None


@dataclass
class BenchResult:
    device: str
    model: str
    image_size: int
    batch_size: int
    reference_steps: int
    reference_images_per_second: float
    engine_images: int
    engine_seconds: float
    engine_images_per_second: float
    engine_over_reference: float
    eval_batch_size: int
    eval_images_per_second: float
    latency_repeats: int
    latency_ms: float
    cache: CacheTiming
    federated: FederatedOverhead | None = None
    # Measured only on request (--deployment: it starts a server and three sites); None, never a guess.
    deployment_overhead_seconds_per_round: float | None = None
    deployment_flower_defaults_seconds_per_round: float | None = None
    # With --deployment: what the loopback carries of one model's bytes (MB/s per way of sending them).
    model_megabytes: float | None = None
    loopback_megabytes_per_second: dict[str, float] | None = None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {_cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _synchronize(device: torch.device) -> None:
    # CUDA runs asynchronously: without this the clock stops before the GPU has finished.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_rate(
    num_classes: int, image_size: int, batch_size: int, device: torch.device, steps: int, warmup: int, lr: float = 1e-3
) -> float:
    """Images/s of bare ResNet18 + Adam steps on random float tensors already on the device."""
    model = prepare_model(build_resnet18(num_classes), device)  # same layout as the engine uses
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    images = torch.randn(batch_size, 1, image_size, image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(num_classes, (batch_size,), device=device)

    def step() -> None:
        with autocast_for(device):
            loss = nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def engine_epoch(setup: TrainingSetup, cfg: ExperimentConfig, dataset: MRIDataset) -> dict[str, float]:
    """One pass of the real training path (a fresh loader, as every epoch of training gets)."""
    schedule = StepSchedule(cfg.train.lr, cfg.train.schedule, steps_per_epoch(dataset, cfg, setup.device))
    return train_epoch(setup, dataset, cfg, schedule, cfg.training_seed, cfg.training_seed)


def bench_indices(catalog: Catalog, images: int) -> list[int]:
    """The benchmark epoch: the first `images` of the pooled training split."""
    indices = catalog.indices(split="train", pooled=True)[:images]
    if not indices:
        raise ValueError("the pooled training split is empty: nothing to benchmark")
    return indices


def engine_rate(
    setup: TrainingSetup, cfg: ExperimentConfig, catalog: Catalog, indices: list[int], warmup: int
) -> dict[str, float]:
    """train_one_epoch stats over the benchmark images, after `warmup` untimed batches."""
    augment = augmentation_for(cfg.train)
    if warmup > 0:
        engine_epoch(setup, cfg, catalog.subset(indices[: warmup * cfg.train.batch_size], augment))
    return engine_epoch(setup, cfg, catalog.subset(indices, augment))


def eval_rate(model: nn.Module, dataset: MRIDataset, device: torch.device, warmup: int) -> float:
    """Images/s of predict_probabilities over a real evaluation loader."""
    first_batch = [(dataset.pixels[:EVAL_BATCH_SIZE], dataset.masks[:EVAL_BATCH_SIZE])]
    for _ in range(warmup):
        predict_probabilities(model, first_batch, device)
    loader = make_loader(dataset, EVAL_BATCH_SIZE, False, device)
    start = time.perf_counter()
    predict_probabilities(model, loader, device)  # returns numpy arrays: the device has finished
    return len(dataset) / (time.perf_counter() - start)


def cache_timing(
    catalog: Catalog, indices: list[int], data: DataConfig, epoch_seconds: float, scratch: Path
) -> CacheTiming:
    """Decode the epoch's images into an empty cache under `scratch`, then read them back.

    The source files were just read (and hashed) by build_catalog, so they sit in the OS page
    cache: this measures decoding and resizing, not the disk.
    """
    records = [catalog.records[i] for i in indices]
    cache = ImageCache(scratch, catalog.image_size, data.crop_to_content, ImageLimits.of(data))
    start = time.perf_counter()
    errors = fill_cache(records, cache, progress=False)
    decode_seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} images failed to decode again: {next(iter(errors.values()))}")
    start = time.perf_counter()
    load_pixels(records, cache)
    load_seconds = time.perf_counter() - start
    cold_over_warm = (decode_seconds + epoch_seconds) / (load_seconds + epoch_seconds)
    return CacheTiming(len(records), decode_seconds, load_seconds, epoch_seconds, cold_over_warm)


def federated_overhead(run_dir: str | Path) -> FederatedOverhead:
    """Overhead of a finished simulation from <run_dir>/federated/metrics.json.

    Clients train one after another on one machine, so the rounds' useful work is the sum of
    every client's training seconds over every round; the rest of the wall time is overhead
    (Ray, serialisation, aggregation, evaluation, checkpoints).  A resumed run restarts its
    elapsed_seconds clock: its wall time covers only the rounds after the resume and the ratio comes out too low.
    """
    path = Path(run_dir) / "federated" / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"no federated results at {path}")
    history = json.loads(path.read_text()).get("history") or []
    if not history:
        raise ValueError(f"{path}: no rounds in the history")
    try:
        per_round = [sum(site["train_seconds"] for site in entry["train"].values()) for entry in history]
        elapsed = [entry["elapsed_seconds"] for entry in history]
    except KeyError as err:
        raise ValueError(f"{path}: history lacks {err}") from None
    train, wall = sum(per_round), elapsed[-1]
    if train <= 0:
        raise ValueError(f"{path}: no client training time recorded")
    later = None
    if len(history) > 1:
        later = (elapsed[-1] - elapsed[0] - sum(per_round[1:])) / (len(history) - 1)
    return FederatedOverhead(len(history), wall, train, wall / train, (wall - train) / len(history), later)


def run_bench(
    cfg: ExperimentConfig,
    catalog: Catalog,
    steps: int,
    warmup: int,
    images: int,
    sim_run: str | Path | None = None,
    scratch: Path | None = None,
) -> BenchResult:
    """Measure everything in the table; `scratch` holds the cold decode cache (default: a temp dir)."""
    if steps < 1 or images < 1 or warmup < 0:
        raise ValueError("bench needs --steps >= 1, --images >= 1 and --warmup >= 0")
    # Read first: a wrong --sim-run should fail before minutes of measuring, not after.
    federated = federated_overhead(sim_run) if sim_run else None
    configure_threads(cfg.train.threads)
    device = select_device(cfg.train.device)
    seed_everything(cfg.training_seed)
    indices = bench_indices(catalog, images)
    size, batch = cfg.data.image_size, cfg.train.batch_size

    log(f"[bench] reference: {steps} bare ResNet18 steps on random tensors")
    reference = reference_rate(catalog.task.num_classes, size, batch, device, steps, warmup, cfg.train.lr)
    log(f"[bench] engine: one epoch of {len(indices)} images through the real training path")
    setup = training_setup(cfg, catalog.task.num_classes)
    stats = engine_rate(setup, cfg, catalog, indices, warmup)
    log("[bench] evaluation rate and batch-1 latency")
    plain = catalog.subset(indices)
    evaluation = eval_rate(setup.model, plain, device, warmup)
    latency = latency_ms(setup.model, plain, device, steps, warmup)
    log("[bench] decode cache: cold fill vs warm load")
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        cache = cache_timing(catalog, indices, cfg.data, stats["seconds"], Path(tmp))

    return BenchResult(
        device=describe_device(device),
        model=cfg.model.name,
        image_size=size,
        batch_size=batch,
        reference_steps=steps,
        reference_images_per_second=reference,
        engine_images=int(stats["images"]),
        engine_seconds=stats["seconds"],
        engine_images_per_second=stats["images_per_second"],
        engine_over_reference=stats["images_per_second"] / reference,
        eval_batch_size=EVAL_BATCH_SIZE,
        eval_images_per_second=evaluation,
        latency_repeats=steps,
        latency_ms=latency,
        cache=cache,
        federated=federated,
    )


def profile_training(
    cfg: ExperimentConfig, catalog: Catalog, out_dir: Path, steps: int = PROFILE_STEPS
) -> tuple[str, Path]:
    """torch.profiler over a few engine training steps: top operators and a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    batch = cfg.train.batch_size
    indices = bench_indices(catalog, (steps + 1) * batch)
    if len(indices) <= batch:
        raise ValueError(f"profiling needs more than one batch ({batch}) of training images")
    augment = augmentation_for(cfg.train)
    setup = training_setup(cfg, catalog.task.num_classes)
    device = setup.device
    # One unrecorded step first: the first step pays for kernel selection and allocation.
    engine_epoch(setup, cfg, catalog.subset(indices[:batch], augment))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine_epoch(setup, cfg, catalog.subset(indices[batch:], augment))
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / "bench-trace.json"
    prof.export_chrome_trace(str(trace))
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=PROFILE_ROWS), trace


def format_table(result: BenchResult) -> str:
    cache, fed = result.cache, result.federated
    federated = (
        f"{fed.overhead_ratio:.2f} x (wall {fed.wall_seconds:.1f} s / client training {fed.train_seconds:.1f} s), "
        f"{fed.overhead_seconds_per_round:.1f} s per round over {fed.rounds} rounds"
        + (f" ({fed.later_overhead_seconds_per_round:.1f} s after the first)" if fed.later_overhead_seconds_per_round is not None else "")
        if fed
        else "not measured (pass --sim-run DIR)"
    )
    deployment = result.deployment_overhead_seconds_per_round
    rows = [
        ("reference: bare ResNet18 step, random tensors", f"{result.reference_images_per_second:.1f} img/s"),
        (
            "engine: catalog -> cache -> augment -> loader -> step",
            f"{result.engine_images_per_second:.1f} img/s ({result.engine_over_reference:.2f} x reference)",
        ),
        (f"evaluation, batch {result.eval_batch_size}", f"{result.eval_images_per_second:.1f} img/s"),
        (f"inference latency, batch 1 (median of {result.latency_repeats})", f"{result.latency_ms:.1f} ms"),
        (f"decode cache cold fill, {cache.images} images", f"{cache.decode_seconds:.2f} s"),
        (f"decode cache warm load, {cache.images} images", f"{cache.load_seconds:.3f} s"),
        ("first epoch cold cache / warm epoch", f"{cache.cold_over_warm:.2f} x"),
        ("federated simulation overhead", federated),
        ("deployment per-round overhead", DEPLOYMENT_UNAVAILABLE if deployment is None else f"{deployment:.1f} s"),
    ]
    if result.deployment_flower_defaults_seconds_per_round is not None:
        rows.append(
            ("deployment overhead, Flower defaults", f"{result.deployment_flower_defaults_seconds_per_round:.1f} s")
        )
    if result.loopback_megabytes_per_second is not None:
        rates = ", ".join(f"{name} {rate:.0f}" for name, rate in result.loopback_megabytes_per_second.items())
        rows.append((f"loopback MB/s, one {result.model_megabytes:.1f} MB model", rates))
    width = max(len(label) for label, _ in rows)
    header = [
        f"device: {result.device}",
        (
            f"model {result.model}, {result.image_size} px, batch {result.batch_size}; "
            f"engine epoch {result.engine_images} images in {result.engine_seconds:.1f} s"
        ),
    ]
    if result.model != "resnet18":
        header.append(f"note: the engine trains {result.model}, the reference ResNet18: the ratio compares models")
    return "\n".join(header + [""] + [f"{label.ljust(width)}  {value}" for label, value in rows])


def deployment_overhead(cfg: ExperimentConfig, flower_defaults: bool, rounds: int = 5) -> float:
    """Seconds per round a loopback deployment (server + one SuperNode per site) spends beyond training."""
    from fedbt.deployment.local import measure_overhead

    overrides = [
        f"data.image_size={cfg.data.image_size}",
        f"model.name={cfg.model.name}",
        f"train.batch_size={cfg.train.batch_size}",
        "train.threads=1",  # three sites share this machine's cores
        # What crosses the wire, and how often: the two settings that decide the transfer cost.
        f"federated.transport_dtype={cfg.federated.transport_dtype}",
        f"federated.evaluate_every={cfg.federated.evaluate_every}",
    ]
    with tempfile.TemporaryDirectory(prefix="fedbt-bench-deploy-") as work:
        log(f"[bench] deployment on loopback, {rounds} rounds, {'Flower defaults' if flower_defaults else 'tuned'}")
        measured = measure_overhead(
            Path(work), Path(cfg.data.data_root), cfg.data.sites, rounds, overrides, flower_defaults
        )
    log(f"[bench] deployment overhead per round: {measured['per_round_seconds']}")
    return measured["overhead_seconds_per_round"]


def model_megabytes(cfg: ExperimentConfig, catalog: Catalog) -> float:
    """The bytes of the model a round moves, as float32."""
    model = build_model(cfg.model, catalog.task.num_classes, cfg.data.image_size)
    return sum(t.numel() * 4 for t in model.state_dict().values()) / 1e6


def run_and_print(
    cfg: ExperimentConfig,
    steps: int,
    warmup: int,
    images: int,
    sim_run: str | None = None,
    profile: bool = False,
    json_path: str | None = None,
    deployment: str | None = None,
) -> int:
    """The `fedbt bench` command."""
    catalog = build_catalog(cfg.data)
    result = run_bench(cfg, catalog, steps, warmup, images, sim_run)
    if deployment is not None:
        from fedbt.deployment.loopback import loopback_rates

        result.model_megabytes = model_megabytes(cfg, catalog)
        result.loopback_megabytes_per_second = loopback_rates(result.model_megabytes)
    if deployment in ("tuned", "both"):
        result.deployment_overhead_seconds_per_round = deployment_overhead(cfg, flower_defaults=False)
    if deployment in ("flower-defaults", "both"):
        result.deployment_flower_defaults_seconds_per_round = deployment_overhead(cfg, flower_defaults=True)
    print(format_table(result))
    numbers = asdict(result)
    if profile:
        log(f"[bench] profiling {PROFILE_STEPS} engine training steps")
        table, trace = profile_training(cfg, catalog, Path(cfg.output_dir))
        print(f"\ntop operators over {PROFILE_STEPS} engine training steps:\n{table}\nChrome trace: {trace}")
        numbers["profile_trace"] = str(trace)
    if json_path:
        write_json(json_path, numbers)
    return 0

"""What a simulation round spends besides training, piece by piece (`fedbt bench --round-costs`).

`fedbt bench --sim-run` gives a finished run's overhead a round as one number (wall time of the
rounds minus the clients' summed training, over the rounds). This times, in this process and on
the experiment's model and image size, each fixed piece a round repeats, as the round's code
calls it:

- the server: the wire copy of the global model (cast, ArrayRecord, packing) once per site,
  unpacking and reading the replies, building a model to checkpoint, writing last.pt with the
  round history, logging the round to MLflow, and every `evaluate_every` rounds scoring the
  pooled validation split;
- each site: building its training set-up from the global state (model, optimiser), and
  keeping its optimiser state between rounds (serialised into the Flower context and back).

The rest of a round's overhead is Ray: handing messages to the client actors and back.
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from fedbt.bench import federated_overhead
from fedbt.config import ExperimentConfig
from fedbt.data.catalog import Catalog, build_catalog
from fedbt.data.loader import make_loader
from fedbt.eval.inference import evaluate

# Flower's records as the federated layer's packing uses them (Flower is imported only under federated/).
from fedbt.federated.packing import ArrayRecord, RecordDict, pack_content, unpack_content
from fedbt.fl.task import transport_state
from fedbt.model.checkpoint import save_checkpoint
from fedbt.model.device import prepare_model, select_device
from fedbt.tracking import experiment_run
from fedbt.train.setup import new_model, training_setup

SITES = 3


def median_seconds(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_entry(server_round: int, sites: list[str]) -> dict:
    """A round's history entry with the fields and sizes a real one has (what last.pt holds per round)."""
    train = {site: {"train_loss": 0.5, "train_seconds": 10.0, "images_per_second": 30.0, "num-examples": 1500}
             for site in sites}  # fmt: skip
    scores = {"loss": 0.4, "accuracy": 0.9, "macro_f1": 0.9, "set_accuracy": 0.9, "n": 700, "tumour_accuracy": 0.95}
    return {"round": server_round, "server": scores, "train": train, "dropped": {},
            "sites": dict.fromkeys(sites, scores), "elapsed_seconds": 20.0 * server_round}  # fmt: skip


def round_costs(cfg: ExperimentConfig, catalog: Catalog, repeats: int = 3) -> dict[str, float]:
    """Median seconds of each fixed piece of one round, for the whole round (all its sites)."""
    device = select_device(cfg.train.device)
    fc = cfg.federated
    classes = catalog.task.num_classes
    state = {k: v.detach().clone() for k, v in new_model(cfg, classes).state_dict().items()}

    def wire_message() -> RecordDict:
        return pack_content(RecordDict({"arrays": ArrayRecord(torch_state_dict=transport_state(state, fc.transport_dtype))}))

    def read_reply() -> dict:
        return unpack_content(wire_message())["arrays"].to_torch_state_dict()

    setup = training_setup(cfg, classes, initial_state=state)
    train = catalog.subset(catalog.indices(split="train", pooled=True)[: 2 * cfg.train.batch_size])
    # One step, so that the optimiser has its state (Adam: two moments per weight) to keep.
    images, masks = next(iter(make_loader(train, cfg.train.batch_size, True, device)))
    setup.model(images.to(device).float()).float().logsumexp(1).mean().backward()
    setup.optimizer.step()
    optimizer_state = setup.optimizer.state_dict()

    def keep_optimizer_state() -> None:
        buffer = io.BytesIO()
        torch.save(optimizer_state, buffer)
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    val = catalog.dataset(split="val", pooled=True)
    history = [round_entry(r, catalog.site_names) for r in range(1, fc.rounds + 1)]
    with tempfile.TemporaryDirectory(prefix="fedbt-round-costs-") as tmp:
        tracked = replace(cfg, tracking=replace(cfg.tracking, uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}"))
        with experiment_run(replace(tracked, output_dir=tmp), "round costs") as tracker:
            costs = {
                "server: wire copies of the global model (cast, ArrayRecord, packing)": SITES
                * median_seconds(wire_message, repeats),
                "server: replies unpacked and read back": SITES * median_seconds(read_reply, repeats),
                "server: a new model for the checkpoint": median_seconds(lambda: new_model(cfg, classes), repeats),
                f"server: last.pt with {fc.rounds} rounds of history": median_seconds(
                    lambda: save_checkpoint(Path(tmp) / "last.pt", setup.model, cfg, {"history": history}, "bench"),
                    repeats,
                ),
                "server: the round logged to MLflow": median_seconds(lambda: tracker.log_round(history[-1]), repeats),
                f"server: pooled validation scoring ({len(val)} images), every {fc.evaluate_every} rounds": (
                    median_seconds(
                        lambda: evaluate(
                            prepare_model(new_model(cfg, classes), device),
                            make_loader(val, cfg.train.batch_size, False, device),
                            device,
                            catalog.task,
                        ),
                        repeats,
                    )
                    / fc.evaluate_every
                ),
                "sites: training set-up from the global state": SITES
                * median_seconds(lambda: training_setup(cfg, classes, initial_state=state), repeats),
                "sites: optimiser state kept between rounds (saved, loaded)": SITES
                * median_seconds(keep_optimizer_state, repeats),
            }
    return costs


def format_costs(costs: dict[str, float], overhead_per_round: float | None = None) -> str:
    width = max(len(name) for name in costs)
    lines = [f"{name.ljust(width)}  {seconds:6.3f} s" for name, seconds in costs.items()]
    lines.append(f"{'sum of the pieces a round'.ljust(width)}  {sum(costs.values()):6.3f} s")
    if overhead_per_round is not None:
        lines.append(f"{'measured overhead a round (--sim-run)'.ljust(width)}  {overhead_per_round:6.3f} s")
    return "\n".join(lines)


def run_and_print(cfg: ExperimentConfig, sim_run: str | None = None) -> int:
    """The `fedbt bench --round-costs` command."""
    overhead = federated_overhead(sim_run).overhead_seconds_per_round if sim_run else None
    costs = round_costs(cfg, build_catalog(cfg.data))
    print(f"fixed pieces of one round, {cfg.data.image_size} px, {cfg.model.name}, {SITES} sites (median seconds):")
    print(format_costs(costs, overhead))
    return 0

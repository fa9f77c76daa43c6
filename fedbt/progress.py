"""Progress output for long work: timestamped lines on stderr, step counters."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

_START = time.perf_counter()

HEADLINE_KEYS = ("loss", "accuracy", "macro_f1", "set_accuracy", "n")


def log(message: str) -> None:
    elapsed = time.perf_counter() - _START
    print(f"[{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)


def step_logger(prefix: str, epoch: int, epochs: int, every: int) -> Callable[[int, int, float], None]:
    """A callback logging every `every` optimiser steps of one epoch."""

    def on_step(step: int, steps: int, loss: float) -> None:
        if every > 0 and ((step + 1) % every == 0 or step + 1 == steps):
            log(f"[{prefix}] epoch {epoch + 1}/{epochs} step {step + 1}/{steps} loss {loss:.4f}")

    return on_step


def headline(metrics: dict) -> dict:
    """The few numbers worth keeping per epoch or round."""
    out = {k: metrics[k] for k in HEADLINE_KEYS if k in metrics}
    if "tumour_vs_none" in metrics:
        out["tumour_accuracy"] = metrics["tumour_vs_none"]["accuracy"]
    return out

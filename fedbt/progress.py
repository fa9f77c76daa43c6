"""Progress output for long work: timestamped lines on stderr, step counters; the libraries'
own output (Flower's, Ray's) sent to a log file instead, unless --verbose."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

_START = time.perf_counter()

HEADLINE_KEYS = ("loss", "accuracy", "macro_f1", "set_accuracy", "n")

# Where log() writes while the process's standard output and error go to a library log (None: stderr).
_terminal: TextIO | None = None
# --verbose: the libraries' output stays on the terminal. Set by the command that runs them.
_verbose = False


def log(message: str) -> None:
    elapsed = time.perf_counter() - _START
    print(f"[{elapsed:7.1f}s] {message}", file=_terminal or sys.stderr, flush=True)


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


def _stream_beside_stderr(stack: contextlib.ExitStack) -> TextIO:
    """Where log() goes on writing once file descriptor 2 leads to the library log: a copy of that
    descriptor as it is now, or sys.stderr itself where it writes elsewhere (a test capturing it)."""
    try:
        if sys.stderr.fileno() != 2:
            return sys.stderr
    except (AttributeError, io.UnsupportedOperation):
        return sys.stderr
    return stack.enter_context(os.fdopen(os.dup(2), "w"))


@contextlib.contextmanager
def library_output_to(log_file: Path) -> Iterator[None]:
    """Everything written to this process's standard output and error (Flower's and Ray's
    loggers, Ray's copies of its workers' lines, warnings, native code; the processes started
    meanwhile inherit it) goes to `log_file` for the duration, while log()'s lines still reach
    the terminal. Redirected at the file descriptors, as Flower's and Ray's handlers hold on
    to the streams they started with. A no-op with --verbose."""
    global _terminal
    if _verbose:
        yield
        return
    log(f"Flower's and Ray's output goes to {log_file} (--verbose: here)")
    _flush_standard_streams()
    originals = {fd: os.dup(fd) for fd in (1, 2)}
    with contextlib.ExitStack() as stack:
        terminal = _stream_beside_stderr(stack)
        with open(log_file, "a") as library_log:
            for fd in originals:
                os.dup2(library_log.fileno(), fd)
        _terminal = terminal
        try:
            yield
        finally:
            _terminal = None
            _flush_standard_streams()
            for fd, original in originals.items():
                os.dup2(original, fd)
                os.close(original)


def _flush_standard_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()


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

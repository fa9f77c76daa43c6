"""A run is quiet by default: the libraries' output goes to the run's log file, the project's
progress lines to the terminal; --verbose leaves everything on the terminal."""

import os

import pytest

from fedbt import cli, progress
from fedbt.progress import library_output_to, log


@pytest.fixture()
def verbose():
    yield lambda: progress.set_verbose(True)
    progress.set_verbose(False)


def test_library_output_goes_to_the_log_file_and_progress_lines_to_the_terminal(tmp_path, capfd):
    log_file = tmp_path / "flower.log"
    with library_output_to(log_file):
        log("[federated] round 1/2 trained")
        # As Flower's handlers, Ray's copies of its workers' lines and native code write: to the descriptors.
        os.write(2, b"DEBUG : Using InMemoryLinkState\n")
        os.write(1, b"(ClientAppActor pid=1) [client br35h] round 1/2\n")
    os.write(2, b"after the run\n")
    terminal = capfd.readouterr()
    assert "[federated] round 1/2 trained" in terminal.err
    assert f"Flower's and Ray's output goes to {log_file}" in terminal.err  # named before it is written
    assert "DEBUG" not in terminal.err and "ClientAppActor" not in terminal.out
    assert "after the run" in terminal.err  # the descriptors are the terminal's again
    assert log_file.read_text() == "DEBUG : Using InMemoryLinkState\n(ClientAppActor pid=1) [client br35h] round 1/2\n"


def test_verbose_leaves_the_library_output_on_the_terminal(tmp_path, capfd, verbose):
    verbose()
    with library_output_to(tmp_path / "flower.log"):
        os.write(2, b"DEBUG : Using InMemoryLinkState\n")
    assert capfd.readouterr().err == "DEBUG : Using InMemoryLinkState\n"
    assert not (tmp_path / "flower.log").exists()


def test_simulate_keeps_the_library_output_on_the_terminal_only_when_asked(monkeypatch, tmp_path, verbose):
    redirected = []

    def check_then_stop(args, extra=()):
        with library_output_to(tmp_path / f"{len(redirected)}.log"):
            pass
        redirected.append((tmp_path / f"{len(redirected)}.log").exists())
        raise ValueError("checked")

    monkeypatch.setattr(cli, "config_from_args", check_then_stop)
    for argv in (["simulate", "--verbose"], ["simulate"]):
        with pytest.raises(ValueError, match="checked"):  # raised here, not by fedbt: it keeps its traceback
            cli.main(argv)
    assert redirected == [False, True]


# What a newcomer's run must not show: libraries' debug lines, warnings and notices.
LIBRARY_NOISE = ("DEBUG", " INFO ", "Warning", "DEPRECATED", "deprecated", "alembic")


def test_a_simulation_prints_only_fedbt_lines_and_its_log_file_holds_flowers_and_rays(finished_run):
    noisy = [line for line in finished_run.terminal.splitlines() if any(word in line for word in LIBRARY_NOISE)]
    assert not noisy, noisy
    assert "[federated]" in finished_run.terminal and "flower.log" in finished_run.terminal
    library_log = (finished_run.out / "flower.log").read_text()
    assert "backend_config" in library_log and "RayBackend" in library_log  # Flower's simulation engine, on Ray

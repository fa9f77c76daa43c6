"""Loading a checkpoint never runs code: only tensors and plain values are read."""

import os

import numpy as np
import pytest
import torch

from fedbt.config import ExperimentConfig, ModelConfig
from fedbt.model.architectures import build_model
from fedbt.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


class RunsAShellCommand:
    """What a crafted checkpoint does when unpickled: call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def small_checkpoint(path):
    cfg = ExperimentConfig(model=ModelConfig(name="cnn"))
    cfg.data.image_size = 32
    return save_checkpoint(path, build_model(cfg.model, 4, 32), cfg, {"epoch": 0, "history": []}, "central")


def test_a_pickle_that_would_run_a_command_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "it-ran"
    torch.save({"format": "fedbt-checkpoint", "version": 1, "payload": RunsAShellCommand(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused: it holds pickled Python objects"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_the_projects_own_checkpoints_load_safely(tmp_path):
    payload = load_checkpoint(small_checkpoint(tmp_path / "a.pt"))
    assert payload["provenance"]["torch"] == str(torch.__version__)
    assert payload["model_state"]["classifier.4.weight"].shape == (4, 256)


def test_an_older_checkpoint_is_refused_with_no_command_that_would_unpickle_it(tmp_path):
    path = small_checkpoint(tmp_path / "old.pt")
    old = torch.load(path, weights_only=True)
    old["provenance"]["torch"] = torch.__version__  # as older fedbt wrote it: torch's version object
    old["progress"]["strategy_state"] = {"m_t": {"w": np.ones(3, dtype=np.float32)}}  # and numpy arrays
    torch.save(old, path)
    with pytest.raises(CheckpointError, match="fedbt never unpickles a file") as refused:
        load_checkpoint(path)
    assert "python -m" not in str(refused.value)

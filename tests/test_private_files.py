"""What holds patient-derived data is its owner's alone: decoded pixels and checkpoints, 0600 files in 0700 folders;
and so are the logs of fedbt's Flower processes, where a site writes the detail of its failures."""

import stat
from pathlib import Path

import numpy as np

from fedbt.config import DataConfig, ExperimentConfig, ModelConfig
from fedbt.data.cache import ImageCache
from fedbt.data.images import ImageLimits
from fedbt.deployment.processes import open_private_log
from fedbt.model.checkpoint import save_checkpoint
from fedbt.train.setup import new_model


def permissions(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_decoded_pixels_are_cached_in_folders_and_files_of_their_owner_alone(tmp_path):
    cache = ImageCache(tmp_path / "site-cache", 8, False, ImageLimits.of(DataConfig()))
    cache.store("ab" * 32, np.zeros((1, 8, 8), np.uint8))
    entry = cache.path_for("ab" * 32)
    assert permissions(entry) == 0o600
    for folder in (entry.parent, cache.root, tmp_path / "site-cache"):
        assert permissions(folder) == 0o700, folder


def test_checkpoints_are_written_private_from_their_first_byte(tmp_path):
    cfg = ExperimentConfig(model=ModelConfig(name="cnn"))
    checkpoint = save_checkpoint(tmp_path / "run" / "final.pt", new_model(cfg, 4), cfg, {}, "central")
    assert permissions(checkpoint) == 0o600 and permissions(tmp_path / "run") == 0o700


def test_a_process_log_is_created_owner_only_and_appended_to(tmp_path):
    log = tmp_path / "executor.log"
    for line in ("first start\n", "second start\n"):
        with open_private_log(log) as fh:
            fh.write(line)
    assert permissions(log) == 0o600
    assert log.read_text() == "first start\nsecond start\n"

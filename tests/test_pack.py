"""A pack (`fedbt data pack`) stands for the data root: the same records, pixels, splits and
held-out test rule as the folders it was made from, and nothing when it was changed or decoded otherwise."""

from __future__ import annotations

import shutil
import stat
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from fedbt.cli import main
from fedbt.data.catalog import build_catalog
from fedbt.data.pack import checksum_path, write_pack


@pytest.fixture()
def data_config(data_config, demo_root, tmp_path):
    """The generated sites, with figshare's pictures re-encoded into SARTAJ's folders: near
    duplicates, whose other bytes draw other splits, so SARTAJ trains on some that figshare tests on."""
    root = tmp_path / "data"
    shutil.copytree(demo_root, root)
    for label in ("glioma", "meningioma", "pituitary"):
        for image in (root / "figshare" / label).glob("*.jpg"):
            Image.open(image).save(root / "sartaj" / "Training" / f"{label}_tumor" / f"copy-{image.name}", quality=80)
    return replace(data_config, data_root=str(root))


@pytest.fixture()
def packed(data_config, tmp_path):
    """The sites' catalog and a pack made from it."""
    catalog = build_catalog(data_config, progress=False)
    path = tmp_path / "packs" / "demo-32px.npz"
    write_pack(path, data_config, catalog.sites, catalog.records, catalog.problems, catalog.pixels)
    return catalog, path


def test_a_catalog_from_the_pack_splits_as_the_folders_do(packed, data_config):
    raw, path = packed
    from_pack = build_catalog(replace(data_config, data_root=str(path)), progress=False)

    # The demo data holds exact duplicates across sites and within SARTAJ: stored once, served to each record.
    assert len({r.sha256 for r in raw.records}) < len(raw.records)
    assert [(r.site, r.sha256, r.allowed, r.source_split) for r in from_pack.records] == [
        (r.site, r.sha256, r.allowed, r.source_split) for r in raw.records
    ]
    assert from_pack.splits == raw.splits
    assert from_pack.held_out_test == raw.held_out_test and raw.held_out_test  # the leakage rule had work to do
    pooled_test = raw.indices(split="test", pooled=True)
    assert from_pack.indices(split="test", pooled=True) == pooled_test
    assert np.array_equal(from_pack.dataset(split="test", pooled=True).pixels, raw.dataset(split="test", pooled=True).pixels)
    for site in raw.site_names:
        assert from_pack.indices(site, split="train") == raw.indices(site, split="train")
    # Reports name files, never this machine's folders.
    assert from_pack.held_out_test_names() == raw.held_out_test_names()
    assert str(data_config.data_root) not in path.read_bytes().decode("latin-1")


def test_a_pack_is_its_owners_alone(packed):
    _, path = packed
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_changed_pack_is_refused(packed, data_config):
    _, path = packed
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="does not match its checksum"):
        build_catalog(replace(data_config, data_root=str(path)), progress=False)
    checksum_path(path).unlink()
    with pytest.raises(ValueError, match="no checksum file"):
        build_catalog(replace(data_config, data_root=str(path)), progress=False)


def test_a_pack_of_another_size_is_refused_in_one_line(packed, demo_args, capsys):
    _, path = packed
    args = [a if a != "data.image_size=32" else "data.image_size=64" for a in demo_args]
    args[args.index("--data-root") + 1] = str(path)
    assert main(["data", "inspect", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbt: error: pack") and "image_size 32 (asked 64)" in err


def test_data_pack_command_writes_a_pack_the_pipeline_reads(demo_args, tmp_path, capsys):
    path = tmp_path / "demo.npz"
    assert main(["data", "pack", *demo_args, str(path)]) == 0
    assert checksum_path(path).read_text().split() == [capsys.readouterr().out.split("sha256 ")[1].split()[0], path.name]
    args = list(demo_args)
    args[args.index("--data-root") + 1] = str(path)
    assert main(["data", "inspect", *args]) == 0

"""A corpus of bad inputs, generated here (none is committed). Each gives its exact one-line
problem or error, and the good images beside it are still read."""

from __future__ import annotations

import errno
import io
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbt.cli import main
from fedbt.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, load_config
from fedbt.data import cache
from fedbt.data.cache import ImageCache
from fedbt.data.catalog import Catalog, build_catalog
from fedbt.data.images import ImageLimits
from fedbt.data.sites import load_site
from fedbt.data.synthetic import make_image, save_jpeg, write_figshare_mat
from fedbt.eval.predict import load_model, predict_files
from fedbt.model.architectures import build_model
from fedbt.model.checkpoint import save_checkpoint

PILLOW_LIMIT = 2 * Image.MAX_IMAGE_PIXELS
BOMB_PROBLEM = f"header claims more than {PILLOW_LIMIT} pixels (Pillow's limit): not decoded"
LABELS = ("glioma", "meningioma")


def jpeg_header(width: int, height: int) -> bytes:
    """Start of image and a baseline start-of-frame segment (one 8-bit channel): all Pillow reads for .size."""
    frame = struct.pack(">HBHHB", 11, 8, height, width, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8\xff\xc0" + frame + b"\xff\xd9"


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@dataclass
class Site:
    root: Path
    yaml: Path
    good: list[str]  # file names of the good images

    def build(self, tmp_path: Path, **settings) -> Catalog:
        cfg = DataConfig(sites=[str(self.yaml)], image_size=32, cache_dir=str(tmp_path / "cache"), **settings)
        return build_catalog(cfg, progress=False)


def generated_site(tmp_path: Path, name: str, fmt: str, seed: int, suffix: str, write) -> Site:
    """A site with three good 40 px images per class, each written by `write(pixels, path, label, stem)`."""
    rng = np.random.default_rng(seed)
    root = tmp_path / f"{name}-site"
    good = []
    for label in LABELS:
        for i in range(3):
            write(make_image(label, rng, 40).pixels, root, label, f"{label}{i}")
            good.append(f"{label}{i}{suffix}")
    yaml = tmp_path / f"{name}-site.yaml"
    yaml.write_text(f"name: {name}s\nformat: {fmt}\nroot: {root}\n")
    return Site(root, yaml, sorted(good))


@pytest.fixture()
def jpeg_site(tmp_path) -> Site:
    """A class-folder site with three good 40 px JPEGs per class."""

    def write(pixels, root, label, stem):
        save_jpeg(pixels, root / label / f"{stem}.jpg", rgb=False)

    return generated_site(tmp_path, "jpeg", "class_folders", 0, ".jpg", write)


@pytest.fixture()
def mat_site(tmp_path) -> Site:
    """A figshare .mat site with three good 40 px slices per class."""

    def write(pixels, root, label, stem):
        write_figshare_mat(root / f"{stem}.mat", pixels, label, f"P-{stem}")

    return generated_site(tmp_path, "mat", "figshare_mat", 1, ".mat", write)


def problems_by_name(catalog: Catalog) -> dict[str, str]:
    return {Path(p.path).name: p.message for p in catalog.problems}


def read_names(catalog: Catalog) -> list[str]:
    return sorted(Path(r.path).name for r in catalog.records)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("bomb.jpg", jpeg_header(20000, 20000), BOMB_PROBLEM),
        ("bomb.png", png_header(20000, 20000), BOMB_PROBLEM),
        (
            "big.jpg",
            jpeg_header(6000, 6000),
            "6000 x 6000 pixels, more than data.max_image_pixels (16777216): not decoded",
        ),
        ("tiny.png", png_header(1, 1), "1 x 1 pixels, smaller than data.min_image_side (32)"),
    ],
    ids=["jpeg-20000x20000", "png-20000x20000", "jpeg-6000x6000", "png-1x1"],
)
def test_image_dimensions_are_checked_before_decoding(jpeg_site, tmp_path, name, content, problem):
    (jpeg_site.root / "glioma" / name).write_bytes(content)
    catalog = jpeg_site.build(tmp_path)
    assert problems_by_name(catalog) == {name: problem}
    assert read_names(catalog) == jpeg_site.good


def test_a_real_1x1_image_and_a_constant_image_are_refused(jpeg_site, tmp_path):
    Image.new("L", (1, 1), 128).save(jpeg_site.root / "glioma" / "dot.png")
    Image.new("L", (64, 64), 0).save(jpeg_site.root / "glioma" / "black.png")
    catalog = jpeg_site.build(tmp_path)
    assert problems_by_name(catalog) == {
        "dot.png": "1 x 1 pixels, smaller than data.min_image_side (32)",
        "black.png": "constant image (every pixel is 0): nothing to classify",
    }
    assert read_names(catalog) == jpeg_site.good


def test_the_limits_are_settings(jpeg_site, tmp_path):
    save_jpeg(
        make_image("glioma", np.random.default_rng(3), 48).pixels, jpeg_site.root / "glioma" / "big.jpg", rgb=False
    )
    catalog = jpeg_site.build(tmp_path, min_image_side=41)
    assert problems_by_name(catalog) == dict.fromkeys(
        jpeg_site.good, "40 x 40 pixels, smaller than data.min_image_side (41)"
    )
    assert read_names(catalog) == ["big.jpg"]
    with pytest.raises(ConfigError, match=r"^--set data.max_image_pixels=0: data.max_image_pixels: Input should be"):
        load_config(overrides=["data.max_image_pixels=0"])


def test_a_3d_mat_and_a_constant_mat_are_refused(mat_site, tmp_path):
    write_figshare_mat(mat_site.root / "volume.mat", np.ones((8, 64, 64)), "glioma", "P-volume")
    write_figshare_mat(mat_site.root / "flat.mat", np.full((64, 64), 7), "glioma", "P-flat")
    catalog = mat_site.build(tmp_path)
    assert problems_by_name(catalog) == {
        "volume.mat": "not a single 2-D image: cjdata/image has shape (8, 64, 64)",
        "flat.mat": "constant image (every pixel is 7): nothing to classify",
    }
    assert read_names(catalog) == mat_site.good
    # The refusal is not cached: the next catalog build still reads the good slices.
    assert read_names(mat_site.build(tmp_path)) == mat_site.good


def test_predict_reports_a_3d_mat_and_predicts_the_rest(mat_site, tmp_path):
    write_figshare_mat(mat_site.root / "volume.mat", np.ones((8, 64, 64)), "glioma", "P-volume")
    cfg = ExperimentConfig(data=DataConfig(image_size=32), model=ModelConfig(name="cnn"))
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "model.pt", build_model(cfg.model, 4, 32), cfg, {}, "central")
    rows = predict_files([str(mat_site.root)], load_model(checkpoint, "cpu"))
    errors = {Path(r.path).name: r.error for r in rows if r.error}
    assert errors == {"volume.mat": "not a single 2-D image: cjdata/image has shape (8, 64, 64)"}
    assert sorted(Path(r.path).name for r in rows if r.label) == mat_site.good


def damage(entry: Path, how: str) -> None:
    if how == "truncated header":
        entry.write_bytes(entry.read_bytes()[:40])  # np.load: "EOF: reading array header"
    elif how == "truncated pixels":
        entry.write_bytes(entry.read_bytes()[:200])
    elif how == "zero bytes":
        entry.write_bytes(b"")
    else:  # a 3-D .mat cached before decoding checked it
        np.save(entry, np.zeros((1, 8, 32, 32), dtype=np.uint8))


@pytest.mark.parametrize("how", ["truncated header", "truncated pixels", "zero bytes", "wrong shape"])
def test_a_damaged_cache_entry_is_decoded_again(jpeg_site, tmp_path, how):
    first = jpeg_site.build(tmp_path)
    record = first.records[0]
    entry = ImageCache(tmp_path / "cache", 32, False, ImageLimits.of(DataConfig())).path_for(record.sha256)
    expected = np.load(entry)
    damage(entry, how)
    again = jpeg_site.build(tmp_path)
    assert again.problems == [] and read_names(again) == jpeg_site.good
    assert np.array_equal(np.load(entry), expected)  # healed on disk, not just in memory
    assert torch.equal(again.pixels, first.pixels)


def test_a_pool_of_decoding_workers_caches_the_same_pixels_as_this_process(jpeg_site, tmp_path, monkeypatch):
    # A site this small is decoded in this process; a real site's thousands of images by a pool.
    in_process = jpeg_site.build(tmp_path / "in-process")
    monkeypatch.setattr(cache, "POOL_FROM_IMAGES", 1)
    monkeypatch.setattr(cache, "default_workers", lambda: 2)
    pools, start_pool = [], cache.ProcessPoolExecutor
    monkeypatch.setattr(
        cache, "ProcessPoolExecutor", lambda *args, **kwargs: pools.append(args) or start_pool(*args, **kwargs)
    )
    pooled = jpeg_site.build(tmp_path / "pooled")
    assert pools == [(2,)]
    assert pooled.problems == in_process.problems and read_names(pooled) == jpeg_site.good
    assert torch.equal(pooled.pixels, in_process.pixels)


def test_a_site_root_may_not_climb_out_of_the_data_root(tmp_path, capsys):
    data_root = tmp_path / "data"
    (data_root / "inside").mkdir(parents=True)
    yaml = tmp_path / "escape.yaml"
    yaml.write_text("name: escape\nformat: class_folders\nroot: ../../etc\n")
    message = f"{yaml}: site root '../../etc' leads out of the data root {data_root}: give an absolute path to leave it"
    with pytest.raises(ConfigError) as err:
        load_site(yaml, data_root)
    assert str(err.value) == message
    assert main(["data", "inspect", "--sites", str(yaml), "--data-root", str(data_root)]) == 2
    assert capsys.readouterr().err == f"fedbt: error: {message}\n"
    # Staying inside is fine, and an absolute root is the way to name a folder elsewhere.
    yaml.write_text("name: inside\nformat: class_folders\nroot: inside/../inside\n")
    assert load_site(yaml, data_root).root == data_root / "inside"
    yaml.write_text(f"name: elsewhere\nformat: class_folders\nroot: {tmp_path}\n")
    assert load_site(yaml, data_root).root == tmp_path


def test_a_site_file_that_is_not_utf8_is_one_line_naming_it(tmp_path):
    yaml = tmp_path / "latin1.yaml"
    yaml.write_bytes(b"name: z\xfcrich\nformat: class_folders\nroot: z\n")
    with pytest.raises(ConfigError) as err:
        load_site(yaml, tmp_path)
    assert str(err.value) == f"{yaml}: not UTF-8 text (byte 0xfc at offset 7)"


def test_links_that_lead_nowhere_or_to_folders_are_reported(jpeg_site, tmp_path):
    folder = jpeg_site.root / "glioma"
    (folder / "loop.jpg").symlink_to("loop.jpg")
    (folder / "gone.jpg").symlink_to(tmp_path / "nothing-here.jpg")
    elsewhere = tmp_path / "elsewhere"
    save_jpeg(make_image("glioma", np.random.default_rng(5), 40).pixels, elsewhere / "outside.jpg", rgb=False)
    (folder / "more").symlink_to(elsewhere)
    catalog = jpeg_site.build(tmp_path)
    assert problems_by_name(catalog) == {
        "loop.jpg": f"symbolic link cannot be followed ({os.strerror(errno.ELOOP)}), skipped",
        "gone.jpg": "broken symbolic link, skipped",
        "more": "symbolic link to a folder, not followed",
    }
    assert read_names(catalog) == jpeg_site.good


def test_an_unreadable_folder_is_reported(jpeg_site, tmp_path, monkeypatch):
    locked = jpeg_site.root / "glioma" / "locked"
    save_jpeg(make_image("glioma", np.random.default_rng(6), 40).pixels, locked / "hidden.jpg", rgb=False)
    locked.chmod(0)
    if os.access(locked, os.R_OK):
        # Root reads any folder whatever its permissions: refuse it as the kernel refuses other users.
        real_scandir = os.scandir

        def scandir(path):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        catalog = jpeg_site.build(tmp_path)
    finally:
        locked.chmod(0o755)
    assert problems_by_name(catalog) == {"locked": f"folder cannot be read ({os.strerror(errno.EACCES)}), skipped"}
    assert read_names(catalog) == jpeg_site.good


def test_a_file_name_that_is_not_utf8_prints_on_a_strict_utf8_stdout(jpeg_site, tmp_path, monkeypatch):
    name = os.fsdecode(b"caf\xe9.txt")  # Python keeps the byte as the surrogate \udce9
    (jpeg_site.root / "glioma" / name).write_text("not an image")
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", strict)
    report = tmp_path / "report.json"
    args = ["--sites", str(jpeg_site.yaml), "--set", f"data.cache_dir={tmp_path / 'cache'}", "--json", str(report)]
    assert main(["data", "inspect", "--data-root", str(tmp_path), *args]) == 0
    strict.flush()
    printed = strict.buffer.getvalue().decode("utf-8")
    path = f"{jpeg_site.root}/glioma/caf\\udce9.txt"
    assert f"  jpegs: {path}: not an image file, skipped" in printed.splitlines()
    assert "  jpegs          6 images: glioma 3, meningioma 3" in printed.splitlines()
    assert json.loads(report.read_text())["problems"][0]["path"] == f"{jpeg_site.root}/glioma/{name}"

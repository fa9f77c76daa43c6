import shutil
from pathlib import Path

import numpy as np
import pytest

from fedbt.config import ConfigError, DataConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.images import ImageLimits, decode_file
from fedbt.data.labels import TUMOUR_CLASSES
from fedbt.data.readers import scan_site
from fedbt.data.sites import load_site
from fedbt.data.synthetic import make_image, save_jpeg, write_figshare_mat


def write_site_yaml(tmp_path: Path, name: str, fmt: str, root: Path, extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nformat: {fmt}\nroot: {root}\n{extra}")
    return path


def test_class_folders_with_release_split(demo_root, tmp_path):
    scan = scan_site(load_site(write_site_yaml(tmp_path, "sartaj", "class_folders", demo_root / "sartaj"), None))
    assert {r.source_split for r in scan.records} == {"train", "test"}
    assert {r.source_label for r in scan.records} == {"glioma_tumor", "meningioma_tumor", "no_tumor", "pituitary_tumor"}
    glioma = next(r for r in scan.records if r.source_label == "glioma_tumor")
    assert glioma.allowed == {"glioma"}
    assert not scan.problems


def test_br35h_yes_is_a_coarse_tumour_label(demo_root, tmp_path):
    # Unquoted yes/no are YAML booleans: the loader must still read them as folder names.
    yaml = write_site_yaml(
        tmp_path, "br35h", "class_folders", demo_root / "br35h", "labels:\n  yes: tumor\n  no: no_tumor\n"
    )
    scan = scan_site(load_site(yaml, None))
    allowed = {r.source_label: r.allowed for r in scan.records}
    assert allowed["yes"] == TUMOUR_CLASSES
    assert allowed["no"] == {"no_tumor"}


def test_figshare_mat_v73_reader_keeps_patient_and_orientation(tmp_path):
    rng = np.random.default_rng(1)
    image = make_image("pituitary", rng, size=40).pixels
    image[0, :] = 255  # a bright top row shows whether rows and columns come back swapped
    write_figshare_mat(tmp_path / "mat" / "1.mat", image, "pituitary", "MRN-123")
    write_figshare_mat(tmp_path / "mat" / "2.mat", make_image("meningioma", rng, 40).pixels, "meningioma", "MRN-9")
    scan = scan_site(load_site(write_site_yaml(tmp_path, "fig", "figshare_mat", tmp_path / "mat"), None))
    by_name = {Path(r.path).name: r for r in scan.records}
    assert by_name["1.mat"].source_label == "pituitary" and by_name["1.mat"].patient == "MRN-123"
    assert by_name["2.mat"].allowed == {"meningioma"}
    decoded = decode_file(by_name["1.mat"].path, ImageLimits.of(DataConfig()))[0].numpy()
    assert decoded.shape == (40, 40)
    assert decoded[0].min() == 255 and decoded[:, 0].min() < 255


def test_bad_inputs_are_reported_by_name_and_skipped(demo_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(demo_root / "br35h", root)
    good = sorted((root / "no").glob("*.jpg"))
    truncated = root / "no" / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:200])
    (root / "no" / "empty.jpg").write_bytes(b"")
    (root / "no" / "notes.txt").write_text("not an image")
    (root / "no" / "fake.jpg").write_text("plain text with a .jpg name")
    (root / "maybe").mkdir()
    save_jpeg(make_image("glioma", np.random.default_rng(0), 40).pixels, root / "maybe" / "m.jpg", rgb=True)
    (root / "yes_empty").mkdir()
    extra = "labels:\n  'yes': tumor\n  'no': no_tumor\n  yes_empty: tumor\n"
    site_yaml = write_site_yaml(tmp_path, "broken", "class_folders", root, extra)
    catalog = build_catalog(
        DataConfig(sites=[str(site_yaml)], image_size=32, cache_dir=str(tmp_path / "c")), progress=False
    )
    messages = {Path(p.path).name: p.message for p in catalog.problems}
    assert "cannot decode" in messages["truncated.jpg"] or "truncated" in messages["truncated.jpg"]
    assert "empty file" in messages["empty.jpg"]
    assert "not an image file" in messages["notes.txt"]
    assert "cannot decode" in messages["fake.jpg"]
    assert "unknown class folder" in messages["maybe"]
    assert "empty class folder" in messages["yes_empty"]
    used = {Path(r.path).name for r in catalog.records}
    assert used.isdisjoint({"truncated.jpg", "empty.jpg", "fake.jpg", "m.jpg"})
    assert len(catalog.records) == len(list((demo_root / "br35h").rglob("*.jpg")))


def test_unreadable_mat_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "mat").mkdir()
    (tmp_path / "mat" / "old.mat").write_bytes(b"MATLAB 5.0 MAT-file, not HDF5")
    write_figshare_mat(
        tmp_path / "mat" / "ok.mat", make_image("glioma", np.random.default_rng(2), 32).pixels, "glioma", "P1"
    )
    scan = scan_site(load_site(write_site_yaml(tmp_path, "fig", "figshare_mat", tmp_path / "mat"), None))
    assert [Path(r.path).name for r in scan.records] == ["ok.mat"]
    assert "not a readable MATLAB v7.3" in scan.problems[0].message


def test_missing_site_path_and_relative_root_without_data_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_site(load_site(write_site_yaml(tmp_path, "gone", "class_folders", tmp_path / "nowhere"), None))
    relative = tmp_path / "rel.yaml"
    relative.write_text("name: rel\nformat: class_folders\nroot: figshare\n")
    with pytest.raises(ValueError, match="give a data root"):
        load_site(relative, None)
    with pytest.raises(ConfigError, match="absent.yaml: site file not found"):
        load_site(tmp_path / "absent.yaml", None)

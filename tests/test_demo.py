"""The demo's generated data: the real sites' label spaces, proportions and looks; written once, marked as generated."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedbt.data import synthetic
from fedbt.data.synthetic import ensure_demo_data, generate_demo_data, is_generated_data
from fedbt.reports.comparison import GENERATED_DATA_NOTE, print_summary_table


def images_per_label(*folders: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for folder in folders:
        for label in folder.iterdir():
            counts[label.name] = counts.get(label.name, 0) + len(list(label.glob("*.jpg")))
    return counts


@pytest.fixture(scope="module")
def real_sites_root(tmp_path_factory) -> Path:
    return generate_demo_data(tmp_path_factory.mktemp("real"), per_class=12, duplicates=3, real_sites=True)


def test_sites_have_the_real_label_spaces_and_proportions(real_sites_root):
    # Three SARTAJ healthy scans are copied into SARTAJ's Testing folder and into Br35H.
    assert images_per_label(real_sites_root / "figshare") == {"glioma": 18, "meningioma": 9, "pituitary": 12}
    sartaj = images_per_label(real_sites_root / "sartaj" / "Training", real_sites_root / "sartaj" / "Testing")
    assert sartaj == {"glioma_tumor": 12, "meningioma_tumor": 12, "no_tumor": 6 + 3, "pituitary_tumor": 12}
    assert images_per_label(real_sites_root / "br35h") == {"yes": 12, "no": 24 + 3}


def mean_head_intensity(folder: Path) -> float:
    own = [p for p in folder.rglob("*.jpg") if not p.name.startswith("dup")]  # not the copies from SARTAJ
    pixels = np.concatenate([np.asarray(Image.open(p).convert("L")).ravel() for p in own])
    return float(pixels[pixels > 25].mean())


def test_sites_differ_in_look_as_the_real_releases_do(real_sites_root):
    sites = ("figshare", "sartaj", "br35h")
    figshare, sartaj, br35h = (mean_head_intensity(real_sites_root / site) for site in sites)
    assert figshare < sartaj < br35h
    assert Image.open(next((real_sites_root / "figshare").rglob("*.jpg"))).mode == "L"
    assert Image.open(next((real_sites_root / "br35h").rglob("*.jpg"))).mode == "RGB"


def test_demo_data_is_written_once_and_rewritten_when_older(tmp_path, monkeypatch):
    monkeypatch.setitem(synthetic.DEMO_DATA, "per_class", 2)
    root = tmp_path / "demo-data"
    (root / "br35h" / "no").mkdir(parents=True)
    (root / "br35h" / "no" / "older.jpg").write_bytes(b"from a generator without a stamp")
    ensure_demo_data(root)
    assert is_generated_data(root) and not (root / "br35h" / "no" / "older.jpg").exists()
    (root / "figshare" / "glioma" / "0.jpg").unlink()
    ensure_demo_data(root)
    assert not (root / "figshare" / "glioma" / "0.jpg").exists()  # reused, not written again
    assert not is_generated_data(tmp_path)


def test_the_table_says_when_the_data_is_generated(capsys):
    models = {"federated": {"pooled": {"accuracy": 0.9}, "sites": {}}}
    print_summary_table(models, generated_data=True)
    assert GENERATED_DATA_NOTE in capsys.readouterr().out
    print_summary_table(models)
    assert GENERATED_DATA_NOTE not in capsys.readouterr().out

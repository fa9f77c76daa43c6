import shutil
from pathlib import Path

import numpy as np

from fedbt.data.readers import scan_site
from fedbt.data.sites import load_site
from fedbt.data.synthetic import make_image, save_jpeg


def combined_set(demo_root: Path, root: Path) -> dict[str, str]:
    """A small combined Kaggle-style set built from the demo sites; returns file -> true origin."""
    truth = {}
    for i, src in enumerate(sorted((demo_root / "figshare" / "glioma").glob("*.jpg"))[:3]):
        dst = root / "Training" / "glioma" / f"fig{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)  # figshare files are single-channel JPEGs
        truth[dst.name] = "figshare"
    for i, src in enumerate(sorted((demo_root / "sartaj" / "Training" / "meningioma_tumor").glob("*.jpg"))[:3]):
        dst = root / "Training" / "meningioma" / f"sar{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        truth[dst.name] = "sartaj"
    for i, src in enumerate(sorted((demo_root / "br35h" / "no").glob("n[0-9]*.jpg"))[:3]):
        dst = root / "Testing" / "notumor" / f"br{i}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        truth[dst.name] = "br35h"
    shutil.copyfile(demo_root / "br35h" / "no" / "dup0.jpg", root / "Testing" / "notumor" / "both.jpg")
    save_jpeg(
        make_image("pituitary", np.random.default_rng(9), 64).pixels,
        root / "Training" / "pituitary" / "rgb.jpg",
        rgb=True,
    )
    return truth


def test_combined_set_is_split_back_into_origins_and_the_rest_reported(demo_root, tmp_path):
    truth = combined_set(demo_root, tmp_path / "kaggle")
    refs = ""
    for name, sub in (("sartaj", "sartaj"), ("br35h", "br35h")):
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nformat: class_folders\nroot: {demo_root / sub}\nlabels:\n  'yes': tumor\n  'no': no_tumor\n"
        )
        refs += f"  - {tmp_path / f'{name}.yaml'}\n"
    found = {}
    problems = {}
    for origin in ("figshare", "sartaj", "br35h"):
        site_yaml = tmp_path / f"k-{origin}.yaml"
        site_yaml.write_text(
            f"name: k-{origin}\nformat: kaggle_combined\nroot: {tmp_path / 'kaggle'}\n"
            f"origin: {origin}\nreference_sites:\n{refs}"
        )
        scan = scan_site(load_site(site_yaml, None))
        found.update({Path(r.path).name: origin for r in scan.records})
        problems.update({Path(p.path).name: p.message for p in scan.problems})
    assert found == truth
    assert "several sites" in problems["both.jpg"]
    assert "origin undecided" in problems["rgb.jpg"]

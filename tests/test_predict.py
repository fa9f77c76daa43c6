"""`fedbt predict` on files, folders, a .mat file and broken input; the same pixels as training."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedbt.cli import main
from fedbt.config import DataConfig, ExperimentConfig, ModelConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.synthetic import make_image, write_figshare_mat
from fedbt.eval.predict import load_model, predict_files
from fedbt.model.architectures import build_model
from fedbt.model.checkpoint import save_checkpoint

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")


@pytest.fixture(scope="module")
def setup(demo_root, site_files, tmp_path_factory):
    """An (untrained) 32 px CNN checkpoint that crops to content, and inputs of every kind."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    work = tmp_path_factory.mktemp("predict")
    data = DataConfig(
        data_root=str(demo_root), sites=site_files, image_size=32, crop_to_content=True, cache_dir=str(work / "cache")
    )
    cfg = ExperimentConfig(data=data, model=ModelConfig(name="cnn"))
    checkpoint = save_checkpoint(work / "model.pt", build_model(cfg.model, 4, 32), cfg, {}, "central")
    (work / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    slice_pixels = make_image("meningioma", np.random.default_rng(0), 64).pixels
    write_figshare_mat(work / "slice.mat", slice_pixels, "meningioma", "P1")
    return {"checkpoint": str(checkpoint), "work": work, "cfg": cfg, "root": demo_root}


def test_predict_files_folders_and_a_corrupt_file_to_json(setup, tmp_path, capsys):
    root, work = setup["root"], setup["work"]
    image = root / "figshare" / "glioma" / "0.jpg"
    folder = root / "sartaj" / "Testing" / "no_tumor"
    corrupt, missing = work / "corrupt.jpg", work / "missing.png"
    out = tmp_path / "predictions.json"
    code = main(
        [
            "predict",
            str(image),
            str(folder),
            str(corrupt),
            str(work / "slice.mat"),
            str(missing),
            "--checkpoint",
            setup["checkpoint"],
            "--output",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = json.loads(out.read_text())
    folder_files = sorted(str(f) for f in folder.rglob("*.jpg"))
    assert [r["path"] for r in rows] == [str(image), *folder_files, str(corrupt), str(work / "slice.mat"), str(missing)]
    good = [r for r in rows if "error" not in r]
    assert len(good) == len(rows) - 2
    for r in good:
        probabilities = r["probabilities"]
        assert set(probabilities) == set(CLASSES) and sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert r["label"] == max(probabilities, key=probabilities.get)  # the most probable class, by name
        assert r["confidence"] == pytest.approx(probabilities[r["label"]])
    errors = {r["path"]: r["error"] for r in rows if "error" in r}
    assert "cannot decode image" in errors[str(corrupt)] and "no such file" in errors[str(missing)]
    stderr = capsys.readouterr().err.splitlines()
    assert any(line.startswith("fedbt: error: ") and str(corrupt) in line for line in stderr)


def test_predict_csv_on_stdout_with_gradcam_overlays(setup, tmp_path, capsys):
    folder = setup["root"] / "figshare" / "pituitary"
    cams = tmp_path / "cams"
    code = main(
        [
            "predict",
            str(folder),
            str(setup["work"] / "corrupt.jpg"),
            "--checkpoint",
            setup["checkpoint"],
            "--format",
            "csv",
            "--gradcam",
            str(cams),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    probabilities = [f"p_{c}" for c in CLASSES]
    assert list(rows[0]) == ["path", "slice", "prediction", "confidence", *probabilities, "gradcam", "error"]
    assert len(rows) == len(list(folder.glob("*.jpg"))) + 1
    broken = rows[-1]
    assert broken["error"] and not broken["prediction"] and not broken["gradcam"]
    for r in rows[:-1]:
        probabilities = {c: float(r[f"p_{c}"]) for c in CLASSES}
        assert r["prediction"] == max(probabilities, key=probabilities.get) and not r["error"]
        overlay = Image.open(r["gradcam"])
        assert overlay.size == (32, 32) and overlay.mode == "RGB"
    assert len(list(cams.glob("*.png"))) == len(rows) - 1


def test_nothing_predicted_is_a_non_zero_exit(setup, capsys):
    assert main(["predict", str(setup["work"] / "corrupt.jpg"), "--checkpoint", setup["checkpoint"]]) == 1
    assert json.loads(capsys.readouterr().out)[0]["error"]


def test_predictions_see_the_pixels_training_saw(setup):
    """decode -> crop -> resize as the training cache does: the same probabilities as on the catalog's pixels."""
    model = load_model(setup["checkpoint"], "cpu")
    catalog = build_catalog(setup["cfg"].data, progress=False)
    chosen = [i for i, r in enumerate(catalog.records) if r.site == "sartaj"][:6]
    paths = [catalog.records[i].path for i in chosen]
    rows = predict_files(paths, model)
    from_training_pixels = model.probabilities(catalog.pixels[chosen])
    for row, expected, path in zip(rows, from_training_pixels, paths):
        assert Path(row.path) == Path(path)
        assert np.allclose([row.probabilities[c] for c in CLASSES], expected, atol=1e-6)

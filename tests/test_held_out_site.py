"""Leave one site out: the federation of the other sites and central on the same sites never train on the
held-out site's images (a marked image shows it), and the held-out site keeps its own split."""

import json
import shutil

import numpy as np
import pytest
import torch

from fedbt.cli import main
from fedbt.config import DataConfig, ExperimentConfig, FederatedConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.synthetic import save_jpeg
from fedbt.eval.evaluate import set_correct
from fedbt.federated.simulation import held_out_site_config
from fedbt.fl.task import client_partition, load_catalog

MARKED = "marked.jpg"


@pytest.fixture()
def marked_cfg(demo_root, site_files, tmp_path) -> ExperimentConfig:
    """Three sites of generated data, one Br35H image a checkerboard no other site has."""
    root = shutil.copytree(demo_root, tmp_path / "data")
    checkerboard = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    save_jpeg(checkerboard, root / "br35h" / "yes" / MARKED, rgb=True)
    data = DataConfig(data_root=str(root), sites=site_files, image_size=32, cache_dir=str(tmp_path / "cache"))
    return ExperimentConfig(output_dir=str(tmp_path / "out"), data=data, federated=FederatedConfig(num_clients=3))


def holds(pixels: torch.Tensor, image: torch.Tensor) -> bool:
    return bool((pixels == image).flatten(1).all(dim=1).any())


def test_the_held_out_sites_images_are_never_trained_on(marked_cfg):
    everything = build_catalog(marked_cfg.data, progress=False)
    marked = next(i for i, r in enumerate(everything.records) if r.path.endswith(MARKED))
    image = everything.pixels[marked]
    # In Br35H's training split: were Br35H federated, its site would train on it.
    assert everything.records[marked].site == "br35h" and everything.splits[marked] == "train"

    trained = held_out_site_config(marked_cfg, "br35h")
    assert trained.federated.num_clients == 2
    # What the federated sites train and validate on, as their ClientApps load it.
    catalog = load_catalog(trained)
    for client in range(trained.federated.num_clients):
        partition = client_partition(trained, client, trained.federated.num_clients)
        for split in ("train", "val"):
            assert not holds(catalog.subset(partition.indices[split]).pixels, image)
    # What central trains and validates on, on the same sites.
    for split in ("train", "val"):
        assert not holds(catalog.dataset(split=split, pooled=True).pixels, image)
    assert "br35h" not in catalog.site_names


def test_a_site_keeps_its_own_split_whichever_sites_are_loaded(marked_cfg):
    everything = build_catalog(marked_cfg.data, progress=False)
    alone = build_catalog(held_out_site_config(marked_cfg, "figshare").data, progress=False)

    def images(catalog, site: str) -> dict[str, set[str]]:
        return {split: {catalog.records[i].sha256 for i in catalog.indices(site, split)} for split in ("train", "val")}

    for site in alone.site_names:
        assert images(everything, site) == images(alone, site)


def test_an_unknown_held_out_site_is_a_one_line_error(demo_args, capsys):
    assert main(["simulate", *demo_args, "--held-out-site", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbt: error: --held-out-site nowhere: not a site of this run") and err.count("\n") == 1


@pytest.mark.e2e
def test_leaving_br35h_out_federates_two_sites_and_scores_both_models_on_br35h(demo_args, tmp_path, capsys):
    out = tmp_path / "loso"
    assert main(["simulate", *demo_args, "--rounds", "1", "--held-out-site", "br35h", "--out", str(out)]) == 0
    assert "federated set acc" in capsys.readouterr().out
    result = json.loads((out / "held-out.json").read_text())["results"]["br35h"]
    assert result["trained_on"] == ["figshare", "sartaj"]
    run = json.loads((out / "held-out-br35h" / "comparison.json").read_text())["results"]
    assert set(run["federated"]["test"]["sites"]) == {"figshare", "sartaj"} == set(run["central"]["test"]["sites"])
    assert result["test"]["federated"]["n"] == result["test"]["central"]["n"] > 0
    # The paired test counts the same images the set accuracies do.
    paired, n = result["paired"], result["test"]["federated"]["n"]
    difference = result["test"]["federated"]["set_accuracy"] - result["test"]["central"]["set_accuracy"]
    assert paired["n"] == n and paired["a_right_b_wrong"] - paired["a_wrong_b_right"] == round(difference * n)


def test_an_image_is_right_when_its_prediction_is_a_class_its_label_allows():
    # glioma, meningioma, no_tumor, pituitary: a fine glioma label, and a Br35H 'yes' (any tumour type)
    masks = np.array([[1, 0, 0, 0], [1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0]], dtype=bool)
    predicted = [1, 3, 2, 2]  # wrong type; any tumour; no tumour for a 'yes'; right
    probs = np.eye(4)[predicted]
    assert set_correct(probs, masks).tolist() == [False, True, False, True]

"""End to end: a 2-round, 3-client Flower simulation on generated data through the real Ray backend."""

import json
import os

import pytest
import torch

from fedbt.cli import main
from fedbt.data.synthetic import generate_demo_data
from fedbt.federated.server_app import EXPERIMENT_ENV

pytestmark = pytest.mark.e2e


def mean_train_loss(record: dict) -> float:
    """The round's training loss over all sites' images."""
    sites = record["train"].values()
    return sum(s["train_loss"] * s["num-examples"] for s in sites) / sum(s["num-examples"] for s in sites)


def test_three_site_simulation_improves_the_global_model_and_writes_the_report(tmp_path):
    # 40 images a class (not the shared fixture's 12): with ~10 validation images a site, whether
    # 3 rounds helped is noise. ResNet18 at lr 0.003 learns in 3 rounds here; the demo's small CNN
    # needs more rounds than a test should take.
    data = generate_demo_data(tmp_path / "data", per_class=40, seed=0, duplicates=3)
    args = ["--config", "configs/demo.yaml", "--data-root", str(data), "--set", f"data.cache_dir={tmp_path / 'cache'}",
            "--set", "data.image_size=32", "--set", "model.name=resnet18", "--set", "train.lr=0.003"]  # fmt: skip
    out = tmp_path / "results"
    code = main(["simulate", *args, "--clients", "3", "--rounds", "3", "--out", str(out)])
    assert code == 0
    # The experiment was this process's for the run only: a deployment started later would inherit it.
    assert EXPERIMENT_ENV not in os.environ
    for name in (
        "report.md",
        "report.html",
        "comparison.json",
        "curves.png",
        "confusion.png",
        "roc.png",
        "federated/final.pt",
        "federated/last.pt",
        "central/metrics.json",
    ):
        assert (out / name).is_file(), name
    results = json.loads((out / "comparison.json").read_text())["results"]
    fed = results["federated"]
    assert [h["round"] for h in fed["history"]] == [1, 2, 3]
    assert set(fed["history"][-1]["sites"]) == {"figshare", "sartaj", "br35h"}
    assert set(fed["test"]["sites"]) == {"figshare", "sartaj", "br35h"}
    assert set(results["local"]) == {"figshare", "sartaj", "br35h"}
    assert results["central"]["epochs"] == 3
    # The global model learned: the sites' training loss fell from round to round, and on the pooled
    # validation split the final model beats the untrained one it started from.
    assert mean_train_loss(fed["history"][-1]) < mean_train_loss(fed["history"][0])
    assert fed["history"][-1]["server"]["loss"] < fed["initial"]["loss"]
    # The report says which leakage control the test figures had, and names what it held out.
    held_out = results["held_out_test"]
    assert f"{len(held_out)} test images were left out of every test set" in (out / "report.md").read_text()


def test_a_stopped_federated_run_resumes_from_its_last_round(demo_args, tmp_path):
    out = tmp_path / "results"
    common = ["simulate", *demo_args, "--out", str(out), "--strategy", "fedavgm",
              "--set", "federated.server_momentum=0.9", "--skip-central", "--skip-local"]  # fmt: skip
    assert main([*common, "--rounds", "1"]) == 0
    first = torch.load(out / "federated" / "last.pt", weights_only=True)["progress"]
    assert first["round"] == 1 and "velocity" in first["server_optimizer"]
    assert main([*common, "--rounds", "2", "--resume"]) == 0
    fed = json.loads((out / "federated" / "metrics.json").read_text())
    assert [h["round"] for h in fed["history"]] == [1, 2]
    # Round 1 was not trained again: its record is the one the first run wrote, with the sites' scores of its
    # model, which came with round 2's message.
    before, after = json.loads(json.dumps(first["history"][0])), fed["history"][0]
    assert {k: v for k, v in after.items() if k != "sites"} == {k: v for k, v in before.items() if k != "sites"}
    assert set(after["sites"]) == {"figshare", "sartaj", "br35h"}


def test_float16_transport_and_sparse_evaluation_still_train_the_global_model(demo_args, tmp_path):
    out = tmp_path / "results"
    code = main(["simulate", *demo_args, "--out", str(out), "--rounds", "3", "--skip-central", "--skip-local",
                 "--set", "federated.transport_dtype=float16", "--set", "federated.evaluate_every=2"])  # fmt: skip
    assert code == 0
    fed = json.loads((out / "federated" / "metrics.json").read_text())
    scored = [h["round"] for h in fed["history"] if h["sites"] and h["server"]]
    assert scored == [2, 3]  # every 2nd round and the last
    assert not fed["history"][0]["sites"] and not fed["history"][0]["server"]
    assert set(fed["history"][0]["train"]) == {"figshare", "sartaj", "br35h"}  # round 1 still trained
    assert fed["history"][-1]["server"]["loss"] < fed["initial"]["loss"]


def test_rounds_of_half_an_epoch_share_out_each_sites_epoch_and_central_trains_the_same_epochs(demo_args, tmp_path):
    out = tmp_path / "results"
    # Batches of 4, so that every site's epoch has several batches to share out (a site of 27 images).
    code = main(["simulate", *demo_args, "--out", str(out), "--rounds", "4", "--local-epochs", "0.5",
                 "--set", "train.batch_size=4", "--skip-local"])  # fmt: skip
    assert code == 0
    results = json.loads((out / "comparison.json").read_text())["results"]
    history = results["federated"]["history"]
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    assert results["central"]["epochs"] == 2  # 4 rounds x half an epoch
    for site in ("figshare", "sartaj", "br35h"):
        seen = [h["train"][site]["images_per_second"] * h["train"][site]["train_seconds"] for h in history]
        examples, batch = history[0]["train"][site]["num-examples"], 4
        epoch = examples // batch * batch  # the loader drops the last, partial batch
        # Two rounds make one epoch of the site's batches; each round is only part of it.
        assert seen[0] + seen[1] == pytest.approx(epoch) and seen[2] + seen[3] == pytest.approx(epoch)
        assert 0 < seen[0] < epoch
    assert "4 rounds x 0.5 local epoch(s); central and local-only models: 2 epochs" in (out / "report.md").read_text()

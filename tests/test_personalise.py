"""Personalised site models: the selection rule keeps the global model unless a candidate beats it on the
site's validation split, BatchNorm re-estimation changes statistics only, and the kept model is stored."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from fedbt.config import ExperimentConfig, PersonaliseConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.labels import CANONICAL_CLASSES
from fedbt.data.transforms import augmentation_for
from fedbt.model.checkpoint import load_checkpoint
from fedbt.model.device import select_device
from fedbt.train import personalise
from fedbt.train.personalise import (
    GLOBAL,
    LOCAL,
    SiteData,
    global_model,
    personalise_site,
    reestimated_batchnorm,
    select,
)
from fedbt.train.setup import new_model


@pytest.fixture()
def cfg(data_config, tmp_path) -> ExperimentConfig:
    train = TrainConfig(batch_size=16, log_every=0, device="cpu")
    return ExperimentConfig(
        output_dir=str(tmp_path), data=data_config, train=train, personalise=PersonaliseConfig(epochs=1)
    )


def site_data(cfg: ExperimentConfig, site: str) -> SiteData:
    catalog = build_catalog(cfg.data, progress=False)
    return SiteData(
        train=catalog.dataset(site=site, split="train", augment=augmentation_for(cfg.train)),
        val=catalog.dataset(site=site, split="val"),
        test=catalog.dataset(site=site, split="test"),
    )


def untrained_state(cfg: ExperimentConfig) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in new_model(cfg, 4).state_dict().items()}


def scores(*values: float) -> dict[str, dict]:
    names = [GLOBAL, "batchnorm", "head", "all"][: len(values)]
    return {name: {"set_accuracy": value} for name, value in zip(names, values)}


@pytest.mark.parametrize(
    ("validation", "kept"),
    [
        (scores(0.80, 0.70, 0.79, 0.60), GLOBAL),  # every candidate worse: the global model stays
        (scores(0.80, 0.80, 0.80, 0.80), GLOBAL),  # a tie is no gain
        (scores(0.80, 0.82, 0.90, 0.85), "head"),  # the best candidate
        (scores(0.80, 0.85, 0.85, 0.70), "batchnorm"),  # among equals, the first tried
    ],
)
def test_selection_keeps_the_global_model_unless_a_candidate_scores_higher_on_validation(validation, kept):
    assert select(validation) == kept


NO_TUMOUR = CANONICAL_CLASSES.index("no_tumor")


class ConstantPrediction(nn.Module):
    """Predicts one class for every image, whatever it shows."""

    def __init__(self, predicted: int):
        super().__init__()
        self.predicted = predicted

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(images), 4)
        logits[:, self.predicted] = 10.0
        return logits


def test_personalisation_never_lowers_the_sites_validation_score(cfg, tmp_path, monkeypatch):
    # Every adaptation predicts 'no tumour' for figshare's images, all of them tumours: validation set
    # accuracy 0, which cannot beat the global model's. The site must keep the global model as it came.
    monkeypatch.setattr(personalise, "adapted_model", lambda *args: ConstantPrediction(NO_TUMOUR))
    state = untrained_state(cfg)
    result = personalise_site(cfg, state, site_data(cfg, "figshare"), tmp_path / "figshare", "personalise figshare")
    assert set(result["candidates"]) == {GLOBAL, "batchnorm", "head", "all"}
    assert all(result["candidates"][name]["val"]["set_accuracy"] == 0.0 for name in ("batchnorm", "head", "all"))
    assert result["chosen"] == GLOBAL
    assert result["test"]["set_accuracy"] == result["candidates"][GLOBAL]["test_set_accuracy"]
    kept = load_checkpoint(tmp_path / "figshare" / "final.pt")["model_state"]
    assert all(torch.equal(kept[k], state[k]) for k in state)


def constant_state(cfg: ExperimentConfig, predicted: int) -> dict[str, torch.Tensor]:
    """A ResNet18 state whose head ignores the image and always predicts one class."""
    state = untrained_state(cfg)
    state["fc.weight"].zero_()
    state["fc.bias"].zero_()
    state["fc.bias"][predicted] = 10.0
    return state


def test_the_sites_own_local_only_model_is_kept_when_it_scores_higher_on_validation(cfg, tmp_path, monkeypatch):
    # figshare's images are all tumours: a global model that says 'no tumour' to every one scores 0, as do
    # the adaptations; the site's own model, saying 'meningioma', scores the share of meningiomas, and is kept.
    monkeypatch.setattr(personalise, "adapted_model", lambda *args: ConstantPrediction(NO_TUMOUR))
    local = constant_state(cfg, CANONICAL_CLASSES.index("meningioma"))
    data = site_data(cfg, "figshare")
    result = personalise_site(cfg, constant_state(cfg, NO_TUMOUR), data, tmp_path / "figshare", "p figshare", local)
    assert result["candidates"][GLOBAL]["val"]["set_accuracy"] == 0.0
    assert result["candidates"][LOCAL]["val"]["set_accuracy"] > 0.0
    assert result["chosen"] == LOCAL
    kept = load_checkpoint(tmp_path / "figshare" / "final.pt")["model_state"]
    assert all(torch.equal(kept[k], local[k]) for k in local)


def test_every_candidate_is_tried_and_only_the_kept_model_is_stored(cfg, tmp_path):
    out = tmp_path / "sartaj"
    result = personalise_site(cfg, untrained_state(cfg), site_data(cfg, "sartaj"), out, "personalise sartaj")
    validation = {name: c["val"]["set_accuracy"] for name, c in result["candidates"].items()}
    assert set(validation) == {GLOBAL, "batchnorm", "head", "all"}  # no local-only model given: no 'local'
    assert validation[result["chosen"]] >= validation[GLOBAL]
    assert result["test"]["n"] == len(site_data(cfg, "sartaj").test)
    assert sorted(p.name for p in out.iterdir()) == ["final.pt"]  # the candidates' checkpoints are gone
    assert load_checkpoint(out / "final.pt")["temperature"] == result["temperature"]


def test_batchnorm_reestimation_changes_the_statistics_and_no_weight(cfg):
    device = select_device("cpu")
    state = untrained_state(cfg)
    model = global_model(cfg, state, device)
    reestimated_batchnorm(model, site_data(cfg, "br35h").train, cfg, device)
    after = model.state_dict()
    assert not torch.equal(after["bn1.running_mean"], state["bn1.running_mean"])
    assert all(torch.equal(after[k], state[k]) for k in state if "running" not in k and "num_batches" not in k)


def test_batchnorm_is_reestimated_when_the_last_batch_holds_one_image(cfg):
    device = select_device("cpu")
    images = site_data(cfg, "br35h").train
    one_left = replace(cfg, train=replace(cfg.train, batch_size=len(images) - 1))  # the last batch: one image
    state = untrained_state(cfg)
    model = global_model(cfg, state, device)
    reestimated_batchnorm(model, images, one_left, device)
    assert not torch.equal(model.state_dict()["layer4.1.bn2.running_mean"], state["layer4.1.bn2.running_mean"])

import copy

import pytest
import torch

import fedbt.train.central as central
from fedbt.config import ExperimentConfig, ModelConfig, TrainConfig
from fedbt.data.catalog import build_catalog
from fedbt.data.transforms import augmentation_for
from fedbt.model.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from fedbt.train.central import TrainData, train_model
from fedbt.train.schedules import lr_factor


def small_config(data_config, epochs: int = 2) -> ExperimentConfig:
    cfg = ExperimentConfig(data=data_config, model=ModelConfig(name="cnn"))
    cfg.train = TrainConfig(epochs=epochs, batch_size=16, lr=1e-3, threads=1, log_every=0)
    return cfg


def train_data(cfg):
    catalog = build_catalog(cfg.data, progress=False)
    return TrainData(
        train=catalog.dataset(split="train", pooled=True, augment=augmentation_for(cfg.train)),
        val=catalog.dataset(split="val", pooled=True),
    )


def test_onecycle_warms_up_then_anneals():
    values = [lr_factor("onecycle", p / 100) for p in range(101)]
    assert values[0] == pytest.approx(1 / 25)
    assert max(values) == pytest.approx(1.0, abs=1e-3) and values.index(max(values)) == 30
    assert values[-1] < 1e-4
    assert lr_factor("cosine", 0.5) == pytest.approx(0.5)


def test_training_lowers_the_loss(data_config, tmp_path):
    cfg = small_config(data_config, epochs=4)
    _, history = train_model(cfg, train_data(cfg), tmp_path, "test")
    assert history[-1]["train"]["loss"] < history[0]["train"]["loss"]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(data_config, tmp_path, monkeypatch):
    cfg = small_config(data_config)
    data = train_data(cfg)
    train_model(cfg, data, tmp_path / "straight", "test")

    real_epoch = central.train_epoch
    calls = {"n": 0}

    def crash_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(central, "train_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_model(cfg, data, tmp_path / "resumed", "test")
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["progress"]["epoch"] == 0
    monkeypatch.setattr(central, "train_epoch", real_epoch)
    train_model(cfg, data, tmp_path / "resumed", "test", resume=True)

    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert [h["epoch"] for h in resumed["progress"]["history"]] == [1, 2]
    for key, value in straight["model_state"].items():
        assert torch.equal(value, resumed["model_state"][key]), key


def test_checkpoint_is_self_describing_and_versioned(data_config, tmp_path):
    cfg = small_config(data_config)
    model = model_from_checkpoint(
        load_checkpoint(save_checkpoint(tmp_path / "a.pt", build_cnn(cfg), cfg, {"epoch": 0}, "central"))
    )
    assert isinstance(model, torch.nn.Module)
    payload = load_checkpoint(tmp_path / "a.pt")
    assert payload["classes"] == ["glioma", "meningioma", "no_tumor", "pituitary"]
    assert payload["image_size"] == 32 and set(payload["normalization"]) == {"mean", "std"}
    payload["version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="is for task"):
        load_checkpoint(tmp_path / "a.pt", expect_task="binary")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


def build_cnn(cfg):
    from fedbt.model.architectures import build_model

    return build_model(cfg.model, 4, cfg.data.image_size)


def test_models_build_for_both_tasks_and_grayscale_input():
    from fedbt.model.architectures import build_model

    x = torch.zeros(2, 1, 64, 64)
    assert build_model(ModelConfig(name="resnet18"), 4, 64)(x).shape == (2, 4)
    assert build_model(ModelConfig(name="cnn"), 2, 64)(x).shape == (2, 2)
    with pytest.raises(FileNotFoundError, match="pretrained weights file not found"):
        build_model(ModelConfig(name="resnet50", pretrained_path="/nonexistent.pth"), 4, 64)


def test_training_seed_decides_the_run(data_config, tmp_path):
    cfg = small_config(data_config, epochs=1)
    data = train_data(cfg)
    first, _ = train_model(cfg, data, tmp_path / "a", "test")
    again, _ = train_model(cfg, data, tmp_path / "b", "test")
    cfg.train.seed = cfg.data.seed + 1
    other, _ = train_model(cfg, data, tmp_path / "c", "test")
    weights = [m.state_dict()["classifier.4.weight"] for m in (first, again, other)]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_central_reports_the_model_it_ends_with_though_validation_got_worse(data_config, tmp_path, monkeypatch):
    """The selection rule: validation loss rises in the last epoch (and patience 1 stops training
    there), yet the test scores and final.pt are that last epoch's model, not the first's."""
    cfg = small_config(data_config, epochs=3)
    cfg.train.lr, cfg.train.early_stopping_patience, cfg.tracking.enabled = 3e-3, 1, False
    catalog = build_catalog(cfg.data, progress=False)
    real_evaluate = central.evaluate
    validation_losses = iter([1.0, 2.0])
    epoch_models = []

    def scripted_validation(model, loader, device, task, temperature=1.0):
        scores = real_evaluate(model, loader, device, task, temperature)
        # Every epoch's validation comes before the test scoring, which passes through.
        if (loss := next(validation_losses, None)) is not None:
            epoch_models.append(copy.deepcopy(model))
            scores["loss"] = loss
        return scores

    monkeypatch.setattr(central, "evaluate", scripted_validation)
    result = central.run_central(cfg, catalog, tmp_path)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    cpu = torch.device("cpu")
    temperature = result["calibration"]["temperature"]  # the test split is scored at the calibrated temperature
    first, last = (
        central.evaluate_everywhere(m, catalog, cpu, 16, temperature)["pooled"]["loss"] for m in epoch_models
    )
    assert first != pytest.approx(last)
    assert result["test"]["pooled"]["loss"] == pytest.approx(last)
    final = load_checkpoint(tmp_path / "final.pt")["model_state"]
    assert all(torch.equal(value, epoch_models[-1].state_dict()[key]) for key, value in final.items())

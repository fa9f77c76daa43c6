"""Augmentation on whole batches on the device: per-image draws, the same kinds of change as
the per-item loader path, and the trainer's choice of where it runs."""

import torch

from fedbt.config import ExperimentConfig, ModelConfig, TrainConfig
from fedbt.data.catalog import MRIDataset
from fedbt.data.transforms import Augmentation, to_device_batch
from fedbt.train.setup import place_augmentation, train_epoch, training_setup

NO_MOVE = {"degrees": 0.0, "translate": 0.0, "scale": (1.0, 1.0)}


def gradient_image(side: int = 16) -> torch.Tensor:
    """A float image in [0, 1] whose left and right halves differ, so a flip shows."""
    return torch.linspace(0, 1, side * side).reshape(1, 1, side, side).sqrt()


def test_without_moves_each_image_is_itself_or_its_mirror_image_and_both_occur():
    torch.manual_seed(0)
    image = gradient_image()
    out = Augmentation(**NO_MOVE).on_batch(image.repeat(64, 1, 1, 1))
    same = [torch.allclose(o, image[0], atol=1e-5) for o in out]
    mirrored = [torch.allclose(o, image[0].flip(-1), atol=1e-5) for o in out]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < 64


def test_every_image_of_a_batch_gets_its_own_draw():
    torch.manual_seed(0)
    out = Augmentation(intensity_jitter=0.2).on_batch(gradient_image().repeat(16, 1, 1, 1))
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 16


def bright_spot_columns(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(2).argmax(2).squeeze(1) % images.shape[-1]


def test_shifts_stay_within_the_translate_fraction():
    torch.manual_seed(0)
    side, spot = 40, 20
    image = torch.zeros(1, 1, side, side)
    image[0, 0, spot, spot] = 1.0
    no_flip_or_turn = Augmentation(degrees=0.0, translate=0.1, scale=(1.0, 1.0))
    columns = bright_spot_columns(no_flip_or_turn.on_batch(image.repeat(200, 1, 1, 1)))
    moved = (columns - spot).abs()
    # A flip of the centred spot moves it by one pixel at most; the shift by up to 4 more.
    assert moved.max() <= 0.1 * side + 1
    assert moved.max() >= 3  # shifts are drawn, not all zero


def test_intensity_jitter_scales_a_flat_image_within_its_range():
    torch.manual_seed(0)
    flat = torch.full((200, 1, 8, 8), 0.5)
    out = Augmentation(**NO_MOVE, intensity_jitter=0.2).on_batch(flat)
    levels = out.mean(dim=(1, 2, 3))
    assert levels.min() >= 0.5 * 0.8 - 1e-5 and levels.max() <= 0.5 * 1.2 + 1e-5
    assert levels.max() - levels.min() > 0.1


def test_a_device_batch_is_augmented_then_normalised():
    torch.manual_seed(0)
    uint8 = (gradient_image() * 255).to(torch.uint8).repeat(4, 1, 1, 1)
    plain = to_device_batch(uint8, torch.device("cpu"))
    augmented = to_device_batch(uint8, torch.device("cpu"), Augmentation(intensity_jitter=0.2))
    assert plain.shape == augmented.shape and not torch.allclose(plain, augmented)


def tiny_training(augment_on: str) -> tuple[ExperimentConfig, MRIDataset]:
    cfg = ExperimentConfig(model=ModelConfig(name="cnn"))
    cfg.data.image_size = 32
    cfg.train = TrainConfig(batch_size=8, threads=1, log_every=0, augment_on=augment_on)
    pixels = torch.randint(0, 256, (24, 1, 32, 32), dtype=torch.uint8)
    masks = torch.zeros(24, 4, dtype=torch.bool)
    masks[torch.arange(24), torch.arange(24) % 4] = True
    return cfg, MRIDataset(pixels, masks, Augmentation())


def test_the_trainer_moves_augmentation_to_the_device_only_when_asked_or_on_cuda():
    cpu = torch.device("cpu")
    cfg, dataset = tiny_training("device")
    loader_data, on_device = place_augmentation(dataset, cfg, cpu)
    assert on_device is dataset.augmentation and loader_data.augmentation is None
    for augment_on, device in (("auto", cpu), ("loader", torch.device("cuda"))):
        cfg, dataset = tiny_training(augment_on)
        assert place_augmentation(dataset, cfg, device) == (dataset, None)
    cfg, dataset = tiny_training("auto")
    assert place_augmentation(dataset, cfg, torch.device("cuda"))[1] is dataset.augmentation


def test_an_epoch_trains_with_augmentation_on_the_device():
    cfg, dataset = tiny_training("device")
    setup = training_setup(cfg, 4, dataset.masks)
    before = [p.detach().clone() for p in setup.model.parameters()]
    stats = train_epoch(setup, dataset, cfg, None, seed=0, loader_seed=0)
    assert stats["images"] == 24 and torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(b, p) for b, p in zip(before, setup.model.parameters()))

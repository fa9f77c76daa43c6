"""Grad-CAM: exact on a model whose answer is known, and on the lesion of a trained ResNet18."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fedbt.config import TrainConfig
from fedbt.data.catalog import MRIDataset
from fedbt.data.loader import make_loader
from fedbt.data.synthetic import make_image
from fedbt.data.transforms import to_device_batch
from fedbt.eval.gradcam import grad_cam, save_overlay, target_layer
from fedbt.model.architectures import build_resnet18
from fedbt.model.device import prepare_model
from fedbt.reports.plots import GridItem, overlay, plot_prediction_grid
from fedbt.train.engine import build_optimizer, train_one_epoch
from fedbt.train.losses import coarse_label_loss


class LinearCam(nn.Module):
    """features = identity, head = global mean times (-1, +1): Grad-CAM of class 1 is relu(input).

    The class-1 score is mean(x), whose gradient is the same positive number everywhere, so
    the channel weight is positive and the map is the rectified input; class 0 is its mirror.
    """

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def test_grad_cam_is_exact_where_the_answer_is_known():
    block = torch.zeros(16, 16)
    block[2:6, 10:14] = 1.0
    images = (block - 0.5).expand(2, 1, 16, 16)
    model = LinearCam().train()
    result = grad_cam(model, images, target=[1, 0])
    assert model.training  # computed in eval mode, handed back as it came
    assert np.allclose(result.cams[0], block.numpy(), atol=1e-6)
    assert np.allclose(result.cams[1], 1 - block.numpy(), atol=1e-6)
    assert result.explained.tolist() == [1, 0] and np.allclose(result.probs.sum(axis=1), 1)
    # Without a target each image's predicted class is explained: mean(block - 0.5) < 0 favours class 0.
    assert grad_cam(model, images).explained.tolist() == [0, 0]
    # The hooks are gone and no weight got a gradient.
    assert not model.features._forward_hooks and not model.features._backward_hooks
    assert all(p.grad is None for p in model.parameters())


def test_resnet_target_is_layer4_and_frozen_weights_still_give_a_map():
    torch.manual_seed(0)
    model = build_resnet18(4)
    assert target_layer(model) is model.layer4
    images = torch.randn(3, 1, 64, 64)
    trainable = grad_cam(model, images, target=2).cams
    for p in model.parameters():
        p.requires_grad = False
    frozen = grad_cam(model, images, target=2).cams
    assert frozen.shape == (3, 64, 64)
    assert np.allclose(frozen, trainable, atol=1e-6)  # freezing decides what trains, not where the evidence is
    # Each map is scaled on its own to span [0, 1].
    assert np.allclose(frozen.min(axis=(1, 2)), 0) and np.allclose(frozen.max(axis=(1, 2)), 1)
    with pytest.raises(ValueError, match="no Grad-CAM target layer"):
        target_layer(nn.Linear(2, 2))


def test_overlays_and_the_prediction_grid(tmp_path):
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))
    cam = np.zeros((32, 32))
    cam[:8, :8] = 1.0
    blended = overlay(gray, cam)
    assert blended.shape == (32, 32, 3) and blended.dtype == np.uint8
    assert blended[0, 0, 0] > blended[0, 0, 2] and blended[-1, 0, 2] > blended[-1, 0, 0]  # hot red, cold blue
    saved = Image.open(save_overlay(gray, cam, tmp_path / "cams" / "x.png"))
    assert saved.size == (32, 32) and saved.mode == "RGB"
    items = [GridItem(gray, cam, "glioma 0.9", True), GridItem(gray, None, "no_tumor 0.6", False)] * 3
    assert Image.open(plot_prediction_grid(items, tmp_path / "grid.png", columns=4)).size[0] > 400


# --- localisation on a trained network ---------------------------------------------------

SIZE = 128  # layer4 is a 4 x 4 map here; at 48 px it would be 2 x 2, too coarse to point at anything


def lesion_images(count: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Half glioma, half no tumour, cut from larger renderings so a lesion sits 20-32% of the
    image away from the centre in any direction (make_image puts gliomas near the centre,
    where a map stuck in the middle would look right)."""
    big = int(SIZE * 1.6)
    pixels, masks, centres = [], [], []
    for i in range(count):
        label = "glioma" if i % 2 == 0 else "no_tumor"
        image = make_image(label, rng, size=big)
        if image.lesion_center is None:
            top, left = rng.integers(0, big - SIZE + 1, 2)
            centre = None
        else:
            angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.32)
            ly, lx = image.lesion_center[0] * big, image.lesion_center[1] * big
            top = int(np.clip(round(ly - (0.5 + radius * np.sin(angle)) * SIZE), 0, big - SIZE))
            left = int(np.clip(round(lx - (0.5 + radius * np.cos(angle)) * SIZE), 0, big - SIZE))
            centre = ((ly - top) / SIZE, (lx - left) / SIZE)
        pixels.append(image.pixels[top : top + SIZE, left : left + SIZE])
        masks.append([label == "no_tumor", label != "no_tumor"])  # the binary task: (no_tumor, tumor)
        centres.append(centre)
    return torch.from_numpy(np.stack(pixels))[:, None], torch.tensor(masks), centres


def peak(cam: np.ndarray) -> tuple[float, float]:
    """Centre of the map's hottest area, (row, col) as fractions of the image."""
    rows, cols = np.nonzero(cam >= 0.95 * cam.max())
    return (rows.mean() + 0.5) / cam.shape[0], (cols.mean() + 0.5) / cam.shape[1]


def test_grad_cam_of_a_trained_resnet18_points_at_the_lesion():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    device = torch.device("cpu")
    train_pixels, train_masks, _ = lesion_images(96, rng)
    test_pixels, test_masks, centres = lesion_images(40, rng)
    model = prepare_model(build_resnet18(2), device)
    optimizer = build_optimizer(model.parameters(), TrainConfig(lr=3e-4))
    loader = make_loader(MRIDataset(train_pixels, train_masks), 16, True, device)
    for _ in range(5):
        train_one_epoch(model, coarse_label_loss, optimizer, loader, device)

    result = grad_cam(model, to_device_batch(test_pixels, device), target=1)  # explain 'tumor'
    accuracy = (result.probs.argmax(axis=1) == test_masks.int().argmax(dim=1).numpy()).mean()
    assert accuracy >= 0.9  # the network found the lesions; only then is its map worth checking
    distances = [np.hypot(*np.subtract(peak(cam), c)) for cam, c in zip(result.cams, centres) if c is not None]
    hits = np.mean(np.array(distances) < 0.2)
    # A map fixed on the image centre would be within 0.2 of only a minority of these lesions.
    assert np.mean([np.hypot(c[0] - 0.5, c[1] - 0.5) < 0.2 for c in centres if c is not None]) < 0.5
    assert hits >= 0.7, f"Grad-CAM peak within 0.2 of the lesion for {hits:.0%} of tumour images"

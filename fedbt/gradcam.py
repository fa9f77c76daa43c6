"""Grad-CAM (Selvaraju et al., 2017): where in the image the evidence for a class lies.

The activations of the model's last convolutional block (``layer4`` of a ResNet) are
weighted by the spatial mean of the class score's gradient with respect to them,
summed over channels, rectified and upsampled to the input size.  Hooks capture the
activations on the way forward and their gradient on the way back, so the model
code stays untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class CamResult:
    cams: np.ndarray  # (N, H, W) in [0, 1], at the input's size
    probs: np.ndarray  # (N, C) softmax probabilities
    explained: np.ndarray  # (N,) index of the class each map explains


def target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: ResNets' layer4, the small CNN's feature stack."""
    for name in ("layer4", "features"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise ValueError(f"no Grad-CAM target layer in {type(model).__name__} (expected layer4 or features)")


def grad_cam(
    model: nn.Module, images: torch.Tensor, target: int | Sequence[int] | None = None, layer: nn.Module | None = None
) -> CamResult:
    """Grad-CAM maps of normalised images (N, 1, H, W).

    target: the class to explain, one for all images or one per image; None: each image's predicted class.
    """
    layer = layer if layer is not None else target_layer(model)
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _inp, out: captured.__setitem__("activations", out)),
        layer.register_full_backward_hook(lambda _m, _gin, gout: captured.__setitem__("gradients", gout[0])),
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # Gradients are taken with respect to the input so that a graph exists even when
            # every weight is frozen, and no parameter's .grad is touched.
            inputs = images.detach().float().requires_grad_(True)
            logits = model(inputs)
            if target is None:
                explained = logits.argmax(dim=1)
            else:
                explained = torch.as_tensor(target, device=logits.device).long().expand(len(inputs))
            # In eval mode samples do not interact, so one backward pass serves the whole batch.
            torch.autograd.grad(logits.gather(1, explained[:, None]).sum(), inputs)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    activations, gradients = captured["activations"].detach().float(), captured["gradients"].float()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cams = F.relu((weights * activations).sum(dim=1, keepdim=True))
    cams = F.interpolate(cams, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cams.amin(dim=(1, 2), keepdim=True)
    high = cams.amax(dim=(1, 2), keepdim=True)
    cams = (cams - low) / (high - low).clamp_min(1e-12)
    return CamResult(cams.cpu().numpy(), logits.detach().float().softmax(dim=1).cpu().numpy(), explained.cpu().numpy())


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A grayscale image (H, W) uint8 with its map (H, W) in [0, 1] blended on top, as RGB uint8."""
    heat = plt.get_cmap("jet")(cam)[..., :3]
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255).round().astype(np.uint8)


def save_overlay(gray: np.ndarray, cam: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(gray, cam)).save(path)
    return path


@dataclass
class GridItem:
    image: np.ndarray  # (H, W) uint8, the model's input before normalisation
    cam: np.ndarray | None  # (H, W) in [0, 1], or None for the image alone
    title: str
    correct: bool | None = None  # colours the title: green right, red wrong, black unknown


def plot_prediction_grid(items: list[GridItem], path: Path, columns: int = 4) -> Path:
    """Sample predictions in a grid, each with its Grad-CAM overlay when given."""
    rows = max(1, -(-len(items) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.1 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ax.imshow(item.image if item.cam is None else overlay(item.image, item.cam), cmap="gray", vmin=0, vmax=255)
        colour = {True: "green", False: "red", None: "black"}[item.correct]
        ax.set_title(item.title, fontsize=8, color=colour)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

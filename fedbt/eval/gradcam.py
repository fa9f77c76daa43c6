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

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fedbt.reports.plots import overlay


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


def save_overlay(gray: np.ndarray, cam: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(gray, cam)).save(path)
    return path

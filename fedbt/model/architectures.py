"""Models: ResNet18 from scratch, the original notebooks' small CNN, ResNet50 transfer learning."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50
from torchvision.models.resnet import BasicBlock, ResNet

from fedbt.config import ModelConfig


def _single_channel_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of a ResNet stem conv taking in_channels; RGB weights are summed for grayscale."""
    stem = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        if conv.in_channels == 3 and in_channels == 1:
            stem.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
    return stem


# GroupNorm's usual 32 groups: every ResNet18 width (64 to 512 channels) divides into them.
GROUPS = 32


class OutOfPlaceBasicBlock(BasicBlock):
    """torchvision's BasicBlock computing the same, with no layer's output changed in place.

    Opacus hooks every layer's backward pass to get per-sample gradients, and autograd forbids
    changing a hooked layer's output in place (torchvision's in-place ReLU and `out += identity`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def resnet18_groupnorm(num_classes: int) -> ResNet:
    """ResNet18 whose every normalisation layer sees one image at a time, ready for per-sample gradients."""
    model = ResNet(
        OutOfPlaceBasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=partial(nn.GroupNorm, GROUPS)
    )
    model.relu = nn.ReLU()
    return model


def build_resnet18(num_classes: int, in_channels: int = 1, norm: str = "batch") -> nn.Module:
    """ResNet18 from scratch; norm 'group' for differential privacy (see resnet18_groupnorm)."""
    if norm == "group":
        model = resnet18_groupnorm(num_classes)
    else:
        model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _single_channel_stem(model.conv1, in_channels)
    return model


class SmallCNN(nn.Module):
    """The original notebooks' baseline: 3 x [conv, ReLU, max-pool], dense 256, dropout, logits.

    Its ReLUs leave their input alone (not in place), so Opacus can hook every layer for
    per-sample gradients (see OutOfPlaceBasicBlock).
    """

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 128, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, 256),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_resnet50_transfer(num_classes: int, in_channels: int, weights_path: str | None) -> nn.Module:
    """ResNet50 with ImageNet weights read from a local file the user names (never downloaded)."""
    model = resnet50(weights=None)
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    if in_channels != 3:
        model.conv1 = _single_channel_stem(model.conv1, in_channels)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def build_model(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    if cfg.name == "resnet18":
        return build_resnet18(num_classes, cfg.in_channels, cfg.norm)
    if cfg.name == "cnn":
        return SmallCNN(num_classes, cfg.in_channels, image_size, cfg.dropout)
    if cfg.name == "resnet50":
        return build_resnet50_transfer(num_classes, cfg.in_channels, cfg.pretrained_path)
    raise ValueError(f"unknown model {cfg.name!r}: choose resnet18, cnn or resnet50")


def set_backbone_trainable(model: nn.Module, trainable_prefixes: tuple[str, ...]) -> None:
    """Freeze every parameter whose name starts with none of the prefixes (e.g. ('fc',))."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable_prefixes)

"""Models: ResNet18 from scratch, the original notebooks' small CNN, ResNet50 transfer learning."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet18, resnet50

from fedbt.config import ModelConfig


def _single_channel_stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of a ResNet stem conv taking in_channels; RGB weights are summed for grayscale."""
    stem = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    with torch.no_grad():
        if conv.in_channels == 3 and in_channels == 1:
            stem.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
    return stem


def build_resnet18(num_classes: int, in_channels: int = 1) -> nn.Module:
    model = resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.conv1 = _single_channel_stem(model.conv1, in_channels)
    return model


class SmallCNN(nn.Module):
    """The original notebooks' baseline: 3 x [conv, ReLU, max-pool], dense 256, dropout, logits."""

    def __init__(self, num_classes: int, in_channels: int = 1, image_size: int = 128, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * side * side, 256),
            nn.ReLU(inplace=True),
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
        return build_resnet18(num_classes, cfg.in_channels)
    if cfg.name == "cnn":
        return SmallCNN(num_classes, cfg.in_channels, image_size, cfg.dropout)
    if cfg.name == "resnet50":
        return build_resnet50_transfer(num_classes, cfg.in_channels, cfg.pretrained_path)
    raise ValueError(f"unknown model {cfg.name!r}: choose resnet18, cnn or resnet50")


def set_backbone_trainable(model: nn.Module, trainable_prefixes: tuple[str, ...]) -> None:
    """Freeze every parameter whose name starts with none of the prefixes (e.g. ('fc',))."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable_prefixes)

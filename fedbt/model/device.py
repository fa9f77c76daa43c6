"""Where models run: device choice, CPU threads, memory layout, mixed precision."""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
from torch import nn


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device(name)


def configure_threads(threads: int | None) -> None:
    torch.set_num_threads(threads or os.cpu_count() or 1)


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their fastest conv kernels.
    return model.to(device=device, memory_format=torch.channels_last)


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on CPU."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)

"""Figures people would rather look at than read (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(history: list[dict], path: Path, title: str) -> Path:
    """Train/val loss and val accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train"]["loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val"]["loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val"].get("accuracy", np.nan) for h in history], "o-", label="val 4-class")
    ax_acc.plot(epochs, [h["val"].get("tumour_accuracy", np.nan) for h in history], "o-", label="val tumour vs none")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str], path: Path) -> Path:
    """Row-normalised confusion matrices side by side, counts annotated."""
    fig, axes = plt.subplots(1, len(matrices), figsize=(4.2 * len(matrices), 4), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], matrices.items()):
        counts = np.asarray(matrix)
        rates = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for (r, c), value in np.ndenumerate(counts):
            ax.text(c, r, str(value), ha="center", va="center", color="white" if rates[r, c] > 0.5 else "black")
        ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=name)
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Figures people would rather look at than read (matplotlib, headless). Every function takes
plain numbers (metrics dicts, arrays) and writes one PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fedbt.reports.render import num  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


@dataclass
class Curve:
    label: str
    epochs: list[float]  # epochs of training done at each point: a round of a quarter epoch adds 0.25
    accuracy: list[float | None]
    loss: list[float]
    style: str


def learning_curves(results: dict, epochs_per_round: float) -> list[Curve]:
    """Federated: pooled val and each site's val per scored round; central: pooled val per epoch. All on
    one axis of epochs of training done, so that equal x means equal compute per training image."""
    history = results["federated"]["history"]

    def at(round_: int) -> float:
        return round_ * epochs_per_round

    # Only rounds that were scored (federated.evaluate_every may skip some).
    scored = [h for h in history if "accuracy" in h["server"]]
    curves = []
    if scored:
        curves.append(
            Curve(
                "federated global (pooled)",
                [at(h["round"]) for h in scored],
                [h["server"]["accuracy"] for h in scored],
                [h["server"]["loss"] for h in scored],
                "o-",
            )
        )
    for site in sorted({s for h in history for s in h["sites"]}):
        on_site = [(h["round"], h["sites"][site]) for h in history if site in h["sites"]]
        curves.append(
            Curve(
                f"federated on {site}",
                [at(r) for r, _ in on_site],
                [m["set_accuracy"] for _, m in on_site],
                [m["loss"] for _, m in on_site],
                ".--",
            )
        )
    if "central" in results:
        central = results["central"]["history"]
        curves.append(
            Curve(
                "central (pooled)",
                [float(h["epoch"]) for h in central],
                [h["val"].get("accuracy") for h in central],
                [h["val"]["loss"] for h in central],
                "s-",
            )
        )
    return curves


def plot_learning_curves(results: dict, path: Path, epochs_per_round: float = 1.0) -> Path:
    """The learning curves (see learning_curves), accuracy and loss side by side."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for curve in learning_curves(results, epochs_per_round):
        emphasis = {"lw": 2} if curve.style != ".--" else {}
        colour = {"color": "black"} if curve.label.startswith("central") else {}
        ax_acc.plot(curve.epochs, curve.accuracy, curve.style, label=curve.label, **emphasis, **colour)
        ax_loss.plot(curve.epochs, curve.loss, curve.style, label=curve.label, **emphasis, **colour)
    xlabel = f"epochs of training done (federated: round x {epochs_per_round:g})"
    ax_acc.set(xlabel=xlabel, ylabel="validation accuracy", title="accuracy")
    ax_loss.set(xlabel=xlabel, ylabel="validation loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_roc_curves(models: dict[str, dict], path: Path) -> Path:
    """Tumour-vs-none ROC of every model on the pooled test split."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, m in models.items():
        tv = m["pooled"].get("tumour_vs_none", {})
        if tv.get("roc_curve"):
            ax.plot(tv["roc_curve"]["fpr"], tv["roc_curve"]["tpr"], label=f"{name} (AUC {tv['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="tumour vs none, pooled test")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_class_roc_curves(metrics: dict, path: Path) -> Path:
    """One-vs-rest ROC per class, and tumour vs none derived from the same output."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, curve in metrics["roc_curves"].items():
        if curve:
            ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {num(metrics['per_class'][name]['auc'])})")
    tv = metrics["tumour_vs_none"]
    if tv.get("roc_curve"):
        ax.plot(tv["roc_curve"]["fpr"], tv["roc_curve"]["tpr"], "k--", label=f"tumour vs none (AUC {num(tv['auc'])})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(
        xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)", title="ROC curves"
    )
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def plot_pr_curves(metrics: dict, path: Path) -> Path:
    """Interpolated precision-recall curve per class, average precision in the legend."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, curve in metrics["pr_curves"].items():
        if curve:
            ap = metrics["per_class"][name]["average_precision"]
            ax.plot(curve["recall"], curve["precision"], label=f"{name} (AP {num(ap)})")
    ax.set(
        xlabel="recall (sensitivity)", ylabel="precision", title="precision-recall curves", xlim=(0, 1), ylim=(0, 1.02)
    )
    ax.legend(fontsize=8, loc="lower left")
    return _save(fig, path)


def plot_reliability(calibration: dict, path: Path) -> Path:
    """Accuracy against mean confidence per bin (a calibrated model follows the diagonal), and bin counts."""
    bins = calibration["bins"]
    width = bins[0]["upper"] - bins[0]["lower"]
    centres = [b["lower"] + width / 2 for b in bins]
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres, [b["accuracy"] or 0 for b in bins], width=width * 0.9, color="tab:blue", label="accuracy")
    ax.plot(
        [b["confidence"] for b in bins if b["count"]],
        [b["accuracy"] for b in bins if b["count"]],
        "o",
        color="tab:red",
        label="mean confidence vs accuracy",
    )
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(ylabel="accuracy", title=f"reliability diagram (ECE {calibration['ece']:.3f})", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8, loc="upper left")
    ax_count.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="grey")
    ax_count.set(xlabel="confidence of the predicted class", ylabel="images")
    return _save(fig, path)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """A grayscale image (H, W) uint8 with its map (H, W) in [0, 1] blended on top, as RGB uint8."""
    heat = plt.get_cmap("jet")(cam)[..., :3]
    base = np.repeat(gray[..., None].astype(np.float32) / 255.0, 3, axis=2)
    return (np.clip((1 - alpha) * base + alpha * heat, 0, 1) * 255).round().astype(np.uint8)


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

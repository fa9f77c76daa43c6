"""The evaluate command's output: evaluation.json, figures and a report page (Markdown and HTML)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import matplotlib

from fedbt.gradcam import GridItem, plot_prediction_grid
from fedbt.plots import plot_confusion_matrices
from fedbt.report import format_table, html_table, markdown_table, pct

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# A report is a list of blocks, rendered once as Markdown and once as HTML:
# ("h1" | "h2" | "p", text), ("table", (header, rows)) or ("img", (title, file name)).
Block = tuple[str, Any]
SUMMARY_HEADER = ["metric", "value", "95% CI (bootstrap)"]


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_class_roc_curves(metrics: dict, path: Path) -> Path:
    """One-vs-rest ROC per class, and tumour vs none derived from the same output."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, curve in metrics["roc_curves"].items():
        if curve:
            ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {_num(metrics['per_class'][name]['auc'])})")
    tv = metrics["tumour_vs_none"]
    if tv.get("roc_curve"):
        ax.plot(tv["roc_curve"]["fpr"], tv["roc_curve"]["tpr"], "k--", label=f"tumour vs none (AUC {_num(tv['auc'])})")
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
            ax.plot(curve["recall"], curve["precision"], label=f"{name} (AP {_num(ap)})")
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


def _interval(ci: dict | None, fmt) -> str:
    return "-" if not ci else f"{fmt(ci['low'])} to {fmt(ci['high'])}"


def summary_rows(m: dict) -> list[list[str]]:
    """metric, value, 95% CI."""
    ci = m.get("confidence_intervals", {})
    tv = m.get("tumour_vs_none", {})
    return [
        ["images (with a fine label)", f"{m['n']} ({m.get('n_fine', 0)})", ""],
        ["accuracy", pct(m.get("accuracy")), _interval(ci.get("accuracy"), pct)],
        ["balanced accuracy", pct(m.get("balanced_accuracy")), ""],
        ["macro precision", pct(m.get("macro_precision")), ""],
        ["macro sensitivity (recall)", pct(m.get("macro_recall")), ""],
        ["macro specificity", pct(m.get("macro_specificity")), ""],
        ["macro F1", pct(m.get("macro_f1")), _interval(ci.get("macro_f1"), pct)],
        ["macro ROC-AUC (one vs rest)", _num(m.get("macro_auc")), _interval(ci.get("macro_auc"), _num)],
        ["macro average precision", _num(m.get("macro_average_precision")), ""],
        ["expected calibration error (10 bins)", _num(m.get("calibration", {}).get("ece")), ""],
        ["set accuracy (coarse labels included)", pct(m.get("set_accuracy")), ""],
        ["tumour vs none: accuracy", pct(tv.get("accuracy")), ""],
        ["tumour vs none: sensitivity", pct(tv.get("sensitivity")), ""],
        ["tumour vs none: specificity", pct(tv.get("specificity")), ""],
        ["tumour vs none: ROC-AUC", _num(tv.get("auc")), ""],
    ]


def per_class_rows(m: dict) -> list[list[str]]:
    return [
        [
            name,
            str(c["support"]),
            pct(c["precision"]),
            pct(c["recall"]),
            pct(c.get("specificity")),
            pct(c["f1"]),
            _num(c["auc"]),
            _num(c.get("average_precision")),
        ]
        for name, c in m.get("per_class", {}).items()
    ]


def _blocks(result: dict, figures: dict[str, str]) -> list[Block]:
    m, model = result["metrics"], result["model"]
    setup = (
        f"{model['architecture']} at {model['image_size']} px (crop to content: {model['crop_to_content']}), "
        f"task {model['task']}, checkpoint {result['checkpoint']}; scored on the {result['data']['description']}."
    )
    blocks: list[Block] = [("h1", "fedbt evaluation"), ("p", setup), ("table", (SUMMARY_HEADER, summary_rows(m)))]
    if "per_class" in m:
        blocks += _class_blocks(m)
    blocks += _latency_blocks(result["latency"])
    if "comparison" in result:
        blocks += _comparison_blocks(result)
    if result["data"]["problems"]:
        note = f"{len(result['data']['problems'])} files could not be used; evaluation.json lists them with the reason."
        blocks += [("h2", "Files not scored"), ("p", note)]
    for title, name in figures.items():
        blocks += [("h2", title), ("img", (title, name))]
    return blocks


def _class_blocks(m: dict) -> list[Block]:
    header = ["class", "images", "precision", "sensitivity", "specificity", "F1", "ROC-AUC", "AP"]
    confusion = [[c, *map(str, row)] for c, row in zip(m["classes"], m["confusion_matrix"])]
    return [
        ("h2", "Per class"),
        ("table", (header, per_class_rows(m))),
        ("h2", "Confusion matrix (rows true, columns predicted)"),
        ("table", (["true \\ predicted", *m["classes"]], confusion)),
    ]


def _latency_blocks(lat: dict) -> list[Block]:
    header = ["device", "threads", "ms per image (batch 1)", f"images/s (batch {lat['batch']})"]
    row = [
        lat["device"],
        str(lat["threads"]),
        f"{lat['ms_per_image_batch1']:.2f}",
        f"{lat['images_per_second_batched']:.1f}",
    ]
    return [("h2", "Inference latency"), ("table", (header, [row]))]


def _comparison_blocks(result: dict) -> list[Block]:
    c, m = result["comparison"], result["metrics"]
    test = c["mcnemar"]
    rows = [
        [label, pct(metrics.get("accuracy")), pct(metrics.get("macro_f1")), _num(metrics.get("macro_auc"))]
        for label, metrics in (("A: " + result["checkpoint"], m), ("B: " + c["checkpoint"], c["metrics"]))
    ]
    verdict = (
        f"McNemar ({test['test']}) on the {test['n']} images with a fine label: A right and B wrong on "
        f"{test['a_right_b_wrong']}, A wrong and B right on {test['a_wrong_b_right']}; p = {test['p_value']:.4g}."
    )
    header = ["model", "accuracy", "macro F1", "macro ROC-AUC"]
    return [("h2", "Comparison with a second model"), ("table", (header, rows)), ("p", verdict)]


def _markdown(blocks: list[Block]) -> str:
    render = {
        "h1": lambda text: f"# {text}",
        "h2": lambda text: f"## {text}",
        "p": lambda text: text,
        "table": lambda table: markdown_table(*table),
        "img": lambda fig: f"![{fig[0]}]({fig[1]})",
    }
    return "\n\n".join(render[kind](content) for kind, content in blocks) + "\n"


def _html(blocks: list[Block]) -> str:
    render = {
        "h1": lambda text: f"<h1>{html.escape(text)}</h1>",
        "h2": lambda text: f"<h2>{html.escape(text)}</h2>",
        "p": lambda text: f"<p>{html.escape(text)}</p>",
        "table": lambda table: html_table(*table),
        "img": lambda fig: f"<img src='{html.escape(fig[1])}' alt='{html.escape(fig[0])}'>",
    }
    return (
        "<!doctype html><meta charset='utf-8'><title>fedbt evaluation</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>"
        + "".join(render[kind](content) for kind, content in blocks)
    )


def write_evaluation_report(result: dict, samples: list[GridItem], out: Path) -> Path:
    """evaluation.json, the figures, report.md and report.html in out; prints the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    m = result["metrics"]
    figures: dict[str, str] = {}
    if "roc_curves" in m:
        figures = {
            "ROC curves": plot_class_roc_curves(m, out / "roc.png").name,
            "Precision-recall curves": plot_pr_curves(m, out / "pr.png").name,
            "Reliability diagram": plot_reliability(m["calibration"], out / "reliability.png").name,
            "Confusion matrix (colour: row-normalised)": plot_confusion_matrices(
                {result["data"]["description"]: m["confusion_matrix"]}, m["classes"], out / "confusion.png"
            ).name,
        }
    if samples:
        grid = plot_prediction_grid(samples, out / "samples.png")
        figures["Sample predictions with Grad-CAM (mistakes first)"] = grid.name
    (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    blocks = _blocks(result, figures)
    (out / "report.md").write_text(_markdown(blocks))
    (out / "report.html").write_text(_html(blocks))
    print(format_table(SUMMARY_HEADER, summary_rows(m)))
    return out / "report.md"

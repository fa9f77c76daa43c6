"""The evaluate command's output: evaluation.json, figures and a report page (Markdown and HTML)."""

from __future__ import annotations

from pathlib import Path

from fedbt.fileio import write_json
from fedbt.reports.plots import (
    GridItem,
    plot_class_roc_curves,
    plot_confusion_matrices,
    plot_pr_curves,
    plot_prediction_grid,
    plot_reliability,
)
from fedbt.reports.render import Block, format_table, num, pct, write_pages

SUMMARY_HEADER = ["metric", "value", "95% CI (bootstrap)"]


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
        ["macro ROC-AUC (one vs rest)", num(m.get("macro_auc")), _interval(ci.get("macro_auc"), num)],
        ["macro average precision", num(m.get("macro_average_precision")), ""],
        ["expected calibration error (10 bins, calibrated)", num(m.get("calibration", {}).get("ece")), ""],
        ["expected calibration error at temperature 1", num(m.get("calibration", {}).get("ece_untempered")), ""],
        ["set accuracy (coarse labels included)", pct(m.get("set_accuracy")), ""],
        ["tumour vs none: accuracy", pct(tv.get("accuracy")), ""],
        ["tumour vs none: sensitivity", pct(tv.get("sensitivity")), ""],
        ["tumour vs none: specificity", pct(tv.get("specificity")), ""],
        ["tumour vs none: ROC-AUC", num(tv.get("auc")), ""],
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
            num(c["auc"]),
            num(c.get("average_precision")),
        ]
        for name, c in m.get("per_class", {}).items()
    ]


def _blocks(result: dict, figures: dict[str, str]) -> list[Block]:
    m, model = result["metrics"], result["model"]
    setup = (
        f"{model['architecture']} at {model['image_size']} px (crop to content: {model['crop_to_content']}), "
        f"task {model['task']}, checkpoint {result['checkpoint']}; scored on the {result['data']['description']}. "
        f"Probabilities are calibrated: the logits divided by the temperature {model.get('temperature', 1.0):.3g} "
        "fitted on validation data."
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
    blocks += [("h2", "Numbers"), ("links", [("every number on this page, and the curves", "evaluation.json")])]
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
        [label, pct(metrics.get("accuracy")), pct(metrics.get("macro_f1")), num(metrics.get("macro_auc"))]
        for label, metrics in (("A: " + result["checkpoint"], m), ("B: " + c["checkpoint"], c["metrics"]))
    ]
    verdict = (
        f"McNemar ({test['test']}) on the {test['n']} images with a fine label: A right and B wrong on "
        f"{test['a_right_b_wrong']}, A wrong and B right on {test['a_wrong_b_right']}; p = {test['p_value']:.4g}."
    )
    header = ["model", "accuracy", "macro F1", "macro ROC-AUC"]
    return [("h2", "Comparison with a second model"), ("table", (header, rows)), ("p", verdict)]


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
    write_json(out / "evaluation.json", result)
    blocks = _blocks(result, figures)
    page = write_pages(blocks, out, "fedbt evaluation")
    print(format_table(SUMMARY_HEADER, summary_rows(m)))
    return page

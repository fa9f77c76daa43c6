"""Comparison report: federated global model vs central vs local-only, on every site's test split."""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedbt.config import ExperimentConfig, to_dict  # noqa: E402
from fedbt.plots import plot_confusion_matrices  # noqa: E402

SITE_NOTE = (
    "Per site: share of test images whose prediction is a class the label allows "
    "(4-class accuracy for fine labels; for a Br35H 'yes' any tumour type counts)."
)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """results: {model: {'pooled': metrics, 'sites': {site: metrics}}} -> header, rows."""
    sites = sorted({s for r in results.values() for s in r["sites"]})
    header = ["model", "pooled 4-class acc", "pooled macro-F1", "pooled tumour/none", *sites]
    rows = []
    for name, r in results.items():
        pooled = r["pooled"]
        rows.append(
            [
                name,
                pct(pooled.get("accuracy")),
                pct(pooled.get("macro_f1")),
                pct(pooled.get("tumour_vs_none", {}).get("accuracy")),
            ]
            + [pct(r["sites"].get(s, {}).get("set_accuracy")) for s in sites]
        )
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def print_summary_table(results: dict[str, dict]) -> None:
    print(format_table(*summary_rows(results)))
    print(SITE_NOTE)


def test_results(results: dict) -> dict[str, dict]:
    """{model name: test metrics} for every model the run produced."""
    out = {}
    if "test" in results.get("federated", {}):
        out["federated"] = results["federated"]["test"]
    if "central" in results:
        out["central"] = results["central"]["test"]
    for name, local in results.get("local", {}).items():
        out[f"local {name}"] = local["test"]
    return out


def plot_learning_curves(results: dict, path: Path) -> Path:
    """Federated: pooled val and each site's val per round; central: pooled val per epoch."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    history = results["federated"]["history"]
    # Only rounds that were scored (federated.evaluate_every may skip some).
    scored = [h for h in history if "accuracy" in h["server"]]
    if scored:
        rounds = [h["round"] for h in scored]
        ax_acc.plot(rounds, [h["server"]["accuracy"] for h in scored], "o-", lw=2, label="federated global (pooled)")
        ax_loss.plot(rounds, [h["server"]["loss"] for h in scored], "o-", lw=2, label="federated global (pooled)")
    for site in sorted({s for h in history for s in h["sites"]}):
        on_site = [(h["round"], h["sites"][site]) for h in history if site in h["sites"]]
        rounds = [r for r, _ in on_site]
        ax_acc.plot(rounds, [m["set_accuracy"] for _, m in on_site], ".--", label=f"federated on {site}")
        ax_loss.plot(rounds, [m["loss"] for _, m in on_site], ".--", label=f"federated on {site}")
    if "central" in results:
        central = results["central"]["history"]
        epochs = [h["epoch"] for h in central]
        ax_acc.plot(epochs, [h["val"].get("accuracy") for h in central], "s-", color="black", label="central (pooled)")
        ax_loss.plot(epochs, [h["val"]["loss"] for h in central], "s-", color="black", label="central (pooled)")
    ax_acc.set(xlabel="round (federated) / epoch (central)", ylabel="validation accuracy", title="accuracy")
    ax_loss.set(xlabel="round (federated) / epoch (central)", ylabel="validation loss", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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


def _wall_times(results: dict) -> list[list[str]]:
    rows = [["federated", f"{results['federated'].get('wall_seconds', 0):.0f} s"]]
    if "central" in results:
        rows.append(["central", f"{results['central']['wall_seconds']:.0f} s"])
    rows += [[f"local {n}", f"{r['wall_seconds']:.0f} s"] for n, r in results.get("local", {}).items()]
    rows.append(["whole experiment", f"{results.get('wall_seconds_total', 0):.0f} s"])
    return rows


def write_report(results: dict, cfg: ExperimentConfig, classes: list[str], out: Path) -> Path:
    """comparison.json, report.md, report.html and the figures, in out/."""
    models = test_results(results)
    header, rows = summary_rows(models)
    images = {
        "Learning curves": plot_learning_curves(results, out / "curves.png").name,
        "Confusion matrices (pooled test)": plot_confusion_matrices(
            {n: m["pooled"]["confusion_matrix"] for n, m in models.items() if "confusion_matrix" in m["pooled"]},
            classes,
            out / "confusion.png",
        ).name,
        "ROC curves": plot_roc_curves(models, out / "roc.png").name,
    }
    (out / "comparison.json").write_text(json.dumps({"config": to_dict(cfg), "results": results}, indent=2))
    fc = cfg.federated
    setup = (
        f"{fc.num_clients} clients ({fc.partition} partition), strategy {fc.strategy}, {fc.rounds} rounds x "
        f"{fc.local_epochs} local epoch(s); central and local-only models: {fc.rounds * fc.local_epochs} epochs; "
        f"{cfg.model.name} at {cfg.data.image_size} px, task {cfg.data.task}."
    )
    md = [
        f"# fedbt comparison: {cfg.name}",
        "",
        setup,
        "",
        "## Test results",
        "",
        markdown_table(header, rows),
        "",
        SITE_NOTE,
        "",
        "## Wall times",
        "",
        markdown_table(["run", "wall time"], _wall_times(results)),
        "",
    ]
    md += [line for title, name in images.items() for line in (f"## {title}", "", f"![{title}]({name})", "")]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(cfg.name, setup, header, rows, _wall_times(results), images))
    print(format_table(header, rows))
    print(SITE_NOTE)
    return out / "report.md"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(name: str, setup: str, header, rows, walls, images: dict[str, str]) -> str:
    figures = "".join(
        f"<h2>{html.escape(t)}</h2><img src='{html.escape(f)}' alt='{html.escape(t)}'>" for t, f in images.items()
    )
    return (
        "<!doctype html><meta charset='utf-8'><title>fedbt report</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:100%}</style>"
        f"<h1>fedbt comparison: {html.escape(name)}</h1><p>{html.escape(setup)}</p>"
        f"<h2>Test results</h2>{html_table(header, rows)}<p>{html.escape(SITE_NOTE)}</p>"
        f"<h2>Wall times</h2>{html_table(['run', 'wall time'], walls)}{figures}"
    )

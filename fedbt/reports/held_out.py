"""Leave one site out: the federation of the other sites, and central trained on the same sites, scored
on the held-out site's test split (what a hospital that joins later would get on its own images)."""

from __future__ import annotations

from pathlib import Path

from fedbt.config import ExperimentConfig, to_dict
from fedbt.fileio import write_json
from fedbt.reports.comparison import GENERATED_DATA_NOTE, SELECTION_RULE, SITE_NOTE, setup_text
from fedbt.reports.render import Block, format_table, mcnemar_text, pct, write_pages

HELD_OUT_NOTE = (
    "Each row federates the other sites (and trains central on the same sites' pooled images, at the same "
    "budget), then scores both final models on the held-out site's test split, whose images neither model "
    "trained on. Set accuracy: the prediction is a class the label allows (a Br35H 'yes' counts any tumour "
    "type); 4-class accuracy counts the fine-labelled images only. McNemar's exact test pairs the two models "
    "image by image on set accuracy: only the images where one is right and the other wrong count."
)


def held_out_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "held-out site (test split)",
        "trained on",
        "images",
        "federated set acc",
        "central set acc",
        "gap (points)",
        "McNemar p (fed right only / central right only)",
        "federated 4-class acc",
        "central 4-class acc",
    ]
    rows = []
    for site, r in results.items():
        fed, central = r["test"]["federated"], r["test"]["central"]
        gap = 100 * (fed["set_accuracy"] - central["set_accuracy"])
        rows.append(
            [
                site,
                ", ".join(r["trained_on"]),
                str(fed["n"]),
                pct(fed["set_accuracy"]),
                pct(central["set_accuracy"]),
                f"{gap:+.1f}",
                mcnemar_text(r.get("paired")),
                pct(fed.get("accuracy")),
                pct(central.get("accuracy")),
            ]
        )
    return header, rows


def write_held_out_report(results: dict[str, dict], cfg: ExperimentConfig, out: Path, generated_data: bool) -> Path:
    """held-out.json, report.md and report.html in out (beside each held-out run's folder); prints the table."""
    write_json(out / "held-out.json", {"results": results, "config": to_dict(cfg)})
    table = held_out_rows(results)
    blocks: list[Block] = [
        ("h1", f"fedbt leave one site out: {cfg.name}"),
        *([("p", GENERATED_DATA_NOTE)] if generated_data else []),
        ("p", setup_text(cfg)),
        ("table", table),
        ("p", HELD_OUT_NOTE),
        ("p", SITE_NOTE),
        ("p", SELECTION_RULE),
        ("links", [(f"held out {site}", f"held-out-{site}/report.html") for site in results]),
    ]
    page = write_pages(blocks, out, "fedbt leave one site out")
    print(format_table(*table))
    print(HELD_OUT_NOTE)
    return page

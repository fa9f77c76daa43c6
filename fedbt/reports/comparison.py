"""Comparison report: federated global model vs central vs local-only, on every site's test split."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedbt.config import ExperimentConfig, to_dict
from fedbt.fileio import write_json
from fedbt.reports.plots import plot_confusion_matrices, plot_learning_curves, plot_roc_curves
from fedbt.reports.render import Block, format_table, num, pct, write_pages

SITE_NOTE = (
    "Per site: share of test images whose prediction is a class the label allows "
    "(4-class accuracy for fine labels; for a Br35H 'yes' any tumour type counts)."
)
SELECTION_RULE = (
    "Selection rule: every model is reported as training ends it (federated: the last round's global model; "
    "central and local-only: the last epoch's, also when early stopping ends training). Validation scores are "
    "watched, never used to pick an earlier checkpoint."
)
FEDBN_NOTE = (
    "FedBN: every site keeps its own BatchNorm layers, so the federated model was scored at each site with "
    "that site's layers; its pooled test figures add up the sites' own scores. No pooled validation curve is "
    "drawn for it: the server's averaged BatchNorm layers are used by no site."
)
GENERATED_DATA_NOTE = (
    "Generated demo data (synthetic MRI-like images), not patient data: "
    "the numbers show the mechanics, not clinical accuracy."
)


def headline_scores(test: dict, sites: list[str]) -> dict[str, float | None]:
    """The test scores the comparison is about, by column name: pooled ones, then each site's
    (None where the model has no such score)."""
    pooled = test["pooled"]
    return {
        "pooled 4-class acc": pooled.get("accuracy"),
        "pooled macro-F1": pooled.get("macro_f1"),
        "pooled tumour/none": pooled.get("tumour_vs_none", {}).get("accuracy"),
        **{site: test["sites"].get(site, {}).get("set_accuracy") for site in sites},
    }


def site_names(tests: Iterable[dict]) -> list[str]:
    return sorted({site for test in tests for site in test["sites"]})


def summary_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """results: {model: {'pooled': metrics, 'sites': {site: metrics}}} -> header, rows."""
    sites = site_names(results.values())
    rows = [[name, *map(pct, headline_scores(r, sites).values())] for name, r in results.items()]
    header = ["model", *headline_scores({"pooled": {}, "sites": {}}, sites)]
    return header, rows


CALIBRATION_NOTE = (
    "Calibration: each model's logits are divided by one temperature, fitted on validation data "
    "(the federated model's from per-temperature loss sums its sites return, no image leaving them); "
    "predictions are unchanged, confidences are what the expected calibration error (ECE, 10 confidence "
    "bins; right = the top class is in the image's label set) measures on the pooled test split."
)
CALIBRATION_HEADER = ["model", "temperature", "fitted on", "pooled test ECE before", "after"]


def calibration_rows(results: dict) -> list[list[str]]:
    """Temperature and pooled test ECE before and after, of each run that was calibrated."""
    runs = {name: results[name].get("calibration") for name in ("federated", "central") if name in results}
    return [
        [name, f"{c['temperature']:.3g}", c["fitted_on"], num(c["test_ece_before"]), num(c["test_ece_after"])]
        for name, c in runs.items()
        if c
    ]


def print_summary_table(results: dict[str, dict], generated_data: bool = False) -> None:
    print(format_table(*summary_rows(results)))
    print(SITE_NOTE)
    print(SELECTION_RULE)
    if generated_data:
        print(GENERATED_DATA_NOTE)


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


def personalisation_share(results: dict) -> float | None:
    """Personalisation's wall time (every site's) as a share of the federated run's."""
    federated = results["federated"].get("wall_seconds")
    if "personalised" not in results or not federated:
        return None
    return sum(r["wall_seconds"] for r in results["personalised"].values()) / federated


def _wall_times(results: dict) -> list[list[str]]:
    rows = [["federated", f"{results['federated'].get('wall_seconds', 0):.0f} s"]]
    if "central" in results:
        rows.append(["central", f"{results['central']['wall_seconds']:.0f} s"])
    rows += [[f"local {n}", f"{r['wall_seconds']:.0f} s"] for n, r in results.get("local", {}).items()]
    if (share := personalisation_share(results)) is not None:
        seconds = sum(r["wall_seconds"] for r in results["personalised"].values())
        rows.append(["personalisation (every site)", f"{seconds:.0f} s ({100 * share:.0f}% of federated)"])
    rows.append(["whole experiment", f"{results.get('wall_seconds_total', 0):.0f} s"])
    return rows


def setup_text(cfg: ExperimentConfig) -> str:
    fc = cfg.federated
    return (
        f"{fc.num_clients} clients ({fc.partition} partition), strategy {fc.strategy}, {fc.rounds} rounds x "
        f"{fc.local_epochs} local epoch(s); central and local-only models: {fc.total_epochs} epochs; "
        f"{cfg.model.name} at {cfg.data.image_size} px, task {cfg.data.task}."
    )


def _split_control(results: dict) -> str:
    """Which leakage control the test figures had: simulation holds every site, a deployment one."""
    held_out = results.get("held_out_test")
    if held_out is None:
        return (
            "Splits: each site's own (its images, its shares, the seed). Byte-identical pictures at two sites "
            "share a split; a near twin of a test image at another site cannot be found here, since no site sees "
            "another's images."
        )
    names = f": {', '.join(held_out)}" if held_out else ""
    return (
        "Splits: each site's own (its images, its shares, the seed), as in a deployment. "
        f"{len(held_out)} test images were left out of every test set because another site trains on the same "
        f"picture (a byte-identical copy or a near duplicate){names}." + held_out_effect(test_results(results))
    )


def held_out_effect(models: dict[str, dict]) -> str:
    """How the pooled accuracy moves when the held-out images are scored too (as a deployment would)."""
    moved = [
        f"{name} {pct(m['pooled_with_held_out'].get('accuracy'))} (reported: {pct(m['pooled'].get('accuracy'))})"
        for name, m in models.items()
        if "pooled_with_held_out" in m
    ]
    return f" Counting them, pooled 4-class accuracy would read: {'; '.join(moved)}." if moved else ""


def tried_candidates(personalised_sites: Iterable[dict]) -> list[str]:
    """What the sites tried besides the global model, in the order tried: a site skips what its model or
    run cannot offer (no BatchNorm in the small CNN, no local-only model in a deployment)."""
    tried = {name: None for site in personalised_sites for name in site.get("candidates", {}) if name != "global"}
    return list(tried)


def personalised_note(candidates: list[str]) -> str:
    """What the personalised column holds, naming the candidates the sites tried (tried_candidates)."""
    adaptations = [name for name in candidates if name != "local"]
    tried = ["the global model"]
    if adaptations:
        tried.append(f"its adaptations on the site's training split ({', '.join(adaptations)})")
    if "local" in candidates:
        tried.append("the site's own local-only model")
    choices = tried[0] if len(tried) == 1 else f"{', '.join(tried[:-1])} or {tried[-1]}"
    return (
        "Each site's own test split, three models: its local-only model, the federation's global model, and the "
        f"model the site would use: whichever of {choices} scores highest on the site's validation split (the "
        "global model unless one beats it strictly). A personalised model serves its own site alone: its scores "
        "are never pooled into the global model's row above."
    )


PERSONALISED_HEADER = ["site (own test split)", "local-only", "global", "personalised", "kept", "validation: tried"]


def personalised_rows(results: dict) -> list[list[str]]:
    """Per site: local-only, global and personalised set accuracy on the site's own test split."""
    rows = []
    for site, mine in results.get("personalised", {}).items():
        local = results.get("local", {}).get(site, {}).get("test", {}).get("sites", {}).get(site, {})
        global_ = results["federated"]["test"]["sites"].get(site, {})
        tried = ", ".join(f"{name} {pct(c['val']['set_accuracy'])}" for name, c in mine["candidates"].items())
        row = [local.get("set_accuracy"), global_.get("set_accuracy"), mine["test"]["set_accuracy"]]
        rows.append([site, *map(pct, row), mine["chosen"], tried])
    return rows


PAIRED_NOTE = (
    "McNemar's exact test, federated against central on the same images: each image's 4-class prediction "
    "right or wrong (fine-labelled images), only the images where the two models disagree counting. The "
    "per-image results stay in paired.json on this machine."
)
PAIRED_HEADER = [
    "test images",
    "n",
    "federated acc",
    "central acc",
    "fed right, central wrong",
    "fed wrong, central right",
    "p",
]
PAIRED_SPLITS = {"pooled": "pooled", "pooled_with_held_out": "pooled with held out"}


def paired_rows(paired: dict) -> list[list[str]]:
    return [
        [
            PAIRED_SPLITS[split],
            str(t["n"]),
            pct(t["federated_accuracy"]),
            pct(t["central_accuracy"]),
            str(t["a_right_b_wrong"]),
            str(t["a_wrong_b_right"]),
            f"{t['p_value']:.2g}",
        ]
        for split, t in paired.items()
    ]


def paired_blocks(paired: dict) -> list[Block]:
    table = (PAIRED_HEADER, paired_rows(paired))
    return [("h2", "Federated against central, image by image"), ("table", table), ("p", PAIRED_NOTE)]


def personalised_blocks(results: dict) -> list[Block]:
    table = (PERSONALISED_HEADER, personalised_rows(results))
    note = personalised_note(tried_candidates(results["personalised"].values()))
    return [("h2", "Each site's own model"), ("table", table), ("p", note)]


def _number_files(out: Path) -> list[tuple[str, str]]:
    """Links to the JSON behind the page: comparison.json and each run's own metrics.json here."""
    runs = sorted(path.relative_to(out).as_posix() for path in out.glob("**/metrics.json"))
    return [("every number on this page", "comparison.json"), *[(f"{run} (per epoch or round)", run) for run in runs]]


def write_report(
    results: dict, cfg: ExperimentConfig, classes: list[str], out: Path, generated_data: bool = False
) -> Path:
    """comparison.json, report.md, report.html and the figures, in out/; prints the summary table.

    generated_data: the run's images are generated, which the report and table then say.
    """
    models = test_results(results)
    header, rows = summary_rows(models)
    figures = {
        "Learning curves": plot_learning_curves(results, out / "curves.png", cfg.federated.local_epochs).name,
        "Confusion matrices (pooled test)": plot_confusion_matrices(
            {n: m["pooled"]["confusion_matrix"] for n, m in models.items() if "confusion_matrix" in m["pooled"]},
            classes,
            out / "confusion.png",
        ).name,
        "ROC curves": plot_roc_curves(models, out / "roc.png").name,
    }
    write_json(out / "comparison.json", {"config": to_dict(cfg), "results": results})
    blocks: list[Block] = [
        ("h1", f"fedbt comparison: {cfg.name}"),
        *([("p", GENERATED_DATA_NOTE)] if generated_data else []),
        ("p", setup_text(cfg)),
        ("h2", "Test results"),
        ("table", (header, rows)),
        ("p", SITE_NOTE),
        ("p", SELECTION_RULE),
        *([("p", FEDBN_NOTE)] if cfg.federated.fedbn else []),
        ("p", _split_control(results)),
        *(paired_blocks(results["paired"]) if "paired" in results else []),
        *(personalised_blocks(results) if "personalised" in results else []),
        ("h2", "Calibration"),
        ("table", (CALIBRATION_HEADER, calibration_rows(results))),
        ("p", CALIBRATION_NOTE),
        ("h2", "Wall times"),
        ("table", (["run", "wall time"], _wall_times(results))),
    ]
    for title, name in figures.items():
        blocks += [("h2", title), ("img", (title, name))]
    blocks += [("h2", "Numbers"), ("links", _number_files(out))]
    page = write_pages(blocks, out, "fedbt report")
    print_summary_table(models, generated_data)
    if "paired" in results:
        print(format_table(PAIRED_HEADER, paired_rows(results["paired"])))
    if "personalised" in results:
        print(format_table(PERSONALISED_HEADER, personalised_rows(results)))
    print(format_table(CALIBRATION_HEADER, calibration_rows(results)))
    return page

"""Several training seeds over one split: each model's mean and spread per score, the paired gap
federated - central (seed by seed) with its 95% t-interval, each seed's per-image McNemar test and
calibration, per site the local-only, global and personalised models, and each further global strategy
against central, as seeds.json, a report and tables."""

from __future__ import annotations

import itertools
import os
import statistics
from collections.abc import Iterable
from pathlib import Path

from scipy import stats

from fedbt.config import ExperimentConfig, to_dict
from fedbt.fileio import write_json
from fedbt.reports.comparison import (
    GENERATED_DATA_NOTE,
    PAIRED_NOTE,
    SELECTION_RULE,
    SITE_NOTE,
    headline_scores,
    personalised_note,
    setup_text,
    site_names,
    tried_candidates,
)
from fedbt.reports.render import Block, format_table, mcnemar_text, pct, write_pages

COMPARED = ("federated", "central")
GAP_NOTE = (
    "Gap: federated minus central, seed by seed (both trained with the same seed), in percentage points; "
    "its mean and the 95% t-interval of that mean (n - 1 degrees of freedom). When the seeds' gaps are all "
    "equal the interval is undefined (a spread of 0 over a few seeds is no certainty): the per-seed McNemar "
    "tests below carry the evidence then."
)
WITH_HELD_OUT = "pooled 4-class acc, with held out"
STRATEGY_NOTE = (
    "Each global strategy trained once per seed on the same split and budget; its gap is to the same seed's "
    "central model, paired by seed as above. The first row is the study's own strategy; the last two columns "
    "give each further strategy minus it, paired by seed, with the 95% t-interval."
)
RANKED_ALIKE_NOTE = (
    "Candidate pairs ordered alike: over the seeds, the pairs of a site's candidates (the global model among "
    "them) whose validation scores differ and whose test scores differ, and how many of them validation orders "
    "as test does. Chance gives about half: the fewer, the less the site's validation split can choose for it."
)
# Below this the seeds' gaps are taken as equal: far under one image's share of any test split.
NO_SPREAD = 1e-9


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student's t confidence interval for the mean of `values`."""
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values (seeds), got {len(values)}")
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return float(interval.low), float(interval.high)


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (None for one value: no spread can be measured)."""
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"values": values, "mean": statistics.mean(values), "sd": sd}


def paired_gap(federated: list[float], central: list[float]) -> dict:
    """The gaps' spread and 95% t-interval; the interval None (undefined) when the gaps do not vary."""
    gaps = [f - c for f, c in zip(federated, central, strict=True)]
    gap = spread(gaps)
    return {**gap, "ci95": list(t_interval(gaps)) if gap["sd"] is not None and gap["sd"] > NO_SPREAD else None}


def study_scores(test: dict, sites: list[str]) -> dict[str, float | None]:
    """The run report's scores with the pooled figure counting the held-out test images beside the pooled one."""
    scores = headline_scores(test, sites)
    with_held_out = test.get("pooled_with_held_out", {}).get("accuracy")
    pooled, *rest = scores.items()
    return dict([pooled, (WITH_HELD_OUT, with_held_out), *rest])


def seed_summary(tests: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """tests: {seed: {'federated': test metrics, 'central': test metrics}} -> for every score both
    models have at every seed: each model's spread and the paired gap."""
    sites = site_names(t[m] for t in tests.values() for m in COMPARED)
    scores = {m: [study_scores(t[m], sites) for t in tests.values()] for m in COMPARED}
    summary = {}
    for name in scores["federated"][0]:
        values = {m: [s[name] for s in scores[m]] for m in COMPARED}
        if any(v is None for m in COMPARED for v in values[m]):
            continue
        summary[name] = {
            **{m: spread(values[m]) for m in COMPARED},
            "gap": paired_gap(values["federated"], values["central"]),
        }
    return summary


def strategy_tests(runs: dict[int, dict], strategy: str, baseline: str = "central") -> dict[int, dict[str, dict]]:
    """A further global strategy's test metrics in the federated model's place, and the same seed's baseline
    (central, or the study's own strategy: "federated") in central's, so that seed_summary pairs them by seed."""
    return {
        seed: {"federated": run["strategies"][strategy]["test"], "central": run[baseline]["test"]}
        for seed, run in runs.items()
        if strategy in run.get("strategies", {})
    }


def ranked_alike(personalised_sites: Iterable[dict]) -> list[int]:
    """[alike, told apart]: over personalised results, the candidate pairs that validation and test both tell
    apart, and how many of them the two order alike (a check on choosing by the validation split)."""
    alike = told_apart = 0
    for site in personalised_sites:
        scores = [(c["val"]["set_accuracy"], c["test_set_accuracy"]) for c in site.get("candidates", {}).values()]
        for (val_a, test_a), (val_b, test_b) in itertools.combinations(scores, 2):
            if val_a != val_b and test_a != test_b:
                told_apart += 1
                alike += (val_a > val_b) == (test_a > test_b)
    return [alike, told_apart]


def site_gains(
    tests: dict[int, dict[str, dict]],
    local_tests: dict[int, dict[str, dict]],
    personalised: dict[int, dict[str, dict]] | None = None,
) -> dict[str, dict]:
    """Is a site better off in the federation? On each site's own test split, seed by seed: the
    global model and (where the seed has one) the site's personalised model, each against the
    local-only model trained with the same seed.
    local_tests: {seed: {site: the local-only model's test metrics}};
    personalised: {seed: {site: the personalised model's result (its test split is the site's own)}}."""
    personalised = personalised or {}
    gains = {}
    for site in sorted({site for local in local_tests.values() for site in local}):
        seeds = [seed for seed in tests if site in local_tests.get(seed, {})]
        alone = [local_tests[seed][site]["sites"][site]["set_accuracy"] for seed in seeds]
        federated = [tests[seed]["federated"]["sites"][site]["set_accuracy"] for seed in seeds]
        gains[site] = {
            "seeds": seeds,
            "local": spread(alone),
            "federated": spread(federated),
            "seeds_worse_off": sum(f < a for f, a in zip(federated, alone)),
        }
        own = [(a, personalised[seed][site]) for seed, a in zip(seeds, alone) if site in personalised.get(seed, {})]
        if own:
            scores = [p["test"]["set_accuracy"] for _, p in own]
            gains[site]["personalised"] = spread(scores)
            gains[site]["personalised_seeds_worse_off"] = sum(p < a for (a, _), p in zip(own, scores))
            gains[site]["personalised_kept"] = [p["chosen"] for _, p in own]
            gains[site]["candidates_ranked_alike"] = ranked_alike(p for _, p in own)
    return gains


def mean_sd(values: dict) -> str:
    """A spread() as 'mean% ± sd' (the sd in percentage points)."""
    if values["sd"] is None:
        return pct(values["mean"])
    return f"{pct(values['mean'])} ± {100 * values['sd']:.1f}"


def points(value: float) -> str:
    return f"{100 * value:+.1f}"


def interval_text(gap: dict) -> str:
    if gap["ci95"] is None:
        return f"undefined (n={len(gap['values'])}, no spread)"
    low, high = gap["ci95"]
    return f"[{points(low)}, {points(high)}]"


def summary_rows(summary: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["score", "federated mean ± sd", "central mean ± sd", "gap (points)", "gap 95% interval"]
    rows = [
        [name, *(mean_sd(s[m]) for m in COMPARED), points(s["gap"]["mean"]), interval_text(s["gap"])]
        for name, s in summary.items()
    ]
    return header, rows


STRATEGY_SCORES = ("pooled 4-class acc", WITH_HELD_OUT)
STRATEGY_HEADER = [
    "global model's strategy",
    "pooled 4-class mean ± sd",
    "gap (points)",
    "gap 95% interval",
    "with held out mean ± sd",
    "gap (points)",
    "gap 95% interval",
    "pooled: minus the study's strategy",
    "with held out: minus the study's strategy",
]


def strategy_rows(summaries: dict[str, dict], minus_own: dict[str, dict] | None = None) -> list[list[str]]:
    """One row per global strategy: pooled accuracy without and with the held-out images, each with its gap
    to central; then, for a further strategy, its difference to the study's own (minus_own: seed_summary's
    of strategy_tests(..., baseline="federated"))."""
    minus_own = minus_own or {}
    rows = []
    for strategy, summary in summaries.items():
        row = [strategy]
        for score in STRATEGY_SCORES:
            s = summary.get(score)
            row += [mean_sd(s["federated"]), points(s["gap"]["mean"]), interval_text(s["gap"])] if s else ["-"] * 3
        for score in STRATEGY_SCORES:
            d = minus_own.get(strategy, {}).get(score)
            row.append(f"{points(d['gap']['mean'])} {interval_text(d['gap'])}" if d else "")
        rows.append(row)
    return rows


def strategy_blocks(rows: list[list[str]]) -> list[Block]:
    return [("h2", "Global strategies against central"), ("table", (STRATEGY_HEADER, rows)), ("p", STRATEGY_NOTE)]


def worse_off(count: int, of: int) -> str:
    return f"{count} of {of}"


def gain_rows(gains: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "site (own test split)",
        "local-only mean ± sd",
        "global mean ± sd",
        "personalised mean ± sd",
        "seeds global < local (same seed)",
        "seeds personalised < local",
        "personalised kept",
        "candidate pairs ordered alike by validation and test",
    ]
    rows = []
    for site, g in gains.items():
        seeds = len(g["seeds"])
        mine = g.get("personalised")
        rows.append(
            [
                site,
                mean_sd(g["local"]),
                mean_sd(g["federated"]),
                mean_sd(mine) if mine else "not run",
                worse_off(g["seeds_worse_off"], seeds),
                worse_off(g["personalised_seeds_worse_off"], len(mine["values"])) if mine else "",
                ", ".join(g.get("personalised_kept", [])),
                worse_off(*g["candidates_ranked_alike"]) if mine else "",
            ]
        )
    return header, rows


PER_SEED_HEADER = [
    "seed",
    "pooled: federated / central",
    "McNemar p (fed right-wrong / wrong-right)",
    "with held out: federated / central",
    "McNemar p",
    "ECE federated before → after",
    "ECE central before → after",
]


def seed_rows(runs: dict[int, dict]) -> list[list[str]]:
    """One row per seed: pooled accuracies and McNemar, the same with the held-out images, calibration."""

    def accuracies(test: str, run: dict) -> str:
        return " / ".join(pct(run[m]["test"].get(test, {}).get("accuracy")) for m in COMPARED)

    def ece(run: dict, model: str) -> str:
        c = run[model].get("calibration")
        return f"{c['test_ece_before']:.3f} → {c['test_ece_after']:.3f}" if c else ""

    rows = []
    for seed, run in runs.items():
        paired = run.get("paired", {})
        rows.append(
            [
                str(seed),
                accuracies("pooled", run),
                mcnemar_text(paired.get("pooled")),
                accuracies("pooled_with_held_out", run),
                mcnemar_text(paired.get("pooled_with_held_out")),
                ece(run, "federated"),
                ece(run, "central"),
            ]
        )
    return rows


def _seeds_text(seeds: list[int], cfg: ExperimentConfig, with_local: bool) -> str:
    models = "federated, central and local-only models are" if with_local else "federated and central are"
    return (
        f"{len(seeds)} training seeds (train.seed {', '.join(map(str, seeds))}) over one split "
        f"(data.seed {cfg.data.seed}): {models} trained once per seed."
    )


def seed_page(seed: int, out: Path, seed_pages: Path | None) -> str:
    """The link from out's report to a seed's own report page."""
    page = f"seed-{seed}/report.html"
    return page if seed_pages is None else Path(os.path.relpath(seed_pages / page, out)).as_posix()


def write_seed_report(
    runs: dict[int, dict],
    cfg: ExperimentConfig,
    out: Path,
    generated_data: bool = False,
    seed_pages: Path | None = None,
) -> dict:
    """seeds.json, report.md and report.html in out; prints the tables. runs: each seed's simulation
    results (its comparison.json's), local-only and personalised models where the seed has them.
    seed_pages: the folder holding the seed-<k>/ reports the page links to (default: out). Returns the summary."""
    tests = {seed: {m: run[m]["test"] for m in COMPARED} for seed, run in runs.items()}
    local_tests = {
        seed: {site: r["test"] for site, r in run["local"].items()} for seed, run in runs.items() if "local" in run
    }
    personalised = {seed: run["personalised"] for seed, run in runs.items() if "personalised" in run}
    summary = seed_summary(tests)
    others = sorted({strategy for run in runs.values() for strategy in run.get("strategies", {})})
    other_summaries = {strategy: seed_summary(strategy_tests(runs, strategy)) for strategy in others}
    minus_own = {strategy: seed_summary(strategy_tests(runs, strategy, baseline="federated")) for strategy in others}
    strategies = strategy_rows({cfg.federated.strategy: summary, **other_summaries}, minus_own)
    gains = site_gains(tests, local_tests, personalised)
    seeds = list(runs)
    per_seed = seed_rows(runs)
    write_json(
        out / "seeds.json",
        {
            "seeds": seeds,
            "split_seed": cfg.data.seed,
            "local_seeds": list(local_tests),
            "personalised_seeds": list(personalised),
            "selection_rule": SELECTION_RULE,
            "summary": summary,
            "other_strategies": other_summaries,
            "other_strategies_minus_own": minus_own,
            "site_gains": gains,
            "paired": {seed: run.get("paired") for seed, run in runs.items()},
            "calibration": {seed: {m: run[m].get("calibration") for m in COMPARED} for seed, run in runs.items()},
            "config": to_dict(cfg),
        },
    )
    table, gain_table = summary_rows(summary), gain_rows(gains)
    blocks: list[Block] = [
        ("h1", f"fedbt seed study: {cfg.name}"),
        *([("p", GENERATED_DATA_NOTE)] if generated_data else []),
        ("p", setup_text(cfg)),
        ("p", _seeds_text(seeds, cfg, bool(local_tests))),
        ("h2", "Test results over seeds"),
        ("table", table),
        ("p", GAP_NOTE),
        ("p", SITE_NOTE),
        ("p", SELECTION_RULE),
        *(strategy_blocks(strategies) if others else []),
        ("h2", "Each seed: federated against central, image by image, and calibration"),
        ("table", (PER_SEED_HEADER, per_seed)),
        ("p", PAIRED_NOTE),
        *(
            [
                ("h2", "Is each site better off in the federation?"),
                ("table", gain_table),
                ("p", personalised_note(tried_candidates(s for run in personalised.values() for s in run.values()))),
                *([("p", RANKED_ALIKE_NOTE)] if personalised else []),
            ]
            if gains
            else []
        ),
        ("h2", "Each seed's runs"),
        ("links", [(f"seed {seed}", seed_page(seed, out, seed_pages)) for seed in seeds] + [("numbers", "seeds.json")]),
    ]
    write_pages(blocks, out, "fedbt seed study")
    print(_seeds_text(seeds, cfg, bool(local_tests)))
    print(format_table(*table))
    print(GAP_NOTE)
    print(SELECTION_RULE)
    if others:
        print(format_table(STRATEGY_HEADER, strategies))
    print(format_table(PER_SEED_HEADER, per_seed))
    if gains:
        print(format_table(*gain_table))
    if generated_data:
        print(GENERATED_DATA_NOTE)
    return summary

"""Several training seeds over one split: each model's mean and spread per score, and the paired
gap federated - central (seed by seed) with its 95% t-interval, as seeds.json, a report and a table."""

from __future__ import annotations

import statistics
from pathlib import Path

from scipy import stats

from fedbt.config import ExperimentConfig, to_dict
from fedbt.fileio import write_json
from fedbt.reports.comparison import (
    GENERATED_DATA_NOTE,
    SELECTION_RULE,
    SITE_NOTE,
    headline_scores,
    setup_text,
    site_names,
)
from fedbt.reports.render import Block, format_table, pct, write_pages

COMPARED = ("federated", "central")
GAP_NOTE = (
    "Gap: federated minus central, seed by seed (both trained with the same seed), in percentage points; "
    "its mean and the 95% t-interval of that mean (n - 1 degrees of freedom)."
)


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student's t confidence interval for the mean of `values`."""
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values (seeds), got {len(values)}")
    interval = stats.ttest_1samp(values, 0.0).confidence_interval(confidence)
    return float(interval.low), float(interval.high)


def spread(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.mean(values), "sd": statistics.stdev(values)}


def paired_gap(federated: list[float], central: list[float]) -> dict:
    gaps = [f - c for f, c in zip(federated, central, strict=True)]
    return {**spread(gaps), "ci95": list(t_interval(gaps))}


def seed_summary(tests: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """tests: {seed: {'federated': test metrics, 'central': test metrics}} -> for every score both
    models have at every seed: each model's spread and the paired gap."""
    sites = site_names(t[m] for t in tests.values() for m in COMPARED)
    scores = {m: [headline_scores(t[m], sites) for t in tests.values()] for m in COMPARED}
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


def site_gains(tests: dict[int, dict[str, dict]], local_tests: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Is a site better off in the federation? On each site's own test split, seed by seed: the
    federated model against the local-only model trained with the same seed.
    local_tests: {seed: {site: the local-only model's test metrics}}."""
    gains = {}
    for site in sorted({site for local in local_tests.values() for site in local}):
        pairs = [
            (t["federated"]["sites"][site]["set_accuracy"], local_tests[seed][site]["sites"][site]["set_accuracy"])
            for seed, t in tests.items()
            if site in local_tests.get(seed, {})
        ]
        federated, alone = [f for f, _ in pairs], [a for _, a in pairs]
        gains[site] = {
            "local": spread(alone),
            "federated": spread(federated),
            "seeds_worse_off": sum(f < a for f, a in pairs),
        }
    return gains


def mean_sd(values: dict) -> str:
    """A spread() as 'mean% ± sd' (the sd in percentage points)."""
    return f"{pct(values['mean'])} ± {100 * values['sd']:.1f}"


def points(value: float) -> str:
    return f"{100 * value:+.1f}"


def summary_rows(summary: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["score", "federated mean ± sd", "central mean ± sd", "gap (points)", "gap 95% interval"]
    rows = []
    for name, s in summary.items():
        low, high = s["gap"]["ci95"]
        rows.append(
            [
                name,
                *(mean_sd(s[m]) for m in COMPARED),
                points(s["gap"]["mean"]),
                f"[{points(low)}, {points(high)}]",
            ]
        )
    return header, rows


def gain_rows(gains: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["site (own test split)", "local-only mean ± sd", "federated mean ± sd", "seeds worse off (same seed)"]
    rows = [
        [
            site,
            mean_sd(g["local"]),
            mean_sd(g["federated"]),
            f"{g['seeds_worse_off']} of {len(g['federated']['values'])}",
        ]
        for site, g in gains.items()
    ]
    return header, rows


def _seeds_text(seeds: list[int], cfg: ExperimentConfig, with_local: bool) -> str:
    models = "federated, central and local-only models are" if with_local else "federated and central are"
    return (
        f"{len(seeds)} training seeds (train.seed {', '.join(map(str, seeds))}) over one split "
        f"(data.seed {cfg.data.seed}): {models} trained once per seed."
    )


def write_seed_report(
    tests: dict[int, dict[str, dict]],
    cfg: ExperimentConfig,
    out: Path,
    local_tests: dict[int, dict[str, dict]],
    generated_data: bool = False,
) -> dict:
    """seeds.json, report.md and report.html in out (beside the seeds' own folders); prints the tables.
    local_tests: the local-only models' test metrics by seed and site (none when local-only was skipped).
    Returns the summary."""
    summary = seed_summary(tests)
    gains = site_gains(tests, local_tests)
    seeds = list(tests)
    write_json(
        out / "seeds.json",
        {
            "seeds": seeds,
            "split_seed": cfg.data.seed,
            "local_seeds": list(local_tests),
            "selection_rule": SELECTION_RULE,
            "summary": summary,
            "site_gains": gains,
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
        *([("h2", "Is each site better off in the federation?"), ("table", gain_table)] if gains else []),
        ("h2", "Each seed's runs"),
        ("links", [(f"seed {seed}", f"seed-{seed}/report.html") for seed in seeds] + [("numbers", "seeds.json")]),
    ]
    write_pages(blocks, out, "fedbt seed study")
    print(_seeds_text(seeds, cfg, bool(local_tests)))
    print(format_table(*table))
    print(GAP_NOTE)
    print(SELECTION_RULE)
    if gains:
        print(format_table(*gain_table))
    if generated_data:
        print(GENERATED_DATA_NOTE)
    return summary

"""Seed studies: the t-interval of the paired gap, the summary over seeds, baselines reused only from
their own seed, a study run again over sessions (finished seeds reused, a cut one resumed, a second
strategy beside), and a 2-seed simulation on generated data."""

import functools
import json
import math
import re
from pathlib import Path

import pytest

from fedbt.cli import main
from fedbt.config import (
    DataConfig,
    ExperimentConfig,
    FederatedConfig,
    ModelConfig,
    PersonaliseConfig,
    TrackingConfig,
    TrainConfig,
    to_dict,
)
from fedbt.federated import seeds, simulation
from fedbt.federated.seeds import seed_config
from fedbt.federated.simulation import _fingerprint, _reusable, same_settings, with_absolute_paths
from fedbt.fileio import read_json, write_json, write_text
from fedbt.fl.protocol import NUM_PARTITIONS, PARTITION_ID
from fedbt.fl.server import run_federated
from fedbt.fl.site import SiteContext, answer
from fedbt.fl.transport import InMemoryTransport
from fedbt.reports.seeds import (
    WITH_HELD_OUT,
    gain_rows,
    ranked_alike,
    seed_rows,
    seed_summary,
    site_gains,
    strategy_rows,
    strategy_tests,
    summary_rows,
    t_interval,
)


def test_t_interval_matches_a_hand_computed_one():
    # Mean 7/3, sd sqrt(7/3); t(0.975, 2 df) = 4.303 from a t table: 7/3 -/+ 4.303 * sqrt(7/3) / sqrt(3).
    half_width = 4.303 * math.sqrt(7 / 3) / math.sqrt(3)
    low, high = t_interval([1.0, 2.0, 4.0])
    assert low == pytest.approx(7 / 3 - half_width, abs=1e-3)
    assert high == pytest.approx(7 / 3 + half_width, abs=1e-3)


def test_t_interval_of_one_seed_is_refused():
    with pytest.raises(ValueError, match="at least 2 values"):
        t_interval([0.5])


def scores(pooled: float, sartaj: float | None) -> dict:
    sites = {"sartaj": {"set_accuracy": sartaj}} if sartaj is not None else {}
    return {"pooled": {"accuracy": pooled}, "sites": sites}


def test_summary_pairs_the_gap_by_seed_and_skips_scores_a_seed_lacks():
    tests = {
        0: {"federated": scores(0.90, 0.70), "central": scores(0.95, 0.80)},
        1: {"federated": scores(0.80, 0.60), "central": scores(0.90, None)},
    }
    summary = seed_summary(tests)
    assert set(summary) == {"pooled 4-class acc"}  # central has no SARTAJ score at seed 1
    pooled = summary["pooled 4-class acc"]
    assert pooled["federated"]["mean"] == pytest.approx(0.85)
    assert pooled["federated"]["sd"] == pytest.approx(math.sqrt(0.005))
    assert pooled["central"]["mean"] == pytest.approx(0.925)
    # Gaps -0.05 and -0.10: mean -0.075, sd 0.05 / sqrt(2); t(0.975, 1 df) = 12.706.
    assert pooled["gap"]["values"] == pytest.approx([-0.05, -0.10])
    half_width = 12.706 * (0.05 / math.sqrt(2)) / math.sqrt(2)
    assert pooled["gap"]["ci95"] == pytest.approx([-0.075 - half_width, -0.075 + half_width], abs=1e-3)


def test_a_site_is_worse_off_at_the_seeds_where_federated_scores_below_that_seeds_local_model_on_its_own_split():
    tests = {seed: {"federated": scores(0.9, value)} for seed, value in enumerate([0.70, 0.82, 0.90])}

    def local(sartaj: float) -> dict:
        # The local model is scored on every site; only its own site's split counts.
        return {"sartaj": {"pooled": {}, "sites": {"sartaj": {"set_accuracy": sartaj}, "br35h": {"set_accuracy": 0.1}}}}

    # Seed 1's federated 0.82 beats seed 0's local 0.80 but not its own seed's 0.85.
    gains = site_gains(tests, {0: local(0.80), 1: local(0.85), 2: local(0.88)})
    assert set(gains) == {"sartaj"}
    assert gains["sartaj"]["local"]["values"] == [0.80, 0.85, 0.88]
    assert gains["sartaj"]["federated"]["mean"] == pytest.approx(0.80666, abs=1e-4)
    assert gains["sartaj"]["seeds_worse_off"] == 2


def test_equal_gaps_over_two_seeds_give_an_undefined_interval_not_a_point():
    tests = {
        0: {"federated": scores(0.90, None), "central": scores(0.92, None)},
        1: {"federated": scores(0.88, None), "central": scores(0.90, None)},
    }
    summary = seed_summary(tests)
    assert summary["pooled 4-class acc"]["gap"]["ci95"] is None
    _, rows = summary_rows(summary)
    assert rows[0][-1] == "undefined (n=2, no spread)"


def test_the_pooled_figure_with_the_held_out_images_stands_beside_the_pooled_one():
    def with_held_out(pooled: float, counted: float) -> dict:
        return {"pooled": {"accuracy": pooled}, "pooled_with_held_out": {"accuracy": counted}, "sites": {}}

    tests = {
        0: {"federated": with_held_out(0.90, 0.93), "central": with_held_out(0.92, 0.95)},
        1: {"federated": with_held_out(0.89, 0.93), "central": with_held_out(0.93, 0.96)},
    }
    summary = seed_summary(tests)
    assert list(summary)[:2] == ["pooled 4-class acc", WITH_HELD_OUT]
    assert summary[WITH_HELD_OUT]["gap"]["values"] == pytest.approx([-0.02, -0.03])


def test_a_second_strategy_is_paired_with_the_same_seeds_central_model_with_and_without_the_held_out_images():
    def test(pooled: float, with_held_out: float) -> dict:
        return {"pooled": {"accuracy": pooled}, "pooled_with_held_out": {"accuracy": with_held_out}, "sites": {}}

    runs = {
        0: {"central": {"test": test(0.92, 0.95)}, "strategies": {"fedexp": {"test": test(0.90, 0.93)}}},
        1: {"central": {"test": test(0.94, 0.96)}, "strategies": {"fedexp": {"test": test(0.91, 0.92)}}},
    }
    summary = seed_summary(strategy_tests(runs, "fedexp"))
    assert summary["pooled 4-class acc"]["gap"]["values"] == pytest.approx([-0.02, -0.03])
    assert summary[WITH_HELD_OUT]["gap"]["values"] == pytest.approx([-0.02, -0.04])
    (row,) = strategy_rows({"fedexp": summary})
    assert row[:3] == ["fedexp", "90.5% ± 0.7", "-2.5"] and row[4:6] == ["92.5% ± 0.7", "-3.0"]


def test_a_second_strategy_is_paired_with_the_same_seeds_run_of_the_studys_own_strategy():
    def test(pooled: float, with_held_out: float) -> dict:
        return {"pooled": {"accuracy": pooled}, "pooled_with_held_out": {"accuracy": with_held_out}, "sites": {}}

    own_and_other = [((0.90, 0.93), (0.91, 0.93)), ((0.92, 0.94), (0.95, 0.96)), ((0.91, 0.95), (0.90, 0.94))]
    runs = {
        seed: {"federated": {"test": test(*own)}, "strategies": {"fedexp": {"test": test(*other)}}}
        for seed, (own, other) in enumerate(own_and_other)
    }
    minus_own = seed_summary(strategy_tests(runs, "fedexp", baseline="federated"))
    assert minus_own["pooled 4-class acc"]["gap"]["values"] == pytest.approx([0.01, 0.03, -0.01])
    assert minus_own[WITH_HELD_OUT]["gap"]["values"] == pytest.approx([0.0, 0.02, -0.01])
    own, further = strategy_rows({"fedavg": {}, "fedexp": {}}, {"fedexp": minus_own})
    assert own[-2:] == ["", ""]
    # mean +1.0 points; t(0.975, 2) = 4.303 times the sd 2.0 over sqrt(3): +1.0 +- 4.97
    assert further[-2] == "+1.0 [-4.0, +6.0]" and further[-1].startswith("+0.3 [")


def test_a_personalised_model_is_judged_against_its_own_seeds_local_model():
    tests = {seed: {"federated": scores(0.9, 0.80)} for seed in (0, 1)}

    def local(sartaj: float) -> dict:
        return {"sartaj": {"sites": {"sartaj": {"set_accuracy": sartaj}}}}

    def personalised(sartaj: float, chosen: str) -> dict:
        return {"sartaj": {"chosen": chosen, "test": {"set_accuracy": sartaj}}}

    mine = {0: personalised(0.85, "all"), 1: personalised(0.85, "global")}
    gains = site_gains(tests, {0: local(0.84), 1: local(0.86)}, mine)
    assert gains["sartaj"]["seeds_worse_off"] == 2
    assert gains["sartaj"]["personalised"]["values"] == [0.85, 0.85]
    assert gains["sartaj"]["personalised_seeds_worse_off"] == 1  # seed 1: 0.85 below its local 0.86
    assert gains["sartaj"]["personalised_kept"] == ["all", "global"]


def test_validation_and_test_are_checked_for_ordering_a_sites_candidates_alike():
    def candidates(*val_and_test: tuple[float, float]) -> dict:
        names = ("global", "batchnorm", "head")
        return {
            "candidates": {
                n: {"val": {"set_accuracy": v}, "test_set_accuracy": t} for n, (v, t) in zip(names, val_and_test)
            }
        }

    # seed 0: global < batchnorm < head on validation, head < batchnorm < global on test: 0 of 3 pairs alike;
    # seed 1: validation ties global and batchnorm (not told apart); the other two pairs are ordered alike.
    seed_0 = candidates((0.90, 0.95), (0.92, 0.93), (0.94, 0.91))
    seed_1 = candidates((0.90, 0.90), (0.90, 0.92), (0.95, 0.96))
    assert ranked_alike([seed_0, seed_1]) == [2, 5]
    gains = site_gains(
        {seed: {"federated": scores(0.9, 0.80)} for seed in (0, 1)},
        {seed: {"sartaj": {"sites": {"sartaj": {"set_accuracy": 0.85}}}} for seed in (0, 1)},
        {
            seed: {"sartaj": {**site, "chosen": "head", "test": {"set_accuracy": 0.9}}}
            for seed, site in enumerate([seed_0, seed_1])
        },
    )
    assert gains["sartaj"]["candidates_ranked_alike"] == [2, 5]
    _, (row,) = gain_rows(gains)
    assert row[-1] == "2 of 5"


def test_each_seed_row_gives_its_mcnemar_test_and_calibration():
    mcnemar = {"p_value": 0.0007, "a_right_b_wrong": 3, "a_wrong_b_right": 19}
    calibration = {"test_ece_before": 0.118, "test_ece_after": 0.02}
    run = {
        model: {"test": {"pooled": {"accuracy": accuracy}}, "calibration": calibration}
        for model, accuracy in (("federated", 0.9), ("central", 0.92))
    }
    rows = seed_rows({0: {**run, "paired": {"pooled": mcnemar}}})
    assert rows == [["0", "90.0% / 92.0%", "0.0007 (3 / 19)", "- / -", "not run", "0.118 → 0.020", "0.118 → 0.020"]]


def test_a_baseline_is_never_reused_from_another_training_seed(tmp_path):
    cfg = ExperimentConfig(output_dir=str(tmp_path))
    first, second = seed_config(cfg, 0), seed_config(cfg, 1)
    assert first.output_dir != second.output_dir and first.data == second.data
    baseline = tmp_path / "central"
    write_json(baseline / "metrics.json", {"kind": "central"})
    write_text(baseline / "fingerprint.json", _fingerprint(first))
    assert _reusable(baseline, first) == {"kind": "central"}
    assert _reusable(baseline, second) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--seeds", "2", "--skip-central"], "cannot skip the central"),
        (["--also-strategy", "fedexp"], "--also-strategy runs beside a seed study"),
    ],
)
def test_impossible_seed_studies_are_one_line_errors(flags, message, capsys):
    assert main(["simulate", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedbt: error: ") and message in err and err.count("\n") == 1


def test_a_second_strategy_that_is_the_studys_own_is_a_one_line_error(demo_args, capsys):
    assert main(["simulate", *demo_args, "--seeds", "2", "--strategy", "fedexp", "--also-strategy", "fedexp"]) == 2
    err = capsys.readouterr().err
    assert err == "fedbt: error: --also-strategy fedexp is the study's own strategy (federated.strategy)\n"


@pytest.mark.e2e
def test_two_seeds_train_twice_on_one_split_and_report_mean_sd_and_gap(demo_args, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["simulate", *demo_args, "--rounds", "1", "--seeds", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "seed 2 of 2" in captured.err
    assert "gap 95% interval" in captured.out
    assert "seeds global < local (same seed)" in captured.out
    assert "McNemar p" in captured.out

    runs = {}
    for seed in (0, 1):
        folder = out / f"seed-{seed}"
        assert (folder / "report.html").is_file()
        runs[seed] = {
            "experiment": json.loads((folder / "experiment.json").read_text()),
            "results": json.loads((folder / "comparison.json").read_text())["results"],
        }
    assert [runs[s]["experiment"]["train"]["seed"] for s in (0, 1)] == [0, 1]
    assert runs[0]["experiment"]["data"] == runs[1]["experiment"]["data"]
    # One split: every site tests the same number of images at both seeds; two trainings: different losses.
    test_sizes = [{s: m["n"] for s, m in runs[k]["results"]["central"]["test"]["sites"].items()} for k in (0, 1)]
    assert test_sizes[0] == test_sizes[1]
    central_losses = [runs[k]["results"]["central"]["history"][0]["train"]["loss"] for k in (0, 1)]
    assert central_losses[0] != central_losses[1]
    # Local-only models train at every seed, each with its seed.
    assert all(set(runs[k]["results"]["local"]) == {"figshare", "sartaj", "br35h"} for k in (0, 1))
    local_losses = [runs[k]["results"]["local"]["sartaj"]["history"][0]["train"]["loss"] for k in (0, 1)]
    assert local_losses[0] != local_losses[1]

    study = json.loads((out / "seeds.json").read_text())
    assert study["seeds"] == [0, 1] and study["split_seed"] == 0
    pooled = study["summary"]["pooled 4-class acc"]
    fed = [runs[k]["results"]["federated"]["test"]["pooled"]["accuracy"] for k in (0, 1)]
    central = [runs[k]["results"]["central"]["test"]["pooled"]["accuracy"] for k in (0, 1)]
    assert pooled["federated"]["values"] == fed and pooled["central"]["values"] == central
    assert pooled["gap"]["values"] == pytest.approx([f - c for f, c in zip(fed, central)])
    low, high = pooled["gap"]["ci95"]
    assert low <= pooled["gap"]["mean"] <= high
    assert {"figshare", "sartaj", "br35h"} <= set(study["summary"])
    assert set(study["site_gains"]) == {"figshare", "sartaj", "br35h"} and study["local_seeds"] == [0, 1]
    assert study["personalised_seeds"] == [0, 1]
    assert all(len(g["personalised"]["values"]) == 2 for g in study["site_gains"].values())
    assert set(study["paired"]) == {"0", "1"}  # JSON keys
    report = (out / "report.html").read_text()
    assert "Selection rule" in report and "seed-1/report.html" in report


def running_study(study: Path, federated: dict[int, float], fedexp: dict[int, float]) -> None:
    """A seed study's folder mid-way: seed 1 still training (no comparison.json); the others finished
    with these pooled accuracies (central 0.93), and FedExP's run beside them finished where given."""
    for seed in (0, 1, 2):
        folder = study / f"seed-{seed}"
        write_json(folder / "experiment.json", {"data": {"data_root": str(study)}, "train": {"seed": seed}})
        write_json(folder / "federated-fedexp" / "experiment.json", {})
        if seed in federated:
            results = {"federated": {"test": scores(federated[seed], None)}, "central": {"test": scores(0.93, None)}}
            write_json(folder / "comparison.json", {"results": results})
            write_text(folder / "report.html", "the seed's own report")
        if seed in fedexp:
            write_json(folder / "federated-fedexp" / "federated" / "metrics.json", {"test": scores(fedexp[seed], None)})


def linked_pages(report: Path) -> list[Path]:
    """The seed pages report.md links to, resolved from its folder."""
    return [report.parent / link for link in re.findall(r"\]\(([^)]*seed-\d+/report\.html)\)", report.read_text())]


def test_a_running_seed_studys_report_covers_its_finished_seeds_and_strategies_and_trains_nothing(tmp_path, capsys):
    study, out = tmp_path / "study", tmp_path / "report"
    running_study(study, federated={0: 0.90, 2: 0.88}, fedexp={0: 0.91, 2: 0.92})
    before = {path: path.read_bytes() for path in study.rglob("*") if path.is_file()}
    assert main(["report", "--run", str(study), "--out", str(out)]) == 0
    # Read only: no seed trained, no file of the study written.
    assert {path: path.read_bytes() for path in study.rglob("*") if path.is_file()} == before
    written = json.loads((out / "seeds.json").read_text())
    assert written["seeds"] == [0, 2]
    assert written["summary"]["pooled 4-class acc"]["gap"]["values"] == pytest.approx([-0.03, -0.05])
    assert written["other_strategies"]["fedexp"]["pooled 4-class acc"]["gap"]["values"] == pytest.approx([-0.02, -0.01])
    minus_fedavg = written["other_strategies_minus_own"]["fedexp"]["pooled 4-class acc"]["gap"]["values"]
    assert minus_fedavg == pytest.approx([0.01, 0.04])
    assert "Global strategies against central" in (out / "report.md").read_text()
    assert capsys.readouterr().out.endswith(f"report: {out / 'report.html'}\n")
    # Its links reach the seeds' own pages, in the study's folder.
    pages = linked_pages(out / "report.md")
    assert len(pages) == 2 and all(page.is_file() for page in pages)
    # Without --out, the report goes into the study's folder, beside its seeds.
    assert main(["report", "--run", str(study)]) == 0
    assert json.loads((study / "seeds.json").read_text())["seeds"] == [0, 2]
    assert [page.resolve() for page in linked_pages(study / "report.md")] == [page.resolve() for page in pages]


def test_a_seed_report_needs_two_finished_seeds(tmp_path, capsys):
    running_study(tmp_path / "study", federated={0: 0.90}, fedexp={})
    assert main(["report", "--run", str(tmp_path / "study")]) == 2
    needs = "a seed report needs 2 finished seeds (seed-<k>/comparison.json); 1 so far"
    assert capsys.readouterr().err == f"fedbt: error: {tmp_path / 'study'}: {needs}\n"


def test_a_running_seed_study_is_completed_over_its_finished_seeds_only(tmp_path, monkeypatch):
    study, out = tmp_path / "study", tmp_path / "completed"
    running_study(study, federated={0: 0.90, 2: 0.90}, fedexp={0: 0.91})
    completed = []

    def complete_run(run, target, overrides):
        completed.append((run.name, target))
        test = scores(0.9 - 0.01 * len(completed), None)
        return {"federated": {"test": test}, "central": {"test": scores(0.93, None)}}

    monkeypatch.setattr(seeds, "complete_run", complete_run)
    result = seeds.complete_seed_study(study, out)
    assert completed == [("seed-0", out / "seed-0"), ("seed-2", out / "seed-2")]
    assert result["seeds"] == [0, 2]
    written = json.loads((out / "seeds.json").read_text())
    assert written["summary"]["pooled 4-class acc"]["gap"]["values"] == pytest.approx([-0.04, -0.05])
    # FedExP beside it, finished at seed 0 only so far, is paired with that seed's central model.
    assert written["other_strategies"]["fedexp"]["pooled 4-class acc"]["gap"]["values"] == pytest.approx([-0.02])


def test_only_settings_that_change_results_decide_whether_an_earlier_seed_is_reused(tmp_path):
    cfg = seed_config(ExperimentConfig(output_dir=str(tmp_path), data=DataConfig(data_root=".")), 0)
    # As experiment.json holds it: absolute paths, tracked under another parent run, resumed, other threads.
    written = to_dict(with_absolute_paths(cfg, tmp_path / "moved"))
    written["tracking"]["parent_run_id"] = "another"
    written["federated"]["resume"] = True
    written["train"]["threads"] = 7
    assert same_settings(written, cfg)
    written["federated"]["rounds"] += 1
    assert not same_settings(written, cfg)


def federated_in_memory(cfg: ExperimentConfig, out: Path, calls: list, study: Path) -> dict:
    """The Flower simulation's part played in memory (fedbt.fl.server over InMemoryTransport): no Ray.
    It writes experiment.json as the simulation does; `calls` gets where it ran, its strategy and resume."""
    cfg = with_absolute_paths(cfg, Path(out))
    write_json(Path(out) / "experiment.json", to_dict(cfg))
    calls.append((Path(out).relative_to(study).as_posix(), cfg.federated.strategy, cfg.federated.resume))
    count = cfg.federated.num_clients
    sites = {
        node: functools.partial(answer, context=SiteContext({PARTITION_ID: node - 1, NUM_PARTITIONS: count}, 1))
        for node in range(1, count + 1)
    }
    transport = InMemoryTransport(sites)
    return run_federated(transport, cfg, clock=transport.clock)


def test_a_seed_study_run_again_reuses_finished_seeds_resumes_a_cut_one_and_adds_a_strategy(
    data_config, tmp_path, monkeypatch
):
    study = tmp_path / "study"
    cfg = ExperimentConfig(
        output_dir=str(study),
        data=data_config,
        model=ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=16, log_every=0),
        federated=FederatedConfig(rounds=2, round_timeout=60, poll_interval=1),
        personalise=PersonaliseConfig(enabled=False),
        tracking=TrackingConfig(enabled=False),
    )
    calls = []
    federate = functools.partial(federated_in_memory, calls=calls, study=study)
    monkeypatch.setattr(simulation, "run_flower_simulation", federate)
    monkeypatch.setattr(seeds, "run_flower_simulation", federate)

    seeds.run_seed_study(cfg, 2, skip_local=True)
    assert calls == [("seed-0", "fedavg", False), ("seed-1", "fedavg", False)]
    cut = read_json(study / "seed-1" / "federated" / "metrics.json")
    (study / "seed-1" / "comparison.json").unlink()  # seed 1 was cut short after its federated run

    calls.clear()
    seeds.run_seed_study(cfg, 2, skip_local=True, also=["fedexp"])
    assert calls == [
        ("seed-0/federated-fedexp", "fedexp", False),  # seed 0 finished: only the new strategy runs
        ("seed-1", "fedavg", True),  # from its checkpoint
        ("seed-1/federated-fedexp", "fedexp", False),
    ]
    resumed = read_json(study / "seed-1" / "federated" / "metrics.json")
    assert [r["elapsed_seconds"] for r in resumed["history"]] == [r["elapsed_seconds"] for r in cut["history"]]

    calls.clear()
    seeds.run_seed_study(cfg, 2, skip_local=True, also=["fedexp"])
    assert calls == []  # every seed and strategy finished with these settings
    study_numbers = read_json(study / "seeds.json")
    pooled = study_numbers["other_strategies"]["fedexp"]["pooled 4-class acc"]
    fedexp = [read_json(study / f"seed-{seed}" / "federated-fedexp" / "federated" / "metrics.json") for seed in (0, 1)]
    central = [read_json(study / f"seed-{seed}" / "comparison.json")["results"]["central"] for seed in (0, 1)]
    gaps = [f["test"]["pooled"]["accuracy"] - c["test"]["pooled"]["accuracy"] for f, c in zip(fedexp, central)]
    assert pooled["gap"]["values"] == pytest.approx(gaps)
    assert "Global strategies against central" in (study / "report.md").read_text()

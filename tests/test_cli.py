import json

import pytest
import torch

from fedbt.cli import main


def test_data_inspect_reports_sites_duplicates_and_leakage(demo_args, tmp_path, capsys):
    out = tmp_path / "report.json"
    code = main(["data", "inspect", *demo_args, "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "figshare" in text and "sartaj" in text and "br35h" in text
    report = json.loads(out.read_text())
    assert report["sites"]["br35h"]["per_label"] == {"no": 27, "yes": 12}
    # The generated data copies 3 SARTAJ no-tumour images into Br35H and into SARTAJ's Testing folder.
    assert report["duplicates"]["exact_duplicate_copies"] == {"br35h + sartaj/test + sartaj/train": 6}
    # The printed report and the JSON tell the same story (the check itself is tested in test_dedup_and_splits).
    leaked = report["duplicates"]["test_images_also_trained_on"]
    assert f"Leakage check: {leaked} reported test images share a picture with a training image" in text
    held_out = report["duplicates"]["test_held_out"]
    assert f"Test images held out (another site trains on the same picture): {len(held_out)}" in text


def test_central_writes_metrics_curves_and_checkpoints(demo_args, tmp_path, capsys):
    out = tmp_path / "central"
    code = main(["central", *demo_args, "--out", str(out), "--set", "model.name=cnn",
                 "--set", "train.epochs=1", "--set", "train.threads=1"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["sites"]) == {"figshare", "sartaj", "br35h"}
    pooled = metrics["test"]["pooled"]
    for key in ("accuracy", "macro_f1", "per_class", "confusion_matrix", "macro_auc", "tumour_vs_none"):
        assert key in pooled
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "final.pt").is_file() and (out / "last.pt").is_file()
    assert "central" in capsys.readouterr().out


def test_bad_settings_give_a_clear_error_and_exit_2(tmp_path, capsys):
    assert main(["central", "--data-root", str(tmp_path / "nowhere"), "--set", "train.epochs=1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["central", "--set", "train.epochz=1"]) == 2
    assert "unknown setting 'epochz'" in capsys.readouterr().err


def test_a_flag_is_a_setting_validated_with_the_rest_and_named_as_typed(capsys):
    # --strategy scaffold with --set privacy.enabled=true: a rule between sections, checked once for both.
    assert main(["simulate", "--strategy", "scaffold", "--set", "privacy.enabled=true"]) == 2
    assert "scaffold cannot use privacy.enabled" in capsys.readouterr().err
    assert main(["simulate", "--rounds", "0"]) == 2
    assert capsys.readouterr().err.startswith("fedbt: error: --rounds 0: federated.rounds:")


def test_fedbt_run_refuses_a_setting_that_is_the_sites_own_before_anything_starts(capsys):
    assert main(["run", "--set", "data.data_root=/elsewhere"]) == 2
    assert "data.data_root is each site's own setting" in capsys.readouterr().err
    assert main(["run", "--set", "data.seed=3"]) == 2  # the split seed: which images are test images
    assert "data.seed is each site's own setting" in capsys.readouterr().err


def test_an_error_from_a_library_keeps_its_traceback_one_of_ours_is_one_line(monkeypatch, capsys):
    import fedbt.cli as cli

    # fedbt's own refusal of a bad value: one line.
    assert cli.main(["simulate", "--seeds", "0"]) == 2
    assert capsys.readouterr().err == "fedbt: error: --seeds must be at least 1, got 0\n"
    monkeypatch.setenv("FEDBT_DEBUG", "1")
    with pytest.raises(ValueError, match="--seeds must be at least 1"):
        cli.main(["simulate", "--seeds", "0"])
    monkeypatch.delenv("FEDBT_DEBUG")

    # An error raised inside torch (a shape mismatch, as a broken model would cause): its traceback.
    def shape_error(_):
        return torch.nn.functional.linear(torch.zeros(2, 3), torch.zeros(4, 5))

    monkeypatch.setattr(cli, "cmd_demo", shape_error)
    with pytest.raises(RuntimeError):
        cli.main(["data", "demo", "unused"])


def test_fedbt_runs_flags_travel_to_the_server_in_its_run_config(tmp_path):
    from fedbt.cli import RUN_FLAG_KEYS, build_parser, flag_overrides
    from fedbt.deployment.runs import RunRequest, run_config_arg

    args = build_parser().parse_args(["run", "--rounds", "2", "--strategy", "fedprox", "--sites", "2", "--out", "o"])
    request = RunRequest("127.0.0.1:1", tmp_path / "ca.pem", tmp_path, overrides=list(flag_overrides(args, RUN_FLAG_KEYS)))
    config = run_config_arg(request)  # refuses an override holding a quote: it could not travel
    assert "federated.rounds=2; federated.num_clients=2; federated.strategy=fedprox" in config
    assert request.experiment().federated.rounds == 2 and "output_dir" not in config

"""Experiment settings and site files: values typed and checked, every mistake one line naming its source."""

from dataclasses import replace

import pytest

from fedbt.cli import build_parser, config_from_args, main
from fedbt.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict
from fedbt.data.sites import load_site


def write(path, text):
    path.write_text(text)
    return path


def site_yaml(tmp_path, name, extra=""):
    return write(tmp_path / f"{name}.yaml", f"name: {name}\nformat: class_folders\nroot: {tmp_path}\n{extra}")


def config_error(paths=(), overrides=()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(list(paths), list(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_set_reads_an_exponent_as_a_float():
    # YAML 1.1 reads 1e-4 (no dot) as a string; the setting's type makes it the number.
    lr = load_config([], ["train.lr=1e-4"]).train.lr
    assert type(lr) is float and lr == 1e-4


def test_central_command_line_resolves_set_to_typed_values(tmp_path):
    args = build_parser().parse_args(["central", "--data-root", str(tmp_path), "--set", "train.lr=1e-4"])
    cfg = config_from_args(args)
    assert type(cfg.train.lr) is float and cfg.train.lr == 1e-4
    assert cfg.train.epochs == 12  # configs/cpu.yaml, the profile for real data, under the override


def test_layers_apply_in_order_defaults_files_then_overrides(tmp_path):
    first = write(tmp_path / "first.yaml", "train:\n  epochs: 3\n  batch_size: 8\n")
    second = write(tmp_path / "second.yaml", "train:\n  epochs: 4\n")
    cfg = load_config([first, second], ["train.epochs=5"])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (5, 8, 1e-3)


def test_unknown_setting_lists_the_valid_names(tmp_path):
    message = config_error(overrides=["train.epochz=1"])
    assert message.startswith("--set train.epochz=1: train: unknown setting 'epochz' (valid: epochs, batch_size,")
    top = write(tmp_path / "top.yaml", "trian:\n  epochs: 1\n")
    assert config_error([top]) == (
        f"{top}: unknown setting 'trian' (valid: name, output_dir, data, model, train, federated, privacy, personalise, tracking)"
    )


def test_wrong_type_names_the_override_and_the_setting():
    message = config_error(overrides=["train.epochs=abc"])
    assert message.startswith("--set train.epochs=abc: train.epochs: Input should be a valid integer")


@pytest.mark.parametrize(
    "key, value",
    [
        ("federated.fraction_train", "1.5"),
        ("federated.fraction_train", "0"),
        ("train.label_smoothing", "-0.1"),
        ("train.lr", "0"),
        ("train.batch_size", "0"),
        ("federated.rounds", "0"),
        ("federated.dirichlet_alpha", "0"),
        ("federated.evaluate_every", "0"),
        ("federated.round_timeout", "0"),
        ("train.schedule", "step"),
    ],
)
def test_values_out_of_range_or_unknown_are_refused_by_the_file_that_sets_them(tmp_path, key, value):
    section, name = key.split(".")
    path = write(tmp_path / "profile.yaml", f"{section}:\n  {name}: {value}\n")
    assert config_error([path]).startswith(f"{path}: {key}: ")


def test_bfloat16_transport_is_refused_with_the_reason():
    message = config_error(overrides=["federated.transport_dtype=bfloat16"])
    assert "federated.transport_dtype" in message and "numpy has no bfloat16" in message


def test_a_round_holds_whole_epochs_or_one_kth_of_an_epoch_and_the_run_whole_epochs():
    quarter = load_config([], ["federated.rounds=48", "federated.local_epochs=0.25"]).federated
    assert (quarter.local_epochs, quarter.total_epochs) == (0.25, 12)
    assert load_config([], ["federated.local_epochs=2.0"]).federated.local_epochs == 2  # a whole number stays one
    assert "one k-th of an epoch" in config_error(overrides=["federated.local_epochs=0.3"])
    assert "one k-th of an epoch" in config_error(overrides=["federated.local_epochs=1.5"])
    message = config_error(overrides=["federated.rounds=3", "federated.local_epochs=0.5"])
    assert "whole number of epochs" in message and "3 x 0.5" in message


def test_assignment_and_replace_are_checked_too():
    cfg = ExperimentConfig()
    with pytest.raises(ValueError, match="epochs"):
        cfg.train.epochs = 0
    with pytest.raises(ValueError, match="optimizer"):
        replace(cfg.train, optimizer="adagrad")
    assert replace(cfg, train=replace(cfg.train, epochs=2)).train.epochs == 2


def test_a_flag_assigned_to_a_setting_fails_in_one_line(tmp_path, capsys):
    assert main(["simulate", "--data-root", str(tmp_path), "--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "fedbt: error: --rounds 0: federated.rounds: Input should be greater than 0 (got 0)\n"


def test_older_config_without_strict_drops_unknown_settings():
    saved = to_dict(ExperimentConfig())
    saved["retired"] = 1
    saved["train"]["old_knob"] = True
    with pytest.raises(ConfigError, match="unknown setting 'retired'"):
        from_dict(saved)
    assert from_dict(saved, strict=False) == ExperimentConfig()


@pytest.mark.parametrize(
    "extra, problem",
    [
        ("spilt:\n  test: 0.2\n", "unknown setting 'spilt' (valid: name, format, root, labels, split,"),
        ("split:\n  test: 1.5\n", "split.test: Input should be less than 1"),
        ("split:\n  test: 0.6\n  val: 0.4\n", "split: test + val is 1"),
        ("split:\n  test: lots\n", "split.test: Input should be a valid number"),
        ("labels:\n  yes: tumr\n", "labels.yes: unknown class 'tumr'"),
    ],
)
def test_site_file_mistakes_fail_in_one_line_naming_the_file(tmp_path, capsys, extra, problem):
    path = site_yaml(tmp_path, "site", extra)
    assert main(["data", "inspect", "--sites", str(path), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"fedbt: error: {path}: {problem}")


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "name: a\nformat: [class_folders\nroot: x\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: invalid YAML at line 3, column 5: ") as err:
        load_site(path, None)
    assert "\n" not in str(err.value)
    assert config_error([path]).startswith(f"{path}: invalid YAML at line 3")


def test_reference_cycles_are_reported_with_the_chain(tmp_path):
    def combined(name, refs):
        extra = f"origin: sartaj\nreference_sites: [{', '.join(str(tmp_path / r) for r in refs)}]\n"
        return write(tmp_path / name, f"name: {name}\nformat: kaggle_combined\nroot: {tmp_path}\n{extra}")

    itself = combined("self.yaml", ["self.yaml"])
    with pytest.raises(ConfigError, match="reference_sites cycle: .*self.yaml -> .*self.yaml$"):
        load_site(itself, None)
    a = combined("a.yaml", ["b.yaml"])
    combined("b.yaml", ["a.yaml"])
    with pytest.raises(ConfigError, match="reference_sites cycle: .*/a.yaml -> .*/b.yaml -> .*/a.yaml$"):
        load_site(a, None)
    # Two sites naming the same reference is no cycle.
    site_yaml(tmp_path, "leaf")
    shared = combined("d.yaml", ["leaf.yaml", "leaf.yaml"])
    assert [r.name for r in load_site(shared, None).reference_sites] == ["leaf", "leaf"]

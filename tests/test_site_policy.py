"""The site decides what leaves it: the site's side of the federated core (fedbt.fl.site.answer)
called as a hospital's node calls it.

Requests are crafted as the server sends them; the node config is what `fedbt site` gives its
SuperNode. A refusal or failure is logged at the site in detail and reaches the server as one
generic reason.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedbt.config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from fedbt.data.labels import get_task
from fedbt.data.sites import SitePolicy, load_site
from fedbt.data.synthetic import generate_demo_data
from fedbt.eval.aggregates import SCORE_BINS, ScoreAggregates, aggregate_metrics
from fedbt.eval.calibration import CONFIDENCE_BINS, tempered_probabilities
from fedbt.eval.metrics import classification_metrics
from fedbt.fl.policy import PolicyRefusal, settable, settable_part
from fedbt.fl.protocol import (
    CONTROL,
    CONTROL_DELTA,
    EVALUATE,
    EXPERIMENT_KEY,
    FAILED_REASON,
    MODEL,
    NODE_CACHE_DIR,
    NODE_DATA_ROOT,
    NODE_SITE,
    REFUSED_REASON,
    ROUND_KEY,
    TEMPERATURE_KEY,
    TEST_AGGREGATES,
    TRAIN,
    Reply,
    Request,
)
from fedbt.fl.site import (
    SITE_STATE_FOLDER,
    SiteContext,
    answer,
    count_test_request,
    load_local,
    site_experiment_of,
)
from fedbt.fl.task import LocalState, client_partition, load_catalog, partition_log_probabilities, zero_control
from fedbt.train.setup import new_model

TASK = get_task("4class")
TEMPERATURE = 100.0  # the scaled-up untrained model is sure of everything: at 100 it is not


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    """40 images a class: a test split holding healthy and tumour images, so both AUCs are defined."""
    return generate_demo_data(tmp_path_factory.mktemp("site-data"), per_class=40, seed=0, duplicates=3)


@pytest.fixture()
def site(site_data, site_files, tmp_path) -> SiteContext:
    """The sartaj node as `fedbt site --site sites/sartaj.yaml --data-root ... --cache-dir ...` starts it."""
    node = {NODE_SITE: site_files[1], NODE_DATA_ROOT: str(site_data), NODE_CACHE_DIR: str(tmp_path / "site-cache")}
    return SiteContext(node, run_id=7)


def fresh_context(context: SiteContext, run_id: int = 7) -> SiteContext:
    """The node's context of a run as its SuperNode would hand it over had no task's context push ever landed."""
    return SiteContext(dict(context.node_config), run_id)


def server_experiment() -> ExperimentConfig:
    # The server's own data settings (its cache, no data root) are not sent to sites that hold their data.
    return ExperimentConfig(
        data=DataConfig(image_size=32, cache_dir="/server/cache"),
        model=ModelConfig(name="cnn"),
        train=TrainConfig(batch_size=16),
    )


def request_from_server(experiment: str, split: str = "test", kind: str = EVALUATE, **config) -> Request:
    state = new_model(server_experiment(), TASK.num_classes).state_dict()
    # An untrained model's scores differ by less than a histogram bin (ties, where a per-image
    # AUC ranks differences of 1e-5); scaled up, its last layer spreads them as a trained one's are.
    state["classifier.4.weight"] *= 2000
    config = {EXPERIMENT_KEY: experiment, "split": split, **config}
    return Request(5, kind, 1, config, {MODEL: state})


def asking_for(section: str, key: str, value) -> str:
    values = settable_part(server_experiment())
    values.setdefault(section, {})[key] = value
    return json.dumps(values)


def honest() -> str:
    return json.dumps(settable_part(server_experiment()))


def test_a_test_scoring_returns_aggregates_whose_metrics_equal_the_per_image_ones(site):
    request = request_from_server(honest())
    reply = answer(request, site)
    assert not reply.failed
    assert set(reply.tensors) == {TEST_AGGREGATES} and reply.metrics == {}
    assert reply.site == {"name": "sartaj"}
    arrays = {k: v.numpy() for k, v in reply.tensors[TEST_AGGREGATES].items()}
    # Nothing per image: every array's shape is fixed by the task, whatever the number of test images.
    fixed = {
        (),
        (TASK.num_classes, TASK.num_classes),
        (TASK.num_classes, 2, SCORE_BINS),
        (2, 2),
        (2, SCORE_BINS),
        (3, CONFIDENCE_BINS),
    }
    assert {a.shape for a in arrays.values()} <= fixed
    from_site = aggregate_metrics(ScoreAggregates.from_arrays(arrays, TASK.num_classes), TASK)
    # The same model on the same images, scored per image.
    log_probs, masks = per_image_scores(request, site)
    per_image = classification_metrics(np.exp(log_probs), masks, TASK)
    assert from_site["n"] == per_image["n"] == len(log_probs) > 0
    assert from_site["confusion_matrix"] == per_image["confusion_matrix"]
    assert abs(from_site["tumour_vs_none"]["auc"] - per_image["tumour_vs_none"]["auc"]) < 0.001
    assert abs(from_site["macro_auc"] - per_image["macro_auc"]) < 0.001


def per_image_scores(request: Request, site: SiteContext) -> tuple[np.ndarray, np.ndarray]:
    """The log-probabilities and masks of the request's model on the site's test images, one row an image."""
    cfg, _ = site_experiment_of(request, site.node_config)
    partition = client_partition(cfg, 0, 1)
    return partition_log_probabilities(cfg, load_catalog(cfg), partition, request.tensors[MODEL], LocalState(), "test")


def test_a_test_scoring_is_at_the_temperature_the_server_sent(site):
    request = request_from_server(honest(), **{TEMPERATURE_KEY: TEMPERATURE})
    reply = answer(request, site)
    arrays = {k: v.numpy() for k, v in reply.tensors[TEST_AGGREGATES].items()}
    from_site = aggregate_metrics(ScoreAggregates.from_arrays(arrays, TASK.num_classes), TASK)
    log_probs, masks = per_image_scores(request, site)
    per_image = classification_metrics(tempered_probabilities(log_probs, TEMPERATURE), masks, TASK, np.exp(log_probs))
    # The calibration error at that temperature, and at 1 beside it.
    site_calibration, image_calibration = from_site["calibration"], per_image["calibration"]
    assert [b["count"] for b in site_calibration["bins"]] == [b["count"] for b in image_calibration["bins"]]
    assert site_calibration["ece"] == pytest.approx(image_calibration["ece"])
    assert site_calibration["ece_untempered"] == pytest.approx(image_calibration["ece_untempered"])
    assert abs(site_calibration["ece"] - site_calibration["ece_untempered"]) > 0.1


def assert_refused(reply: Reply, capsys, logged: str) -> None:
    assert reply.failed
    assert reply.error_reason == REFUSED_REASON
    log = capsys.readouterr().err
    assert "refused the server's" in log and logged in log


def test_a_second_test_scoring_in_a_run_is_refused(site, capsys):
    assert not answer(request_from_server(honest()), site).failed
    assert_refused(answer(request_from_server(honest()), site), capsys, "test scoring number 2")


def private_files(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mode & 0o777 for path in [folder, *folder.iterdir()]}


def test_the_count_of_test_scorings_is_kept_at_the_site_not_in_the_context_it_pushes_back(site, tmp_path, capsys):
    assert not answer(request_from_server(honest()), fresh_context(site)).failed
    # The count is the site's, in its own files: a context that was never saved back does not reset it.
    assert_refused(answer(request_from_server(honest()), fresh_context(site)), capsys, "number 2")
    assert not answer(request_from_server(honest()), fresh_context(site, run_id=8)).failed
    assert not site.memory.values  # nothing of it travels in Flower's context
    # Both runs' scorings are counted in the site's test quota (fedbt.fl.ledger), owner-only.
    files = private_files(tmp_path / "site-cache" / SITE_STATE_FOLDER / "sartaj")
    assert files.pop("sartaj") == 0o700
    [(quota, mode)] = files.items()
    assert quota.startswith("test-quota-") and mode == 0o600


def test_a_sites_optimiser_state_is_kept_at_the_site_not_in_the_context_it_pushes_back(site, tmp_path):
    cfg = ExperimentConfig(data=DataConfig(cache_dir=str(tmp_path / "site-cache")))
    local = LocalState(optimizer={"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": []})
    fresh_context(site).store(cfg).write("local", local.as_tensors())
    assert load_local(fresh_context(site), cfg).optimizer["state"][0]["step"] == 3
    assert load_local(fresh_context(site, run_id=8), cfg).optimizer is None
    assert not site.memory.values
    folder = tmp_path / "site-cache" / SITE_STATE_FOLDER / "sartaj"
    assert private_files(folder) == {"sartaj": 0o700, "run-7-local.pt": 0o600}


def test_a_simulated_site_keeps_its_state_in_the_context(tmp_path):
    simulated = SiteContext({"partition-id": 0, "num-partitions": 3}, run_id=7)
    cfg = ExperimentConfig(data=DataConfig(cache_dir=str(tmp_path / "cache")))
    count_test_request(simulated.store(cfg), SitePolicy())
    with pytest.raises(PolicyRefusal, match="test scoring number 2"):
        count_test_request(simulated.store(cfg), SitePolicy())
    simulated.store(cfg).write("local", LocalState(batchnorm={"bn.weight": torch.ones(2)}).as_tensors())
    assert load_local(simulated, cfg).batchnorm["bn.weight"].tolist() == [1.0, 1.0]
    assert set(simulated.memory.values) == {"local", "test-requests"}
    assert not (tmp_path / "cache").exists()


def test_a_scaffold_training_request_is_accepted_and_the_site_keeps_its_control_variate_on_its_disk(site):
    cfg = server_experiment()
    cfg.federated.strategy = "scaffold"
    request = request_from_server(json.dumps(settable_part(cfg)), kind=TRAIN, **{ROUND_KEY: 1})
    model = new_model(cfg, TASK.num_classes)
    request.tensors[CONTROL] = zero_control(model)
    reply = answer(request, site)
    assert not reply.failed
    delta = reply.tensors[CONTROL_DELTA]
    assert delta.keys() == {name for name, _ in model.named_parameters()}
    assert any(v.abs().sum() > 0 for v in delta.values())
    # Its first c_i is all of its change (it started from zeros), read back as tensors alone (weights_only);
    # kept pending until the server says it counted this reply into c (LocalState.settled).
    site_cfg, _ = site_experiment_of(request, site.node_config)
    kept = load_local(fresh_context(site), site_cfg)
    assert kept.control is None and kept.pending_round == 1
    pending = kept.pending_control
    assert pending.keys() == delta.keys() and all(torch.equal(pending[k], delta[k]) for k in pending)


@pytest.mark.parametrize(
    ("section", "key", "value", "logged"),
    [
        ("data", "data_root", "/elsewhere", "data.data_root='/elsewhere'"),
        ("data", "cache_dir", "/tmp/exported", "data.cache_dir='/tmp/exported'"),
        ("data", "seed", 3, "data.seed=3"),
        ("model", "pretrained_path", "/etc/shadow", "model.pretrained_path='/etc/shadow'"),
        ("data", "image_size", 512, "data.image_size=512 is above this site's limit of 256"),
        ("train", "batch_size", 4096, "train.batch_size=4096 is above this site's limit of 64"),
    ],
)
def test_a_server_asking_for_what_the_site_decides_is_refused(site, capsys, section, key, value, logged):
    reply = answer(request_from_server(asking_for(section, key, value), split="val"), site)
    assert_refused(reply, capsys, logged)
    assert str(value) not in reply.error_reason


def test_training_beyond_the_local_epoch_limit_is_refused(site, capsys):
    request = request_from_server(asking_for("federated", "local_epochs", 50), kind=TRAIN, **{ROUND_KEY: 1})
    assert_refused(answer(request, site), capsys, "federated.local_epochs=50 is above")


def test_a_failure_at_the_site_reaches_the_server_without_its_paths(site, tmp_path, capsys):
    site.node_config[NODE_DATA_ROOT] = str(tmp_path / "patient-0042-scans")  # no images there
    reply = answer(request_from_server(honest()), site)
    assert reply.failed and reply.error_reason == FAILED_REASON
    log = capsys.readouterr().err
    assert "patient-0042-scans" in log and "Traceback" in log


def test_site_policy_limits_come_from_the_site_file(site, tmp_path, capsys):
    site_file = tmp_path / "small.yaml"
    text = open(site.node_config[NODE_SITE]).read()
    site_file.write_text(text + "policy:\n  max_image_size: 24\n")
    site.node_config[NODE_SITE] = str(site_file)
    assert_refused(answer(request_from_server(honest(), split="val"), site), capsys, "limit of 24")


def test_a_policy_the_site_file_gets_wrong_is_refused_in_one_line_naming_the_file(tmp_path, site_files, demo_root):
    site_file = tmp_path / "typo.yaml"
    site_file.write_text(open(site_files[1]).read() + "policy:\n  max_image_sise: 24\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: policy: unknown setting 'max_image_sise'"):
        load_site(site_file, demo_root)


def test_a_server_may_set_every_setting_inside_a_section_it_may_set():
    # privacy.client_level is a section of privacy: its fields travel as privacy.client_level.<field>.
    assert settable("privacy.client_level.enabled") and settable("privacy.client_level.noise_multiplier")
    assert settable("train.lr") and not settable("train.device") and not settable("data.cache_dir")
    assert not settable("privacy_level.enabled")  # a prefix of the name is not a section

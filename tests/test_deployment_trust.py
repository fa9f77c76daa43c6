"""End to end, what a site lets a server do and learn: a deployment on 127.0.0.1 (TLS, registered
sites, the real `fedbt server` / `fedbt site` processes) under servers that overreach or record.

A server may submit any ServerApp in a bundle named fedbt at fedbt's version: the sites accept
the run and run their own ClientApp (tests/site_probe_apps.py holds the ServerApps). One
federation serves the module (each deployment costs minutes on a small machine); the fixture
kills its process groups at the end, also when a test fails.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from site_probe_apps import ANSWERS_FILE, OVERREACHES, REPLIES_FILE
from test_deployment_e2e import (
    RUN_TIMEOUT,
    TINY,
    app_bundle,
    fedbt,
    last_line,
    run_args,
    sites_with_policy,
    wait_for_the_run_to_end,
)

from fedbt.config import ExperimentConfig, from_dict
from fedbt.data.labels import Task, get_task
from fedbt.data.sites import load_site
from fedbt.data.synthetic import generate_demo_data
from fedbt.deployment.control import FlowerControl
from fedbt.deployment.local import LocalFederation
from fedbt.deployment.runs import COMPLETED, RunRequest, run_config_arg
from fedbt.eval.aggregates import SCORE_BINS, score_bins
from fedbt.eval.calibration import CONFIDENCE_BINS, TEMPERATURES, tempered_probabilities
from fedbt.eval.metrics import classification_metrics, safe_auc
from fedbt.fl.policy import SiteSetup, settable_part, site_experiment
from fedbt.fl.protocol import REFUSED_CODE, REFUSED_REASON
from fedbt.fl.task import LocalState, client_partition, load_catalog, partition_log_probabilities
from fedbt.model.checkpoint import load_checkpoint
from fedbt.train.setup import new_model

pytestmark = pytest.mark.e2e

FEDBT_SERVER_APP = 'serverapp = "fedbt.federated.server_app:app"'
PROBES = Path(__file__).with_name("site_probe_apps.py")
SPLITS = ("train", "val", "test")
# A model that learnt something: after two rounds at the profile's pace every P(tumour) lay within
# 0.02 (3 to 7 bins of the 4096 the histograms had then), where the per-image AUC ranks differences the
# aggregates count as ties (0.79 against 0.53), and binned AUCs would compare little but ties.
# Five local epochs at lr 0.01 spread them over 28 bins and more.
LEARNING = ("federated.rounds=2", "federated.local_epochs=5", "train.lr=0.01")
# The sites' largest image side here, above the runs' 32 px: a request over it (the small CNN's weights
# grow with the image's area) stays a few MB.
IMAGE_LIMIT = 48
# Training replies, validation and test scorings on 2 cores that other jobs share; a guard, not a bound.
FULL_RUN_TIMEOUT = 900


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    """40 images a class: every split holds more images than the task has classes, so a list as long
    as a split stands out, and each test split has healthy and tumour images (both AUCs are defined)."""
    return generate_demo_data(tmp_path_factory.mktemp("site-data"), per_class=40, seed=0, duplicates=3)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, site_data, site_files):
    work = tmp_path_factory.mktemp("trust")
    limited = sites_with_policy(work / "sites", site_files, max_image_size=IMAGE_LIMIT)
    federation = LocalFederation(work, site_data, limited, connect_timeout=30)
    try:
        yield federation.start()
    finally:
        federation.close()


def run_probe(
    federation: LocalFederation, server_app: str, work: Path, *overrides: str, timeout: float = RUN_TIMEOUT
) -> tuple[int, str, str]:
    """A run of fedbt whose ServerApp is site_probe_apps' `server_app`, to its end: (run id, status, details)."""
    bundle = app_bundle(work / "app", {FEDBT_SERVER_APP: f'serverapp = "site_probe_apps:{server_app}"'}, PROBES)
    operator = FlowerControl(federation.control_address, federation.certs / "ca.pem", work / "operator")
    request = RunRequest(federation.control_address, federation.certs / "ca.pem", work / "results",
                         overrides=[*TINY, "tracking.enabled=false", *overrides])  # fmt: skip
    run_id = operator.submit(bundle, run_config_arg(request))
    return run_id, *wait_for_the_run_to_end(operator, run_id, timeout)


def site_logs(federation: LocalFederation) -> str:
    return "".join((federation.work / f"site-{name}.out").read_text() for name in federation.sites)


def test_a_server_asking_for_another_data_root_or_a_second_test_scoring_is_refused_at_every_site(federation, tmp_path):
    run_id, status, details = run_probe(federation, "overreaching", tmp_path)
    assert status == COMPLETED, details
    answers = json.loads((tmp_path / "results" / ANSWERS_FILE).read_text())
    assert list(answers) == list(OVERREACHES)
    sites = len(federation.sites)
    refused = [{"code": REFUSED_CODE, "reason": REFUSED_REASON}] * sites
    assert [a["error"] for a in answers["another data root"]] == refused
    assert [sorted(a["content"]) for a in answers["a first test scoring"]] == [["site", "test-aggregates"]] * sites
    assert [a["error"] for a in answers["a second test scoring"]] == refused
    # The reason is in each site's log, and only there.
    logs = site_logs(federation)
    refusal = f"refused the server's evaluate request of run {run_id}: "
    assert logs.count(f"{refusal}the server asked for data.data_root='/elsewhere'") == sites
    assert logs.count(f"{refusal}test scoring number 2 of run {run_id}; this site allows 1 a run") == sites


def test_an_image_size_above_the_sites_limit_fails_the_run_and_the_reason_stays_at_the_sites(federation, tmp_path):
    above = f"data.image_size={2 * IMAGE_LIMIT}"
    done = fedbt(run_args(federation, tmp_path / "results", "--rounds", "1", "--set", above))
    assert done.returncode == 2
    message = last_line(done.stderr)
    # Every site refused: the run stops at once and says so, without the reason (it stays at the sites).
    assert message.startswith("fedbt: error: run") and "refused by 3 of 3 sites" in message
    assert "limit" not in done.stdout + done.stderr
    refusal = f"{above} is above this site's limit of {IMAGE_LIMIT}"
    assert site_logs(federation).count(refusal) == len(federation.sites)


@dataclass
class SiteFacts:
    """What would give a site's images away: how many each split holds, their file names, its folders."""

    name: str
    counts: set[int]
    secrets: set[str]
    probs: np.ndarray  # the final model's per-image test probabilities at its temperature, scored here
    masks: np.ndarray


def site_facts(federation: LocalFederation, name: str, cfg: ExperimentConfig, saved: dict, cache: Path) -> SiteFacts:
    """The site's split as its node makes it (its own site file, data root and policy), scored by the saved model."""
    site_file = federation.names[name]
    setup = SiteSetup(site_file, load_site(site_file, federation.data_root), str(federation.data_root), str(cache))
    site_cfg = site_experiment(settable_part(cfg), setup)
    catalog = load_catalog(site_cfg)
    partition = client_partition(site_cfg, 0, 1)
    indices = [i for split in SPLITS for i in partition.indices[split]]
    counts = {len(partition.indices[split]) for split in SPLITS} | {len(indices)}
    files = {Path(catalog.records[i].path).name for i in indices}
    log_probs, masks = partition_log_probabilities(site_cfg, catalog, partition, saved["model_state"], LocalState())
    probs = tempered_probabilities(log_probs, saved["temperature"])
    return SiteFacts(name, counts, files | {str(federation.data_root), str(federation.work)}, probs, masks)


def leaks(value, facts: SiteFacts, shapes: set[tuple[int, ...]], where: str) -> list[str]:
    """Every per-image value, file name or path of the site in a dumped reply (site_probe_apps.message_dump)."""
    found = []
    if isinstance(value, dict) and "shape" in value and "base64" in value:  # an array
        if tuple(value["shape"]) not in shapes:
            found.append(f"{where}: an array of shape {value['shape']}, not the model's or the aggregates'")
        return found + leaks(base64.b64decode(value["base64"]), facts, shapes, where)
    if isinstance(value, dict) and set(value) == {"base64"}:
        return leaks(base64.b64decode(value["base64"]), facts, shapes, where)
    if isinstance(value, bytes):
        return [f"{where}: bytes holding {s!r}" for s in facts.secrets if s.encode() in value]
    if isinstance(value, dict):
        for key, item in value.items():
            found += leaks(key, facts, shapes, where) + leaks(item, facts, shapes, f"{where}/{key}")
    elif isinstance(value, list):
        # The reliability table has CONFIDENCE_BINS rows whatever the images: not a per-image list.
        fixed = where.endswith("calibration/bins") and len(value) == CONFIDENCE_BINS
        if len(value) in facts.counts and not fixed:
            found.append(f"{where}: a list of {len(value)} values, as many as the images of one of its splits")
        for i, item in enumerate(value):
            found += leaks(item, facts, shapes, f"{where}[{i}]")
    elif isinstance(value, str):
        found += [f"{where}: the text {value!r} holds {s!r}" for s in facts.secrets if s in value]
        if value.startswith(("{", "[")):  # JSON inside a text value (the validation metrics)
            found += leaks(json.loads(value), facts, shapes, where)
    return found


def test_a_full_run_sends_only_aggregates_and_they_give_the_per_image_test_metrics(federation, tmp_path):
    _, status, details = run_probe(federation, "recording", tmp_path, *LEARNING, timeout=FULL_RUN_TIMEOUT)
    assert status == COMPLETED, details
    results = tmp_path / "results"
    replies = json.loads((results / REPLIES_FILE).read_text())
    saved = load_checkpoint(results / "federated" / "final.pt")
    cfg = from_dict(saved["config"])
    task = get_task(cfg.data.task)
    facts = {name: site_facts(federation, name, cfg, saved, tmp_path / "cache" / name) for name in federation.sites}

    # Every reply a site sent: per site, two training rounds (the second also scoring the first round's model),
    # the final model's validation (its scores and calibration sums), one test scoring (with the site's
    # personalised model's: personalise.enabled is the default).
    assert not [reply for reply in replies if "error" in reply]
    sent = {}
    for reply in replies:
        name = reply["content"]["site"]["values"]["name"]
        sent.setdefault(name, []).append((reply["type"], sorted(reply["content"])))
    train, test = ["arrays", "metrics", "site"], ["personalised-test-aggregates", "site", "test-aggregates"]
    val = ["metrics", "site", "temperature-losses"]
    expected = [("train", train)] * 2 + [("evaluate", val), ("evaluate", test)]
    assert sent == dict.fromkeys(federation.sites, expected)

    # No array but the model's weights and the aggregates, whose shapes no number of images changes.
    model = {tuple(v.shape) for v in new_model(cfg, task.num_classes).state_dict().values()}
    classes = task.num_classes
    calibration = {TEMPERATURES.shape, (3, CONFIDENCE_BINS)}  # loss sums on the temperature grid, confidence bins
    shapes = model | calibration | {(), (classes, classes), (classes, 2, SCORE_BINS), (2, 2), (2, SCORE_BINS)}
    found = [leak for r in replies for leak in leaks(r, facts[r["content"]["site"]["values"]["name"]], shapes, "")]
    assert found == []

    # The pooled test metrics the aggregates gave are the per-image ones of the final model on the same images:
    # counts exactly; AUCs but for the order of images inside one bin (with 4096 bins, 59 test images gave 0.877
    # against 0.878; with 65536, a 0.1% change in odds, they agree within 0.001).
    pooled = json.loads((results / "federated" / "metrics.json").read_text())["test"]["pooled"]
    probs = np.concatenate([site.probs for site in facts.values()])
    masks = np.concatenate([site.masks for site in facts.values()])
    per_image = classification_metrics(probs, masks, task)
    assert pooled["n"] == per_image["n"] == len(probs)
    for exact in ("accuracy", "set_accuracy", "confusion_matrix"):
        assert pooled[exact] == per_image[exact], exact
    assert pooled["tumour_vs_none"]["accuracy"] == per_image["tumour_vs_none"]["accuracy"]
    # The aggregates rank images by histogram bin: their AUCs are the per-image ones of the binned scores,
    # and within 0.001 of the per-image ones.
    assert pooled["tumour_vs_none"]["auc"] == pytest.approx(binned_tumour_auc(probs, masks, task), abs=1e-12)
    assert pooled["macro_auc"] == pytest.approx(binned_macro_auc(probs, masks, task), abs=1e-12)
    assert pooled["tumour_vs_none"]["auc"] == pytest.approx(per_image["tumour_vs_none"]["auc"], abs=0.001)
    assert pooled["macro_auc"] == pytest.approx(per_image["macro_auc"], abs=0.001)


def binned_tumour_auc(probs: np.ndarray, masks: np.ndarray, task: Task) -> float:
    return safe_auc(task.is_tumour(masks), score_bins(task.tumour_probability(probs)))


def binned_macro_auc(probs: np.ndarray, masks: np.ndarray, task: Task) -> float:
    fine = masks.sum(axis=1) == 1
    y_true, scores = masks[fine].argmax(axis=1), score_bins(probs[fine])
    aucs = [safe_auc(y_true == c, scores[:, c]) for c in range(task.num_classes)]
    return float(np.mean([auc for auc in aucs if auc is not None]))

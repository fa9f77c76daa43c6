"""A hospital's privacy budget and test quota are its own, across runs, and so is its personalised
model: whole deployments played in memory, each site a hospital's node (its site file, data and
state folder), the server without data. No Flower, no process."""

import functools
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from fedbt.config import DataConfig, ExperimentConfig, FederatedConfig, ModelConfig, PrivacyConfig, TrainConfig
from fedbt.data.sites import load_site
from fedbt.data.synthetic import generate_demo_data
from fedbt.eval.aggregates import SCORE_BINS
from fedbt.eval.calibration import CONFIDENCE_BINS
from fedbt.fl import server
from fedbt.fl.ledger import PrivacyLedger, TestQuota, format_ledger
from fedbt.fl.protocol import (
    NODE_CACHE_DIR,
    NODE_DATA_ROOT,
    NODE_SITE,
    PERSONALISED_AGGREGATES,
    PERSONALISED_KEY,
    SPLIT_KEY,
    Reply,
    Request,
)
from fedbt.fl.site import SITE_STATE_FOLDER, SiteContext, answer
from fedbt.fl.transport import InMemoryTransport, RunRefusedError
from fedbt.model.checkpoint import load_checkpoint
from fedbt.train import personalise

SITES = ("figshare", "sartaj")


@pytest.fixture(scope="module")
def site_data(tmp_path_factory) -> Path:
    return generate_demo_data(tmp_path_factory.mktemp("hospital-data"), per_class=10, seed=0)


def site_file(folder: Path, name: str, policy: dict) -> str:
    """The project's site file with this policy added."""
    spec = yaml.safe_load((Path(__file__).parent.parent / "sites" / f"{name}.yaml").read_text())
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**spec, "policy": policy}))
    return str(path)


class Hospitals:
    """Two hospitals' nodes with one policy; each run is a new Flower run id, as `fedbt run` makes."""

    def __init__(self, folder: Path, data: Path, policy: dict):
        folder.mkdir(parents=True, exist_ok=True)
        self.cache = folder / "site-cache"
        self.nodes = {
            node: {
                NODE_SITE: site_file(folder, name, policy),
                NODE_DATA_ROOT: str(data),
                NODE_CACHE_DIR: str(self.cache),
            }
            for node, name in enumerate(SITES, start=1)
        }
        self.runs = 0

    def run(self, cfg: ExperimentConfig, heard: list[tuple[Request, Reply]] | None = None) -> dict:
        """Play a run; `heard` gets every request and the site's reply to it, as the server receives them."""
        self.runs += 1
        sites = {
            node: functools.partial(listened, context=SiteContext(config, self.runs), heard=heard)
            for node, config in self.nodes.items()
        }
        transport = InMemoryTransport(sites)
        return server.run_federated(transport, cfg, server_has_data=False, clock=transport.clock)

    def folder(self, name: str) -> Path:
        return self.cache / SITE_STATE_FOLDER / name

    def ledger(self, name: str) -> PrivacyLedger:
        (path,) = self.folder(name).glob("privacy-ledger-*.json")
        return PrivacyLedger(path)


def listened(request: Request, context: SiteContext, heard: list | None) -> Reply:
    reply = answer(request, context)
    if heard is not None:
        heard.append((request, reply))
    return reply


def experiment(tmp_path: Path, epsilon: float = 2.0, enabled: bool = True) -> ExperimentConfig:
    return ExperimentConfig(
        output_dir=str(tmp_path / "server"),
        data=DataConfig(image_size=32, data_root=None),
        model=ModelConfig(name="cnn"),  # no BatchNorm: DP-SGD's per-image gradients
        train=TrainConfig(batch_size=8, epochs=1),
        federated=FederatedConfig(num_clients=len(SITES), rounds=1, round_timeout=60, poll_interval=1),
        privacy=PrivacyConfig(enabled=enabled, target_epsilon=epsilon),
    )


def test_private_runs_add_to_one_ledger_and_a_run_past_the_lifetime_cap_is_refused_before_training(tmp_path, site_data):
    hospitals = Hospitals(tmp_path / "h", site_data, {"require_privacy": True, "max_epsilon_total": 5.0})
    hospitals.run(experiment(tmp_path, epsilon=2.0))
    first = hospitals.ledger("figshare").total()
    assert 0 < first <= 2.0
    # A second run (here: resumed from the first's checkpoint, a new run to Flower) adds to the same ledger.
    resumed = experiment(tmp_path, epsilon=2.0)
    resumed = replace(resumed, federated=replace(resumed.federated, rounds=2, resume=True))
    hospitals.run(resumed)
    ledger = hospitals.ledger("figshare")
    assert set(ledger.runs()) == {"1", "2"}
    assert ledger.total() == pytest.approx(first + ledger.runs()["2"]["epsilon"])
    # A third run that may spend 2 more would pass the cap of 5: refused by every site before it trains.
    with pytest.raises(RunRefusedError, match=f"refused by {len(SITES)} of {len(SITES)} sites"):
        hospitals.run(experiment(tmp_path / "third", epsilon=2.0))
    assert set(hospitals.ledger("figshare").runs()) == {"1", "2"}
    assert not list(hospitals.folder("figshare").glob("run-3-*"))  # it never trained
    # What the site's operator reads (`fedbt site --show-ledger`).
    policy = load_site(hospitals.nodes[2][NODE_SITE], str(site_data)).policy
    report = format_ledger(hospitals.ledger("sartaj"), TestQuota(tmp_path / "no-scorings.json"), policy)
    assert "run 1: epsilon" in report and "run 2: epsilon" in report and "(cap 5)" in report


@pytest.mark.parametrize(
    ("asked", "policy"),
    [
        ({"enabled": False}, {"require_privacy": True}),
        ({"epsilon": 9.0}, {"max_epsilon_per_run": 4.0}),
    ],
)
def test_a_server_asking_for_looser_privacy_than_the_site_requires_is_refused(tmp_path, site_data, asked, policy):
    hospitals = Hospitals(tmp_path / "h", site_data, policy)
    with pytest.raises(RunRefusedError, match="refused by 2 of 2 sites"):
        hospitals.run(experiment(tmp_path, **asked))
    assert not list(hospitals.folder("figshare").glob("run-*"))  # refused before it trained


def test_a_second_runs_test_scoring_is_refused_once_the_quota_is_used(tmp_path, site_data):
    hospitals = Hospitals(tmp_path / "h", site_data, {"test_quota": 1, "test_quota_days": 7})
    result = hospitals.run(experiment(tmp_path, enabled=False))
    assert set(result["test"]["sites"]) == set(SITES)
    with pytest.raises(RunRefusedError, match="refused by 2 of 2 sites"):
        hospitals.run(experiment(tmp_path / "second", enabled=False))


def test_a_finished_run_leaves_only_the_ledger_and_the_quota_at_the_site(tmp_path, site_data):
    hospitals = Hospitals(tmp_path / "h", site_data, {})
    hospitals.run(experiment(tmp_path, epsilon=2.0))
    left = sorted(
        path.name.split("-")[0] + "-" + path.name.split("-")[1] for path in hospitals.folder("sartaj").iterdir()
    )
    assert left == ["personalised-run", "privacy-ledger", "test-quota"]  # the site's own model stays too


def test_an_abandoned_runs_state_is_swept_after_its_days_and_a_live_ones_is_kept(tmp_path, site_data):
    hospitals = Hospitals(tmp_path / "h", site_data, {"keep_run_state_days": 1})
    folder = hospitals.folder("figshare")
    folder.mkdir(parents=True)
    old, recent = folder / "run-99-local.pt", folder / "run-98-local.pt"
    old.write_bytes(b"x")
    recent.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    hospitals.run(experiment(tmp_path, enabled=False))
    assert not old.exists() and recent.exists()


def test_an_unreadable_ledger_fails_closed(tmp_path, site_data):
    hospitals = Hospitals(tmp_path / "h", site_data, {"max_epsilon_total": 50.0})
    hospitals.run(experiment(tmp_path, epsilon=2.0))
    hospitals.ledger("figshare").path.write_text("{ truncated")
    hospitals.ledger("sartaj").path.write_text("{ truncated")
    with pytest.raises(RunRefusedError):
        hospitals.run(experiment(tmp_path / "again", epsilon=2.0))


def final_replies(heard: list[tuple[Request, Reply]]) -> list[Reply]:
    return [reply for request, reply in heard if request.config.get(SPLIT_KEY) == "test"]


def test_a_site_keeps_the_global_model_when_adaptation_does_not_help_and_keeps_it_to_itself(
    tmp_path, site_data, monkeypatch
):
    def useless(candidate, cfg, state, data, work, kind, device):
        # An adaptation that forgets everything: every image gets the same scores.
        model = personalise.global_model(cfg, state, device)
        for parameter in model.parameters():
            parameter.data.zero_()
        return model

    monkeypatch.setattr(personalise, "adapted_model", useless)
    hospitals = Hospitals(tmp_path / "h", site_data, {})
    heard = []
    result = hospitals.run(experiment(tmp_path, enabled=False), heard)
    assert set(result["personalised"]) == set(SITES)
    for reply in final_replies(heard):
        mine = json.loads(reply.site[PERSONALISED_KEY])
        validation = {name: c["val"]["set_accuracy"] for name, c in mine["candidates"].items()}
        assert mine["chosen"] == "global" and validation["all"] <= validation["global"]
    for site in SITES:
        # The kept model is the global model: on the site's own test split it scores as the global model does.
        kept, own = result["personalised"][site]["test"], result["test"]["sites"][site]
        assert kept["n"] == own["n"] and kept["set_accuracy"] == own["set_accuracy"]
        # It stays at the site, owner-only, after the run's own state is gone.
        final = hospitals.folder(site) / "personalised-run-1" / "final.pt"
        assert final.stat().st_mode & 0o777 == 0o600
        assert load_checkpoint(final)["progress"] == {"personalised": "global"}
    assert result["test"]["pooled"]["n"] == sum(result["test"]["sites"][site]["n"] for site in SITES)


def scalars_only(value) -> bool:
    """Whether a JSON value holds numbers and strings in objects, and no list (a value per image would be one)."""
    if isinstance(value, dict):
        return all(scalars_only(v) for v in value.values())
    return isinstance(value, str | int | float | bool) or value is None


def test_no_value_of_one_image_leaves_a_personalising_site_in_its_final_reply(tmp_path, site_data):
    hospitals = Hospitals(tmp_path / "h", site_data, {})
    heard = []
    result = hospitals.run(experiment(tmp_path, enabled=False), heard)
    replies = final_replies(heard)
    assert len(replies) == len(SITES) and set(result["personalised"]) == set(SITES)
    classes = 4
    # Every array's shape is fixed by the task, whatever the number of test images (as the global model's scoring).
    fixed = {(), (classes, classes), (classes, 2, SCORE_BINS), (2, 2), (2, SCORE_BINS), (3, CONFIDENCE_BINS)}
    for reply in replies:
        assert PERSONALISED_AGGREGATES in reply.tensors and reply.metrics == {}
        assert {tensor.shape for group in reply.tensors.values() for tensor in group.values()} <= fixed
        assert scalars_only(json.loads(reply.site[PERSONALISED_KEY]))

"""End to end: a hospital's privacy ledger across real runs of a real deployment on 127.0.0.1.

Two private runs in a row at the same sites add up in each site's ledger; a third run whose
epsilon would pass the sites' lifetime cap is refused at every site before it trains. Every
process is stopped in `finally` (LocalFederation.close).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedbt.config import PROJECT_ROOT
from fedbt.deployment.local import LocalFederation
from fedbt.fl.ledger import PrivacyLedger
from fedbt.fl.site import SITE_STATE_FOLDER

pytestmark = pytest.mark.e2e

SITES = ("figshare", "sartaj")
CAP = 5.0
PRIVATE_RUN = [
    "data.image_size=32", "model.name=cnn", "train.threads=1", "train.batch_size=8", "tracking.enabled=false",
    f"federated.num_clients={len(SITES)}", "federated.rounds=1",
    "privacy.enabled=true", "privacy.target_epsilon=2",
]  # fmt: skip


def capped_site_files(folder: Path) -> list[str]:
    """The project's site files with a lifetime cap on the privacy spent on their data."""
    folder.mkdir(parents=True)
    paths = []
    for name in SITES:
        spec = yaml.safe_load((PROJECT_ROOT / "sites" / f"{name}.yaml").read_text())
        path = folder / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**spec, "policy": {"require_privacy": True, "max_epsilon_total": CAP}}))
        paths.append(str(path))
    return paths


def ledger(federation: LocalFederation, name: str) -> PrivacyLedger:
    (path,) = (federation.work / "cache" / name / SITE_STATE_FOLDER / name).glob("privacy-ledger-*.json")
    return PrivacyLedger(path)


def test_two_private_runs_add_up_in_the_ledger_and_a_third_past_the_cap_is_refused(tmp_path, demo_root):
    federation = LocalFederation(tmp_path, demo_root, capped_site_files(tmp_path / "sites"), connect_timeout=30)
    try:
        federation.start()
        for number in (1, 2):
            outcome = federation.run(tmp_path / f"run-{number}", PRIVATE_RUN)
            assert outcome.status == "finished:completed", (outcome.status, outcome.details)
        spent = {name: ledger(federation, name).runs() for name in SITES}
        assert all(len(runs) == 2 and all(0 < r["epsilon"] <= 2 for r in runs.values()) for runs in spent.values())
        third = federation.run(tmp_path / "run-3", PRIVATE_RUN)
        assert third.status == "finished:failed" and "refused by 2 of 2 sites" in third.details, third
        # Refused before it trained: the ledgers hold the two runs, no third.
        assert {name: ledger(federation, name).runs() for name in SITES} == spent
        logs = [(federation.work / f"site-{name}.out").read_text() for name in SITES]
        assert all("passes this site's lifetime cap of 5" in log for log in logs)
    finally:
        federation.close()

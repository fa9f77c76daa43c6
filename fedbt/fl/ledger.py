"""What a hospital's site keeps for good, whatever the run: its privacy ledger and its test quota.

Both belong to the site and its data, not to a Flower run: a second run, a resumed run or a
restarted node adds to the same files. They sit in the site's state folder, owner-only, each
written whole or not at all (fedbt.fileio), and the site's operator reads them with
`fedbt site --show-ledger`. Nothing in them leaves the site.

- The privacy ledger holds, per run, the record-level epsilon spent on the site's data. Runs
  compose: the total is their sum (basic composition, an upper bound on what they spend together).
- The test quota holds the times of the final test scorings the site served.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from fedbt.data.sites import SitePolicy
from fedbt.fileio import atomic_write, read_json, to_json
from fedbt.fl.policy import PolicyRefusal

DAY_SECONDS = 86400.0


def data_key(site_name: str, data_root: Path) -> str:
    """Which data a ledger is of: the site and where its images are (another data root, another ledger)."""
    return hashlib.sha256(f"{site_name}\0{data_root.resolve()}".encode()).hexdigest()[:16]


def _write_private_json(path: Path, value: object) -> None:
    atomic_write(path, lambda fh: fh.write(to_json(value).encode()), private=True)


def _read_field(path: Path, field: str, empty: object) -> object:
    """A field of a site's own JSON file; `empty` when there is no file yet. A file that cannot be
    read fails closed: an unreadable ledger read as empty would hand out a fresh budget."""
    if not path.exists():
        return empty
    value = read_json(path)
    if not isinstance(value, dict) or field not in value:
        raise PolicyRefusal(f"{path} cannot be read; this site refuses until its operator restores the file")
    return value[field]


@dataclass
class PrivacyLedger:
    path: Path

    def runs(self) -> dict[str, dict]:
        """Per run: the epsilon and delta it has spent so far, and when it last trained."""
        return dict(_read_field(self.path, "runs", {}))

    def total(self, excluding: str | None = None) -> float:
        return sum(float(entry["epsilon"]) for run, entry in self.runs().items() if run != excluding)

    def record(self, run: str, epsilon: float, delta: float) -> None:
        runs = self.runs()
        spent = max(epsilon, float(runs.get(run, {}).get("epsilon", 0.0)))
        runs[run] = {"epsilon": spent, "delta": delta, "updated": time.time()}
        _write_private_json(self.path, {"runs": runs})


@dataclass
class TestQuota:
    path: Path

    def scorings(self) -> list[dict]:
        """Each final test scoring served: its run and its time."""
        return list(_read_field(self.path, "scorings", []))

    def recent(self, policy: SitePolicy, now: float) -> list[dict]:
        return [s for s in self.scorings() if now - float(s["time"]) < policy.test_quota_days * DAY_SECONDS]

    def take(self, policy: SitePolicy, run: str, now: float | None = None) -> None:
        """Count one final test scoring of `run`; PolicyRefusal beyond the run's number or the period's quota."""
        now = time.time() if now is None else now
        of_run = [s for s in self.scorings() if s["run"] == run]
        if len(of_run) >= policy.max_test_requests:
            raise PolicyRefusal(
                f"test scoring number {len(of_run) + 1} of run {run}; this site allows {policy.max_test_requests} a run"
            )
        recent = self.recent(policy, now)
        if len(recent) >= policy.test_quota:
            raise PolicyRefusal(
                f"this site allows {policy.test_quota} test scorings in {policy.test_quota_days:g} days, "
                f"across runs; {len(recent)} were served"
            )
        kept = [s for s in self.scorings() if s in recent or s["run"] == run]
        _write_private_json(self.path, {"scorings": [*kept, {"run": run, "time": now}]})


def privacy_refusal(cfg, policy: SitePolicy, ledger: PrivacyLedger | None, run: str) -> str | None:
    """Why the site refuses this run's privacy settings (None: it may train). Checked before any
    training: a run that would pass the site's lifetime cap never starts."""
    privacy = cfg.privacy
    if policy.require_privacy and not privacy.enabled:
        return "this site requires record-level differential privacy (privacy.enabled) in every run"
    if not privacy.enabled:
        return None
    if policy.max_epsilon_per_run is not None and privacy.target_epsilon > policy.max_epsilon_per_run:
        cap = policy.max_epsilon_per_run
        return f"privacy.target_epsilon={privacy.target_epsilon:g} is above this site's {cap:g} a run"
    if privacy.delta > policy.max_delta:
        return f"privacy.delta={privacy.delta:g} is above this site's {policy.max_delta:g}"
    if policy.max_epsilon_total is not None and ledger is not None:
        spent = ledger.total(excluding=run)
        if spent + privacy.target_epsilon > policy.max_epsilon_total:
            return (
                f"this run may spend epsilon {privacy.target_epsilon:g}; with the {spent:g} earlier runs spent "
                f"that passes this site's lifetime cap of {policy.max_epsilon_total:g} (its privacy ledger)"
            )
    return None


def format_ledger(ledger: PrivacyLedger, quota: TestQuota, policy: SitePolicy) -> str:
    lines = [f"privacy ledger {ledger.path}"]
    for run, entry in sorted(ledger.runs().items(), key=lambda item: item[1]["updated"]):
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["updated"]))
        lines.append(f"  run {run}: epsilon {entry['epsilon']:.3f} at delta {entry['delta']:g} (last trained {when})")
    cap = "no cap" if policy.max_epsilon_total is None else f"cap {policy.max_epsilon_total:g}"
    lines.append(f"  total epsilon {ledger.total():.3f} ({cap})")
    recent = quota.recent(policy, time.time())
    lines.append(f"test scorings in the last {policy.test_quota_days:g} days: {len(recent)} of {policy.test_quota}")
    return "\n".join(lines)

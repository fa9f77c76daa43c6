"""README's "Run across hospitals" on one machine, with one site's replies cut on their way out.

A server and three sites on loopback (what `fedbt server` and `fedbt site` start), the sites'
data under DATA_ROOT, `configs/cpu.yaml`, 3 rounds of one local epoch, every site required.
figshare's ClientApp tasks reach their SuperNode through tests/test_lost_replies_e2e.py's
CuttingProxy, which cuts each task's first push of its output half way (once per round and per
final scoring), as a SuperNode under load dropped them. The run must complete; the script prints
its outcome, the pushes each task needed and the wall time, and exits non-zero when the run did
not complete.

    .venv/bin/python scripts/cut_push_run.py ../shared/data/brain-mri /tmp/cut-run
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedbt.deployment.local import LocalFederation  # noqa: E402
from fedbt.deployment.nodes import SITE_READY, STARTUP_TIMEOUT  # noqa: E402
from fedbt.deployment.runs import RunRequest, submit_and_follow  # noqa: E402
from tests.test_lost_replies_e2e import CuttingProxy, start_site_behind  # noqa: E402

SITES = ["sites/figshare.yaml", "sites/sartaj.yaml", "sites/br35h.yaml"]
RUN = ["federated.rounds=3", "federated.local_epochs=1", "federated.min_clients=3", "federated.round_timeout=1800"]


def main(data_root: Path, work: Path) -> int:
    federation = LocalFederation(work, data_root, SITES, connect_timeout=60)
    started = time.monotonic()
    # Stopped last in, first out: figshare's processes, its proxy, then the server and the other sites.
    with contextlib.ExitStack() as stop:
        stop.callback(federation.close)
        federation.start_server()
        processes, proxy = start_site_behind(federation, "figshare", CuttingProxy)
        stop.callback(proxy.close)
        for process in processes:
            stop.callback(process.stop)
        for name in ("sartaj", "br35h"):
            federation.start_site(name)
        for site in federation.sites.values():
            site.wait_for(SITE_READY, STARTUP_TIMEOUT + federation.connect_timeout)
        request = RunRequest(federation.control_address, federation.certs / "ca.pem", work / "results",
                             config="configs/cpu.yaml", overrides=RUN)  # fmt: skip
        outcome = submit_and_follow(request)
    print(f"run: {outcome.status} {outcome.details or ''}".rstrip())
    print(f"rounds: {[entry['round'] for entry in outcome.metrics['history']] if outcome.metrics else None}")
    print(f"figshare's pushes per task: {sorted(proxy.pushes.values())}")
    print(f"wall: {time.monotonic() - started:.0f} s")
    return 0 if outcome.status == "finished:completed" else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} DATA_ROOT WORK_DIR")
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))

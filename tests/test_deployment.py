"""Deployment pieces that need no running federation: certificates, failures, run config, the patient
round (waiting for sites and replies over a Transport, on a clock of the test's own)."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.app import Error, Message, Metadata
from flwr.common.config import parse_config_args

from fedbt.deployment import front
from fedbt.deployment.certs import CertLayout, make_deployment_certs, registered_keys
from fedbt.deployment.nodes import LOOPBACK, ServerSettings, SiteSettings, public_front, with_runtime_port
from fedbt.deployment.processes import DeploymentError, ManagedProcess, describe_failure
from fedbt.deployment.runs import RunRequest, run_config_arg
from fedbt.federated.packing import reply_of
from fedbt.fl.protocol import REFUSED_CODE, REFUSED_REASON, RUN_REFUSED, TRAIN, Reply, Request
from fedbt.fl.transport import FakeClock, RunRefusedError, SitesMissingError, answered, send_and_collect, wait_for_sites


def test_certs_name_the_server_and_give_each_site_a_flower_readable_key_pair(tmp_path):
    layout = make_deployment_certs(tmp_path / "certs", ["10.0.0.5", "server.example.org"], ["figshare", "br35h"])
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a) for a in ("10.0.0.5", "127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["server.example.org", "localhost"]
    private = load_ssh_private_key(layout.site_private_key("figshare").read_bytes(), None)
    public = load_ssh_public_key(layout.site_public_key("figshare").read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and public == private.public_key()
    assert set(registered_keys(layout.sites_dir)) == {"figshare", "br35h"}
    assert layout.site_private_key("figshare").stat().st_mode & 0o077 == 0, "private keys are owner-only"
    # A second call for a new site keeps the CA, so earlier sites stay trusted.
    make_deployment_certs(tmp_path / "certs", [], ["sartaj"])
    assert x509.load_pem_x509_certificate(layout.ca_cert.read_bytes()) == ca


def test_private_keys_are_owner_only_from_the_start_and_never_silently_replaced(tmp_path):
    old_umask = os.umask(0o000)  # a careless umask: files would be world-readable unless created private
    try:
        layout = make_deployment_certs(tmp_path / "certs", ["127.0.0.1"], ["figshare"])
    finally:
        os.umask(old_umask)
    for key in (layout.ca_key, layout.server_key, layout.site_private_key("figshare")):
        assert key.stat().st_mode & 0o777 == 0o600, key
    assert layout.sites_dir.stat().st_mode & 0o077 == 0
    before = layout.site_private_key("figshare").read_bytes()
    with pytest.raises(ValueError, match="figshare.key exists: refusing to overwrite a key"):
        make_deployment_certs(tmp_path / "certs", [], ["figshare"])
    assert layout.site_private_key("figshare").read_bytes() == before
    make_deployment_certs(tmp_path / "certs", [], ["figshare"], force=True)
    assert layout.site_private_key("figshare").read_bytes() != before


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["ERROR : Exit Code: 305", "Failed to initialize the connection to the SuperLink.",
          "[code: 2004] Failed to activate SuperNode.", "", "For more information, visit: <x>"],
         "not registered with the server"),
        (["ERROR : Exit Code: 305", "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"],
         "not signed by the given CA"),
        (["WARNING : Giving up reconnection after 3.00 seconds", "ERROR : Exit Code: 305",
          "[Errno 111] Connection refused"], "unreachable"),
        (["INFO : SuperNode ID: 1", "INFO : SuperNode terminated gracefully.", "INFO:     Finished server process [7]"],
         "no longer accepts this site's key (was the site removed?) (INFO : SuperNode terminated gracefully.)"),
    ],
)  # fmt: skip
def test_flower_failures_become_one_line_with_their_meaning(lines, expected):
    message = describe_failure("site figshare", lines, 1)
    assert expected in message and "\n" not in message
    assert message.startswith("site figshare stopped (exit code 1)")


def test_run_config_carries_profile_overrides_deployment_flag_and_tracking_store(tmp_path, monkeypatch):
    request = RunRequest("127.0.0.1:1", tmp_path / "ca.pem", tmp_path / "out", overrides=["federated.rounds=2"])
    request.resume = True
    values = parse_config_args([run_config_arg(request)])
    # The ServerApp's process tracks into the store this machine uses (here the tests' MLFLOW_TRACKING_URI).
    assert values == {
        "config": "configs/demo.yaml",
        "overrides": f"federated.rounds=2; federated.resume=true; tracking.uri={os.environ['MLFLOW_TRACKING_URI']}",
        "out": str(tmp_path / "out"),
        "deployment": True,
    }
    assert request.experiment().federated.rounds == 2 and request.experiment().federated.resume
    monkeypatch.setenv("FEDBT_TRACKING", "off")
    assert parse_config_args([run_config_arg(request)])["overrides"].endswith("; tracking.enabled=false")


class SlowTransport:
    """A Transport with a fixed node list whose replies arrive after `delay` receives."""

    def __init__(self, nodes, delay=1):
        self.nodes, self.delay, self.receives = nodes, delay, 0

    def node_ids(self):
        return list(self.nodes)

    def send(self, requests):
        return [f"m{i}" for i, _ in enumerate(requests)]

    def receive(self, pending):
        self.receives += 1
        if self.receives < self.delay:
            return []
        return [(i, Reply(node=1)) for i in sorted(pending)]


def requests(count: int) -> list[Request]:
    return [Request(node, TRAIN, 1) for node in range(1, count + 1)]


def test_the_server_waits_for_missing_sites_only_until_the_timeout():
    # Times in quarters of a second: exact in binary, so the boundaries below are exact too.
    clock = FakeClock()
    transport = SlowTransport([2, 1])
    assert wait_for_sites(transport, minimum=2, timeout=0.5, poll=0.25, clock=clock) == [1, 2]
    assert clock.now() == 0.0  # enough sites: no wait at all
    transport.nodes = [1]
    with pytest.raises(SitesMissingError, match="only 1 of the required 2 sites connected for 0.5 s"):
        wait_for_sites(transport, minimum=2, timeout=0.5, poll=0.25, clock=clock)
    assert clock.now() == 0.5  # polled at 0, 0.25 and 0.5 s, then gave up


def test_the_server_collects_replies_and_gives_up_at_the_round_timeout():
    clock = FakeClock()
    prompt = SlowTransport([1, 2], delay=3)
    assert len(send_and_collect(prompt, requests(2), timeout=5, poll=0.25, clock=clock)) == 2
    assert (prompt.receives, clock.now()) == (3, 0.5)  # polled until the replies came, sleeping between polls

    silent = SlowTransport([1, 2], delay=10**6)
    clock = FakeClock()
    assert send_and_collect(silent, requests(1), timeout=1.0, poll=0.25, clock=clock) == []
    # Polled at 0, 0.25, 0.5, 0.75 and 1.0 s, then gave up at the deadline.
    assert (silent.receives, clock.now()) == (5, 1.0)


def error_reply(reason: str, node: int, code: int = 0) -> Reply:
    """A site's error as the server's Grid pulls it (code 0: Flower's, for a ClientApp that raised), read as a Reply."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="sent",
                        group_id="1", created_at=0.0, ttl=60, message_type="train")  # fmt: skip
    return reply_of(Message(Error(code=code, reason=reason), metadata=metadata))


def test_a_site_that_failed_is_left_out_but_one_that_refused_the_app_stops_the_run():
    failed = error_reply("<class 'ValueError'>:<'no images'>", node=7)
    # Its policy refused this request, not the run's app: the others may still train.
    declined = error_reply(REFUSED_REASON, node=8, code=REFUSED_CODE)
    assert answered([failed, declined], asked=2) == []
    refused = error_reply(f"<class 'fedbt.federated.flower_internals.RunRefused'>:<'{RUN_REFUSED}: ...'>", node=9)
    with pytest.raises(RunRefusedError, match=f"refused by 1 of 2 sites \\(nodes 9; .*{RUN_REFUSED}"):
        answered([failed, refused], asked=2)


def test_the_server_front_needs_two_ports_and_nginx_and_says_so_in_one_line(tmp_path, monkeypatch):
    layout = CertLayout(tmp_path / "certs")
    same = ServerSettings(layout.root, tmp_path / "state", port=9092, control_port=9092)
    with pytest.raises(DeploymentError, match="the public port and the control port are both 9092: choose two"):
        public_front(same, layout)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(front, "NGINX_DIRS", ())
    with pytest.raises(DeploymentError, match=r"nginx not found: .*\(apt-get install nginx\)"):
        public_front(ServerSettings(layout.root, tmp_path / "state"), layout).command()


def test_a_site_without_a_runtime_port_gets_a_free_one_and_keeps_one_it_was_given(tmp_path):
    def site(port: int | None) -> SiteSettings:
        return SiteSettings(tmp_path / "s.yaml", "h:1", tmp_path / "ca.pem", tmp_path / "k", None, None, tmp_path, port)

    assert with_runtime_port(site(9555)).runtime_port == 9555
    chosen = with_runtime_port(site(None)).runtime_port
    assert chosen is not None
    with socket.socket() as probe:  # free: another site on this machine could listen there now
        probe.bind((LOOPBACK, chosen))


def test_a_process_that_ends_at_sigterm_is_not_waited_on_for_the_rest_of_the_grace(monkeypatch):
    slept: list[float] = []
    sleep = time.sleep
    monkeypatch.setattr(time, "sleep", lambda seconds: (slept.append(seconds), sleep(seconds)))
    sleeper = ManagedProcess("sleeper", ["sleep", "600"], env=dict(os.environ))
    sleeper.stop(grace=30)
    assert sleeper.process.returncode == -signal.SIGTERM
    assert sum(slept) < 30  # it returned when the child ended, not when the grace ran out

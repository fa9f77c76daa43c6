"""Deployment pieces that need no running federation: certificates, failures, run config, the patient Grid."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from fedbt.cli import main
from fedbt.deployment.certs import make_deployment_certs, registered_keys
from fedbt.deployment.processes import describe_failure
from fedbt.deployment.runs import RunRequest, run_config_arg
from fedbt.federated import grid as grid_module
from fedbt.federated.grid import PatientGrid, SitesMissingError


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
    ],
)  # fmt: skip
def test_flower_failures_become_one_line_with_their_meaning(lines, expected):
    message = describe_failure("site figshare", lines, 1)
    assert expected in message and "\n" not in message
    assert message.startswith("site figshare stopped (exit code 1)")


def test_run_config_carries_profile_overrides_and_deployment_flag(tmp_path):
    request = RunRequest("127.0.0.1:1", tmp_path / "ca.pem", tmp_path / "out", overrides=["federated.rounds=2"])
    request.resume = True
    values = parse_config_args([run_config_arg(request)])
    assert values == {
        "config": "configs/demo.yaml",
        "overrides": "federated.rounds=2; federated.resume=true",
        "out": str(tmp_path / "out"),
        "deployment": True,
    }
    assert request.experiment().federated.rounds == 2 and request.experiment().federated.resume


class FakeGrid:
    """Stands in for Flower's Grid: a fixed node list, replies that arrive after `delay` pulls."""

    def __init__(self, nodes, delay=1):
        self.nodes, self.delay, self.pulls = nodes, delay, 0

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        if self.pulls < self.delay:
            return []
        return [type("Reply", (), {"metadata": type("Meta", (), {"reply_to_message_id": i})()})() for i in ids]


class FakeClock:
    """Stands in for the time module in fedbt.federated.grid: sleeping moves the clock on at once."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def clock(monkeypatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(grid_module, "time", clock)
    return clock


def test_patient_grid_stops_waiting_for_missing_sites_after_the_timeout(clock):
    # Times in quarters of a second: exact in binary, so the boundaries below are exact too.
    inner = FakeGrid([1])
    grid = PatientGrid(inner, poll_interval=0.25, min_nodes=2, wait_timeout=0.5)
    assert grid.get_node_ids() == [1]  # below the minimum, but not for long yet
    clock.now = 0.5
    assert grid.get_node_ids() == [1]  # exactly the allowed wait: still waiting
    inner.nodes = [1, 2]
    clock.now = 0.75
    assert grid.get_node_ids() == [1, 2]
    inner.nodes = [1]  # a site left again: the wait starts over from now
    assert grid.get_node_ids() == [1]
    clock.now = 1.25
    assert grid.get_node_ids() == [1]
    clock.now = 1.5
    with pytest.raises(SitesMissingError, match="only 1 of the required 2 sites"):
        grid.get_node_ids()


def test_patient_grid_collects_replies_and_gives_up_at_the_round_timeout(clock):
    prompt = FakeGrid([1, 2], delay=3)
    grid = PatientGrid(prompt, poll_interval=0.25, min_nodes=2, wait_timeout=1)
    assert len(list(grid.send_and_receive([object(), object()], timeout=5))) == 2
    assert (prompt.pulls, clock.now) == (3, 0.5)  # polled until the replies came, sleeping between polls

    silent = FakeGrid([1, 2], delay=10**6)
    slow = PatientGrid(silent, poll_interval=0.25, min_nodes=2, wait_timeout=1)
    clock.now = 0.0
    assert list(slow.send_and_receive([object()], timeout=1.0)) == []
    # Polled at 0, 0.25, 0.5, 0.75 and 1.0 s, then gave up at the deadline.
    assert (silent.pulls, clock.now) == (5, 1.0)


def test_site_without_data_and_run_without_ca_fail_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["site", "--site", "sites/figshare.yaml", "--server", "127.0.0.1:1", "--data-root", str(empty)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fedbt: error:") and "figshare" in err and "\n" not in err
    code = main(["run", "--server", "127.0.0.1:1", "--ca", str(tmp_path / "missing.pem"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "CA certificate not found" in err and "\n" not in err

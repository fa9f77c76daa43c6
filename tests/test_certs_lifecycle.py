"""`fedbt certs` over a deployment's life: run again, a site added and the server certificate
renewed with the CA key offline; every call leaves a working deployment or changes nothing."""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedbt.cli import main
from fedbt.deployment import certs
from fedbt.deployment.certs import CertLayout

HOST = ["--host", "server.example.org"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_server_works(layout: CertLayout) -> x509.Certificate:
    """The server's certificate is signed by the deployment's CA, valid now, and its key is its own."""
    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert server.not_valid_before_utc < now < server.not_valid_after_utc
    key = serialization.load_pem_private_key(layout.server_key.read_bytes(), password=None)
    assert key.public_key() == server.public_key(), "server.key is not server.pem's key"
    return server


@pytest.fixture
def deployment(tmp_path) -> CertLayout:
    """A deployment made on the offline machine, whose CA key then moved out of the folder."""
    assert main(["certs", "--out", str(tmp_path / "certs"), *HOST]) == 0
    offline = tmp_path / "offline"
    offline.mkdir()
    shutil.move(tmp_path / "certs" / "ca.key", offline / "ca.key")
    return CertLayout(tmp_path / "certs", offline / "ca.key")


def test_certs_run_twice_changes_nothing_and_says_why(tmp_path, capsys):
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out), *HOST]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main(["certs", "--out", str(out), *HOST, "--sites", "figshare", "sartaj", "br35h"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedbt: error: ") and "server.key exists: refusing to overwrite" in error
    assert error.count("\n") == 1
    assert snapshot(out) == before
    assert_server_works(CertLayout(out))


def test_a_site_is_added_with_the_ca_key_offline_and_the_ca_untouched(deployment, capsys):
    before = snapshot(deployment.root)
    assert main(["certs", "--out", str(deployment.root), "--sites", "newsite"]) == 0
    after = snapshot(deployment.root)
    assert set(after) - set(before) == {"sites/newsite.key", "sites/newsite.pub"}
    assert all(after[name] == data for name, data in before.items()), "an existing file changed"
    assert not (deployment.root / "ca.key").exists(), "a new CA key appeared"
    assert_server_works(deployment)


def test_signing_without_the_ca_key_refuses_in_one_line_instead_of_making_a_new_ca(deployment, capsys):
    before = snapshot(deployment.root)
    assert main(["certs", "--out", str(deployment.root), *HOST, "--force", "--sites", "newsite"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedbt: error: the CA key ") and "no new CA is made" in error and error.count("\n") == 1
    assert snapshot(deployment.root) == before
    assert_server_works(deployment)


def test_a_renewed_server_certificate_verifies_against_the_unchanged_ca(deployment):
    ca_before = deployment.ca_cert.read_bytes()
    old = x509.load_pem_x509_certificate(deployment.server_cert.read_bytes())
    renew = ["certs", "--out", str(deployment.root), *HOST, "--force", "--ca-key", str(deployment.ca_key)]
    assert main(renew) == 0
    assert deployment.ca_cert.read_bytes() == ca_before
    assert assert_server_works(deployment).serial_number != old.serial_number


def test_the_ca_outlives_the_certificates_it_signs(deployment):
    ca = x509.load_pem_x509_certificate(deployment.ca_cert.read_bytes())
    server = assert_server_works(deployment)
    assert server.not_valid_after_utc - server.not_valid_before_utc <= datetime.timedelta(days=825, hours=1)
    assert ca.not_valid_after_utc - server.not_valid_after_utc > datetime.timedelta(days=365 * 7)


def test_a_write_that_fails_half_way_leaves_every_file_as_it_was(deployment, monkeypatch):
    before = snapshot(deployment.root)
    real_open = certs.os.open

    def disk_full_at_the_certificate(path, *args):
        if str(path).endswith(".tmp") and "server.pem" in str(path):
            raise OSError(28, "No space left on device")
        return real_open(path, *args)

    monkeypatch.setattr(certs.os, "open", disk_full_at_the_certificate)
    with pytest.raises(OSError, match="No space left"):
        certs.make_deployment_certs(deployment.root, ["server.example.org"], [], force=True, ca_key=deployment.ca_key)
    assert snapshot(deployment.root) == before, "a key was replaced without its certificate (or a temp file left)"

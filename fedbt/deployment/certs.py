"""`fedbt certs`: the TLS and site-authentication material of one deployment.

One folder holds everything; each machine gets only its part (README, "Run across hospitals"):

    ca.pem, ca.key            the deployment's own certificate authority (ca.key never leaves this folder)
    server/server.pem, .key   the SuperLink's TLS certificate for the names and addresses given
    sites/<name>.key, .pub    a site's authentication key pair (OpenSSH format, as Flower reads it)

TLS proves the server to the sites; the key pairs prove each site to the server, which
accepts only the public keys registered with it (`fedbt server --site-keys certs/sites`).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Flower authenticates SuperNodes with NIST-curve EC keys; P-384 is the curve its docs use.
SITE_KEY_CURVE = ec.SECP384R1()
VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for a leaf certificate
SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The server reaches its own SuperLink over loopback (to register sites; Flower's ServerApp
# runner does too), so its certificate always names loopback beside the given hosts.
LOOPBACK_NAMES = ["127.0.0.1", "localhost"]


@dataclass(frozen=True)
class CertLayout:
    """Where each file of a deployment folder lives."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    def site_private_key(self, site: str) -> Path:
        return self.sites_dir / f"{site}.key"

    def site_public_key(self, site: str) -> Path:
        return self.sites_dir / f"{site}.pub"


def _write_private(path: Path, data: bytes, force: bool = False) -> None:
    """A private key, readable by its owner only from its first byte; an existing key is never overwritten
    unless `force` (a replaced key locks out every machine still holding the old one)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() and not force:
        raise ValueError(f"{path} exists: refusing to overwrite a key (pass --force to replace it)")
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdated a little: a site whose clock runs behind would otherwise reject a fresh certificate.
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=VALID_DAYS)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbt"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def make_ca(layout: CertLayout, force: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedbt deployment CA"))
        .issuer_name(_name("fedbt deployment CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .sign(key, hashes.SHA256())
    )
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(layout.ca_key, _pem_private(key), force)
    return cert, key


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    """IP addresses as IP entries, everything else as DNS names: TLS checks each kind separately."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_server_cert(
    layout: CertLayout,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    force: bool = False,
) -> None:
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or address (--host)")
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(subject_alternative_names(list(dict.fromkeys(hosts + LOOPBACK_NAMES)))),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    layout.server_cert.parent.mkdir(parents=True, exist_ok=True)
    layout.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(layout.server_key, _pem_private(key), force)


def make_site_keys(layout: CertLayout, site: str, force: bool = False) -> None:
    if not SITE_NAME.match(site):
        raise ValueError(f"site name {site!r}: use letters, digits, '-' and '_' only")
    key = ec.generate_private_key(SITE_KEY_CURVE)
    openssh = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_private(layout.site_private_key(site), openssh, force)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    layout.site_public_key(site).write_bytes(public + f" fedbt-site-{site}\n".encode())


def _load_ca(layout: CertLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{layout.ca_key}: not an EC private key")
    return cert, key


def make_deployment_certs(out: str | Path, hosts: list[str], sites: list[str], force: bool = False) -> CertLayout:
    """A CA (reused when the folder has one), a server certificate for `hosts`, a key pair per site.

    Reusing the CA lets a site be added later without re-issuing everyone's trust anchor.
    """
    layout = CertLayout(Path(out))
    if layout.ca_cert.is_file() and layout.ca_key.is_file():
        ca_cert, ca_key = _load_ca(layout)
    else:
        ca_cert, ca_key = make_ca(layout, force)
    if hosts:
        make_server_cert(layout, ca_cert, ca_key, hosts, force)
    for site in sites:
        make_site_keys(layout, site, force)
    return layout


def registered_keys(site_keys_dir: str | Path) -> dict[str, Path]:
    """{site name: public key file} of every `<name>.pub` in a folder."""
    folder = Path(site_keys_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"site key folder not found: {folder}")
    return {path.stem: path for path in sorted(folder.glob("*.pub"))}

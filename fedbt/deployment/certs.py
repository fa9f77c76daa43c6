"""`fedbt certs`: the TLS and site-authentication material of one deployment, and its life cycle.

One folder holds everything; each machine gets only its part (README, "Run across hospitals"):

    ca.pem                    the deployment's own certificate authority: every machine
    ca.key                    its private key: kept offline, needed only to sign a server certificate
    server/server.pem, .key   the SuperLink's TLS certificate for the names and addresses given
    sites/<name>.key, .pub    a site's authentication key pair (OpenSSH format, as Flower reads it)
    removed/<name>-<node>.pub the public keys of removed sites (`fedbt remove-site`, on the server)

TLS proves the server to the sites; the key pairs prove each site to the server, which
accepts only the public keys registered with it (`fedbt server --site-keys certs/sites`).

A call first decides everything it will write and checks it against what is there; only then
are the files written, each first to a temporary name and then moved into place, so a refused
call changes nothing and a key never ends up beside another key's certificate. An existing CA is
never replaced: a new one would stop every certificate and `ca.pem` copy already handed out.
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
# The CA outlives what it signs: a server certificate can be renewed many times under one CA.
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825  # the longest lifetime browsers and most TLS stacks accept for a leaf certificate
SITE_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# The server reaches its own SuperLink over loopback (to register sites; Flower's ServerApp
# runner does too), so its certificate always names loopback beside the given hosts.
LOOPBACK_NAMES = ["127.0.0.1", "localhost"]


@dataclass(frozen=True)
class CertLayout:
    """Where each file of a deployment folder lives; the CA key may live elsewhere (offline)."""

    root: Path
    ca_key_file: Path | None = None  # default: ROOT/ca.key

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.ca_key_file or self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server" / "server.key"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    @property
    def removed_dir(self) -> Path:
        """Public keys of removed sites (`fedbt remove-site`), out of the folder the server registers."""
        return self.root / "removed"

    def site_private_key(self, site: str) -> Path:
        return self.sites_dir / f"{site}.key"

    def site_public_key(self, site: str) -> Path:
        return self.sites_dir / f"{site}.pub"


@dataclass(frozen=True)
class PendingFile:
    path: Path
    data: bytes
    private: bool  # a private key: owner-only from its first byte, in an owner-only folder


def write_together(files: list[PendingFile]) -> None:
    """Every file written under a temporary name first, then all moved into place: a failure
    while writing (a full disk, a permission) leaves every existing file as it was."""
    staged: list[tuple[Path, Path]] = []
    try:
        for pending in files:
            pending.path.parent.mkdir(mode=0o700 if pending.private else 0o755, parents=True, exist_ok=True)
            tmp = pending.path.with_name(f".{pending.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if pending.private else 0o644)
            staged.append((tmp, pending.path))
            with os.fdopen(fd, "wb") as file:
                file.write(pending.data)
                file.flush()
                os.fsync(file.fileno())
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in staged:
        os.replace(tmp, path)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(days: int, not_after: datetime.datetime | None = None) -> tuple[datetime.datetime, datetime.datetime]:
    """From a little before now (a site whose clock runs behind would otherwise reject a fresh
    certificate) for `days`, but never past `not_after` (the issuing CA's end)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    end = now + datetime.timedelta(days=days)
    return now - datetime.timedelta(hours=1), min(end, not_after) if not_after else end


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedbt"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(CA_VALID_DAYS)
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


def new_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(SERVER_VALID_DAYS, ca_cert.not_valid_after_utc)
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
    return cert, key


def site_key_files(layout: CertLayout, site: str) -> list[PendingFile]:
    key = ec.generate_private_key(SITE_KEY_CURVE)
    openssh = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [
        PendingFile(layout.site_private_key(site), openssh, private=True),
        PendingFile(layout.site_public_key(site), public + f" fedbt-site-{site}\n".encode(), private=False),
    ]


def make_site_keys(layout: CertLayout, site: str, force: bool = False) -> None:
    """One site's key pair, alone: no CA is involved (the server trusts the public key it registers)."""
    check_request(layout, [], [site], force)
    write_together(site_key_files(layout, site))


def load_ca(layout: CertLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The deployment's CA with its key, checked to belong together and to be still valid."""
    if not layout.ca_key.is_file():
        raise ValueError(
            f"the CA key {layout.ca_key} is not here: run this where it is kept, or name it with --ca-key "
            f"(no new CA is made: the server and sites trust {layout.ca_cert})"
        )
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{layout.ca_key} is not the key of {layout.ca_cert}")
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
        expired = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        raise ValueError(f"the CA {layout.ca_cert} expired on {expired}: make a new deployment")
    return cert, key


def refuse_to_replace(paths: list[Path], what: str, force: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists: refusing to overwrite a key ({what}; pass --force to replace it)")


def check_request(layout: CertLayout, hosts: list[str], sites: list[str], force: bool) -> None:
    """Everything that would refuse the call, before anything is generated or written."""
    for site in sites:
        if not SITE_NAME.match(site):
            raise ValueError(f"site name {site!r}: use letters, digits, '-' and '_' only")
    if not layout.ca_cert.exists() and layout.ca_key.exists():
        raise ValueError(f"{layout.ca_key} exists without its certificate {layout.ca_cert}: restore it first")
    if hosts:
        refuse_to_replace(
            [layout.server_key, layout.server_cert], "the server must get the new pair; sites keep working", force
        )
    for site in sites:
        refuse_to_replace(
            [layout.site_private_key(site), layout.site_public_key(site)],
            f"site {site} must get the new key and the server its new .pub",
            force,
        )


def make_deployment_certs(
    out: str | Path, hosts: list[str], sites: list[str], force: bool = False, ca_key: str | Path | None = None
) -> CertLayout:
    """A CA when the folder has none, a server certificate for `hosts` (signed with the CA's key,
    which must then be at hand), a key pair per site (which needs no CA).

    With a CA in the folder, its `ca.pem` and key are never touched: sites and server
    certificates are added or renewed under it, and earlier ones stay trusted.
    """
    layout = CertLayout(Path(out), Path(ca_key) if ca_key else None)
    check_request(layout, hosts, sites, force)
    files: list[PendingFile] = []
    if not layout.ca_cert.exists():
        ca_cert, ca_private = new_ca()
        files += [
            PendingFile(layout.ca_key, _pem_private(ca_private), private=True),
            PendingFile(layout.ca_cert, _pem(ca_cert), private=False),
        ]
    elif hosts:
        ca_cert, ca_private = load_ca(layout)
    if hosts:
        server_cert, server_key = new_server_cert(ca_cert, ca_private, hosts)
        files += [
            PendingFile(layout.server_key, _pem_private(server_key), private=True),
            PendingFile(layout.server_cert, _pem(server_cert), private=False),
        ]
    for site in sites:
        files += site_key_files(layout, site)
    write_together(files)
    return layout


def registered_keys(site_keys_dir: str | Path) -> dict[str, Path]:
    """{site name: public key file} of every `<name>.pub` in a folder."""
    folder = Path(site_keys_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"site key folder not found: {folder}")
    return {path.stem: path for path in sorted(folder.glob("*.pub"))}

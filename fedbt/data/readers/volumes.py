"""What the ``dicom`` and ``nifti`` readers share: the site's patient secret and the keyed
hashes made with it, the label CSV, and the tally of slices kept and skipped.

A patient id (a DICOM PatientID, a NIfTI subject folder) identifies a person. It is replaced
by HMAC-SHA256 under the site's own secret before it enters a ``Record``: the same patient
gets the same key at every run of this site (its slices stay in one split), and nobody
without the secret, which never leaves the site's machine, can test a guessed id against it.
"""

from __future__ import annotations

import csv
import hmac
import os
import secrets
from collections import Counter
from pathlib import Path

from fedbt.data.records import Problem, Record, SiteScan
from fedbt.data.sites import SiteSpec, VolumeLayout

SECRET_BYTES = 32
MIN_SECRET_BYTES = 16
SECRETS_ENV = "FEDBT_SECRETS"
# The tally's reason for slices a slice rule leaves out on purpose (not a problem).
NOT_PICKED = "not picked by the slice rule"


class SkippedFile(ValueError):
    """A file that gives no slice: `reason` is its category in the tally, the message says more."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def default_secret_path(site: str) -> Path:
    """$FEDBT_SECRETS/<site>.key, else ~/.config/fedbt/secrets/<site>.key: outside the data,
    the repository, the cache and every results folder, so no copy of those carries it."""
    folder = os.environ.get(SECRETS_ENV) or Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")) / "fedbt" / "secrets"
    return Path(folder).expanduser() / f"{site}.key"


def _create_secret(path: Path) -> None:
    """Random bytes, owner-only (0600 in 0700 folders) from the first byte. Two processes
    creating it at once agree: the file appears whole (a hard link), and only the first."""
    for folder in reversed([path.parent, *path.parent.parents]):
        if not folder.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
        fh.write(secrets.token_bytes(SECRET_BYTES))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def site_secret(spec: SiteSpec) -> bytes:
    """The site's patient secret, created on first use; refused when others may read it."""
    path = spec.patient_secret or default_secret_path(spec.name)
    if not path.exists():
        _create_secret(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ValueError(f"site {spec.name}: patient secret {path} has mode {mode:o}: make it owner-only (chmod 600)")
    secret = path.read_bytes()
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"site {spec.name}: patient secret {path} holds {len(secret)} bytes, fewer than 16")
    return secret


def keyed_hash(secret: bytes, kind: str, value: str) -> str:
    """16 hex digits standing for `value`; `kind` keeps a patient and a series with the same id apart."""
    return hmac.new(secret, f"{kind}:{value}".encode(), "sha256").hexdigest()[:16]


class LabelTable:
    """A label CSV: one row per key, a `label` column. Keys are compared, never reported:
    a message names the CSV's line, since a key may be a patient's id."""

    def __init__(self, spec: SiteSpec) -> None:
        layout: VolumeLayout = spec.volumes
        self.path = spec.root / layout.labels_csv
        self.key = layout.key
        self.labels: dict[str, tuple[str, int]] = {}  # key -> (source label, line)
        self.used: set[str] = set()
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as fh:
                self._read(csv.DictReader(fh), spec)
        except FileNotFoundError:
            raise ValueError(f"site {spec.name}: label CSV {self.path} does not exist") from None
        except (UnicodeDecodeError, csv.Error) as err:
            raise ValueError(f"site {spec.name}: label CSV {self.path} cannot be read ({err})") from None

    def _read(self, rows: csv.DictReader, spec: SiteSpec) -> None:
        if not rows.fieldnames or not {self.key, "label"} <= set(rows.fieldnames):
            found = ", ".join(rows.fieldnames or []) or "nothing"
            raise ValueError(f"{self.path}: needs columns {self.key} and label, has {found}")
        for row in rows:
            line = rows.line_num
            key, label = (row[self.key] or "").strip(), (row["label"] or "").strip()
            if not key or not label:
                raise ValueError(f"{self.path} line {line}: empty {self.key} or label")
            if key in self.labels:
                raise ValueError(f"{self.path} lines {self.labels[key][1]} and {line}: the same {self.key} twice")
            if spec.allowed_for(label) is None:
                mapping = "map it under 'labels:' in the site YAML"
                raise ValueError(f"{self.path} line {line}: unknown label {label!r}: {mapping}")
            self.labels[key] = (label, line)

    def label_of(self, key: str) -> str | None:
        if key in self.labels:
            self.used.add(key)
            return self.labels[key][0]
        return None

    def check_all_used(self, what: str) -> None:
        """Every row must match something under the root: a row that does not is a typo or a
        patient who was not exported, and either way the labels are not what the site thinks."""
        unused = sorted(line for key, (_, line) in self.labels.items() if key not in self.used)
        if unused:
            lines = ", ".join(map(str, unused[:10])) + (f" and {len(unused) - 10} more" if len(unused) > 10 else "")
            raise ValueError(f"{self.path} line {lines}: {self.key} matches no {what} under the root")


def finish_scan(spec: SiteSpec, records: list[Record], problems: list[Problem], tally: Counter[str]) -> SiteScan:
    if not records:
        problems.append(Problem(spec.name, str(spec.root), "no labelled slices found"))
    tally["kept"] = len(records)
    return SiteScan(spec, records, problems, tally)

"""Split the combined 7,023-image Kaggle set back into its three origins.

Rules, in order:
1. A file byte-identical (sha256) to a file of one reference site is from that site.
   Identical to files of several sites (SARTAJ and Br35H share no-tumour images): ambiguous.
2. A single-channel JPEG of a tumour class is figshare (the combined set re-encoded
   figshare's slices as grayscale; SARTAJ and Br35H files are RGB).
3. Anything else is undecided.
Ambiguous and undecided files are reported as problems of the site, never guessed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace

from PIL import Image

from fedbt.data.labels import TUMOUR_CLASSES
from fedbt.data.readers.class_folders import scan_class_folders
from fedbt.data.records import Problem, Record, SiteScan
from fedbt.data.sites import SiteSpec

Scanner = Callable[[SiteSpec], SiteScan]

FIGSHARE = "figshare"


def _is_single_channel(path: str) -> bool:
    try:
        with Image.open(path) as img:
            return img.mode in ("L", "I;16", "I")
    except (OSError, Image.DecompressionBombError):  # no evidence either way: the file stays undecided
        return False


def decide_origin(record: Record, reference: dict[str, set[str]]) -> tuple[str | None, str]:
    """(origin or None, reason) for one file of the combined set."""
    matches = reference.get(record.sha256, set())
    if len(matches) == 1:
        return next(iter(matches)), "byte-identical to a reference file"
    if len(matches) > 1:
        return None, f"byte-identical to files of several sites ({', '.join(sorted(matches))})"
    if record.allowed <= TUMOUR_CLASSES and _is_single_channel(record.path):
        return FIGSHARE, "single-channel tumour image"
    return None, "no byte-identical reference file and not a single-channel tumour image"


def reference_index(sites: tuple[SiteSpec, ...], scan: Scanner) -> dict[str, set[str]]:
    index: dict[str, set[str]] = defaultdict(set)
    for site in sites:
        for r in scan(site).records:
            index[r.sha256].add(site.name)
    return index


def scan_kaggle_origin(spec: SiteSpec, scan_reference: Scanner) -> SiteScan:
    if spec.origin is None:
        raise ValueError(f"site {spec.name}: format kaggle_combined needs 'origin' (figshare, sartaj or br35h)")
    combined = scan_class_folders(spec)
    reference = reference_index(spec.reference_sites, scan_reference)
    records: list[Record] = []
    problems = list(combined.problems)
    for r in combined.records:
        origin, reason = decide_origin(r, reference)
        if origin is None:
            problems.append(Problem(spec.name, r.path, f"origin undecided: {reason}"))
        elif origin == spec.origin:
            records.append(replace(r, site=spec.name))
    return SiteScan(spec, records, problems)

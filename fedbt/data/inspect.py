"""`fedbt data inspect`: per-site counts, image summary, duplicate and leakage report."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
from PIL import Image

from fedbt.data.catalog import Catalog
from fedbt.data.records import Record


def image_summary(records: list[Record]) -> dict:
    """Sizes and pixel modes read from file headers (no decoding)."""
    modes: Counter[str] = Counter()
    widths, heights = [], []
    for r in records:
        if r.path.lower().endswith(".mat"):
            modes["mat"] += 1
            continue
        if r.slice is not None:  # a slice of a DICOM series or NIfTI volume: volume_site_counts
            modes["nifti slice" if r.slice.index is not None else "dicom slice"] += 1
            continue
        try:
            with Image.open(r.path) as img:
                modes[img.mode] += 1
                widths.append(img.width)
                heights.append(img.height)
        except OSError:
            modes["unreadable header"] += 1
    summary: dict = {"modes": dict(modes)}
    if widths:
        summary["width"] = {"min": min(widths), "median": int(np.median(widths)), "max": max(widths)}
        summary["height"] = {"min": min(heights), "median": int(np.median(heights)), "max": max(heights)}
    return summary


def _place(r: Record) -> str:
    return f"{r.site}/{r.source_split}" if r.source_split else r.site


def duplicate_report(catalog: Catalog) -> dict:
    """Exact and near duplicates within and across sites, label conflicts, and a leakage check."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(catalog.records):
        by_sha[r.sha256].append(i)
    exact_kinds: Counter[str] = Counter()
    for members in by_sha.values():
        if len(members) > 1:
            places = sorted({_place(catalog.records[i]) for i in members})
            exact_kinds[" + ".join(places)] += len(members) - 1
    near_kinds: Counter[str] = Counter()
    for i, j in catalog.near_pairs:
        a, b = catalog.records[i], catalog.records[j]
        if a.sha256 != b.sha256:
            near_kinds[" + ".join(sorted({a.site, b.site}))] += 1

    pictures: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(catalog.picture_ids.tolist()):
        pictures[g].append(i)
    conflicts, split_apart = [], 0
    for members in pictures.values():
        label_sets = {catalog.records[i].allowed for i in members}
        # Consistent labels share a class (glioma inside 'tumour'); disjoint ones conflict.
        if not frozenset.intersection(*label_sets):
            conflicts.append(sorted({f"{catalog.records[i].site}:{catalog.records[i].source_label}" for i in members}))
        split_apart += len({catalog.splits[i] for i in members}) > 1
    held_out = set(catalog.held_out_test)
    trained = {catalog.picture_ids[i] for i, split in enumerate(catalog.splits) if split == "train"}
    leaked = [
        i
        for i, split in enumerate(catalog.splits)
        if split == "test" and i not in held_out and catalog.picture_ids[i] in trained
    ]
    return {
        "exact_duplicate_copies": dict(exact_kinds),
        "near_duplicate_pairs": dict(near_kinds),
        "duplicate_groups": sum(len(m) > 1 for m in pictures.values()),
        "label_conflict_groups": conflicts,
        "groups_split_across_sites": split_apart,
        "test_held_out": catalog.held_out_test_names(),
        "test_images_also_trained_on": len(leaked),
    }


def site_counts(catalog: Catalog) -> dict:
    out: dict = {}
    for site in catalog.site_names:
        idx = [i for i, r in enumerate(catalog.records) if r.site == site]
        labels = Counter(catalog.records[i].source_label for i in idx)
        split_counts = {
            split: dict(Counter(catalog.records[i].source_label for i in catalog.indices(site, split)))
            for split in ("train", "val", "test")
        }
        out[site] = {
            "images": len(idx),
            "per_label": dict(sorted(labels.items())),
            "splits_unique_images": split_counts,
            "problems": sum(p.site == site for p in catalog.problems),
        }
    return out


def volume_site_counts(catalog: Catalog) -> dict:
    """Per DICOM or NIfTI site: patients, studies and series kept (counted by their keyed
    hashes), slices kept and skipped by reason, and patients per label."""
    out: dict = {}
    for site, tally in catalog.slice_tally.items():
        kept = [r for r in catalog.records if r.site == site]
        patient_labels = {(r.patient, r.source_label) for r in kept}
        out[site] = {
            "patients": len({r.patient for r in kept}),
            "studies": len({r.slice.study for r in kept}),
            "series": len({r.slice.series for r in kept}),
            "slices_kept": tally["kept"],
            "slices_skipped": {reason: n for reason, n in sorted(tally.items()) if reason != "kept" and n},
            "patients_per_label": dict(sorted(Counter(label for _, label in patient_labels).items())),
        }
    return out


def inspect_report(catalog: Catalog) -> dict:
    return {
        "sites": site_counts(catalog),
        "volume_sites": volume_site_counts(catalog),
        "images": image_summary(catalog.records),
        "duplicates": duplicate_report(catalog),
        "pooled_unique_images": {
            split: len(catalog.indices(split=split, pooled=True)) for split in ("train", "val", "test")
        },
        "problems": [{"site": p.site, "path": p.path, "message": p.message} for p in catalog.problems],
    }


def format_report(report: dict) -> str:
    lines = ["Sites"]
    for site, info in report["sites"].items():
        labels = ", ".join(f"{k} {v}" for k, v in info["per_label"].items())
        lines.append(f"  {site:<10} {info['images']:>5} images: {labels}")
        for split, counts in info["splits_unique_images"].items():
            lines.append(
                f"  {'':<10} {split:<5} {sum(counts.values()):>5} unique: "
                + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            )
        if info["problems"]:
            lines.append(f"  {'':<10} {info['problems']} problems (listed below)")
    for site, info in report["volume_sites"].items():
        lines.append(
            f"DICOM/NIfTI site {site}: {info['patients']} patients, {info['studies']} studies, "
            f"{info['series']} series, {info['slices_kept']} slices kept"
        )
        skipped = ", ".join(f"{reason} {n}" for reason, n in info["slices_skipped"].items()) or "none"
        lines.append(f"  slices skipped: {skipped}")
        lines.append("  patients per label: " + ", ".join(f"{k} {v}" for k, v in info["patients_per_label"].items()))
    img = report["images"]
    lines.append(f"Images: modes {img['modes']}")
    if "width" in img:
        lines.append(f"  width  {img['width']}\n  height {img['height']}")
    dup = report["duplicates"]
    lines.append("Exact duplicates (extra copies, by where the copies sit):")
    lines += [f"  {k}: {v}" for k, v in sorted(dup["exact_duplicate_copies"].items())] or ["  none"]
    lines.append("Near duplicates (pairs of different files showing the same picture):")
    lines += [f"  {k}: {v}" for k, v in sorted(dup["near_duplicate_pairs"].items())] or ["  none"]
    lines.append(f"Duplicate groups: {dup['duplicate_groups']}; label conflicts: {len(dup['label_conflict_groups'])}")
    lines += [f"  conflict: {' / '.join(c)}" for c in dup["label_conflict_groups"][:20]]
    lines.append(
        f"Splits: each site's own (a function of its images, its shares and the seed); "
        f"{dup['groups_split_across_sites']} duplicate groups sit in different splits at different sites"
    )
    held_out = dup["test_held_out"]
    lines.append(f"Test images held out (another site trains on the same picture): {len(held_out)}")
    lines += [f"  {name}" for name in held_out[:20]]
    if len(held_out) > 20:
        lines.append(f"  ... {len(held_out) - 20} more")
    leaked = dup["test_images_also_trained_on"]
    lines.append(f"Leakage check: {leaked} reported test images share a picture with a training image")
    pooled = report["pooled_unique_images"]
    lines.append(f"Pooled (each image once): train {pooled['train']}, val {pooled['val']}, test {pooled['test']}")
    if report["problems"]:
        lines.append(f"Problems ({len(report['problems'])}):")
        lines += [f"  {p['site']}: {p['path']}: {p['message']}" for p in report["problems"]]
    return "\n".join(lines)

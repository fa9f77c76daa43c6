"""Readers for the on-disk layouts people download, one module per format.

- ``class_folders``: ``<root>/[Training|Testing/]<label>/*.jpg``.
- ``figshare_mat``: the original figshare release (.mat, keeps patient ids).
- ``kaggle_combined``: one origin out of the combined 7,023-image Kaggle set.
- ``dicom``: a hospital's DICOM tree, series picked by rule, labels from a CSV.
- ``nifti``: one NIfTI volume a file, slices picked by rule, labels from a CSV.

Nothing is dropped silently: every file that is not used becomes a ``Problem``.
"""

from __future__ import annotations

from fedbt.data.readers.class_folders import scan_class_folders
from fedbt.data.readers.dicom import scan_dicom
from fedbt.data.readers.figshare_mat import scan_figshare_mat
from fedbt.data.readers.kaggle_combined import scan_kaggle_origin
from fedbt.data.readers.nifti import scan_nifti
from fedbt.data.records import SiteScan
from fedbt.data.sites import SiteSpec


def scan_site(spec: SiteSpec) -> SiteScan:
    if spec.format == "class_folders":
        return scan_class_folders(spec)
    if spec.format == "figshare_mat":
        return scan_figshare_mat(spec)
    if spec.format == "kaggle_combined":
        # Reference sites decide the origin of each file; they are scanned by this same dispatcher.
        return scan_kaggle_origin(spec, scan_site)
    if spec.format == "dicom":
        return scan_dicom(spec)
    if spec.format == "nifti":
        return scan_nifti(spec)
    raise ValueError(f"site {spec.name}: unknown format {spec.format!r}")

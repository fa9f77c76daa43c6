"""Canonical label space shared by every site, and the tasks built on it.

Sites label their images differently: figshare has three tumour types and no
healthy class, SARTAJ has four classes, Br35H only says tumour yes/no.  Every
sample therefore carries the *set* of canonical classes its source label allows.
A fine label allows one class; Br35H ``yes`` allows all three tumour types.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANONICAL_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "no_tumor", "pituitary")
TUMOUR_CLASSES: frozenset[str] = frozenset({"glioma", "meningioma", "pituitary"})
NO_TUMOUR = "no_tumor"

# Folder names used by the public releases, mapped to the classes they allow.
# Site YAMLs may add to or override these.
KNOWN_SOURCE_LABELS: dict[str, frozenset[str]] = {
    "glioma": frozenset({"glioma"}),
    "glioma_tumor": frozenset({"glioma"}),
    "meningioma": frozenset({"meningioma"}),
    "meningioma_tumor": frozenset({"meningioma"}),
    "pituitary": frozenset({"pituitary"}),
    "pituitary_tumor": frozenset({"pituitary"}),
    "notumor": frozenset({NO_TUMOUR}),
    "no_tumor": frozenset({NO_TUMOUR}),
    "no": frozenset({NO_TUMOUR}),
    "yes": TUMOUR_CLASSES,
}

# figshare .mat files store the label as a number.
FIGSHARE_MAT_LABELS: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}


def parse_allowed(value: str | list[str]) -> frozenset[str]:
    """Turn a YAML label mapping value (a class, a list, or 'tumor') into a class set."""
    names = [value] if isinstance(value, str) else list(value)
    allowed: set[str] = set()
    for name in names:
        if name in ("tumor", "tumour"):
            allowed |= TUMOUR_CLASSES
        elif name in CANONICAL_CLASSES:
            allowed.add(name)
        else:
            raise ValueError(f"unknown class {name!r}: use one of {', '.join(CANONICAL_CLASSES)} or 'tumor'")
    return frozenset(allowed)


@dataclass(frozen=True)
class Task:
    """A classification task: its output classes and how canonical sets map onto them."""

    name: str
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def target_mask(self, allowed: frozenset[str]) -> list[bool]:
        """Which output classes a sample with this allowed set may belong to."""
        if self.name == "4class":
            return [c in allowed for c in self.classes]
        # binary: any set of tumour types is simply 'tumor'.
        if allowed <= TUMOUR_CLASSES:
            return [False, True]
        if allowed == {NO_TUMOUR}:
            return [True, False]
        raise ValueError(f"label set {sorted(allowed)} mixes tumour and no-tumour")

    def tumour_probability(self, probs: np.ndarray) -> np.ndarray:
        """P(tumour) from this task's class probabilities (N, C) -> (N,)."""
        return 1.0 - probs[:, self.classes.index(NO_TUMOUR)]

    def is_tumour(self, masks: np.ndarray) -> np.ndarray:
        """Whether each sample's label says tumour (any type), from target masks (N, C)."""
        return ~masks[:, self.classes.index(NO_TUMOUR)]


TASKS: dict[str, Task] = {
    "4class": Task("4class", CANONICAL_CLASSES),
    "binary": Task("binary", (NO_TUMOUR, "tumor")),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(TASKS)}") from None

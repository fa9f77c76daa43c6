"""Training losses: the coarse-label loss that lets sites with different label spaces train one model."""

from __future__ import annotations

import torch


def coarse_label_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    class_weights: torch.Tensor | None = None,
    present_classes: torch.Tensor | None = None,
    smoothing: float = 0.0,
) -> torch.Tensor:
    """-log sum_{c in allowed} p_c: cross-entropy for fine labels, set likelihood for coarse ones.

    A Br35H 'tumour of unknown type' thus only pushes probability mass onto the
    tumour classes as a whole and never onto a type it cannot vouch for.
    With `present_classes` (restricted softmax, as in FedRS) the probabilities are
    normalised over the classes a site has at all: figshare, which has no healthy
    scans, then never learns to push 'no tumour' down, a class it knows nothing about.
    `smoothing` mixes in the cross-entropy to a uniform target over those classes, so a
    from-scratch model is not driven to ever larger logits on a few noisy labels.
    """
    logits = logits.float()
    if present_classes is not None:
        present_classes = present_classes.to(logits.device)
        logits = logits.masked_fill(~present_classes, float("-inf"))
    normaliser = logits.logsumexp(dim=1)
    per_sample = normaliser - logits.masked_fill(~masks, float("-inf")).logsumexp(dim=1)
    if smoothing > 0:
        in_play = logits if present_classes is None else logits[:, present_classes]
        per_sample = (1 - smoothing) * per_sample + smoothing * (normaliser - in_play.mean(dim=1))
    if class_weights is None:
        return per_sample.mean()
    weights = (masks.float() * class_weights).sum(1) / masks.sum(1)
    return (weights * per_sample).sum() / weights.sum()


def class_weights_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Inverse-frequency weights; a coarse sample counts fractionally for each allowed class."""
    counts = (masks.float() / masks.sum(1, keepdim=True)).sum(0).clamp_min(1.0)
    return counts.sum() / (len(counts) * counts)

import math

import numpy as np
import pytest
import torch

from fedbt.data.labels import TUMOUR_CLASSES, get_task, parse_allowed
from fedbt.train.losses import class_weights_from_masks, coarse_label_loss


def test_parse_allowed_expands_tumour_and_rejects_unknown():
    assert parse_allowed("tumor") == TUMOUR_CLASSES
    assert parse_allowed(["glioma", "pituitary"]) == {"glioma", "pituitary"}
    with pytest.raises(ValueError, match="unknown class 'astrocytoma'"):
        parse_allowed("astrocytoma")


def test_target_masks_for_both_tasks():
    four, binary = get_task("4class"), get_task("binary")
    assert four.target_mask(frozenset({"glioma"})) == [True, False, False, False]
    assert four.target_mask(TUMOUR_CLASSES) == [True, True, False, True]
    assert binary.target_mask(frozenset({"meningioma"})) == [False, True]
    assert binary.target_mask(TUMOUR_CLASSES) == [False, True]
    assert binary.target_mask(frozenset({"no_tumor"})) == [True, False]
    with pytest.raises(ValueError):
        get_task("3class")


def test_coarse_label_loss_is_cross_entropy_for_fine_labels():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.1], [0.0, 1.0, 3.0, -2.0]])
    masks = torch.tensor([[True, False, False, False], [False, False, True, False]])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    assert torch.allclose(coarse_label_loss(logits, masks), expected)


def test_coarse_label_loss_is_minus_log_of_the_allowed_probability_mass():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    masks = torch.tensor([[True, True, False, True]])  # 'tumour of unknown type'
    p = torch.softmax(logits, dim=1)[0]
    expected = -math.log(float(p[0] + p[1] + p[3]))
    assert coarse_label_loss(logits, masks).item() == pytest.approx(expected, rel=1e-6)


def test_coarse_loss_gradient_never_prefers_one_tumour_type():
    logits = torch.zeros(1, 4, requires_grad=True)
    coarse_label_loss(logits, torch.tensor([[True, True, False, True]])).backward()
    grad = logits.grad[0]
    # Equal push on the three tumour types, away from no_tumor.
    assert torch.allclose(grad[[0, 1, 3]], grad[0].expand(3))
    assert grad[2] > 0 > grad[0]


def test_class_weights_count_coarse_samples_fractionally():
    masks = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    weights = class_weights_from_masks(masks)
    # Classes seen less than once count as one, so a rare class cannot get a huge weight.
    counts = np.array([2 + 1 / 3, 1, 1, 1])
    assert np.allclose(weights.numpy(), counts.sum() / (4 * counts), rtol=1e-5)


def test_restricted_softmax_ignores_classes_the_site_does_not_have():
    logits = torch.tensor([[1.0, 0.5, 2.0, -0.5]], requires_grad=True)
    masks = torch.tensor([[True, False, False, False]])
    present = torch.tensor([True, True, False, True])  # figshare: no healthy scans at all
    loss = coarse_label_loss(logits, masks, present_classes=present)
    expected = torch.nn.functional.cross_entropy(logits[:, [0, 1, 3]], torch.tensor([0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0  # 'no tumour' is neither pushed down nor up


def test_label_smoothing_matches_torch_for_fine_labels():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.1], [0.0, 1.0, 3.0, -2.0]])
    masks = torch.tensor([[True, False, False, False], [False, False, True, False]])
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.1)
    assert coarse_label_loss(logits, masks, smoothing=0.1).item() == pytest.approx(expected.item(), rel=1e-6)


def test_label_smoothing_of_a_coarse_label_mixes_set_and_uniform_terms():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    masks = torch.tensor([[True, True, False, True]])
    log_p = torch.log_softmax(logits, dim=1)[0]
    set_term = -math.log(float(log_p[[0, 1, 3]].exp().sum()))
    expected = 0.8 * set_term + 0.2 * float(-log_p.mean())
    assert coarse_label_loss(logits, masks, smoothing=0.2).item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothing_under_restricted_softmax_spreads_only_over_present_classes():
    logits = torch.tensor([[1.0, 0.5, 2.0, -0.5]], requires_grad=True)
    masks = torch.tensor([[True, False, False, False]])
    present = torch.tensor([True, True, False, True])
    loss = coarse_label_loss(logits, masks, present_classes=present, smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits[:, [0, 1, 3]], torch.tensor([0]), label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0

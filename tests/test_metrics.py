import numpy as np
import pytest

from fedbt.data.labels import get_task
from fedbt.eval.metrics import classification_metrics


def test_metrics_on_a_hand_computed_case():
    task = get_task("4class")
    # classes: glioma, meningioma, no_tumor, pituitary
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # glioma -> glioma
            [0.6, 0.2, 0.1, 0.1],  # meningioma -> glioma (wrong)
            [0.1, 0.1, 0.7, 0.1],  # no_tumor -> no_tumor
            [0.1, 0.1, 0.1, 0.7],  # pituitary -> pituitary
            [0.1, 0.6, 0.2, 0.1],  # coarse 'tumour' -> meningioma: inside the allowed set
            [0.2, 0.1, 0.6, 0.1],  # coarse 'tumour' -> no_tumor: wrong
        ]
    )
    masks = np.array(
        [
            [1, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 1, 0],
            [0, 0, 0, 1],
            [1, 1, 0, 1],
            [1, 1, 0, 1],
        ],
        dtype=bool,
    )
    m = classification_metrics(probs, masks, task)
    assert m["n"] == 6 and m["n_fine"] == 4
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["set_accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert m["per_class"]["glioma"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["meningioma"]["recall"] == 0.0
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0 + 1 + 1) / 4)
    assert m["balanced_accuracy"] == pytest.approx(0.75)
    expected_loss = -np.mean(np.log([0.7, 0.2, 0.7, 0.7, 0.8, 0.4]))
    assert m["loss"] == pytest.approx(expected_loss)


def test_tumour_vs_none_is_derived_from_four_class_output():
    task = get_task("4class")
    probs = np.array(
        [
            [0.3, 0.3, 0.4, 0.0],  # P(tumour) 0.6 -> tumour; truth tumour (coarse)
            [0.1, 0.1, 0.8, 0.0],  # P(tumour) 0.2 -> none; truth none
            [0.2, 0.2, 0.55, 0.05],  # P(tumour) 0.45 -> none; truth glioma: a miss
            [0.3, 0.0, 0.6, 0.1],  # P(tumour) 0.4 -> none; truth none
        ]
    )
    masks = np.array([[1, 1, 0, 1], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]], dtype=bool)
    tv = classification_metrics(probs, masks, task)["tumour_vs_none"]
    assert tv["accuracy"] == pytest.approx(3 / 4)
    assert tv["sensitivity"] == pytest.approx(1 / 2)
    assert tv["specificity"] == pytest.approx(1.0)
    assert tv["confusion_matrix"] == [[2, 0], [1, 1]]
    # Tumour scores 0.6, 0.45 against none 0.2, 0.4: every tumour ranks above every none.
    assert tv["auc"] == pytest.approx(1.0)


def test_binary_task_scores_every_sample():
    task = get_task("binary")
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    masks = np.array([[1, 0], [0, 1], [0, 1]], dtype=bool)
    m = classification_metrics(probs, masks, task)
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["tumour_vs_none"]["sensitivity"] == pytest.approx(0.5)

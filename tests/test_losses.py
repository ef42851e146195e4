"""The CSTP loss against hand-computed values (docs/method.md#loss)."""

import math

import pytest
import torch

from cstp.losses import CSTPLossWeights, byol_loss, cstp_loss

LN2, LN3, LN5, LN6 = math.log(2), math.log(3), math.log(5), math.log(6)


def test_byol_loss_is_zero_for_the_same_direction_and_four_for_opposite():
    q = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]])
    torch.testing.assert_close(byol_loss(q, 3 * q), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(byol_loss(q, -q), torch.full((2,), 4.0))
    # Orthogonal vectors: 2 − 2·0.
    torch.testing.assert_close(byol_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])), torch.tensor([2.0]))
    assert byol_loss(q, q).shape == (2,)


def hand_made_outputs():
    """Logits whose cross-entropies are logs of small integers (5 classes)."""
    def rows(*values):
        return torch.tensor(values, dtype=torch.float32)

    return {
        # BYOL, per sample: byol(q1, z'2) + byol(q2, z'1) = (2 + 0) and (4 + 0); batch mean 3.
        "q1": rows([1.0, 0.0], [1.0, 0.0]),
        "target_z2": rows([0.0, 1.0], [-2.0, 0.0]),
        "q2": rows([1.0, 0.0], [0.0, 1.0]),
        "target_z1": rows([7.0, 0.0], [0.0, 0.5]),
        # Softmax of [ln2, 0, 0, 0, 0] is [2/6, 1/6, ...]: CE = ln3 for class 0, ln6 otherwise.
        "spatial": rows([LN2, 0, 0, 0, 0], [LN2, 0, 0, 0, 0]),
        "temporal": torch.zeros(2, 5),
        # Softmax of ln4 at one place is [4/8, 1/8, ...]: CE = ln2 there, ln8 elsewhere.
        "speed1": rows([2 * LN2, 0, 0, 0, 0], [0, 2 * LN2, 0, 0, 0]),
        "speed2": torch.zeros(2, 5),
        "rotation1": torch.zeros(2, 5),
        "rotation2": rows([0, 0, 0, 2 * LN2, 0], [0, 0, 0, 2 * LN2, 0]),
    }


def hand_made_labels():
    return {
        "spatial_label": torch.tensor([0, 1]),   # CE (ln3 + ln6)/2, accuracy 1/2 (argmax 0)
        "temporal_label": torch.tensor([2, 3]),  # CE ln5, accuracy 0 (argmax of zeros is 0)
        "speed_label": torch.tensor([0, 1]),     # view 1: ln2, acc 1; view 2: ln5, acc 1/2
        "rot1": torch.tensor([0, 0]),            # ln5, accuracy 1
        "rot2": torch.tensor([3, 2]),            # (ln2 + ln8)/2 = 2·ln2, accuracy 1/2
    }


def test_cstp_loss_matches_hand_computation():
    total, terms, accuracies = cstp_loss(hand_made_outputs(), hand_made_labels(), CSTPLossWeights())

    byol = 3.0
    spatial = (LN3 + LN6) / 2
    temporal = LN5
    speed1, speed2 = LN2, LN5
    rotation1, rotation2 = LN5, 2 * LN2
    expected_total = 0.1 * byol + spatial + temporal + (speed1 + speed2) + (rotation1 + rotation2)

    assert total.item() == pytest.approx(expected_total, rel=1e-6)
    expected_terms = {
        "byol": byol, "spatial": spatial, "temporal": temporal,
        "speed": (speed1 + speed2) / 2, "rotation": (rotation1 + rotation2) / 2,
        "total": expected_total,
    }
    assert terms.keys() == expected_terms.keys()
    for name, value in expected_terms.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6, abs=1e-6), name

    expected_accuracies = {"spatial": 0.5, "temporal": 0.0, "speed": 0.75, "rotation": 0.75}
    assert accuracies.keys() == expected_accuracies.keys()
    for name, value in expected_accuracies.items():
        assert isinstance(accuracies[name], torch.Tensor)
        assert accuracies[name].item() == pytest.approx(value), name


def test_default_weights_are_the_reference_recipe():
    assert CSTPLossWeights() == CSTPLossWeights(byol=0.1, spatial=1, temporal=1, speed=1, rotation=1)
    default_total, _, _ = cstp_loss(hand_made_outputs(), hand_made_labels())
    explicit_total, _, _ = cstp_loss(hand_made_outputs(), hand_made_labels(), CSTPLossWeights())
    assert default_total.item() == explicit_total.item()


@pytest.mark.parametrize("task", ["speed", "rotation"])
def test_speed_and_rotation_are_summed_over_both_views(task):
    only = CSTPLossWeights(byol=0, spatial=0, temporal=0, speed=0, rotation=0)
    setattr(only, task, 1.0)
    total, terms, _ = cstp_loss(hand_made_outputs(), hand_made_labels(), only)
    # The logged term is the per-view mean; the loss carries the per-view sum: 2x.
    assert total.item() == pytest.approx(2 * terms[task].item(), rel=1e-6)
    hand = {"speed": LN2 + LN5, "rotation": LN5 + 2 * LN2}[task]
    assert total.item() == pytest.approx(hand, rel=1e-6)


def test_each_weight_scales_its_own_term():
    base_total, terms, _ = cstp_loss(hand_made_outputs(), hand_made_labels(), CSTPLossWeights())
    doubled_byol, _, _ = cstp_loss(hand_made_outputs(), hand_made_labels(), CSTPLossWeights(byol=0.2))
    assert (doubled_byol - base_total).item() == pytest.approx(0.1 * terms["byol"].item(), rel=1e-5)
    no_spatial, _, _ = cstp_loss(hand_made_outputs(), hand_made_labels(), CSTPLossWeights(spatial=0))
    assert (base_total - no_spatial).item() == pytest.approx(terms["spatial"].item(), rel=1e-5)


def test_gradient_reaches_predictions_but_not_target_projections():
    outputs = {k: v.clone().requires_grad_(True) for k, v in hand_made_outputs().items()}
    total, terms, accuracies = cstp_loss(outputs, hand_made_labels())
    total.backward()
    assert outputs["q1"].grad is not None and outputs["q1"].grad.abs().sum() > 0
    assert outputs["spatial"].grad is not None
    assert outputs["target_z1"].grad is None and outputs["target_z2"].grad is None
    assert all(not t.requires_grad for t in terms.values())
    assert all(not a.requires_grad for a in accuracies.values())

"""The CSTP pretraining loss (docs/method.md#loss).

    L = w_byol·mean_b[byol(q1, z'2) + byol(q2, z'1)]
      + w_spatial·CE_spatial + w_temporal·CE_temporal
      + w_speed·(CE_speed,view1 + CE_speed,view2)
      + w_rotation·(CE_rot,view1 + CE_rot,view2)

Speed and rotation are summed over the two views, not averaged, as in the
reference (its `main_byol.py`; docs/method.md#loss); the logged terms are the
per-view averages, as the reference prints them.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def byol_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-sample 2 − 2·cos(q, z), in [0, 4]; shape (B,).

    Computed in float32 so that a bf16 forward does not round the cosine.
    """
    q = F.normalize(q.float(), dim=-1)
    z = F.normalize(z.float(), dim=-1)
    return 2 - 2 * (q * z).sum(dim=-1)


@dataclass
class CSTPLossWeights:
    """`--loss_weight 0.1 1 1 1 1` of the reference recipe."""

    byol: float = 0.1
    spatial: float = 1.0
    temporal: float = 1.0
    speed: float = 1.0
    rotation: float = 1.0


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == labels).float().mean()


def cstp_loss(outputs: dict, labels: dict, weights: CSTPLossWeights | None = None):
    """Returns (total, terms, accuracies).

    `outputs` is `CSTPModel.forward`'s dict; `labels` holds int64 tensors
    spatial_label, temporal_label, speed_label (shared by both views), rot1, rot2.
    `terms` and `accuracies` are detached scalar tensors, ready to all_reduce.
    """
    if weights is None:
        weights = CSTPLossWeights()
    # Symmetric BYOL: each view's prediction regresses the other view's target projection.
    byol = (
        byol_loss(outputs["q1"], outputs["target_z2"].detach())
        + byol_loss(outputs["q2"], outputs["target_z1"].detach())
    ).mean()
    spatial = F.cross_entropy(outputs["spatial"], labels["spatial_label"])
    temporal = F.cross_entropy(outputs["temporal"], labels["temporal_label"])
    speed1 = F.cross_entropy(outputs["speed1"], labels["speed_label"])
    speed2 = F.cross_entropy(outputs["speed2"], labels["speed_label"])
    rotation1 = F.cross_entropy(outputs["rotation1"], labels["rot1"])
    rotation2 = F.cross_entropy(outputs["rotation2"], labels["rot2"])

    total = (
        weights.byol * byol
        + weights.spatial * spatial
        + weights.temporal * temporal
        + weights.speed * (speed1 + speed2)
        + weights.rotation * (rotation1 + rotation2)
    )

    terms = {
        "byol": byol,
        "spatial": spatial,
        "temporal": temporal,
        "speed": (speed1 + speed2) / 2,
        "rotation": (rotation1 + rotation2) / 2,
        "total": total,
    }
    terms = {name: value.detach().float() for name, value in terms.items()}
    accuracies = {
        "spatial": _accuracy(outputs["spatial"], labels["spatial_label"]),
        "temporal": _accuracy(outputs["temporal"], labels["temporal_label"]),
        "speed": (_accuracy(outputs["speed1"], labels["speed_label"])
                  + _accuracy(outputs["speed2"], labels["speed_label"])) / 2,
        "rotation": (_accuracy(outputs["rotation1"], labels["rot1"])
                     + _accuracy(outputs["rotation2"], labels["rot2"])) / 2,
    }
    return total, terms, accuracies

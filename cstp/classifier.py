"""The finetuning / test model: the R(2+1)D backbone and the reference head (docs/method.md#finetuning).

    clip ─ backbone ─ y (feature_dim) ─ L2-normalise ─ BatchNorm1d ─ Linear ─ logits

No dropout, no projector. The head is newly initialised with the reference's
Glorot init (BN γ of random sign included, docs/method.md#initialisation), as is a backbone that is
trained from scratch.

`frozen=True` is the linear probe: the backbone's parameters do not train and
its BatchNorm layers stay in eval mode (running statistics frozen too), so the
features are exactly the pretrained ones; only the head learns.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models.cstp_model import reference_init_
from .models.r2plus1d import R2Plus1D10


class ClassifierHead(nn.Module):
    def __init__(self, feature_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(feature_dim)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(F.normalize(features, dim=1)))


class VideoClassifier(nn.Module):
    def __init__(self, backbone: R2Plus1D10, num_classes: int, frozen: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = reference_init_(ClassifierHead(backbone.feature_dim, num_classes))
        self.frozen = frozen
        if frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.head.fc.out_features

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()   # a linear probe must not move the BN running statistics
        return self

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        return self.backbone(clips)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(clips))


def build_classifier(width: float, num_classes: int, backbone_state: dict | None = None,
                     frozen: bool = False) -> VideoClassifier:
    """A classifier whose backbone is `backbone_state` (strictly matching keys), or
    reference-initialised when None (training from scratch)."""
    backbone = R2Plus1D10(width)
    if backbone_state is None:
        reference_init_(backbone)
    else:
        backbone.load_state_dict(backbone_state)
    return VideoClassifier(backbone, num_classes, frozen=frozen)

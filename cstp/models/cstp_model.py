"""CSTP: BYOL on R(2+1)D plus the four pretext heads (docs/method.md#overview).

    view ─ online backbone ─ y ─ projector ─ z ─ predictor ─ q     (trained)
    view ─ target backbone ─── ─ projector ─ z'                    (EMA of online, no grad)
    y1,y2 ─ overlap_spatial / overlap_temporal (on concat(y1, y2)), speed, rotation (on each y)

The EMA update is not part of forward (the reference does it inside forward,
docs/deviations.md#ema-update-outside-forward): the training engine calls `update_target()` once per iteration,
right before forward, which is the same order and keeps forward free of side
effects for DistributedDataParallel.
"""

import math

import torch
import torch.nn as nn

from .r2plus1d import R2Plus1D10


def reference_init_(module: nn.Module) -> nn.Module:
    """The reference initialisation (docs/method.md#initialisation; the reference's `models/pace/r21d_byol.py`).

    Glorot-uniform on Linear and Conv3d weights, and also on BatchNorm γ: for a
    1-D tensor Glorot takes fan_in = fan_out = C/2, so γ ~ U(±sqrt(6/C)) —
    small and of random sign (docs/method.md#initialisation), unlike the usual γ = 1. β = 0;
    Linear biases keep PyTorch's default.
    """
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            nn.init.xavier_uniform_(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            bound = math.sqrt(6.0 / m.num_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)
    return module


def mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear → BN1d → ReLU → Linear: the shape of every projector, predictor and head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class Encoder(nn.Module):
    """Backbone + projector: one branch of BYOL. Returns (y, z)."""

    def __init__(self, backbone_width: float, proj_hidden: int, proj_dim: int):
        super().__init__()
        self.backbone = R2Plus1D10(backbone_width)
        self.projector = mlp(self.backbone.feature_dim, proj_hidden, proj_dim)

    def forward(self, x):
        y = self.backbone(x)
        return y, self.projector(y)


class CSTPModel(nn.Module):
    def __init__(
        self,
        backbone_width: float = 1.0,
        proj_hidden: int = 4096,
        proj_dim: int = 512,
        ema_tau: float = 0.996,
        target_init: str = "independent",
        num_speed_classes: int = 5,
        num_rotation_classes: int = 5,
        num_overlap_classes: int = 5,
    ):
        super().__init__()
        if target_init not in ("independent", "copy"):
            raise ValueError(f"target_init must be 'independent' or 'copy', got {target_init!r}")
        self.ema_tau = ema_tau

        self.online = Encoder(backbone_width, proj_hidden, proj_dim)
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        feature_dim = self.online.backbone.feature_dim
        self.feature_dim = feature_dim

        # Pretext heads read the online backbone's pooled feature y, not the projection (docs/method.md#pretext-heads).
        # The 4-class tasks keep the reference's 5 logits (docs/method.md#pretext-heads).
        self.overlap_spatial = mlp(2 * feature_dim, 2 * feature_dim, num_overlap_classes)
        self.overlap_temporal = mlp(2 * feature_dim, 2 * feature_dim, num_overlap_classes)
        self.speed = mlp(feature_dim, feature_dim, num_speed_classes)
        self.rotation = mlp(feature_dim, feature_dim, num_rotation_classes)

        self.target = Encoder(backbone_width, proj_hidden, proj_dim)

        reference_init_(self)  # online, heads and target, each with its own random draws
        if target_init == "copy":
            # Standard BYOL. The reference instead starts the target from its own
            # random init (docs/method.md#byol-branch), which is the default here.
            self.target.load_state_dict(self.online.state_dict())
        for p in self.target.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update_target(self) -> None:
        """ξ ← τ·ξ + (1−τ)·θ on parameters only; the target's BN buffers are not averaged (docs/method.md)."""
        for target_param, online_param in zip(self.target.parameters(), self.online.parameters()):
            target_param.mul_(self.ema_tau).add_(online_param, alpha=1.0 - self.ema_tau)

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> dict:
        # Each view goes through each network on its own, so every BN sees one view (docs/method.md#byol-branch).
        y1, z1 = self.online(view1)
        y2, z2 = self.online(view2)
        with torch.no_grad():
            # The target follows the model's mode; in training it uses batch statistics, as in the reference.
            _, target_z1 = self.target(view1)
            _, target_z2 = self.target(view2)

        pair = torch.cat([y1, y2], dim=1)  # order (view 1, view 2) as in the reference
        return {
            "q1": self.predictor(z1),
            "q2": self.predictor(z2),
            "target_z1": target_z1,
            "target_z2": target_z2,
            "spatial": self.overlap_spatial(pair),
            "temporal": self.overlap_temporal(pair),
            "speed1": self.speed(y1),
            "speed2": self.speed(y2),
            "rotation1": self.rotation(y1),
            "rotation2": self.rotation(y2),
            "y1": y1,
            "y2": y2,
        }

    def online_backbone_state_dict(self) -> dict:
        """The online backbone's weights alone (keys as in a plain `R2Plus1D10`), for export and finetuning."""
        return self.online.backbone.state_dict()

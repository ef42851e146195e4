"""The reference learning-rate curve (docs/method.md#optimisation): linear warm-up from
min_lr to the peak over `warmup_epochs`, then a half cosine back to min_lr.

The reference steps it once per epoch (epoch 1 runs at min_lr, epoch W+1 at the
peak); `progress` may also be fractional for a per-step schedule.
"""

from __future__ import annotations

import math


def warmup_cosine_lr(progress: float, epochs: int, warmup_epochs: float, peak_lr: float,
                     min_lr: float = 1e-5) -> float:
    """LR at `progress` epochs into training (0-based: 0 is the first epoch)."""
    if warmup_epochs > 0 and progress < warmup_epochs:
        return min_lr + (peak_lr - min_lr) * progress / warmup_epochs
    decay_epochs = max(epochs - warmup_epochs, 1e-12)
    t = min(max(progress - warmup_epochs, 0.0) / decay_epochs, 1.0)
    return min_lr + (peak_lr - min_lr) * (1 + math.cos(math.pi * t)) / 2

"""Which samples each DDP rank reads in each epoch.

Every rank must run the same number of steps (unequal shards hang or crash DDP,
docs/architecture.md#sharding-across-ranks), so each rank gets `samples_per_rank` samples, a multiple
of the batch size. Shards are disjoint; the few samples left over change every
epoch because the order is reshuffled per epoch with a seed shared by all ranks.
"""

from __future__ import annotations

import numpy as np


def samples_per_rank(num_samples: int, world_size: int, batch_size: int) -> int:
    per_rank = (num_samples // world_size) // batch_size * batch_size
    if per_rank == 0:
        raise ValueError(
            f"{num_samples} samples cannot give every one of {world_size} rank(s) a full batch of "
            f"{batch_size}; use a smaller batch size or fewer ranks")
    return per_rank


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The dataset order of one epoch, identical on every rank."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples).astype(np.int64)


def shard_indices(num_samples: int, rank: int, world_size: int, batch_size: int, seed: int, epoch: int,
                  shuffle: bool = True) -> np.ndarray:
    """Dataset indices rank `rank` reads in `epoch`, in order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    per_rank = samples_per_rank(num_samples, world_size, batch_size)
    order = epoch_order(num_samples, seed, epoch, shuffle)
    return order[rank::world_size][:per_rank]

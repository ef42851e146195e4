import numpy as np
import pytest

from pipelines.sharding import epoch_order, samples_per_rank, shard_indices


@pytest.mark.parametrize("num_samples", [17, 40, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("batch", [1, 4])
def test_shards_are_equal_disjoint_multiples_of_the_batch(num_samples, world, batch):
    for epoch in range(3):
        shards = [shard_indices(num_samples, r, world, batch, seed=1, epoch=epoch) for r in range(world)]
        sizes = {len(s) for s in shards}
        assert sizes == {samples_per_rank(num_samples, world, batch)}
        assert sizes.pop() % batch == 0
        flat = np.concatenate(shards)
        assert len(set(flat.tolist())) == len(flat)
        assert flat.min() >= 0 and flat.max() < num_samples
        # at most world*batch-1 samples left out, the rest covered
        assert num_samples - len(flat) < world * batch


def test_order_reshuffles_every_epoch_identically_on_all_ranks():
    a, b = epoch_order(100, 1, 0), epoch_order(100, 1, 1)
    assert sorted(a.tolist()) == list(range(100)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_order(100, 1, 0))
    assert np.array_equal(epoch_order(10, 1, 5, shuffle=False), np.arange(10))


def test_left_out_samples_change_between_epochs():
    left_out = set()
    for epoch in range(20):
        kept = np.concatenate([shard_indices(10, r, 2, 4, seed=0, epoch=epoch) for r in range(2)])
        left_out |= set(range(10)) - set(kept.tolist())
    assert left_out == set(range(10))


def test_too_small_dataset_is_refused_with_a_message():
    with pytest.raises(ValueError, match="full batch"):
        samples_per_rank(5, 2, 4)

"""Resuming with train.channels_last toggled: CUDA's fused SGD needs parameters, gradients
and momentum buffers with identical strides, and Optimizer.load_state_dict keeps the
checkpoint's. The Trainer re-lays the buffers like their parameters (same values)."""

import pytest
import torch

from bench.measure import synthetic_batch
from cstp.config import load_config
from cstp.engine import Trainer

TINY = ["model.width=0.0625", "proj_hidden=32", "proj_dim=16", "plan.frames=4", "crop_size=32", "batch_size=2",
        "train.threads=1", "device=cpu", "tensorboard=false"]


class _Loader:   # what Trainer reads of a loader
    batch_size = 2
    steps_per_epoch = 4


def trainer(tmp_path, channels_last: bool, resume_state=None) -> Trainer:
    cfg = load_config(None, [*TINY, f"train.channels_last={str(channels_last).lower()}"])
    return Trainer(cfg, _Loader(), tmp_path, torch.device("cpu"), resume_state=resume_state)


def momentum(t: Trainer) -> dict[str, torch.Tensor]:
    names = {p: n for n, p in t.model.named_parameters()}
    return {names[p]: s["momentum_buffer"] for p, s in t.optimizer.state.items() if "momentum_buffer" in s}


@pytest.mark.parametrize("written, resumed", [(True, False), (False, True)])
def test_momentum_buffers_take_their_parameters_strides_after_a_toggled_resume(tmp_path, written, resumed):
    first = trainer(tmp_path, written)
    first.train_step(synthetic_batch(first.cfg, torch.device("cpu")), 0.01)
    state = first.state_dict()
    saved = momentum(first)
    # the toggle matters only if some buffer's layout differs between the two settings
    assert any(b.dim() == 5 and not b.is_contiguous() for b in saved.values()) == written

    second = trainer(tmp_path, resumed, resume_state=state)
    params = dict(second.model.named_parameters())
    loaded = momentum(second)
    assert set(loaded) == set(saved)
    relaid = 0
    for name, buffer in loaded.items():
        assert buffer.stride() == params[name].stride(), name
        assert torch.equal(buffer, saved[name]), name        # values kept
        relaid += saved[name].stride() != buffer.stride()
    assert relaid > 0                                        # the test exercised a re-lay
    second.train_step(synthetic_batch(second.cfg, torch.device("cpu")), 0.01)
    for name, p in second.model.named_parameters():
        if p.grad is not None:
            assert p.grad.stride() == p.stride(), name

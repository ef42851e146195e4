"""R(2+1)D-10 and the CSTP model against the numbers of docs/method.md#backbone and #pretext-heads."""

import math

import pytest
import torch
import torch.nn as nn

from cstp.losses import cstp_loss
from cstp.models.cstp_model import CSTPModel, reference_init_
from cstp.models.r2plus1d import R2Plus1D10, SpatioTemporalConv


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stconv_widths(module: nn.Module) -> list:
    return [m.intermediate_channels for m in module.modules() if isinstance(m, SpatioTemporalConv)]


def random_labels(batch: int) -> dict:
    return {
        "spatial_label": torch.randint(0, 5, (batch,)),
        "temporal_label": torch.randint(0, 5, (batch,)),
        "speed_label": torch.randint(0, 4, (batch,)),
        "rot1": torch.randint(0, 4, (batch,)),
        "rot2": torch.randint(0, 4, (batch,)),
    }


def small_model(**kwargs) -> CSTPModel:
    """A CPU-cheap model: quarter-width backbone, narrow projector."""
    kwargs = {"backbone_width": 0.25, "proj_hidden": 64, "proj_dim": 32, **kwargs}
    return CSTPModel(**kwargs)


@pytest.fixture(scope="module")
def full_model():
    torch.manual_seed(0)
    return CSTPModel()


# --- backbone ---------------------------------------------------------------------------------


def test_backbone_has_the_reference_parameter_count():
    backbone = R2Plus1D10()
    assert count(backbone) == 14_365_303
    assert backbone.feature_dim == 512


def test_factorised_conv_widths_match_the_spec_table():
    backbone = R2Plus1D10()
    assert stconv_widths(backbone.stem) == [83]
    assert stconv_widths(backbone.conv2) == [144, 144]
    # Each downsampling stage: c1, c2, then the k=1 shortcut ("ds").
    assert stconv_widths(backbone.conv3) == [230, 288, 42]
    assert stconv_widths(backbone.conv4) == [460, 576, 85]
    assert stconv_widths(backbone.conv5) == [921, 1152, 170]


def test_convs_have_no_bias_and_there_is_no_max_pool():
    backbone = R2Plus1D10()
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 2 * 12
    assert all(c.bias is None for c in convs)
    assert not any(isinstance(m, nn.MaxPool3d) for m in backbone.modules())


def test_stage_output_shapes_at_full_width():
    backbone = R2Plus1D10().eval()
    shapes = {}
    for name in ("stem", "conv2", "conv3", "conv4", "conv5"):
        getattr(backbone, name).register_forward_hook(
            lambda module, inputs, output, name=name: shapes.__setitem__(name, tuple(output.shape[1:]))
        )
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 16, 112, 112))
    assert shapes == {
        "stem": (64, 16, 56, 56),
        "conv2": (64, 16, 56, 56),
        "conv3": (128, 8, 28, 28),
        "conv4": (256, 4, 14, 14),
        "conv5": (512, 2, 7, 7),
    }
    assert features.shape == (1, 512)


def test_width_scales_every_stage():
    backbone = R2Plus1D10(width=0.25)
    assert backbone.stage_channels == (16, 32, 64, 128)
    assert backbone.feature_dim == 128
    assert R2Plus1D10(width=0.01).stage_channels == (4, 4, 4, 5)  # never below 4 channels


def test_channels_last_3d_forward_matches_contiguous():
    torch.manual_seed(0)
    backbone = R2Plus1D10(width=0.25).eval()
    clip = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        expected = backbone(clip)
        backbone = backbone.to(memory_format=torch.channels_last_3d)
        got = backbone(clip.to(memory_format=torch.channels_last_3d))
    assert got.shape == (2, 128)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


# --- CSTP model: structure --------------------------------------------------------------------


def test_cstp_part_parameter_counts(full_model):
    m = full_model
    assert count(m.online.projector) == 4_207_104
    assert count(m.predictor) == 4_207_104
    assert count(m.overlap_spatial) == 1_056_773
    assert count(m.overlap_temporal) == 1_056_773
    assert count(m.speed) == 266_245
    assert count(m.rotation) == 266_245
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == 25_425_547  # ≈ 25.43 M (docs/method.md#pretext-heads)
    assert count(m.target) == 18_572_407  # ≈ 18.57 M, all frozen
    assert all(not p.requires_grad for p in m.target.parameters())
    assert not hasattr(m.target, "predictor")


def test_forward_output_shapes_at_full_width(full_model):
    clip = torch.randn(2, 3, 16, 112, 112)
    with torch.no_grad():
        out = full_model(clip, clip)
    expected = {
        "q1": (2, 512), "q2": (2, 512), "target_z1": (2, 512), "target_z2": (2, 512),
        "spatial": (2, 5), "temporal": (2, 5), "speed1": (2, 5), "speed2": (2, 5),
        "rotation1": (2, 5), "rotation2": (2, 5), "y1": (2, 512), "y2": (2, 512),
    }
    assert {k: tuple(v.shape) for k, v in out.items()} == expected


def test_forward_output_shapes_at_quarter_width():
    model = CSTPModel(backbone_width=0.25)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 64, 64), torch.randn(2, 3, 8, 64, 64))
    assert model.feature_dim == 128
    assert out["y1"].shape == (2, 128) and out["y2"].shape == (2, 128)
    assert out["q1"].shape == (2, 512) and out["target_z2"].shape == (2, 512)
    assert model.overlap_spatial[0].in_features == 256  # concat(y1, y2)
    for key in ("spatial", "temporal", "speed1", "speed2", "rotation1", "rotation2"):
        assert out[key].shape == (2, 5)


def test_pair_heads_read_view1_then_view2():
    torch.manual_seed(0)
    # Train mode: BN uses batch statistics, so recomputing a head on the same batch reproduces it.
    model = small_model().train()
    a, b = torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        out = model(a, b)
        expected = model.overlap_spatial(torch.cat([out["y1"], out["y2"]], dim=1))
        swapped = model.overlap_spatial(torch.cat([out["y2"], out["y1"]], dim=1))
        torch.testing.assert_close(out["spatial"], expected)
        assert not torch.allclose(out["spatial"], swapped)
        torch.testing.assert_close(out["speed2"], model.speed(model.online.backbone(b)))


# --- initialisation ---------------------------------------------------------------------------


def test_batchnorm_gamma_is_glorot_with_random_sign(full_model):
    norms = [m for m in full_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 50
    for bn in norms:
        bound = math.sqrt(6.0 / bn.num_features)
        gamma = bn.weight.detach()
        assert gamma.abs().max() <= bound
        assert gamma.abs().max() > 0.5 * bound  # spread over the range, not e.g. all near 0
        assert (gamma > 0).any() and (gamma < 0).any()  # random sign, not γ = 1
        assert torch.all(bn.bias == 0)


def test_linear_and_conv_weights_are_glorot_uniform(full_model):
    for m in full_model.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d)):
            receptive = m.weight[0, 0].numel()
            fan_in, fan_out = m.weight.shape[1] * receptive, m.weight.shape[0] * receptive
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w = m.weight.detach()
            assert w.abs().max() <= bound
            assert w.abs().max() > 0.9 * bound
    # Linear biases keep PyTorch's default U(±1/sqrt(fan_in)), which is not zero.
    first = full_model.online.projector[0]
    assert first.bias.abs().max() <= 1 / math.sqrt(first.in_features)
    assert first.bias.abs().max() > 0


def test_reference_init_changes_pytorch_defaults():
    bn = nn.BatchNorm3d(64)
    assert torch.all(bn.weight == 1)
    reference_init_(bn)
    assert torch.all(bn.weight.abs() <= math.sqrt(6 / 64)) and (bn.weight < 0).any()


def test_target_is_independent_by_default_and_a_copy_on_request():
    torch.manual_seed(0)
    independent = small_model()
    pairs = list(zip(independent.online.named_parameters(), independent.target.parameters()))
    for (name, online), target in pairs:
        assert online.shape == target.shape
        if not name.endswith("bias") or online.any():  # BN β is 0 in both
            assert not torch.equal(online, target), name

    copied = small_model(target_init="copy")
    online_state, target_state = copied.online.state_dict(), copied.target.state_dict()
    assert online_state.keys() == target_state.keys()
    for key in online_state:
        assert torch.equal(online_state[key], target_state[key])
    assert all(not p.requires_grad for p in copied.target.parameters())

    with pytest.raises(ValueError):
        small_model(target_init="deepcopy")


# --- target / EMA -----------------------------------------------------------------------------


def test_update_target_is_the_ema_on_parameters_only():
    torch.manual_seed(0)
    tau = 0.9
    model = small_model(ema_tau=tau)
    # Make the online BN buffers differ from the target's, so copying them would show.
    with torch.no_grad():
        for buffer in model.online.buffers():
            if buffer.is_floating_point():
                buffer.add_(1.0)
    online = [p.detach().clone().double() for p in model.online.parameters()]
    target = [p.detach().clone().double() for p in model.target.parameters()]
    target_buffers = [b.clone() for b in model.target.buffers()]

    model.update_target()

    for after, t, o in zip(model.target.parameters(), target, online):
        torch.testing.assert_close(after.double(), tau * t + (1 - tau) * o, rtol=0, atol=1e-6)
        assert not after.requires_grad
    for after, before in zip(model.target.buffers(), target_buffers):
        assert torch.equal(after, before)
    # The online network is left alone.
    for p, o in zip(model.online.parameters(), online):
        assert torch.equal(p.double(), o)


def test_forward_does_not_update_the_target():
    torch.manual_seed(0)
    model = small_model()
    before = [p.clone() for p in model.target.parameters()]
    model(torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32))
    assert all(torch.equal(p, b) for p, b in zip(model.target.parameters(), before))


def test_target_outputs_carry_no_graph():
    model = small_model()
    out = model(torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32))
    assert not out["target_z1"].requires_grad and not out["target_z2"].requires_grad
    assert out["q1"].requires_grad and out["spatial"].requires_grad


# --- training ---------------------------------------------------------------------------------


def test_one_sgd_step_trains_every_online_parameter_and_no_target_parameter():
    torch.manual_seed(0)
    model = small_model().train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    online_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    target_before = [p.detach().clone() for p in model.target.parameters()]

    out = model(torch.randn(4, 3, 8, 32, 32), torch.randn(4, 3, 8, 32, 32))
    total, terms, _ = cstp_loss(out, random_labels(4))
    assert torch.isfinite(total)
    total.backward()

    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"
            assert torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None
    optimizer.step()

    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, online_before[n])]
    assert len(changed) == len(online_before)
    assert all(torch.equal(p, b) for p, b in zip(model.target.parameters(), target_before))


def test_every_online_output_backpropagates_into_the_backbone():
    torch.manual_seed(0)
    model = small_model().train()
    out = model(torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32))
    stem_weight = model.online.backbone.stem[0].spatial_conv.weight
    for key in ("q1", "q2", "spatial", "temporal", "speed1", "speed2", "rotation1", "rotation2"):
        (grad,) = torch.autograd.grad(out[key].pow(2).sum(), stem_weight, retain_graph=True)
        assert grad.abs().sum() > 0, key


def test_online_backbone_state_dict_loads_into_a_plain_backbone():
    torch.manual_seed(0)
    model = small_model().train()  # batch statistics: eval-mode features at init are all ~0
    backbone = R2Plus1D10(width=0.25).train()
    backbone.load_state_dict(model.online_backbone_state_dict())  # strict: same keys
    clip = torch.randn(2, 3, 8, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone(clip), model(clip, clip)["y1"])


def test_trains_under_ddp_without_unused_parameters(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = small_model()
        ddp = DistributedDataParallel(model)  # find_unused_parameters=False: an unused one would raise
        optimizer = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.01)
        for _ in range(3):
            ddp.module.update_target()
            out = ddp(torch.randn(2, 3, 8, 32, 32), torch.randn(2, 3, 8, 32, 32))
            total, _, _ = cstp_loss(out, random_labels(2))
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
        assert torch.isfinite(total)
    finally:
        dist.destroy_process_group()

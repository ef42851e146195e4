"""Every backbone checkpoint kind loads into R2Plus1D10; wrong files are refused with
a message that says what was expected."""

import re

import pytest
import torch

from cstp.backbone_io import BackboneLoadError, load_backbone
from cstp.models.cstp_model import CSTPModel
from cstp.models.r2plus1d import R2Plus1D10

WIDTH = 0.125


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    return CSTPModel(backbone_width=WIDTH, proj_hidden=16, proj_dim=8)


def assert_same(state, model):
    expected = model.online_backbone_state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_pretraining_checkpoint_gives_the_online_backbone(tmp_path, pretrained):
    path = tmp_path / "ckpt_000000010.pt"
    torch.save({"format": "cstp-dali-checkpoint", "model": pretrained.state_dict(),
                "config": {"model": {"width": WIDTH}}, "position": {"epoch": 1, "sample": 0, "step": 10}}, path)
    loaded = load_backbone(path)
    assert loaded.kind == "pretraining checkpoint" and loaded.width == WIDTH
    assert_same(loaded.state_dict, pretrained)
    # the online backbone, not the EMA target (which is initialised independently)
    assert not torch.equal(loaded.state_dict["stem.0.spatial_conv.weight"],
                           pretrained.target.backbone.stem[0].spatial_conv.weight)


def test_exported_backbone(tmp_path, pretrained):
    path = tmp_path / "backbone.pt"
    torch.save({"format": "cstp-dali-backbone", "arch": "r2plus1d10", "width": WIDTH, "step": 3,
                "state_dict": pretrained.online_backbone_state_dict()}, path)
    loaded = load_backbone(path, expected_width=WIDTH)
    assert loaded.kind == "exported backbone"
    assert_same(loaded.state_dict, pretrained)
    R2Plus1D10(loaded.width).load_state_dict(loaded.state_dict)


def to_reference_name(key: str) -> str:
    """Our R2Plus1D10 key -> VCOP R2Plus1DNet naming (the inverse of backbone_io's map)."""
    key = re.sub(r"^stem\.0\.", "conv1.", key)
    key = re.sub(r"^stem\.1\.", "bn1.", key)
    key = re.sub(r"^(conv[2-5])\.shortcut\.0\.", r"\1.block1.downsampleconv.", key)
    key = re.sub(r"^(conv[2-5])\.shortcut\.1\.", r"\1.block1.downsamplebn.", key)
    return re.sub(r"^(conv[2-5])\.(conv1|bn1|conv2|bn2)\.", r"\1.block1.\2.", key)


@pytest.mark.parametrize("encoder_prefix", ["", "base_network."])
def test_reference_checkpoint_drops_everything_but_the_online_backbone(tmp_path, pretrained, encoder_prefix):
    state = {}
    for key, value in pretrained.online_backbone_state_dict().items():
        state[f"module.online_net.{encoder_prefix}{to_reference_name(key)}"] = value
    for key, value in pretrained.online.projector.state_dict().items():
        state[f"module.online_net.projector.{key}"] = value
    for key, value in pretrained.target.backbone.state_dict().items():
        state[f"module.target_net.{encoder_prefix}{to_reference_name(key)}"] = value + 1
    state["module.predictor.0.weight"] = torch.zeros(3, 3)
    state["module.pb_cls.0.weight"] = torch.zeros(5, 3)
    path = tmp_path / "save_300.pth"
    torch.save({"epoch": 300, "arch": "r21d_byol-1", "state_dict": state}, path)
    loaded = load_backbone(path)
    assert loaded.kind == "reference checkpoint"
    assert loaded.width == WIDTH          # told from conv5's width
    assert_same(loaded.state_dict, pretrained)


def test_wrong_width_says_which_width_the_file_holds(tmp_path, pretrained):
    path = tmp_path / "backbone.pt"
    torch.save({"format": "cstp-dali-backbone", "width": WIDTH,
                "state_dict": pretrained.online_backbone_state_dict()}, path)
    with pytest.raises(BackboneLoadError, match=r"width-0.125 backbone but model.width=1 .*model.width=0.125"):
        load_backbone(path, expected_width=1.0)


def test_missing_keys_and_wrong_shapes_are_named(tmp_path, pretrained):
    state = dict(pretrained.online_backbone_state_dict())
    del state["conv3.shortcut.1.running_mean"]
    state["conv4.conv1.temporal_conv.weight"] = torch.zeros(2, 2, 3, 1, 1)
    path = tmp_path / "backbone.pt"
    torch.save({"format": "cstp-dali-backbone", "width": WIDTH, "state_dict": state}, path)
    with pytest.raises(BackboneLoadError) as err:
        load_backbone(path)
    message = str(err.value)
    assert "1 missing keys (e.g. conv3.shortcut.1.running_mean)" in message
    assert "1 wrong shapes (e.g. conv4.conv1.temporal_conv.weight: file (2, 2, 3, 1, 1)" in message
    assert "R2Plus1D10(0.125)" in message


def test_a_width_mismatch_inside_the_file_is_caught(tmp_path, pretrained):
    path = tmp_path / "backbone.pt"     # claims width 0.25 but holds a 0.125 network
    torch.save({"format": "cstp-dali-backbone", "width": 0.25,
                "state_dict": pretrained.online_backbone_state_dict()}, path)
    with pytest.raises(BackboneLoadError, match="does not fit an R\\(2\\+1\\)D-10 of width 0.25.*wrong shapes"):
        load_backbone(path)


def test_unknown_files_list_the_accepted_kinds(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(BackboneLoadError, match="not a backbone checkpoint I know.*expected one of: our pretraining"):
        load_backbone(path)
    torch.save({"format": "something-else"}, path)
    with pytest.raises(BackboneLoadError, match="unknown checkpoint format 'something-else'"):
        load_backbone(path)
    with pytest.raises(BackboneLoadError, match="not found.*expected one of"):
        load_backbone(tmp_path / "missing.pt")
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n')
    with pytest.raises(BackboneLoadError, match="metrics.jsonl is not a PyTorch checkpoint file"):
        load_backbone(log)


class Pickled:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "cstp-dali-backbone", "obj": Pickled()}, path)
    with pytest.raises(BackboneLoadError, match="pickled Python objects"):
        load_backbone(path)


@pytest.mark.parametrize("damage, message", [
    (lambda s, w: ({**s, "stem.0.bn.weight": s["stem.0.bn.weight"] * float("nan")}, w),
     "1 tensors with NaN or infinite values (e.g. stem.0.bn.weight)"),
    (lambda s, w: ({**s, "conv5.bn2.bias": torch.full_like(s["conv5.bn2.bias"], float("inf"))}, w),
     "1 tensors with NaN or infinite values (e.g. conv5.bn2.bias)"),
    (lambda s, w: ({**s, "stem.0.bn.weight": 3}, w), "1 values that are not tensors (e.g. stem.0.bn.weight)"),
    (lambda s, w: (s, "wide"), "its 'width' entry is 'wide', not a number"),
    (lambda s, w: (s, -1.0), "its 'width' entry is -1.0, not a number"),
    (lambda s, w: (s, True), "its 'width' entry is True, not a number"),
    (lambda s, w: ({**s, "conv5.bn2.weight": torch.ones(10 ** 6)}, None), "not a number in (0, 4]"),
])
def test_non_finite_non_tensor_values_and_a_bad_width_are_refused(tmp_path, pretrained, damage, message):
    """A backbone file with NaN weights (a diverged run), a value that is not a tensor or a width that
    is no number: one line, never a traceback, never a model that silently computes NaN features."""
    state, width = damage(pretrained.online_backbone_state_dict(), WIDTH)
    path = tmp_path / "backbone.pt"
    torch.save({"format": "cstp-dali-backbone", "width": width, "state_dict": state}, path)
    with pytest.raises(BackboneLoadError) as caught:
        load_backbone(path)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_finetune_checkpoints_are_checked_before_evaluate_builds_the_classifier(tmp_path):
    from cstp.backbone_io import load_classifier
    from cstp.classifier import build_classifier

    good = {"format": "cstp-dali-finetune", "width": WIDTH, "num_classes": 3,
            "model": build_classifier(WIDTH, 3).state_dict()}
    assert load_classifier(good, "best.pt").num_classes == 3
    for raw, message in [
        ({**good, "num_classes": 7}, "2 wrong shapes (e.g. head.fc.weight: file (3, 64) vs model (7, 64)"),
        ({k: v for k, v in good.items() if k != "width"}, "its 'width' entry is None"),
        ({**good, "num_classes": "3"}, "its 'num_classes' entry is '3'"),
        ({**good, "model": {k: v for k, v in good["model"].items() if not k.startswith("head.")}},
         "missing keys (e.g. head.bn.weight"),
        ({**good, "model": {k: v * float("nan") if v.is_floating_point() else v for k, v in good["model"].items()}},
         "tensors with NaN or infinite values"),
        ({**good, "model": [1, 2]}, "its weights are a list"),
    ]:
        with pytest.raises(BackboneLoadError, match=re.escape(message)):
            load_classifier(raw, "best.pt")

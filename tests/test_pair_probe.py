"""scripts/pair_probe.py: reading a pair label off frozen features (a `make proof` diagnostic)."""

import torch

from preprocessing import proof_data as pd
from preprocessing.demo_data import DemoVideo

from .lmdb_fixtures import write_lmdb
from .scripts_loader import load_script


pair_probe = load_script("pair_probe")


def test_the_fresh_head_reads_a_label_coded_in_the_pair_and_not_one_that_is_not():
    torch.manual_seed(0)
    n, dim = 1000, 8
    labels = torch.randint(0, 5, (n,))
    view1 = torch.randn(n, dim)
    view2 = view1.clone()
    view2[:, 0] += labels.float()          # the label is the views' difference along one feature
    x = torch.cat([view1, view2], 1)
    accuracy, majority = pair_probe.fresh_head_accuracy(x, labels, steps=1500)
    assert accuracy >= majority + 0.4, (accuracy, majority)
    shuffled = labels[torch.randperm(n)]
    accuracy, majority = pair_probe.fresh_head_accuracy(x, shuffled, steps=1500)
    assert accuracy <= majority + 0.08, (accuracy, majority)
    # the features' scale does not matter (a random backbone's are ~1e-7)
    tiny, _ = pair_probe.fresh_head_accuracy(x * 1e-7, labels, steps=1500)
    unit, _ = pair_probe.fresh_head_accuracy(x, labels, steps=1500)
    assert abs(tiny - unit) <= 0.02


def test_it_runs_on_real_loader_pairs(tmp_path, capsys):
    videos = [DemoVideo(pd.CLASSES[i % 6], i % 6, i // 6, pd.WIDTH, pd.HEIGHT, pd.FRAMES, 0) for i in range(16)]
    db = write_lmdb(tmp_path / "db", [list(pd.render_proof_video(v)) for v in videos],
                    names=[v.relative_path for v in videos], labels=[v.label for v in videos])
    code = pair_probe.main(["random", "--db", str(db), "--pairs", "32", "--steps", "5", "--codes"])
    assert code == 0
    out = capsys.readouterr().out
    assert "32 pairs" in out and out.count("(majority") == 2
    assert "per-view codes, R²: grey" in out and "motion" in out


def test_a_missing_lmdb_is_refused_with_a_message(tmp_path, capsys):
    assert pair_probe.main(["random", "--db", str(tmp_path / "none.lmdb")]) == 2
    assert "no LMDB" in capsys.readouterr().err


def test_the_view_codes_are_the_views_grey_level_saturation_hue_and_motion():
    import math

    grey, saturation, hue = 0.2, 0.3, math.radians(60)
    u, v = (torch.as_tensor(axis, dtype=torch.float32) for axis in (pd.CHROMA_U, pd.CHROMA_V))
    colour = u * math.cos(hue) + v * math.sin(hue)
    rgb = grey + saturation * colour                                    # (3,)
    views = rgb.view(1, 3, 1, 1, 1).expand(2, 3, 4, 5, 5).clone()
    views[1, :, 1::2] += 0.1                                            # view 2: every other frame brighter
    codes = pair_probe.view_codes(views)
    assert torch.allclose(codes["grey"][0], torch.tensor(grey), atol=1e-6)
    assert torch.allclose(codes["saturation"][0], torch.tensor(saturation), atol=1e-6)
    assert torch.allclose(codes["hue_cos"][0], torch.tensor(math.cos(hue)), atol=1e-5)
    assert torch.allclose(codes["hue_sin"][0], torch.tensor(math.sin(hue)), atol=1e-5)
    assert codes["motion"][0] == 0
    assert torch.allclose(codes["motion"][1], torch.tensor(0.1), atol=1e-6)  # |±0.1| between every pair of frames
    assert torch.allclose(codes["hue_cos"][1], codes["hue_cos"][0], atol=1e-5)  # the grey step leaves the hue


def test_the_linear_readout_finds_a_coded_quantity_and_not_an_uncoded_one():
    torch.manual_seed(0)
    n = 600
    x = torch.randn(n, 12)
    coded = x[:, 3] * 2 - x[:, 7] + 0.05 * torch.randn(n)
    assert pair_probe.linear_readout_r2(x, coded) > 0.95
    assert pair_probe.linear_readout_r2(x, torch.randn(n)) < 0.05
    # a dead unit (rounding noise only) is dropped, not blown up to unit scale; the scale of
    # the features (a random backbone's are ~1e-7) does not matter
    dead = torch.cat([x, 1e-12 * torch.randn(n, 1)], 1)
    assert abs(pair_probe.linear_readout_r2(dead * 1e-7, coded) - pair_probe.linear_readout_r2(x, coded)) < 0.01

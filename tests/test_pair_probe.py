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
    code = pair_probe.main(["random", "--db", str(db), "--pairs", "32", "--steps", "5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "32 pairs" in out and out.count("(majority") == 2


def test_a_missing_lmdb_is_refused_with_a_message(tmp_path, capsys):
    assert pair_probe.main(["random", "--db", str(tmp_path / "none.lmdb")]) == 2
    assert "no LMDB" in capsys.readouterr().err

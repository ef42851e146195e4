import json

import numpy as np

from PIL import Image

from cstp.plot import main, smooth


def test_plot_draws_the_curves_of_a_run(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 31):
            f.write(json.dumps({"step": step, "loss_total": 10 - step / 10, "loss_byol": 4.0, "lr": step / 100,
                                "rotation_accuracy": step / 30, "data_wait_fraction": 0.01}) + "\n")
        f.write('{"step": 31, "loss_to')  # cut short by a crash: ignored
    (tmp_path / "summary.json").write_text(json.dumps({"majority_baseline": {"rotation_accuracy": 0.3}}))
    assert main([str(tmp_path), "--out", str(tmp_path / "c.png")]) == 0
    with Image.open(tmp_path / "c.png") as im:
        assert im.size == (1200, 800)
        colours = np.asarray(im.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 20  # something was drawn


def test_plot_refuses_a_folder_without_metrics(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_smooth_is_a_trailing_mean():
    assert smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]

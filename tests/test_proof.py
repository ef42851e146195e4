"""scripts/proof.py (`make proof`) at a tiny budget: every stage runs through the real
train/finetune/evaluate machinery and the report has the documented layout; plus the
pure helpers it is built from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocessing.ffmpeg_tools import locate

from .scripts_loader import load_script

ROOT = Path(__file__).resolve().parents[1]


proof = load_script("proof")
demo_downstream = load_script("demo_downstream")


def test_final_accuracy_weights_records_by_the_steps_they_cover(tmp_path):
    records = [{"step": 5, "speed_accuracy": 0.0}, {"step": 10, "speed_accuracy": 0.2},
               {"step": 15, "speed_accuracy": 0.4}, {"step": 17, "speed_accuracy": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # the last 7 steps: 2 steps at 1.0 and 5 at 0.4
    assert proof.final_accuracy(tmp_path, "speed", 7) == pytest.approx((2 * 1.0 + 5 * 0.4) / 7)
    # the last 4 steps: 2 at 1.0, then 2 of the record covering steps 11-15
    assert proof.final_accuracy(tmp_path, "speed", 4) == pytest.approx((2 * 1.0 + 2 * 0.4) / 4)


def test_few_lines_takes_the_first_videos_of_each_class():
    lines = ["a/1.mp4 0", "a/2.mp4 0", "a/3.mp4 0", "b/1.mp4 1", "b/2.mp4 1", "c/1.mp4 2"]
    assert proof.few_lines(lines, 2) == "a/1.mp4 0\na/2.mp4 0\nb/1.mp4 1\nb/2.mp4 1\nc/1.mp4 2\n"


def test_a_stale_or_foreign_dataset_is_rebuilt_or_refused(tmp_path, monkeypatch):
    from preprocessing import proof_data

    made = []

    def fake_generate(out_dir, videos_per_class, seed, workers, progress=False):
        made.append(videos_per_class)
        (out_dir / "videos").mkdir(parents=True)
        (out_dir / "classes.txt").write_text("".join(c + "\n" for c in proof_data.CLASSES))
        (out_dir / "train.txt").write_text(f"v{len(made)}\n")

    monkeypatch.setattr(proof_data, "generate_proof_dataset", fake_generate)
    data = tmp_path / "proof"
    proof.ensure_dataset(data, 40)
    proof.ensure_dataset(data, 40)                       # current: reused
    assert made == [40] and (data / "train.txt").read_text() == "v1\n"
    proof.ensure_dataset(data, 10)                       # another size: rebuilt
    assert made == [40, 10] and (data / "train.txt").read_text() == "v2\n"
    (data / "proof_dataset.json").unlink()               # an older generator wrote no stamp: rebuilt
    (data / "leftover.lmdb").mkdir()
    proof.ensure_dataset(data, 10)
    assert made == [40, 10, 10] and not (data / "leftover.lmdb").exists()
    monkeypatch.setattr(proof_data, "GENERATOR_VERSION", proof_data.GENERATOR_VERSION + 1)
    proof.ensure_dataset(data, 10)                       # a newer generator: rebuilt
    assert len(made) == 4
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit, match="not a proof dataset"):
        proof.ensure_dataset(foreign, 40)
    assert (foreign / "precious.txt").read_text() == "keep" and len(made) == 4


def test_linear_probe_does_not_depend_on_the_features_scale():
    # a randomly initialised backbone outputs features of ~1e-7: the probe must see them as it
    # sees the same features at unit scale (a floor on the spread once shrank them against the
    # fixed weight decay, so the random baseline was regularised harder than the trained backbones)
    import torch

    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 16, generator=generator)
    labels = torch.arange(6).repeat(20)
    features = centres[labels] + 1.5 * torch.randn(len(labels), 16, generator=generator)
    train, test = slice(0, 90), slice(90, None)
    unit = proof.linear_probe(features[train], labels[train], features[test], labels[test], 6)
    tiny = proof.linear_probe(features[train] * 1e-7, labels[train], features[test] * 1e-7, labels[test], 6)
    assert unit > 0.4 and tiny == pytest.approx(unit, abs=1e-9)


def test_the_joint_accuracy_is_the_mean_over_the_seeds_runs(tmp_path):
    runs = []
    for seed, accuracies in ((1, [0.2, 0.3, 0.4]), (2, [0.5, 0.7, 0.9])):
        run = tmp_path / f"cstp_s{seed}"
        run.mkdir()
        # records every 5 steps; the last 10 steps are the last two records
        lines = [json.dumps({"step": 5 * (i + 1), "speed_accuracy": a, "loss": 1.0}) for i, a in enumerate(accuracies)]
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        runs.append(run)
    joint = proof.joint_accuracy(runs, "speed", last=10)
    assert joint["joint_seeds"] == pytest.approx([0.35, 0.8])
    assert joint["joint"] == pytest.approx(0.575)


def test_the_few_label_recipe_finetunes_the_width_the_proof_pretrains():
    # the few-labels finetune loads the pretrained backbone: another width would not load
    from cstp.config import load_config
    from cstp.finetune_config import load_finetune_config
    pretrain = load_config(str(ROOT / "configs" / "proof.yaml"))
    finetune = load_finetune_config(str(ROOT / "configs" / "finetune_proof.yaml"))
    assert finetune["model"]["width"] == pretrain["model"]["width"]
    assert finetune["clip"]["frames"] == pretrain["plan"]["frames"] == proof.EVAL_CLIP["frames"]


def test_the_demo_finetunes_the_width_and_clips_that_make_demo_pretrains():
    # `make demo` pretrains with configs/proof.yaml and finetunes with configs/finetune_demo.yaml
    from cstp.config import load_config
    from cstp.finetune_config import load_finetune_config
    pretrain = load_config(str(ROOT / "configs" / "proof.yaml"))
    finetune = load_finetune_config(str(ROOT / "configs" / "finetune_demo.yaml"))
    assert finetune["model"]["width"] == pretrain["model"]["width"]
    assert finetune["clip"]["frames"] == pretrain["plan"]["frames"]
    assert pretrain["run"]["max_steps"] == 1000 and pretrain["run"]["seed"] == 1
    assert finetune["data"]["train"] == pretrain["data"]["path"]
    makefile = (ROOT / "Makefile").read_text()
    assert "scripts/proof.py --data $(PROOF_DATA) --data-only" in makefile
    assert "train.py --config configs/proof.yaml --out runs/demo" in makefile
    assert "demo_downstream.py --run runs/demo --data $(PROOF_DATA)" in makefile and "PROOF_DATA := data/proof" in makefile


@pytest.mark.slow
@pytest.mark.skipif(locate("ffmpeg") is None, reason="ffmpeg not installed")
def test_data_only_builds_the_dataset_and_its_lmdbs_then_stops(tmp_path, capsys):
    # `make demo`'s first step: make proof's own data step, nothing trained, no output folder
    data, out = tmp_path / "data", tmp_path / "proof"
    args = ["--out", str(out), "--data", str(data), "--videos-per-class", "2", "--few-per-class", "1",
            "--data-only", "--no-progress"]
    assert proof.main(args) == 0
    from pipelines.lmdb_store import read_metadata
    assert [len(read_metadata(str(data / f"{name}.lmdb"))[0]) for name in ("train", "test", "few1")] == [6, 6, 6]
    assert not out.exists()
    built = (data / "train.lmdb" / "data.mdb").stat().st_mtime_ns
    assert proof.main(args) == 0                                   # a second run reuses everything
    assert (data / "train.lmdb" / "data.mdb").stat().st_mtime_ns == built and not out.exists()
    assert "data ready" in capsys.readouterr().out


def test_demo_downstream_asks_for_the_lmdbs_it_needs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "backbone.pt").write_bytes(b"")
    assert demo_downstream.main(["--run", str(run), "--data", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "train.lmdb" in err and "test.lmdb" in err and "make demo" in err


def test_targets_follow_the_issue_margins():
    report = {"heads": {"speed": {"alone": 0.41, "joint": 0.31, "majority": 0.25}},
              "linear_probe": {"cstp": [0.5, 0.5], "byol": [0.5, 0.4], "random": [0.39, 0.41]},
              "few_labels": {"cstp": [0.3, 0.3], "scratch": [0.3, 0.3]}}
    targets = proof.check_targets(report)
    assert targets == {"every_head_alone_above_majority_plus_0.15": True,
                       "every_head_joint_above_majority_plus_0.05": True,
                       "linear_probe_cstp_above_random_plus_0.10": True,
                       "linear_probe_cstp_at_least_byol": True,
                       "few_labels_cstp_above_scratch": False}
    report["heads"]["speed"]["alone"] = 0.39
    report["linear_probe"]["random"] = [0.41, 0.41]
    targets = proof.check_targets(report)
    assert not targets["every_head_alone_above_majority_plus_0.15"]
    assert not targets["linear_probe_cstp_above_random_plus_0.10"]


def test_a_tie_in_float32_accuracies_stays_a_tie():
    # make proof at 2000 steps: few labels 8, 16, 3 of 48 (CSTP) against 9, 8, 10 of 48 (scratch),
    # the same 27 videos, whose float32 fractions summed beat the scratch ones by 1.5e-8
    f32 = lambda right: float(np.float32(right / 48))
    report = {"heads": {"speed": {"alone": f32(20), "joint": 0.3, "majority": f32(20) - 0.15}},
              "linear_probe": {"cstp": [f32(8), f32(16), f32(3)], "byol": [f32(9), f32(8), f32(10)],
                               "random": [0.0, 0.0, 0.0]},
              "few_labels": {"cstp": [f32(8), f32(16), f32(3)], "scratch": [f32(9), f32(8), f32(10)]}}
    assert proof.mean(report["few_labels"]["cstp"]) != proof.mean(report["few_labels"]["scratch"])
    targets = proof.check_targets(report)
    assert not targets["few_labels_cstp_above_scratch"]
    assert targets["linear_probe_cstp_at_least_byol"]
    assert targets["every_head_alone_above_majority_plus_0.15"]
    report["few_labels"]["cstp"][2] = f32(4)
    assert proof.check_targets(report)["few_labels_cstp_above_scratch"]


@pytest.mark.slow
@pytest.mark.skipif(locate("ffmpeg") is None, reason="ffmpeg not installed")
def test_proof_runs_end_to_end_at_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "proof"
    code = proof.main(["--out", str(out), "--data", str(tmp_path / "data"), "--steps", "2", "--seeds", "1",
                       "--videos-per-class", "3", "--few-per-class", "2", "--finetune-epochs", "1", "--last", "2",
                       "--diagnosis-pairs", "40", "--diagnosis-steps", "5", "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["heads"]) == {"rotation", "speed", "temporal", "spatial"}
    for head in report["heads"].values():
        assert set(head) == {"alone", "joint", "majority", "joint_seeds"}
        assert len(head["joint_seeds"]) == 1 and head["joint"] == head["joint_seeds"][0]
        assert all(0.0 <= head[k] <= 1.0 for k in ("alone", "joint", "majority"))
    for section, names in (("linear_probe", {"cstp", "byol", "random"}), ("knn", {"cstp", "byol", "random"}),
                           ("few_labels", {"cstp", "scratch"}), ("all_labels", {"cstp", "scratch"})):
        assert set(report[section]) == names
        for values in report[section].values():
            assert len(values) == 1 and all(0.0 <= v <= 1.0 for v in values)
    assert report["seconds"] > 0 and isinstance(report["machine"], str) and report["machine"]
    assert report["test_videos"] == 6 and report["train_videos"] == 12
    # every run went through train.py / finetune.py with the requested budget
    for run in ("alone_rotation", "alone_speed", "alone_temporal", "alone_spatial", "cstp_s1", "byol_s1"):
        assert json.loads((out / "runs" / run / "summary.json").read_text())["steps"] == 2
    alone = (out / "runs" / "alone_speed" / "config.yaml").read_text()
    assert "speed: 1.0" in alone and "byol: 0.0" in alone and "rotation: 0.0" in alone
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (out / "report.md").read_text()
    assert "| speed |" in md and "linear probe" in md and "report.png" in md and "## Every label" in md
    # the finetunes: few labels on the few-labels LMDB, every label on the training LMDB, each from the
    # joint run's backbone and from scratch
    import yaml
    for prefix, db in (("few", "few2.lmdb"), ("all", "train.lmdb")):
        for init, backbone in (("cstp", str(out / "runs" / "cstp_s1" / "backbone.pt")), ("scratch", "")):
            cfg = yaml.safe_load((out / "runs" / f"{prefix}_{init}_s1" / "config.yaml").read_text())
            assert Path(cfg["data"]["train"]).name == db and cfg["model"]["init"] == backbone
    # 5. the diagnosis: every backbone of the run and a random one, both pair probes, every per-view code
    diagnosis = report["diagnosis"]
    assert diagnosis["pairs"] == 40 and diagnosis["head_steps"] == 5
    assert set(diagnosis["backbones"]) == {"random", "alone_rotation", "alone_speed", "alone_temporal",
                                           "alone_spatial", "cstp_s1", "byol_s1"}
    for entry in diagnosis["backbones"].values():
        assert 0.0 <= entry["temporal_probe"] <= 1.0 and 0.0 <= entry["spatial_probe"] <= 1.0
        assert set(entry["codes_r2"]) == {"grey", "saturation", "hue_cos", "hue_sin", "motion"}
        assert all(r <= 1.0 for r in entry["codes_r2"].values())
    assert "## Diagnosis" in md and "| alone_temporal |" in md

    # `make demo`'s second half on the same data: finetuning from the joint run's backbone and from
    # scratch, evaluation and retrieval, merged into the run's summary.json
    assert demo_downstream.main(["--run", str(out / "runs" / "cstp_s1"), "--data", str(tmp_path / "data"),
                                 "epochs=1", "batch_size=4"]) == 0
    summary = json.loads((out / "runs" / "cstp_s1" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test_videos"] == 6 and summary["finetune_epochs"] == 1
    for key in ("finetune_top1", "scratch_top1", "retrieval_r1", "scratch_retrieval_r1", "knn_top1"):
        assert 0.0 <= summary[key] <= 1.0
    assert "finetuned top-1" in capsys.readouterr().out


@pytest.mark.parametrize("flags", [["--diagnosis-pairs", "-1"], ["--diagnosis-pairs", "5"],
                                   ["--diagnosis-steps", "0"]])
def test_bad_diagnosis_flags_are_refused_before_any_work(tmp_path, capsys, flags):
    assert proof.main(["--out", str(tmp_path / "out"), "--data", str(tmp_path / "data"), *flags]) == 2
    assert "--diagnosis-pairs" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()

"""finetune.py and evaluate.py end to end on a tiny LMDB: validation split, logs,
best checkpoint, linear probe, exact resume, plateau scheduler, the evaluation report,
and 2 gloo ranks under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
from cstp.checkpoint import latest_checkpoint
from cstp.finetune_engine import validation_split
from tests.lmdb_fixtures import coded_video, write_lmdb
from tests.test_ddp import free_port

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.width=0.125", "clip.frames=4", "clip.stride=2", "clip.crop_size=32", "clip.test_short_side=32",
        "batch_size=4", "epochs=3", "log_every=1", "progress=false", "train.threads=1", "num_threads=1",
        "device=cpu", "val_fraction=0.2"]
CLASSES = ["alpha", "beta", "gamma"]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    # 18 videos of 3 classes, 9..26 frames (the short ones wrap in the test protocol)
    names = [f"{CLASSES[i % 3]}/v{i:03d}" for i in range(18)]
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb",
                          [coded_video(9 + i, 32, 40) for i in range(18)], names=names,
                          labels=[i % 3 for i in range(18)], classes=CLASSES))


def run(out, db, *extra, resume=False):
    argv = ["--out", str(out), f"data.train={db}", *TINY, *extra] + (["--resume", "auto"] if resume else [])
    assert finetune.main(argv) == 0


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_validation_split_is_stratified_deterministic_and_disjoint():
    labels = [0] * 10 + [1] * 5 + [2] * 1
    train, val = validation_split(labels, 0.2, seed=1)
    assert sorted(train + val) == list(range(16)) and not set(train) & set(val)
    assert [labels[i] for i in val].count(0) == 2     # round(0.2 * 10)
    assert [labels[i] for i in val].count(1) == 1     # round(0.2 * 5)
    assert 15 in train                                # a class of one video stays in training
    assert validation_split(labels, 0.2, seed=1) == (train, val)
    assert validation_split(labels, 0.2, seed=2)[1] != val


def test_finetune_logs_validates_and_keeps_the_best(tmp_path, tiny_db):
    run(tmp_path, tiny_db)
    recs = records(tmp_path)
    train_recs = [r for r in recs if "loss" in r]
    val_recs = [r for r in recs if "val_loss" in r]
    # 18 videos, 3 to validation (one per class), 15 to training: 3 steps of 4 per epoch
    assert [r["step"] for r in train_recs] == list(range(1, 10))
    assert [(r["step"], r["epoch"], r["val_videos"]) for r in val_recs] == [(3, 0, 3), (6, 1, 3), (9, 2, 3)]
    for key in ("lr", "train_top1", "samples_per_s", "data_wait_fraction"):
        assert key in train_recs[0]
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert best["format"] == "cstp-dali-finetune" and "optimizer" not in best
    assert best["classes"] == CLASSES and best["num_classes"] == 3
    chosen = max(val_recs, key=lambda r: (r["val_top1"], -r["val_loss"]))
    assert best["best"]["epoch"] == chosen["epoch"] and best["best"]["val_top1"] == chosen["val_top1"]
    assert len(best["val_videos"]) == 3
    _, last = latest_checkpoint(tmp_path)
    assert last["position"] == {"epoch": 3, "sample": 0, "step": 9}
    assert any((tmp_path / "tensorboard").iterdir())


def test_resume_mid_epoch_gives_the_same_weights_and_scheduler(tmp_path, tiny_db):
    # patience 0 and an impossible improvement threshold (better than 0 loss): the lr drops
    # tenfold at every validation, so the resumed run must carry the scheduler state across
    plateau = ["plateau_patience=0", "plateau_threshold=1.0", "epochs=4"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight, tiny_db, *plateau, "max_steps=11")
    run(stopped, tiny_db, *plateau, "max_steps=5")            # stops inside epoch 1
    _, mid = latest_checkpoint(stopped)
    assert mid["position"] == {"epoch": 1, "sample": 8, "step": 5}
    run(stopped, tiny_db, *plateau, "max_steps=11", resume=True)
    _, a = latest_checkpoint(straight)
    _, b = latest_checkpoint(stopped)
    assert a["position"] == b["position"] == {"epoch": 3, "sample": 8, "step": 11}
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]
    lrs = [r["lr"] for r in records(straight) if "val_loss" in r]
    assert lrs == pytest.approx([0.0025, 0.00025, 0.000025])
    assert [r["step"] for r in records(stopped)] == [r["step"] for r in records(straight)]


def test_linear_probe_keeps_the_pretrained_backbone_and_its_bn_statistics(tmp_path, tiny_db):
    from cstp.models.cstp_model import reference_init_
    from cstp.models.r2plus1d import R2Plus1D10

    torch.manual_seed(3)
    backbone = reference_init_(R2Plus1D10(0.125))
    init = tmp_path / "backbone.pt"
    torch.save({"format": "cstp-dali-backbone", "width": 0.125, "state_dict": backbone.state_dict()}, init)
    run(tmp_path / "probe", tiny_db, f"model.init={init}", "model.mode=linear", "epochs=1")
    _, state = latest_checkpoint(tmp_path / "probe")
    assert state["init"]["kind"] == "exported backbone"
    for key, value in backbone.state_dict().items():
        assert torch.equal(state["model"]["backbone." + key], value), key   # running stats included
    assert not torch.equal(state["model"]["head.bn.running_mean"], torch.zeros(12))   # the head trained


def test_bad_inputs_give_messages(tmp_path, tiny_db, capsys):
    assert finetune.main(["--out", str(tmp_path), *TINY]) == 2
    assert "data.train" in capsys.readouterr().err
    assert finetune.main(["--out", str(tmp_path), f"data.train={tiny_db}", *TINY, "model.mode=probe"]) == 2
    assert "model.mode" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    assert finetune.main(["--out", str(tmp_path), f"data.train={tiny_db}", *TINY, f"model.init={bad}"]) == 2
    assert "expected one of" in capsys.readouterr().err
    exported = tmp_path / "backbone.pt"
    torch.save({"format": "cstp-dali-backbone", "width": 0.125, "state_dict": {}}, exported)
    assert finetune.main(["--out", str(tmp_path), f"data.train={tiny_db}", *TINY, "--resume", str(exported)]) == 2
    assert "a pretrained backbone goes to model.init" in capsys.readouterr().err
    assert finetune.main(["--out", str(tmp_path), f"data.train={tiny_db}", *TINY, "batch_size=64"]) == 2
    assert "smaller batch size" in capsys.readouterr().err


def test_resuming_a_finetune_run_that_does_not_fit_is_one_line(tmp_path, tiny_db, capsys):
    """Another class count, a checkpoint without a usable width or position, or only unreadable
    checkpoints under --resume auto: one line, exit 2, the run's config.yaml untouched."""
    run(tmp_path, tiny_db, "max_steps=1", "epochs=1")
    config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    argv = ["--resume", "auto", "--out", str(tmp_path), f"data.train={tiny_db}", *TINY]
    assert finetune.main(argv + ["model.num_classes=5"]) == 2
    err = capsys.readouterr().err
    assert "its weights do not fit this model: 2 wrong shapes (e.g. head.fc.weight" in err, err
    assert len(err.strip().splitlines()) == 1 and (tmp_path / "config.yaml").read_text() == config
    path, state = latest_checkpoint(tmp_path)
    nan_momentum = {"state": {k: {n: v * float("nan") for n, v in buffers.items()}
                              for k, buffers in state["optimizer"]["state"].items()},
                    "param_groups": state["optimizer"]["param_groups"]}
    for damaged, message in [({**state, "width": "wide"}, "its 'width' entry is 'wide'"),
                             ({**state, "position": None}, "has no valid 'position' entry"),
                             # loaded before: NaN weights after the first step, every later step skipped
                             ({**state, "optimizer": nan_momentum}, "its optimizer state has ")]:
        torch.save(damaged, path)
        assert finetune.main(argv) == 2
        assert message in capsys.readouterr().err
    path.write_bytes(b"")
    assert finetune.main(argv) == 2
    assert "--resume auto: no checkpoint in" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "must be >= 1, got 0"),            # a ZeroDivisionError traceback before
    ("--num-threads", "0", "must be >= 1, got 0"),           # a DALI ValueError traceback
    ("--knn-k", "0", "must be >= 1, got 0"),                 # a kNN over no neighbours, reported silently
    ("--workers", "-1", "must be >= 0, got -1"),
    ("--random-init", "0", "must be in (0, 4], got 0"),      # a width-0 backbone, evaluated silently
    ("--random-init", "100", "must be in (0, 4], got 100"),  # killed for memory
])
def test_evaluate_refuses_bad_numbers_in_its_flags(tiny_db, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--random-init", "0.125", "--data", tiny_db, "--json", str(tmp_path / "r.json"), flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_refuses_a_gallery_whose_labels_mean_other_classes(tmp_path, capsys):
    """Two LMDBs built from lists that number the classes differently: retrieval and kNN compared
    label numbers across them and reported R@1 0.000 silently."""
    names = ["alpha/a0", "alpha/a1", "beta/b0", "beta/b1"]
    test = write_lmdb(tmp_path / "test.lmdb", [coded_video(9, 32, 40) for _ in names], names=names,
                      labels=[0, 0, 1, 1], classes=["alpha", "beta"])
    gallery = write_lmdb(tmp_path / "gallery.lmdb", [coded_video(9, 32, 40) for _ in names], names=names,
                         labels=[1, 1, 0, 0], classes=["beta", "alpha"])
    argv = ["--random-init", "0.125", "--data", str(test), "--json", str(tmp_path / "r.json"), "--no-progress",
            "--device", "cpu", "frames=4", "stride=2", "crop_size=16", "test_short_side=16"]
    assert evaluate.main([*argv, "--train-data", str(gallery)]) == 2
    assert "names label 0 'beta'" in capsys.readouterr().err and not (tmp_path / "r.json").exists()
    assert evaluate.main([*argv, "--train-data", str(test)]) == 0


def test_finetune_reads_a_reference_lmdb_through_data_train_list(tmp_path):
    from tests.test_clip_pipeline import build_reference_layout_lmdb

    db = tmp_path / "ref.lmdb"
    build_reference_layout_lmdb(db)
    listing = tmp_path / "trainlist01.txt"
    # labels in the list's own numbering (not sorted class order); one video not listed
    listing.write_text("cycling/c1.avi 0 17\ncycling/c2.avi 0 8\nbowling/b1.avi 1 20\nbowling/b2.avi 1 11\n"
                       "archery/a1.avi 2 9\n")
    run(tmp_path / "ft", str(db), f"data.train_list={listing}", "batch_size=2", "epochs=1")
    best = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)
    assert best["classes"] == ["cycling", "bowling", "archery"] and best["num_classes"] == 3
    assert best["num_videos"] == 5
    # one validation video from each class with two (list positions 0-1 and 2-3)
    assert len(best["val_videos"]) == 2 and {v // 2 for v in best["val_videos"]} == {0, 1}
    assert finetune.main(["--out", str(tmp_path / "x"), f"data.train={db}", *TINY,
                          f"data.train_list={tmp_path / 'none.txt'}"]) == 2


def test_evaluate_writes_the_report(tmp_path, tiny_db):
    run(tmp_path / "ft", tiny_db, "epochs=1")
    out = tmp_path / "eval.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "ft" / "best.pt"), "--data", tiny_db, "--train-data",
                          tiny_db, "--json", str(out), "--no-progress", "--num-threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert report["videos"] == 18
    assert 0 <= report["top1"] <= report["top5"] <= 1
    assert report["top5"] == 1.0                            # 3 classes
    assert set(report["per_class"]) == set(CLASSES)
    cm = torch.tensor(report["confusion_matrix"])
    assert cm.sum() == 18 and cm.sum(1).tolist() == [6, 6, 6]
    assert report["top1"] == pytest.approx(cm.diag().sum().item() / 18)
    assert Path(report["confusion_png"]).stat().st_size > 1000
    assert set(report["retrieval"]) == {"r1", "r5", "r10", "r20", "r50"}
    r = report["retrieval"]
    assert r["r1"] <= r["r5"] <= r["r10"] <= r["r20"] <= r["r50"] == 1.0   # 18 gallery videos, 6 per class
    assert report["clip"] == {"frames": 4, "stride": 2, "crop_size": 32, "test_short_side": 32}

    # a backbone alone: retrieval only, leave-one-out without --train-data
    assert evaluate.main(["--random-init", "0.125", "--data", tiny_db, "--json", str(out), "--no-progress",
                          "frames=4", "stride=2", "crop_size=32", "test_short_side=32"]) == 0
    report = json.loads(out.read_text())
    assert report["top1"] is None and "leave-one-out" in report["retrieval_gallery"]
    assert report["retrieval"]["r50"] == 1.0                # 17 others, 5 of the same class


@pytest.mark.slow
def test_a_checkpoint_one_node_cannot_load_stops_both_ranks(tmp_path, tiny_db):
    """Rank 1's node-local copy of the checkpoint is cut in half, rank 0's is good: both ranks
    exit 2 within seconds with one line naming rank 1 (rank 0 waited for it in
    init_process_group until the timeout)."""
    from tests.test_distributed import assert_one_rank_stopped_all, resume_on_two_nodes

    stopped = tmp_path / "stopped"
    run(stopped, tiny_db, "max_steps=3")   # the end of epoch 0: a position for 2 ranks as well
    good, _ = latest_checkpoint(stopped)
    damaged = tmp_path / "rank1.pt"
    damaged.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    codes, stderr = resume_on_two_nodes("finetune", [good, damaged], "--out", str(tmp_path / "run"),
                                        f"data.train={tiny_db}", *TINY)
    assert_one_rank_stopped_all(codes, stderr, "finetune", f"rank 1: {damaged} is a damaged checkpoint")


@pytest.mark.slow
def test_a_backbone_or_data_one_node_cannot_read_stops_both_ranks(tmp_path, tiny_db):
    """Rank 1's node-local copy of the pretrained backbone, then of the data, is missing: both
    ranks exit 2 within seconds with one line naming rank 1."""
    from tests.test_distributed import RANK_PATH, assert_one_rank_stopped_all, on_two_nodes

    pretrained = tmp_path / "pre"
    run(pretrained, tiny_db, "max_steps=1")
    backbones = [pretrained / "best.pt", tmp_path / "missing.pt"]
    codes, stderr = on_two_nodes("finetune", backbones, "--out", str(tmp_path / "a"), f"data.train={tiny_db}",
                                 f"model.init={RANK_PATH}", *TINY)
    assert_one_rank_stopped_all(codes, stderr, "finetune", "rank 1: model.init: ")
    data = [Path(tiny_db), tmp_path / "missing.lmdb"]
    codes, stderr = on_two_nodes("finetune", data, "--out", str(tmp_path / "b"), f"data.train={RANK_PATH}", *TINY)
    assert_one_rank_stopped_all(codes, stderr, "finetune", "rank 1: cannot read the data: ")


@pytest.mark.slow
def test_two_gloo_ranks_keep_identical_learning_rates_and_resume(tmp_path, tiny_db):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))

    def torchrun(script, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(free_port()), str(ROOT / script), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]

    # patience 0: any epoch without a better validation loss cuts the lr
    common = ["--out", str(out), f"data.train={tiny_db}", *TINY, "batch_size=2", "plateau_patience=0"]
    torchrun("finetune.py", *common, "epochs=2")
    torchrun("finetune.py", *common, "epochs=4", "--resume", "auto")
    vals = [r for r in records(out) if "val_loss" in r]
    # 15 training videos over 2 ranks x batch 2: 3 steps per epoch
    assert [r["step"] for r in vals] == [3, 6, 9, 12]
    # the lr the plateau rule gives for the logged (global) losses, across the resume at step 6
    best, lr = float("inf"), 0.025
    for r in vals:
        if r["val_loss"] < best * (1 - 1e-4):
            best = r["val_loss"]
        else:
            lr *= 0.1
        assert r["lr"] == pytest.approx(lr)
    assert vals[-1]["lr"] < 0.025                            # the test did cut the lr
    best = float("inf")
    for r in vals:
        assert r["val_videos"] == 3                          # every validation video once over both ranks
        # the ranks validate different videos; each stepped its scheduler with the all-reduced loss
        # (rank 1's own loss would give it another `best`), so both keep the same state and lr
        best = min(best, r["val_loss"])
        assert r["plateau_best_ranks"] == pytest.approx([best, best], rel=1e-3)
        assert r["plateau_bad_epochs_ranks"][0] == r["plateau_bad_epochs_ranks"][1]
        assert len(r["lr_ranks"]) == 2 and r["lr_ranks"][0] == r["lr_ranks"][1] == pytest.approx(r["lr"])
    _, state = latest_checkpoint(out)
    assert state["world_size"] == 2 and state["position"]["step"] == 12

    # evaluation split over 2 ranks: the same report as one process
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert evaluate.main(["--checkpoint", str(out / "best.pt"), "--data", tiny_db, "--json", str(one),
                          "--no-progress", "--batch-size", "4"]) == 0
    torchrun("evaluate.py", "--checkpoint", str(out / "best.pt"), "--data", tiny_db, "--json", str(two),
             "--no-progress", "--batch-size", "4", "--device", "cpu")
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert a["videos"] == b["videos"] == 18
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["retrieval"] == pytest.approx(b["retrieval"])


def test_running_out_of_memory_in_finetuning_says_what_to_lower(tmp_path, tiny_db, monkeypatch, capsys):
    from cstp import finetune_engine

    def no_memory(self, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 512.00 MiB")
    monkeypatch.setattr(finetune_engine.FinetuneTrainer, "train_step", no_memory)
    argv = ["--out", str(tmp_path), f"data.train={tiny_db}", *TINY]
    assert finetune.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "finetune.py: out of memory (CUDA out of memory. Tried to allocate 512.00 MiB) with data.batch_size=4, "
        "clip.frames=4, clip.crop_size=32: lower the batch per rank")

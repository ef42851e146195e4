"""train.py end to end on a tiny LMDB: logs, checkpoints, exact resume, bad flags."""

import json

import pytest
import torch

import train
from cstp.checkpoint import latest_checkpoint
from tests.lmdb_fixtures import coded_video, write_lmdb

TINY = ["model.width=0.0625", "proj_hidden=32", "proj_dim=16", "plan.frames=4", "crop_size=32",
        "batch_size=4", "epochs=3", "warmup_epochs=1", "log_every=1", "progress=false", "train.threads=1",
        "num_threads=1", "lr=0.05", "device=cpu", "tensorboard=false"]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb",
                          [coded_video(20 + 7 * i, 48, 64) for i in range(16)]))


def run(out, db, *extra):
    assert train.main(["--out", str(out), f"data.path={db}", *TINY, *extra]) == 0


def test_training_logs_every_term_and_writes_checkpoints(tmp_path, tiny_db):
    run(tmp_path, tiny_db, "max_steps=5")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for key in ("loss", "loss_byol", "loss_spatial", "loss_temporal", "loss_speed", "loss_rotation",
                "spatial_accuracy", "temporal_accuracy", "speed_accuracy", "rotation_accuracy", "lr",
                "grad_norm", "samples_per_s", "data_wait_fraction", "epoch"):
        assert key in records[0], key
    assert all(r["loss"] == pytest.approx(r["loss_total"]) for r in records)
    # 0.1·BYOL + spatial + temporal + 2·speed + 2·rotation (per-view means logged)
    r = records[0]
    assert r["loss"] == pytest.approx(0.1 * r["loss_byol"] + r["loss_spatial"] + r["loss_temporal"]
                                      + 2 * r["loss_speed"] + 2 * r["loss_rotation"], rel=1e-4)
    assert records[0]["lr"] < records[-1]["lr"]  # warming up
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["majority_baseline"]) == {"spatial_accuracy", "temporal_accuracy", "speed_accuracy",
                                                 "rotation_accuracy"}
    for key in ("loss_total", "rotation_accuracy", "speed_accuracy", "spatial_accuracy", "temporal_accuracy"):
        assert 0 <= summary[key] < 100
    path, state = latest_checkpoint(tmp_path)
    assert state["position"] == {"epoch": 1, "sample": 4, "step": 5}
    assert (tmp_path / "config.yaml").is_file()
    from cstp.models.r2plus1d import R2Plus1D10
    exported = torch.load(tmp_path / "backbone.pt", weights_only=True)
    backbone = R2Plus1D10(exported["width"])
    backbone.load_state_dict(exported["state_dict"])   # strict: every key matches a plain backbone
    for key, value in exported["state_dict"].items():
        assert torch.equal(value, state["model"]["online.backbone." + key]), key


def test_resume_mid_epoch_ends_with_the_same_weights(tmp_path, tiny_db):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(straight, tiny_db, "max_steps=7")
    run(stopped, tiny_db, "max_steps=3")   # stops mid-epoch (4 steps per epoch)
    _, mid = latest_checkpoint(stopped)
    assert mid["position"] == {"epoch": 0, "sample": 12, "step": 3}
    assert train.main(["--out", str(stopped), "--resume", "auto", f"data.path={tiny_db}", *TINY,
                       "max_steps=7"]) == 0
    _, a = latest_checkpoint(straight)
    _, b = latest_checkpoint(stopped)
    assert a["position"] == b["position"] == {"epoch": 1, "sample": 12, "step": 7}
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    steps = [json.loads(x)["step"] for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]


def test_a_fresh_run_refuses_to_mix_with_an_old_one(tmp_path, tiny_db, capsys):
    run(tmp_path, tiny_db, "max_steps=2")
    assert train.main(["--out", str(tmp_path), f"data.path={tiny_db}", *TINY, "max_steps=4"]) == 2
    assert "--resume auto" in capsys.readouterr().err


def test_resuming_with_another_model_shape_or_from_only_broken_checkpoints_is_one_line(tmp_path, tiny_db, capsys):
    """A resumed run whose model.* differs from the checkpoint's got torch's multi-line
    load_state_dict traceback after config.yaml had been overwritten; `--resume auto` over
    nothing but unreadable checkpoints told the user to pass --resume auto."""
    run(tmp_path, tiny_db, "max_steps=2")
    config = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    for extra in ("model.width=0.125", "proj_dim=8"):
        assert train.main(["--out", str(tmp_path), "--resume", "auto", f"data.path={tiny_db}", *TINY,
                           "max_steps=3", extra]) == 2
        err = capsys.readouterr().err
        assert "its weights do not fit this model" in err and "wrong shapes" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert (tmp_path / "config.yaml").read_text() == config   # the run's own config is kept
    state = torch.load(tmp_path / "ckpt_000000002.pt", weights_only=True)
    optimizer = {**state["optimizer"], "state": {k: {n: v * float("inf") for n, v in buffers.items()}
                                                 for k, buffers in state["optimizer"]["state"].items()}}
    torch.save({**state, "optimizer": optimizer}, tmp_path / "ckpt_000000003.pt")
    assert train.main(["--out", str(tmp_path), "--resume", "auto", f"data.path={tiny_db}", *TINY]) == 2
    err = capsys.readouterr().err   # loaded before: the first step made every weight NaN, exported in backbone.pt
    assert "its optimizer state has " in err and "tensors with NaN or infinite values" in err, err
    model = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({**state, "model": model}, tmp_path / "ckpt_000000003.pt")
    assert train.main(["--out", str(tmp_path), "--resume", "auto", f"data.path={tiny_db}", *TINY]) == 2
    err = capsys.readouterr().err   # the hint said to set model.* as in the run that wrote it: no setting fits NaN
    assert "tensors with NaN or infinite values" in err and "resume from an earlier checkpoint" in err, err
    assert "set model.*" not in err, err
    torch.save({**state, "position": {"epoch": 0}}, tmp_path / "ckpt_000000003.pt")
    assert train.main(["--out", str(tmp_path), "--resume", "auto", f"data.path={tiny_db}", *TINY]) == 2
    assert "has no valid 'position' entry" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ckpt_000000001.pt").write_bytes(b"PK\x03\x04 cut short")
    assert train.main(["--out", str(broken), "--resume", "auto", f"data.path={tiny_db}", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--resume auto: no checkpoint in" in err and "loads" in err and "pass --resume auto" not in err
    assert (broken / "ckpt_000000001.pt").exists()


def test_metrics_past_the_resumed_checkpoint_are_dropped(tmp_path, tiny_db):
    run(tmp_path, tiny_db, "max_steps=2")
    with open(tmp_path / "metrics.jsonl", "a") as f:   # logged by a run that died before saving
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "lo')
    assert train.main(["--out", str(tmp_path), "--resume", "auto", f"data.path={tiny_db}", *TINY,
                       "max_steps=3"]) == 0
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_bad_flags_give_a_message(tmp_path, tiny_db, capsys):
    assert train.main(["--out", str(tmp_path), f"data.path={tiny_db}", "optim.lrr=1"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path), "data.path="]) == 2
    assert train.main(["--out", str(tmp_path), f"data.path={tmp_path}/missing.lmdb", *TINY]) == 2
    assert "build-lmdb" in capsys.readouterr().err
    assert train.main(["--out", str(tmp_path), f"data.path={tiny_db}", *TINY, "batch_size=64"]) == 2
    assert "full batch" in capsys.readouterr().err
    for bad in ("plan.frames=0", "plan.temporal_rates=[]", "plan.crop_size=4000"):   # tracebacks before
        assert train.main(["--out", str(tmp_path), f"data.path={tiny_db}", *TINY, bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("train.py: plan: ") and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_exits_0(tmp_path, tiny_db):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(root / "train.py"), "--out", str(out), f"data.path={tiny_db}",
                             *TINY, "epochs=200"], cwd=root, env=dict(os.environ, PYTHONPATH=str(root)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert "continue with --resume auto" in stdout
    _, state = latest_checkpoint(out)
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert state["position"]["step"] == logged[-1] >= 2
    assert state["position"]["step"] < 200 * 4
    step = state["position"]["step"]
    assert train.main(["--out", str(out), "--resume", "auto", f"data.path={tiny_db}", *TINY,
                       f"max_steps={step + 2}"]) == 0
    _, resumed = latest_checkpoint(out)
    assert resumed["position"]["step"] == step + 2


def test_overrides_may_come_before_between_and_after_the_flags():
    """`train.py --config C data.path=X --out O max_steps=3` was refused ("unrecognized arguments:
    max_steps=3"): argparse cannot split one positional list around flags without intermixed parsing."""
    import evaluate
    import finetune

    args = train.parse_args(["--config", "c.yaml", "data.path=x", "--out", "o", "max_steps=3", "--resume", "auto",
                             "lr=0.1"])
    assert args.overrides == ["data.path=x", "max_steps=3", "lr=0.1"] and args.resume == "auto"
    args = finetune.parse_args(["model.init=b.pt", "--resume", "auto", "epochs=2"])
    assert args.overrides == ["model.init=b.pt", "epochs=2"]
    args = evaluate.parse_args(["--checkpoint", "b.pt", "frames=4", "--data", "d", "--json", "j", "stride=2"])
    assert args.overrides == ["frames=4", "stride=2"]


def test_an_output_path_that_is_a_file_or_a_folder_is_refused_before_the_work(tmp_path, tiny_db, capsys):
    """run.out naming a file was a FileExistsError traceback; evaluate.py --json naming a folder an
    IsADirectoryError after the whole evaluation had run (its results lost)."""
    import evaluate
    import finetune

    stray = tmp_path / "notes.txt"
    stray.write_text("keep me")
    assert train.main(["--out", str(stray), f"data.path={tiny_db}", *TINY]) == 2
    assert f"train.py: run.out: {stray} is a file" in capsys.readouterr().err
    assert finetune.main(["--out", str(stray / "sub"), f"data.train={tiny_db}"]) == 2
    assert f"finetune.py: run.out: {stray} is a file, not a folder" in capsys.readouterr().err
    assert evaluate.main(["--random-init", "0.0625", "--data", tiny_db, "--json", str(tmp_path)]) == 2
    assert f"evaluate.py: --json: {tmp_path} is a folder" in capsys.readouterr().err
    assert stray.read_text() == "keep me"


def test_a_reference_lmdb_with_unreadable_entries_trains_to_the_end_and_writes_its_summary(tmp_path):
    """Read without a list, an unreadable entry of a reference-layout LMDB has 0 frames: training
    substituted it, but the majority baseline at the end planned it and died (ValueError traceback,
    no summary.json)."""
    import lmdb

    from pipelines import lmdb_store as fmt

    db = write_lmdb(tmp_path / "ref.lmdb", [coded_video(12, 48, 64) for _ in range(8)], version=1)
    env = lmdb.open(str(db), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key in (fmt.META_KEY, fmt.CLASSES_KEY, fmt.INFO_KEY):   # as the reference writes it
            txn.delete(key)
        txn.put(fmt.video_key(0), b"garbage")
    env.close()
    out = tmp_path / "run"
    assert train.main(["--out", str(out), f"data.path={db}", *TINY, "max_steps=2"]) == 0
    assert "majority_baseline" in json.loads((out / "summary.json").read_text())


def test_running_out_of_memory_says_what_to_lower_and_other_errors_are_not_hidden(tmp_path, tiny_db, monkeypatch,
                                                                                    capsys):
    from cstp import engine
    from cstp.out_of_memory import is_out_of_memory

    def no_memory(self, batch, lr):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total)")
    monkeypatch.setattr(engine.Trainer, "train_step", no_memory)
    assert train.main(["--out", str(tmp_path / "a"), f"data.path={tiny_db}", *TINY, "max_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train.py: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB "
                   "total)) with data.batch_size=4, plan.frames=4, plan.crop_size=32: lower the batch per rank "
                   "(the first of these) or the clip size; `python benchmark.py model --config CONFIG --batch N` "
                   "measures what a batch takes"]

    def broken(self, batch, lr):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x2)")
    monkeypatch.setattr(engine.Trainer, "train_step", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train.main(["--out", str(tmp_path / "b"), f"data.path={tiny_db}", *TINY, "max_steps=3"])

    # the allocators' own words: torch on the CPU, DALI, Python
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 96000000000 bytes."))
    assert is_out_of_memory(RuntimeError("CUDA allocation failed"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("Expected all tensors to be on the same device"))
    assert not is_out_of_memory(ValueError("out of memory"))

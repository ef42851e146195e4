"""Distributed hardening of the trainer on CPU (gloo): two torchrun "nodes" on localhost,
torchrun --max-restarts bringing a crashed rank back, non-finite losses, checkpoint
cadence and pruning, LR scaling, TensorBoard, the data-wait watchdog, the speed
switches, and the SLURM script."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from cstp.checkpoint import latest_checkpoint, list_checkpoints
from cstp.config import load_config
from cstp.engine import Trainer, build_model, parameter_digest, peak_learning_rate
from tests.lmdb_fixtures import coded_video, write_lmdb
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
# 16 videos, batch 4: 4 steps per epoch in one process, 2 per rank with two ranks
DIST = [*TINY, "max_steps=6", "checkpoint_every=2", "keep_checkpoints=0", "nan_at_steps=[5]"]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb",
                          [coded_video(20 + 7 * i, 48, 64) for i in range(16)]))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def child_env() -> dict:
    # torchrun's agent shares its TCPStore with the ranks by default, without a per-attempt
    # prefix: after a restart the new ranks can read the dead ranks' gloo addresses and fail
    # or hang (pytorch/pytorch#135712). The opt-out gives every attempt a fresh store.
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def final_digest(out: Path) -> str:
    _, state = latest_checkpoint(out)
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    return parameter_digest(model)


# ---------------------------------------------------------------- multi-node and restarts

@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory, tiny_db):
    """Two torchrun launchers, one process each, meeting through c10d on a free port."""
    out = tmp_path_factory.mktemp("two_nodes") / "run"
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cstp-test"]
    script = [str(ROOT / "train.py"), "--out", str(out), "--resume", "auto", f"data.path={tiny_db}", *DIST]
    procs = [subprocess.Popen(torchrun(*common, *script), cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_two_torchrun_nodes_complete_and_agree_on_the_weights(two_node_run):
    out = two_node_run
    _, state = latest_checkpoint(out)
    assert state["world_size"] == 2
    # 2 steps per epoch per rank: step 6 ends epoch 2
    assert state["position"] == {"epoch": 3, "sample": 0, "step": 6}
    summary = json.loads((out / "summary.json").read_text())
    digests = summary["weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == final_digest(out)
    # The NaN on the highest rank at step 5 was skipped by both ranks (their weights agree).
    logged = records(out)
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in logged] == [0, 0, 0, 0, 1, 1]
    assert all(r["substituted_samples"] == 0 for r in logged)
    assert logged[4]["loss"] is None and logged[5]["loss"] is not None
    assert summary["skipped_steps"] == 1


@pytest.mark.slow
def test_max_restarts_brings_a_dead_rank_back_and_the_run_resumes(tmp_path, tiny_db, two_node_run):
    out = tmp_path / "run"
    cmd = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.2",
                   str(ROOT / "train.py"), "--out", str(out), "--resume", "auto", f"data.path={tiny_db}", *DIST,
                   "fail_at_step=4")
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 exits before step 4" in proc.stderr          # the hook fired once...
    assert "resuming from" in proc.stderr and "ckpt_000000002.pt" in proc.stderr   # ...torchrun restarted
    _, state = latest_checkpoint(out)
    assert state["position"] == {"epoch": 3, "sample": 0, "step": 6}
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    # Resumed exactly: the same losses and weights as the run that never died.
    for resumed, straight in zip(records(out), records(two_node_run)):
        assert (resumed["step"], resumed["loss"]) == (straight["step"], straight["loss"])
    assert final_digest(out) == final_digest(two_node_run)


def damaged_copy(good: Path, damage: str, dest: Path) -> Path:
    if damage == "cut in half":
        data = good.read_bytes()
        dest.write_bytes(data[:len(data) // 2])
    elif damage == "NaN weights":
        state = torch.load(good, weights_only=True)
        state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
        torch.save(state, dest)
    else:   # "a later step": a good checkpoint, but not the one the other rank resumes from
        shutil.copyfile(good.with_name("ckpt_000000004.pt"), dest)
    return dest


def resume_on_two_nodes(script: str, paths: list[Path], *args) -> tuple[list[int], str]:
    """`script` ('train' or 'finetune') on two torchrun nodes of one rank each, rank r resuming
    from paths[r] (node-local copies of a checkpoint): the launchers' exit codes and their
    stderr together. Fails the test when they still run after 90 s."""
    return on_two_nodes(script, paths, "--resume", RANK_PATH, *args)


RANK_PATH = "{rank_path}"   # in on_two_nodes' arguments: this rank's entry of `paths`


def on_two_nodes(script: str, paths: list[Path], *args) -> tuple[list[int], str]:
    """`script` on two torchrun nodes of one rank each, RANK_PATH in `args` replaced by
    paths[rank]: the launchers' exit codes and their stderr together (see resume_on_two_nodes)."""
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "cstp-resume"]
    # this file as each rank's script (`__main__` below)
    env = dict(child_env(), RESUME_SCRIPT=script, RANK_PATHS=os.pathsep.join(map(str, paths)))
    procs = [subprocess.Popen(torchrun(*common, str(Path(__file__).resolve()), *args),
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        errs = [p.communicate(timeout=90)[1] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.terminate()   # torchrun passes SIGTERM on to its rank, then SIGKILL after 30 s
        for p in procs:
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        pytest.fail(f"{script}.py: the ranks still run after 90 s")
    return [p.returncode for p in procs], "".join(errs)


def assert_one_rank_stopped_all(codes: list[int], stderr: str, script: str, message: str):
    """Both launchers report a rank that exited 2 (no traceback's 1), and one line says why."""
    assert codes == [1, 1], stderr[-3000:]   # torchrun's code for a failed rank
    assert "exitcode: 2" in stderr and "exitcode: 1" not in stderr, stderr[-3000:]
    lines = [x for x in stderr.splitlines() if x.startswith(f"{script}.py: ")]
    assert len(lines) == 1 and message in lines[0], stderr[-3000:]
    assert "Connection closed by peer" not in stderr


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("cut in half", "rank 1: --resume: {path} is a damaged checkpoint"),
    ("NaN weights", "--resume: rank 1: its weights are not finite"),
    ("a later step", "the ranks would resume from different points (rank 0: step 2; rank 1: step 4)")])
def test_a_checkpoint_only_one_node_cannot_resume_from_stops_every_rank(tmp_path, tiny_db, two_node_run, damage,
                                                                        message):
    """Nodes read node-local copies of a checkpoint: when rank 1's copy is damaged (or another
    step) and rank 0's is good, every rank exits 2 within seconds with one line naming rank 1.
    Rank 0 waited in init_process_group until the timeout (30 min) for a rank 1 that had
    exited; a copy with NaN weights left it a gloo 'Connection closed by peer' traceback;
    ranks at different steps ran on until their collectives no longer matched, and hung."""
    good = two_node_run / "ckpt_000000002.pt"
    paths = [good, damaged_copy(good, damage, tmp_path / "rank1.pt")]
    codes, stderr = resume_on_two_nodes("train", paths, "--out", str(tmp_path / "run"), f"data.path={tiny_db}",
                                        *DIST)
    assert_one_rank_stopped_all(codes, stderr, "train", message.format(path=paths[1]))


@pytest.mark.slow
def test_data_only_one_node_cannot_read_stops_every_rank(tmp_path, tiny_db):
    """Nodes read node-local copies of the data: when rank 1's is missing, every rank exits 2
    within seconds with one line naming rank 1 (rank 0 waited in init_process_group until the
    timeout, 30 min, for a rank 1 that had exited)."""
    paths = [Path(tiny_db), tmp_path / "missing.lmdb"]
    codes, stderr = on_two_nodes("train", paths, "--out", str(tmp_path / "run"), f"data.path={RANK_PATH}", *DIST)
    assert_one_rank_stopped_all(codes, stderr, "train", f"rank 1: cannot read the data: LMDB not found: {paths[1]}")


# ---------------------------------------------------------------- non-finite losses

def run(out, db, *extra) -> int:
    return train.main(["--out", str(out), f"data.path={db}", *TINY, *extra])


def test_a_nan_step_is_skipped_and_counted(tmp_path, tiny_db):
    assert run(tmp_path, tiny_db, "max_steps=3", "nan_at_steps=[2]", "checkpoint_every=1",
               "keep_checkpoints=0") == 0
    logged = records(tmp_path)
    assert [r["skipped_steps"] for r in logged] == [0, 1, 1]
    assert logged[1]["loss"] is None and logged[1]["grad_norm"] is None
    assert logged[2]["loss"] > 0 and logged[2]["grad_norm"] > 0
    one, two, three = (torch.load(p, weights_only=True) for p in list_checkpoints(tmp_path))
    trained = [n for n, p in build_model(one["config"]).named_parameters() if p.requires_grad]
    for name in trained:   # step 2 changed no trained weight; step 3 did
        assert torch.equal(one["model"][name], two["model"][name]), name
    assert any(not torch.equal(two["model"][n], three["model"][n]) for n in trained)
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 1
    assert two["skipped_steps"] == 1


def test_too_many_nan_steps_in_a_row_abort_with_a_message(tmp_path, tiny_db, capsys):
    assert run(tmp_path, tiny_db, "max_steps=8", "nan_at_steps=[2, 3, 4]", "max_bad_steps=3") == 1
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row by step 4" in err and "run.max_bad_steps=3" in err


# ---------------------------------------------------------------- checkpoints

def test_checkpoint_cadence_pruning_and_a_truncated_newest(tmp_path, tiny_db, caplog):
    assert run(tmp_path, tiny_db, "max_steps=7", "checkpoint_every=2", "keep_checkpoints=3") == 0
    saved = {p.name: torch.load(p, weights_only=True)["position"] for p in list_checkpoints(tmp_path)}
    # step 2 (pruned), 4 = the end of epoch 0, 6, and 7 = the last step
    assert saved == {"ckpt_000000004.pt": {"epoch": 1, "sample": 0, "step": 4},
                     "ckpt_000000006.pt": {"epoch": 1, "sample": 8, "step": 6},
                     "ckpt_000000007.pt": {"epoch": 1, "sample": 12, "step": 7}}
    newest = tmp_path / "ckpt_000000007.pt"
    newest.write_bytes(newest.read_bytes()[:5000])        # a crash while writing
    with caplog.at_level(logging.INFO):
        assert train.main(["--out", str(tmp_path), "--resume", "auto", f"data.path={tiny_db}", *TINY,
                           "max_steps=8", "checkpoint_every=2", "keep_checkpoints=3"]) == 0
    assert "ignoring ckpt_000000007.pt" in caplog.text
    assert "ckpt_000000006.pt at epoch 1, sample 8, step 6" in caplog.text
    _, state = latest_checkpoint(tmp_path)
    assert state["position"] == {"epoch": 2, "sample": 0, "step": 8}
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5, 6, 7, 8]


# ---------------------------------------------------------------- LR scaling

def test_linear_lr_scaling_rule():
    o = load_config(None, ["lr=0.09", "lr_scaling=linear", "reference_batch=128"])["optim"]
    assert peak_learning_rate(o, 128) == pytest.approx(0.09)
    assert peak_learning_rate(o, 64) == pytest.approx(0.045)
    assert peak_learning_rate(o, 512) == pytest.approx(0.36)
    assert peak_learning_rate({**o, "lr_scaling": "none"}, 512) == 0.09
    k400 = load_config(str(ROOT / "configs" / "k400.yaml"))["optim"]
    ucf = load_config(str(ROOT / "configs" / "ucf101.yaml"))["optim"]
    assert (k400["lr_scaling"], k400["reference_batch"], k400["lr"]) == ("linear", 128, 0.09)
    assert (ucf["lr_scaling"], ucf["reference_batch"], ucf["lr"]) == ("linear", 60, 0.03)
    assert peak_learning_rate(ucf, 6 * 10) == pytest.approx(0.03)   # the reference's 6 GPUs x 10


def test_scaled_lr_is_applied_and_logged(tmp_path, tiny_db, caplog):
    # global batch 4 (one process) vs reference 8: the peak halves; epoch 1 runs at the peak
    with caplog.at_level(logging.INFO):
        assert run(tmp_path, tiny_db, "max_steps=5", "lr=0.05", "lr_scaling=linear", "reference_batch=8") == 0
    assert "peak lr 0.025 = 0.05 x 4 / 8 (optim.lr_scaling=linear)" in caplog.text
    lrs = [r["lr"] for r in records(tmp_path)]
    assert lrs[0] == pytest.approx(1e-5) and lrs[4] == pytest.approx(0.025)


# ---------------------------------------------------------------- TensorBoard

def test_tensorboard_event_files(tmp_path, tiny_db):
    pytest.importorskip("tensorboard")
    assert run(tmp_path, tiny_db, "max_steps=2", "tensorboard=true") == 0
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"loss/total", "loss/byol", "accuracy/rotation", "train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2]


def test_tensorboard_missing_gives_one_warning_and_the_run_goes_on(tmp_path, tiny_db, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    with caplog.at_level(logging.WARNING):
        assert run(tmp_path, tiny_db, "max_steps=2", "tensorboard=true") == 0
    assert caplog.text.count("tensorboard package is not installed") == 1
    assert not (tmp_path / "tensorboard").exists()
    assert [r["step"] for r in records(tmp_path)] == [1, 2]


# ---------------------------------------------------------------- trainer units (no DALI)

def small_cfg(*extra) -> dict:
    return load_config(None, ["model.width=0.0625", "proj_hidden=32", "proj_dim=16", "plan.frames=4",
                              "crop_size=32", "batch_size=2", "epochs=2", "warmup_epochs=0", "log_every=3",
                              "progress=false", "tensorboard=false", "lr=0.05", *extra])


class SyntheticLoader:
    """What Trainer reads of a loader; `slow` maps a batch index to seconds to stall before it."""

    def __init__(self, steps=3, batch_size=2, slow=None):
        self.steps_per_epoch, self.batch_size, self.slow = steps, batch_size, slow or {}

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        b = self.batch_size
        for i in range(self.steps_per_epoch):
            time.sleep(self.slow.get(i, 0))
            view = lambda: torch.rand((b, 3, 4, 32, 32), generator=gen) * 2 - 1  # noqa: E731
            label = lambda n: torch.randint(0, n, (b,), generator=gen)  # noqa: E731
            yield {"view1": view(), "view2": view(), "spatial_label": label(5), "temporal_label": label(5),
                   "speed_label": label(4), "rot1": label(4), "rot2": label(4)}


def test_a_rank_waiting_on_data_warns_naming_the_batch(tmp_path, caplog):
    trainer = Trainer(small_cfg("data_timeout_s=0.2", "epochs=1"), SyntheticLoader(slow={1: 1.0}), tmp_path,
                      torch.device("cpu"))
    with caplog.at_level(logging.WARNING):
        trainer.run()
    waits = [r.getMessage() for r in caplog.records if "waited" in r.getMessage()]
    assert waits, caplog.text
    assert "epoch 0, samples 2..3 of rank 0's shard (step 2)" in waits[0]
    assert len(waits) <= 5   # once per timeout, not per poll


def test_no_host_sync_between_log_records(tmp_path, monkeypatch):
    """Metrics stay on the device: tensors are read only at log records (every 3 steps)
    and checkpoints, not per step."""
    trainer = Trainer(small_cfg("epochs=1"), SyntheticLoader(steps=6), tmp_path, torch.device("cpu"))
    reads = []
    for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append((trainer.position.step, _name))
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(trainer, "save", lambda: None)
    monkeypatch.setattr(trainer, "export_backbone", lambda path: None)
    monkeypatch.setattr(trainer, "summary", lambda *a: {})
    trainer.run()
    assert sorted({step for step, _ in reads}) == [3, 6], reads


def test_a_stop_request_is_acted_on_within_ten_steps_even_between_log_records(tmp_path):
    class StopsMidway(SyntheticLoader):
        def __iter__(self):
            for i, batch in enumerate(super().__iter__()):
                if i == 12:
                    trainer.request_stop()   # what the SIGTERM handler does
                yield batch

    trainer = Trainer(small_cfg("epochs=1", "log_every=100"), StopsMidway(steps=40), tmp_path,
                      torch.device("cpu"))
    summary = trainer.run()
    assert summary["stopped_early"] and summary["steps"] == 20
    _, state = latest_checkpoint(tmp_path)
    assert state["position"] == {"epoch": 0, "sample": 40, "step": 20}
    assert [r["step"] for r in records(tmp_path)] == [20]   # the partial window is logged before leaving


def test_channels_last_is_real_and_gives_the_same_gradients(tmp_path):
    batch = next(iter(SyntheticLoader()))
    grads, layouts = {}, []
    for flag in ("false", "true"):
        trainer = Trainer(small_cfg(f"channels_last={flag}"), SyntheticLoader(), tmp_path, torch.device("cpu"))
        conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv3d))
        conv.register_forward_pre_hook(lambda m, args: layouts.append(
            (flag, args[0].is_contiguous(memory_format=torch.channels_last_3d), args[0].is_contiguous())))
        trainer.train_step(batch, 0.05)
        grads[flag] = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        if flag == "true":
            assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
            assert not conv.weight.is_contiguous()
    # the first conv sees channels-last inputs only with the switch on
    assert set(layouts) == {("false", False, True), ("true", True, False)}
    assert grads["false"].keys() == grads["true"].keys()
    # same maths in another summation order: equal up to rounding (amplified by BN on 2 samples)
    scale = max(g.abs().max() for g in grads["false"].values())
    for name, g in grads["false"].items():
        assert (g - grads["true"][name]).abs().max() <= 2e-3 * scale, name


def test_sync_bn_and_compile_switches(tmp_path):
    from cstp.engine import convert_sync_batchnorm

    model = build_model(small_cfg())
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    synced = convert_sync_batchnorm(build_model(small_cfg()), torch.device("cuda", 0), world_size=2)
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn > 0
    # one process, or a CPU (torch's SyncBatchNorm is CUDA-only): plain per-process BN
    for device, world in ((torch.device("cuda", 0), 1), (torch.device("cpu"), 2)):
        kept = convert_sync_batchnorm(build_model(small_cfg()), device, world_size=world)
        assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in kept.modules())
    compiled = Trainer(small_cfg("compile=true"), SyntheticLoader(), tmp_path, torch.device("cpu"))
    assert isinstance(compiled.ddp_model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.ddp_model._orig_mod is compiled.model
    assert not isinstance(Trainer(small_cfg(), SyntheticLoader(), tmp_path, torch.device("cpu")).ddp_model,
                          torch._dynamo.eval_frame.OptimizedModule)


# ---------------------------------------------------------------- SLURM

def test_slurm_script_parses_and_launches_torchrun_with_resume():
    script = ROOT / "scripts" / "slurm_pretrain.sbatch"
    if shutil.which("bash") is None:
        pytest.skip("bash not found")
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    for needed in ("--resume auto", "--rdzv-backend c10d", '--rdzv-endpoint "$head:$PORT"',
                   '--rdzv-id "$SLURM_JOB_ID"', '--nnodes "$SLURM_NNODES"', "--max-restarts", "#SBATCH --requeue",
                   "#SBATCH --ntasks-per-node=1", "scontrol requeue", "srun ",
                   "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        assert needed in text, needed


if __name__ == "__main__":
    # a rank of on_two_nodes: RESUME_SCRIPT's main with RANK_PATH in its arguments replaced
    # by this rank's path in RANK_PATHS
    import importlib
    rank_path = os.environ["RANK_PATHS"].split(os.pathsep)[int(os.environ["RANK"])]
    argv = [arg.replace(RANK_PATH, rank_path) for arg in sys.argv[1:]]
    sys.exit(importlib.import_module(os.environ["RESUME_SCRIPT"]).main(argv))

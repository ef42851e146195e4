"""DDP with 2 gloo ranks on CPU under torchrun: train.py end to end (each rank its own DALI
pipeline and shard), and one launch of this file as the ranks' script (`__main__` below)
that checks what DDP must guarantee after a training step: the same gradient on every
rank, equal to the mean of the ranks' own gradients, and the same weights; and that the
ranks' shards of an epoch are disjoint and cover the dataset up to the drop-last remainder."""

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cstp.checkpoint import latest_checkpoint
from cstp.config import load_config
from pipelines.sharding import epoch_order
from tests.lmdb_fixtures import coded_video, write_lmdb
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_train(out, db, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(ROOT / "train.py"), "--out", str(out),
           f"data.path={db}", *TINY, *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_two_rank_torchrun_pretraining_resumes_mid_epoch_exactly(tmp_path):
    """Stopped in the middle of an epoch and resumed with --resume auto, a 2-rank gloo run
    ends with the same weights, bit for bit, as one that was never stopped."""
    db = write_lmdb(tmp_path / "db.lmdb", [coded_video(20 + 5 * i, 48, 64) for i in range(16)])
    stopped = tmp_path / "stopped"
    torchrun_train(stopped, db, "max_steps=3")
    _, state = latest_checkpoint(stopped)
    assert state["world_size"] == 2
    # 16 videos / 2 ranks / batch 4 = 2 steps per epoch: step 3 is the middle of epoch 1
    assert state["position"] == {"epoch": 1, "sample": 4, "step": 3}
    records = [json.loads(x) for x in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

    resumed = torchrun_train(stopped, db, "max_steps=5", "--resume", "auto")
    assert "resuming from" in resumed.stderr
    straight = tmp_path / "straight"
    torchrun_train(straight, db, "max_steps=5")
    (_, after_resume), (_, uninterrupted) = latest_checkpoint(stopped), latest_checkpoint(straight)
    assert after_resume["position"] == uninterrupted["position"] == {"epoch": 2, "sample": 4, "step": 5}
    for name, tensor in uninterrupted["model"].items():
        assert torch.equal(after_resume["model"][name], tensor), name


# ---------------------------------------------------------------- gradients and shards

# 18 videos, 2 ranks x batch 4: 8 samples (2 steps) per rank and epoch; 2 videos are the
# drop-last remainder. optim.clip_grad=0: no clipping, so the step's gradient is DDP's
# all-reduced mean itself.
NUM_VIDEOS, BATCH = 18, 4
STEP_ARGS = [*TINY, f"batch_size={BATCH}", "clip_grad=0"]


def ddp_rank_main(db: str, out: str):
    """One rank of test_ddp_step_and_shards (run by torchrun): one Trainer step on this
    rank's first batch, next to the gradient of the same batch without DDP; then the
    video ids of every batch of epochs 0 and 1. Writes OUT/rank{rank}.pt."""
    import torch.distributed as dist

    from cstp.engine import LABEL_KEYS, Trainer, parameter_digest
    from cstp.losses import cstp_loss
    from pipelines.loader import LoaderSettings, PretrainLoader
    from pipelines.plan import plan_config_from
    from train import distributed_env

    rank, world_size, _ = distributed_env()
    torch.set_num_threads(1)
    cfg = load_config(None, STEP_ARGS)
    d = cfg["data"]
    loader = PretrainLoader(db, plan_config_from(cfg["plan"]), LoaderSettings(
        batch_size=d["batch_size"], num_threads=1, seed=cfg["run"]["seed"]), device="cpu", rank=rank,
        world_size=world_size)
    dist.init_process_group("gloo")       # after the pipeline (docs/architecture.md#forked-workers)
    trainer = Trainer(cfg, loader, out, torch.device("cpu"))
    epochs = [[{k: v.clone() for k, v in b.items()} for b in loader] for _ in range(2)]
    first = epochs[0][0]

    # This rank's own gradient: the same step on a copy of the model, outside DDP.
    alone = copy.deepcopy(trainer.model)
    alone.update_target()                 # train_step does this before its forward pass
    total, _, _ = cstp_loss(alone(first["view1"], first["view2"]), {k: first[k] for k in LABEL_KEYS},
                            trainer.loss_weights)
    total.backward()
    trainer.train_step(first, lr=0.05)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    own = {n: p.grad.clone() for n, p in alone.named_parameters() if n in grads}
    torch.save({"ddp_grads": grads, "own_grads": own, "digest": parameter_digest(trainer.model),
                "videos": [[b["video_index"].tolist() for b in batches] for batches in epochs],
                "substituted": sum(int(b["substituted"].sum()) for batches in epochs for b in batches)},
               Path(out) / f"rank{rank}.pt")
    loader.close()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_step_and_shards(tmp_path):
    db = write_lmdb(tmp_path / "db.lmdb", [coded_video(20 + 3 * i, 48, 64) for i in range(NUM_VIDEOS)])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(Path(__file__).resolve()), str(db), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    # Gradients: bitwise the same on both ranks, and the mean of the two ranks' own
    # gradients, which differ (their batches do): DDP averaged them.
    names = sorted(ranks[0]["ddp_grads"])
    assert len(names) > 20 and names == sorted(ranks[1]["ddp_grads"])
    differ = 0
    for name in names:
        g0, g1 = ranks[0]["ddp_grads"][name], ranks[1]["ddp_grads"][name]
        assert torch.equal(g0, g1), name
        mean = (ranks[0]["own_grads"][name] + ranks[1]["own_grads"][name]) / 2
        assert torch.allclose(g0, mean, rtol=1e-4, atol=1e-6), name
        differ += not torch.allclose(ranks[0]["own_grads"][name], ranks[1]["own_grads"][name], rtol=1e-3)
    assert differ > len(names) // 2
    # ...so the step left the same weights on both ranks
    assert ranks[0]["digest"] == ranks[1]["digest"]

    # Shards: each rank 2 batches of 4 per epoch; disjoint; together exactly the first 16
    # videos of the epoch's shuffled order (the same on every rank); the last 2 of that
    # order are dropped, and the dropped pair changes from epoch to epoch.
    assert ranks[0]["substituted"] == ranks[1]["substituted"] == 0
    dropped = []
    for epoch in range(2):
        shards = [[v for batch in r["videos"][epoch] for v in batch] for r in ranks]
        assert [len(r["videos"][epoch]) for r in ranks] == [2, 2] and [len(s) for s in shards] == [8, 8]
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0] + shards[1])) == 16
        order = epoch_order(NUM_VIDEOS, seed=load_config(None, STEP_ARGS)["run"]["seed"], epoch=epoch)
        assert shards[0] == order[0:16:2].tolist() and shards[1] == order[1:16:2].tolist()
        dropped.append(set(range(NUM_VIDEOS)) - set(shards[0] + shards[1]))
        assert dropped[-1] == set(order[16:].tolist())
    assert dropped[0] != dropped[1]


if __name__ == "__main__":
    ddp_rank_main(*sys.argv[1:3])

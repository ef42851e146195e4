"""train.py under torchrun with 2 gloo ranks on CPU: each rank its own DALI pipeline and shard."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cstp.checkpoint import latest_checkpoint
from tests.lmdb_fixtures import coded_video, write_lmdb
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_torchrun_pretraining(tmp_path):
    db = write_lmdb(tmp_path / "db.lmdb", [coded_video(20 + 5 * i, 48, 64) for i in range(16)])
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), str(ROOT / "train.py"), "--out", str(out),
           f"data.path={db}", *TINY, "max_steps=3"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, state = latest_checkpoint(out)
    assert state["world_size"] == 2
    # 16 videos / 2 ranks / batch 4 = 2 steps per epoch: step 3 is the middle of epoch 1
    assert state["position"] == {"epoch": 1, "sample": 4, "step": 3}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]

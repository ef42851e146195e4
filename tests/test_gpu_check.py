"""scripts/gpu_check.sh and bench/gpu_data.py on a CPU: the hard deadline jumps to the
summary, LMDBs are repeated logically (a list, nothing copied), a skipped GPU test counts
as a failure, and the graph facts count the decoder operators of each graph."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from bench import gpu_data
from pipelines.lmdb_store import read_metadata
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from tests.lmdb_fixtures import coded_video, write_lmdb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb", [coded_video(20 + 5 * i, 48, 64)
                                                                         for i in range(5)]))


def test_dry_run_is_cut_at_its_hard_deadline_and_still_ends_with_the_summary(tmp_path, tiny_db):
    """--cpu-dry-run with a 30 s deadline: the GPU tests are killed when it comes (not only
    checked between parts), every later part is skipped, and the summary still comes, in
    the files the device tool brings back."""
    out = tmp_path / "out"
    # The GPU tests must still be running at the deadline on any machine, however fast:
    # a pytest plugin (loaded only by the script's pytest run) stalls them.
    (tmp_path / "stall_gpu_tests.py").write_text("import time\n\n\ndef pytest_sessionstart(session):\n"
                                                 "    time.sleep(600)\n")
    env = {**os.environ, "GPU_CHECK_DEADLINE_S": "30", "GPU_CHECK_MIN_PART_S": "3",
           "PYTEST_ADDOPTS": "-p stall_gpu_tests",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-dry-run", "--data", tiny_db,
                           "--out", str(out)],
                          env=env,
                          capture_output=True, text=True, timeout=240)
    wall = time.monotonic() - start
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (out / "gpu_check.log").read_text()
    assert "ffmpeg: " in log and "libnvcuvid (NVDEC): " in log       # what the machine has for videos
    assert "each listed 4x in" in log                                  # 5 videos, (1 + 2 + 2) x 4 = 20 samples
    assert "!! pytest_gpu killed after" in log, log[-3000:]
    assert "!! skipped all_lmdb_b2:" in log and "!! skipped model_bf16_cl:" in log
    summary = (out / "summary.txt").read_text()
    assert "figure" in summary and "GPU tests (a skip counts as a failure):\n  FAILED" in summary
    assert "parts skipped at the deadline (30 s): " in summary and "all_lmdb_b2" in summary
    assert wall < 30 + 2 * 25 + 15, wall     # the deadline, the summary's two calls, bash and python start-up
    assert {"gpu.csv", "gpu_check.log", "results.json", "summary.txt"} <= {p.name for p in out.iterdir()}
    assert len(list(out.iterdir())) <= 8


def test_the_help_states_the_timing_plan():
    text = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--help"], capture_output=True,
                          text=True).stdout
    assert "Timing plan on one H100" in text and "pytest -m gpu" in text and "GPU_CHECK_DEADLINE_S" in text


def test_repeat_list_repeats_an_lmdb_logically(tiny_db, tmp_path):
    listing = tmp_path / "repeat.txt"
    before = sorted(p.name for p in Path(tiny_db).iterdir())
    assert gpu_data.repeat_list(tiny_db, str(listing), 12) == (5, 3)
    assert sorted(p.name for p in Path(tiny_db).iterdir()) == before       # nothing written into the LMDB
    metas, _ = read_metadata(tiny_db, str(listing))
    assert [m.key for m in metas] == [0, 1, 2, 3, 4] * 3
    original, _ = read_metadata(tiny_db)
    assert [(m.name, m.frames, m.label) for m in metas] == [(m.name, m.frames, m.label) for m in original] * 3
    loader = PretrainLoader(tiny_db, PlanConfig(frames=4, crop_size=32), LoaderSettings(batch_size=3, num_threads=1),
                            list_path=str(listing))
    assert loader.steps_per_epoch == 5
    indices = sorted(i for batch in loader for i in batch["video_index"].tolist())
    loader.close()
    assert indices == list(range(15))   # 15 list entries, each read once per epoch


def test_a_skipped_gpu_test_is_a_failure():
    assert gpu_data.pytest_outcome("...\n12 passed in 40.1s\n") == ("12 passed in 40.1s", True)
    assert gpu_data.pytest_outcome("11 passed, 1 skipped in 40.1s")[1] is False
    assert gpu_data.pytest_outcome("1 failed, 11 passed in 40.1s")[1] is False
    assert gpu_data.pytest_outcome("20 deselected in 1.0s")[1] is False
    assert gpu_data.pytest_outcome("")[1] is False


@pytest.mark.parametrize("graph, decoders", [("views", 8), ("frames", 1)])
def test_graph_facts_count_decoder_operators_and_time_the_build(tiny_db, tmp_path, graph, decoders):
    out = tmp_path / "facts.json"
    assert gpu_data.main(["graph-facts", "--graph", "lmdb", "--device", "cpu", "--data", tiny_db, "--batch", "2",
                          "--out", str(out), "--config", "configs/quick.yaml", "plan.frames=4", "crop_size=32",
                          f"data.graph={graph}", "num_threads=1"]) == 0
    [facts] = json.loads(out.read_text())
    assert facts["decoder_operators"] == decoders and facts["graph"].startswith(f"LMDB pretraining ({graph} graph")
    assert facts["dali_threads"] == 1 and facts["build_s"] > 0 and facts["first_batch_s"] >= facts["build_s"]
    assert facts["rank_threads"] >= facts["rank_threads_added"] > 0
    lines = gpu_data.summary_lines(_work_with(tmp_path, facts))
    assert any(f"{decoders} decoder operators" in line for line in lines)


def _work_with(tmp_path, facts) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    (work / "graph_lmdb.json").write_text(json.dumps([facts]))
    return work

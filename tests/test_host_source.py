"""`benchmark.py source` (bench/host_source.py): bytes handed to the decoders and read
from storage per sample, counted exactly, for both LMDB layouts and video files."""

from __future__ import annotations

import json

import numpy as np
import pytest

import benchmark
from bench import host_source
from pipelines.plan import PlanConfig, make_pretrain_plan
from pipelines.sharding import shard_indices
from preprocessing.convert_lmdb import convert_lmdb
from tests.lmdb_fixtures import coded_video, encode_jpeg, write_lmdb

CFG = PlanConfig(frames=4, crop_size=32)
LENGTH, H, W, VIDEOS, SAMPLES = 40, 240, 320, 12, 6


@pytest.fixture(scope="module")
def frames():
    return coded_video(LENGTH, H, W)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory, frames):
    root = tmp_path_factory.mktemp("source")
    return {version: str(write_lmdb(root / f"v{version}.lmdb", [frames] * VIDEOS, version=version))
            for version in (1, 2)}


def planned(video: int, epoch: int = 0) -> tuple[list[int], list[int]]:
    """The frame indices sample `video` reads (with repeats), and the distinct ones."""
    plan = make_pretrain_plan(0, epoch, video, LENGTH, H, W, CFG)
    wanted = [int(f) for f in np.concatenate([plan.view1.frames, plan.view2.frames])]
    return wanted, sorted(set(wanted))


@pytest.mark.parametrize("version", [1, 2])
def test_handed_and_needed_bytes_are_the_planned_jpegs_exactly(dbs, frames, version):
    sizes = [len(encode_jpeg(f)) for f in frames]   # every video holds the same frames
    order = shard_indices(VIDEOS, 0, 1, 1, 0, 0, True)[:SAMPLES]
    handed = sum(sizes[f] for v in order for f in planned(int(v))[0]) / SAMPLES
    needed = sum(sizes[f] for v in order for f in planned(int(v))[1]) / SAMPLES
    r = host_source.measure(dbs[version], CFG, samples=SAMPLES, warm_rounds=2, seed=0, batch_size=1)
    assert (r["path"], r["layout"], r["cold_samples"], r["warm_samples"]) == ("lmdb", version, SAMPLES, 2 * SAMPLES)
    assert r["handed_bytes"] == handed and r["needed_bytes"] == needed and handed > needed
    assert r["cpu_ms"] == pytest.approx(r["source_ms"] + r["hand_over_ms"]) and r["source_ms"] > 0


def test_storage_bytes_follow_the_layout(tmp_path, frames):
    # Fresh databases: pages this process has mapped before cannot be evicted.
    fresh = {v: str(write_lmdb(tmp_path / f"v{v}.lmdb", [frames] * VIDEOS, version=v)) for v in (1, 2)}
    # with read hints: converted from a copy (the conversion maps its source's pages into this process)
    source = write_lmdb(tmp_path / "v1_copy.lmdb", [frames] * VIDEOS, version=1)
    fresh[3] = str(convert_lmdb(source, tmp_path / "v2_hinted.lmdb", progress=False)["out"])
    results = {v: host_source.measure(fresh[v], CFG, samples=SAMPLES, warm_rounds=1, seed=0, batch_size=1)
               for v in (1, 2, 3)}
    if any(r["resident_before_bytes"] > r["data_bytes"] // 4 for r in results.values()):
        pytest.skip("posix_fadvise(DONTNEED) does not evict pages on this file system (tmpfs?)")
    sizes = [len(encode_jpeg(f)) for f in frames]
    for r in results.values():
        assert r["storage_bytes_resident"] > 0 and r["ratio"] == r["storage_bytes"] / r["needed_bytes"]
    # version 1 pulls each sample's whole video (40 frames) from storage to use at most 8
    assert results[1]["storage_bytes_resident"] >= sum(sizes)
    assert results[1]["ratio"] > 3
    # version 2: the distinct planned frames' pages, and few index pages; the same with read hints
    assert results[2]["ratio"] < 1.5 and results[3]["ratio"] < 1.5
    assert results[3]["storage_bytes_resident"] <= results[2]["storage_bytes_resident"] + 4 * host_source.PAGE
    assert results[2]["storage_bytes_resident"] >= results[2]["needed_bytes"]
    distinct = np.mean([len(planned(int(v))[1])
                        for v in shard_indices(VIDEOS, 0, 1, 1, 0, 0, True)[:SAMPLES]])
    frame_pages = max(-(-s // host_source.PAGE) for s in sizes) * host_source.PAGE
    assert results[2]["storage_bytes_resident"] <= distinct * frame_pages + 4 * host_source.PAGE


def test_the_video_path_hands_over_and_reads_the_whole_file(tmp_path):
    sizes = [50_000 + 4096 * i for i in range(4)]
    for i, size in enumerate(sizes):   # the source never decodes: any bytes will do
        (tmp_path / f"x{i}.webm").write_bytes(np.random.default_rng(i).bytes(size))
    index = tmp_path / "videos.json"
    index.write_text(json.dumps({"format": "cstp-dali-video-index", "version": 1, "root": ".", "classes": ["a"],
                                 "videos": [dict(name=f"a/x{i}", file=f"x{i}.webm", label=0, frames=LENGTH,
                                                 height=H, width=W, fps=25.0, codec="vp9") for i in range(4)]}))
    r = host_source.measure(str(index), CFG, samples=4, warm_rounds=1, seed=0, batch_size=1)
    assert (r["path"], r["layout"], r["handed_bytes"], r["needed_bytes"]) == ("video", None, np.mean(sizes),
                                                                               np.mean(sizes))
    assert r["data_bytes"] == sum(sizes)
    spans = []   # the GOPs of 16 frames from the one holding a sample's first frame to its last frame's
    for video in shard_indices(4, 0, 1, 1, 0, 0, True):
        wanted = planned(int(video))[1]
        spans.append((min(LENGTH, (wanted[-1] // 16 + 1) * 16) - wanted[0] // 16 * 16) / LENGTH)
    assert r["gop"] == 16 and r["gop_span_fraction"] == pytest.approx(np.mean(spans), abs=1e-12)
    if r["resident_before_bytes"] < sum(sizes) // 4:
        assert r["storage_bytes_resident"] == sum(-(-s // host_source.PAGE) * host_source.PAGE for s in sizes) / 4


def test_the_command_line_prints_a_row_per_database_and_writes_json(dbs, tmp_path, capsys):
    out = tmp_path / "source.json"
    assert benchmark.main(["source", "--data", dbs[1], "--data", dbs[2], "--samples", "4", "--warm-rounds", "1",
                           "--repeat", "2", "plan.frames=4", "crop_size=32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "T=4 per view" in text and "storage/needed" in text
    rows = json.loads(out.read_text())
    assert [(r["layout"], r["videos"], r["cold_samples"]) for r in rows] == [(1, 2 * VIDEOS, 4), (2, 2 * VIDEOS, 4)]
    assert rows[0]["needed_bytes"] == rows[1]["needed_bytes"] and rows[0]["handed_bytes"] == rows[1]["handed_bytes"]


def test_missing_data_is_one_line(tmp_path, capsys):
    assert benchmark.main(["source", "--data", str(tmp_path / "nope.lmdb")]) == 2
    assert "not found" in capsys.readouterr().out

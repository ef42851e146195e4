"""Data faults never end a run and never pass silently: JPEG frames with damaged bytes
behind intact markers (which DALI's decoder refuses), video files cut after indexing,
a partial copy of an LMDB, a blocklist, and train.py --resume on a foreign file."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch

from pipelines import lmdb_store as fmt
from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
from pipelines.clip_plan import ClipPlanConfig
from pipelines.faults import DataFaultError, lmdb_needed_bytes
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from pipelines.pretrain_pipeline import PRETRAIN_OUTPUTS, cstp_pretrain_pipeline
from pipelines.reference_executor import ReferencePretrainLoader
from pipelines.sources import PretrainLmdbSource
from preprocessing.__main__ import main as preprocessing_main
from tests.lmdb_fixtures import coded_video, encode_jpeg, write_lmdb
from tests.test_train import TINY

ROOT = Path(__file__).resolve().parents[1]
CFG = PlanConfig(frames=4, crop_size=32)
H, W = 48, 64
DAMAGED = 6   # the video whose frames are damaged


def damage_header(jpeg: bytes, seed: int = 4) -> bytes:
    """Bit rot between SOI and the scan: markers intact, the Huffman tables broken
    ("Bogus Huffman table definition"), which DALI's CPU decoder and PIL both refuse."""
    sos = jpeg.find(b"\xff\xda")
    rng = np.random.default_rng(seed)
    out = bytearray(jpeg)
    for p in rng.integers(2, sos, 4):
        out[p] = rng.integers(0, 256)
    return bytes(out)


def put(path, video, frames):
    """Replace a video's frames, in the database's layout (version 2: a header and a key per frame)."""
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for key, value in fmt.layout_entries(video, frames):
            txn.put(key, value)
    env.close()


@pytest.fixture(scope="module")
def damaged_db(tmp_path_factory):
    path = write_lmdb(tmp_path_factory.mktemp("faults") / "rot.lmdb", [coded_video(24, H, W) for _ in range(16)])
    frames = [encode_jpeg(f) for f in coded_video(24, H, W)]
    assert fmt.jpeg_problem(damage_header(frames[0]), H, W) is None   # the cheap check lets it through
    put(path, DAMAGED, [damage_header(f) for f in frames])
    return str(path)


def batches_of(loader, epochs):
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append({k: v.clone() for k, v in batch.items()})
    loader.close()
    return out


def ids(batches):
    return [v for b in batches for v in b["video_index"].tolist()]


@pytest.mark.parametrize("workers", [0, 1])
def test_damaged_jpeg_bytes_cost_one_substituted_sample_and_resume_exactly(damaged_db, caplog, workers):
    caplog.set_level(logging.WARNING)
    settings = LoaderSettings(batch_size=4, num_threads=1, seed=0, workers=workers)
    straight = batches_of(PretrainLoader(damaged_db, CFG, settings), 3)
    assert len(straight) == 12                                 # every step of 3 epochs ran
    assert DAMAGED not in ids(straight)
    # the damaged video is drawn once per epoch and replaced each time
    assert sum(int((b["substituted"] > 0).sum()) for b in straight) == 3
    named = [r.getMessage() for r in caplog.records if f"skipping video {DAMAGED} " in r.getMessage()]
    assert len(named) == 1 and "decoders.image_slice" in named[0]
    # a run resumed in the middle of epoch 1 reads exactly what the straight run read
    resumed = batches_of(PretrainLoader(damaged_db, CFG, settings, start_epoch=1, start_sample=4), 2)
    for a, b in zip(straight[5:], resumed, strict=True):
        for key in PRETRAIN_OUTPUTS:
            assert torch.equal(a[key], b[key]), key


def test_the_reference_executor_substitutes_the_same_damaged_video(damaged_db):
    settings = LoaderSettings(batch_size=4, num_threads=1, seed=0)
    dali = batches_of(PretrainLoader(damaged_db, CFG, settings), 1)
    reference = batches_of(ReferencePretrainLoader(damaged_db, CFG, settings), 1)
    assert ids(reference) == ids(dali)
    assert [b["substituted"].tolist() for b in reference] == [b["substituted"].tolist() for b in dali]


def test_clean_data_gives_the_same_batches_with_and_without_the_fault_machinery(tmp_path):
    """PretrainLoader (recovering pipeline, substitution hooks) against the bare DALI
    pipeline on a plain source and iterator, as before faults.py existed."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    db = str(write_lmdb(tmp_path / "clean.lmdb", [coded_video(20 + 3 * i, H, W) for i in range(8)]))
    settings = LoaderSettings(batch_size=4, num_threads=1, seed=5)
    loader = PretrainLoader(db, CFG, settings)
    source = PretrainLmdbSource(db, loader.metas, CFG, seed=5, batch_size=4)
    pipe = cstp_pretrain_pipeline(source=source, batch_size=4, num_threads=1, device_id=None, decode="roi")
    pipe.build()
    bare = DALIGenericIterator([pipe], list(PRETRAIN_OUTPUTS), auto_reset=False,
                               last_batch_policy=LastBatchPolicy.DROP, prepare_first_batch=False)
    for _ in range(2):
        ours = batches_of_epoch(loader)
        theirs = [o[0] for o in bare]
        bare.reset()
        assert len(ours) == len(theirs) == 2
        for a, b in zip(ours, theirs):
            for key in PRETRAIN_OUTPUTS:
                assert torch.equal(a[key], b[key].long() if key not in ("view1", "view2") else b[key]), key


def batches_of_epoch(loader):
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_clip_loaders_substitute_damaged_frames_in_both_executors(damaged_db):
    cfg = ClipPlanConfig(frames=4, crop_size=32)
    settings = ClipLoaderSettings(batch_size=4, num_threads=1, seed=0)
    results = {}
    for executor in ("dali", "reference"):
        for mode in ("train", "val"):
            loader = ClipLoader(damaged_db, mode, cfg, settings, executor=executor)
            results[executor, mode] = batches_of(loader, 1)
    for mode in ("train", "val"):
        dali, ref = results["dali", mode], results["reference", mode]
        assert DAMAGED not in ids(dali) and ids(dali) == ids(ref)
        assert sum(int(b["substituted"].sum()) for b in dali) == 1
        for a, b in zip(dali, ref):
            assert torch.equal(a["valid"], b["valid"]) and torch.equal(a["substituted"], b["substituted"])
    # val: the replacement is another video's clip, flagged invalid
    assert sum(int((~b["valid"]).sum()) for b in results["dali", "val"]) == 1


def test_verify_decode_writes_a_blocklist_that_the_loaders_honour(damaged_db, tmp_path, caplog):
    blocklist = tmp_path / "rot.blocklist.txt"
    assert preprocessing_main(["verify", "--db", damaged_db, "--decode", "--blocklist", str(blocklist),
                               "--workers", "2", "--quiet"]) == 1
    lines = blocklist.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"class0/video{DAMAGED:03d}\tframe 0: ")
    caplog.set_level(logging.WARNING)
    loader = PretrainLoader(damaged_db, CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0),
                            blocklist=str(blocklist))
    batches = batches_of(loader, 1)
    assert DAMAGED not in ids(batches) and sum(int((b["substituted"] > 0).sum()) for b in batches) == 1
    # replaced before it reached the decoder: no pipeline failure to recover from
    assert not any("data pipeline failed" in r.getMessage() for r in caplog.records)
    assert any("in the blocklist" in r.getMessage() for r in caplog.records)
    # finetune.py / evaluate.py: a blocklisted val/test item is replaced and not scored
    val = batches_of(ClipLoader(damaged_db, "val", ClipPlanConfig(frames=4, crop_size=32),
                                ClipLoaderSettings(batch_size=4, num_threads=1), blocklist=str(blocklist)), 1)
    assert DAMAGED not in ids(val) and sum(int((~b["valid"]).sum()) for b in val) == 1


# ---------------------------------------------------------------- a partial copy of an LMDB

def test_a_cut_data_file_is_refused_at_open_not_a_sigbus(tmp_path):
    db = write_lmdb(tmp_path / "cut.lmdb", [coded_video(30, H, W) for _ in range(12)])
    data = db / "data.mdb"
    needed = lmdb_needed_bytes(str(data))
    assert needed == data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(needed // 2)
    with pytest.raises(DataFaultError, match=rf"data\.mdb is {needed // 2} bytes but .* needs {needed} bytes"):
        PretrainLoader(str(db), CFG, LoaderSettings(batch_size=4, num_threads=1))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--out", str(tmp_path / "run"),
                           f"data.path={db}", *TINY], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]          # not -7 (SIGBUS)
    assert f"{data} is {needed // 2} bytes but its database needs {needed} bytes" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- train.py end to end

def run_train(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_runs_to_the_end_over_damaged_jpegs_and_counts_them(damaged_db, tmp_path):
    out = tmp_path / "run"
    proc = run_train(tmp_path, "--out", str(out), f"data.path={damaged_db}", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["substituted_samples"] == 3   # 16 videos / 4 x 3 epochs
    assert proc.stderr.count(f"skipping video {DAMAGED} ") == 1


def test_train_resume_on_a_foreign_file_is_a_one_line_message(tmp_path, capsys):
    from fractions import Fraction

    import train

    evil = tmp_path / "evil.pt"
    torch.save({"x": Fraction(1, 3)}, evil)   # any pickled object beyond tensors and plain data
    other = tmp_path / "other.pt"
    torch.save({"format": "cstp-dali-finetune", "model": {}}, other)
    for path, expected in ((evil, "pickled Python objects"), (other, "is not a cstp-dali-checkpoint checkpoint"),
                           (tmp_path / "missing.pt", "checkpoint not found")):
        capsys.readouterr()
        assert train.main(["--out", str(tmp_path / "run"), "--resume", str(path), "data.path=x.lmdb", *TINY]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: --resume: ") and expected in lines[0], lines


# ---------------------------------------------------------------- video files

@pytest.fixture(scope="module")
def vp9_videos(tmp_path_factory):
    from tests.test_video_path import write_coded_video

    root = tmp_path_factory.mktemp("vp9") / "videos"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        write_coded_video(root / "a" / f"clip{i}.webm", 40, "webm")
    index = root.parent / "index.json"
    assert preprocessing_main(["index-videos", "--videos", str(root), "--out", str(index), "--quiet"]) == 0
    return index, root


@pytest.fixture()
def vp9_index(vp9_videos, tmp_path):
    """A fresh copy of the indexed videos (copy2 keeps the mtimes the index recorded)."""
    index, root = vp9_videos
    copy = tmp_path / "videos"
    shutil.copytree(root, copy, copy_function=shutil.copy2)
    data = json.loads(index.read_text())
    data["root"] = str(copy)
    (tmp_path / "index.json").write_text(json.dumps(data))
    return tmp_path / "index.json", copy


def cut_in_half(path):
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_a_video_cut_after_indexing_is_refused_at_open_and_reported_by_verify(vp9_index):
    index, root = vp9_index
    assert all("size" in v and "mtime_ns" in v for v in json.loads(index.read_text())["videos"])
    cut_in_half(root / "a" / "clip2.webm")
    with pytest.raises(DataFaultError, match=r"1 of the 4 videos .*clip2\.webm is \d+ bytes, \d+ when indexed; "
                                             r"re-index them \(python -m preprocessing index-videos"):
        PretrainLoader(str(index), CFG, LoaderSettings(batch_size=2, num_threads=1))
    blocklist = index.with_suffix(".blocklist.txt")
    assert preprocessing_main(["index-videos", "--out", str(index), "--verify", "--blocklist", str(blocklist),
                               "--quiet"]) == 1
    assert blocklist.read_text().startswith("a/clip2.webm\tthe file is ")


def test_a_video_cut_while_training_is_substituted(vp9_index, caplog):
    index, root = vp9_index
    caplog.set_level(logging.WARNING)
    loader = PretrainLoader(str(index), CFG, LoaderSettings(batch_size=2, num_threads=1, seed=0))
    cut_in_half(root / "a" / "clip1.webm")   # after the open check, before the first read
    batches = batches_of(loader, 1)
    assert 1 not in ids(batches) and len(ids(batches)) == 4
    assert sum(int((b["substituted"] > 0).sum()) for b in batches) == 1
    assert any("skipping video 1 " in r.getMessage() and "re-index" in r.getMessage() for r in caplog.records)


def test_frames_the_decoder_cannot_deliver_are_an_error_and_substituted(vp9_index, caplog):
    """A file that decodes to fewer frames than its index says (a stream broken inside,
    the index stale but the file's size and time unchanged): DALI would fill the missing
    frames with black; with pad_mode='none' that is a pipeline error, which the loader
    recovers from by substituting the sample."""
    index, root = vp9_index
    data = json.loads(index.read_text())
    data["videos"][3]["frames"] = 400   # the file holds 40
    index.write_text(json.dumps(data))
    caplog.set_level(logging.WARNING)
    loader = PretrainLoader(str(index), PlanConfig(frames=4, crop_size=32, ), LoaderSettings(batch_size=2,
                                                                                              num_threads=1, seed=0))
    batches = batches_of(loader, 2)
    assert len(batches) == 4 and 3 not in ids(batches)
    assert sum(int((b["substituted"] > 0).sum()) for b in batches) == 2
    named = [r.getMessage() for r in caplog.records if "skipping video 3 " in r.getMessage()]
    assert len(named) == 1 and "out-of-bounds frame index" in named[0]
    clips = ClipLoader(str(index), "train", ClipPlanConfig(frames=4, crop_size=32),
                       ClipLoaderSettings(batch_size=2, num_threads=1, seed=0))
    batches = batches_of(clips, 1)
    assert 3 not in ids(batches) and sum(int(b["substituted"].sum()) for b in batches) == 1


@pytest.mark.slow
def test_two_rank_gloo_run_with_a_damaged_frame_on_one_rank_finishes_on_both(damaged_db, tmp_path):
    """The rank that reads the damaged video recovers (locate, rebuild, resume) while the
    other waits in the gradient all-reduce; the epoch keeps its length on both ranks,
    so they stay in step, finish, and hold the same weights."""
    from pipelines.sharding import shard_indices
    from tests.test_ddp import torchrun_train

    # 16 videos, 2 ranks x batch 4: 2 steps per epoch; which rank reads video 6 per epoch:
    readers = [[r for r in (0, 1) if DAMAGED in shard_indices(16, r, 2, 4, 1, e, True)] for e in range(3)]
    assert all(len(r) == 1 for r in readers)
    out = tmp_path / "ddp"
    proc = torchrun_train(out, damaged_db)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["substituted_samples"] == 3
    assert len(set(summary["weight_digests"])) == 1      # every rank ended with the same weights
    # each recovery was done by the rank that read the damaged video, and only by it
    failed = [line for line in proc.stderr.splitlines() if "data pipeline failed" in line]
    assert sorted(int(line.split("[rank ")[1][0]) for line in failed) == sorted(r[0] for r in readers)


def rot_in_place(path, seed=0):
    """Bit rot: random bytes over the middle third of a file, its size and mtime kept
    (so the index's stamp still matches and only the decoder can tell)."""
    st = os.stat(path)
    data = bytearray(Path(path).read_bytes())
    third = len(data) // 3
    data[third:2 * third] = np.random.default_rng(seed).integers(0, 256, third, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_video_rotten_inside_fails_in_the_decoder_and_is_substituted(tmp_path, caplog):
    """MJPEG with damaged packets: libavcodec refuses them inside fn.decoders.video
    ("Failed to send packet to decoder"), the pipeline dies, the loader recovers."""
    from tests.test_video_path import write_coded_video

    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    for i in range(4):
        write_coded_video(root / "a" / f"clip{i}.avi", 60, "avi")
    index = tmp_path / "index.json"
    assert preprocessing_main(["index-videos", "--videos", str(root), "--out", str(index), "--quiet"]) == 0
    rot_in_place(root / "a" / "clip0.avi")
    caplog.set_level(logging.WARNING)
    loader = PretrainLoader(str(index), CFG, LoaderSettings(batch_size=2, num_threads=1, seed=0))
    batches = batches_of(loader, 1)
    assert len(batches) == 2 and 0 not in ids(batches)
    assert sum(int((b["substituted"] > 0).sum()) for b in batches) == 1
    assert any("data pipeline failed" in r.getMessage() for r in caplog.records)
    assert any("skipping video 0 " in r.getMessage() and "decoders.video" in r.getMessage() for r in caplog.records)
    # offline: index-videos --verify finds it (the stamp still matches: only decoding can
    # tell), and its blocklist keeps it from the decoder
    blocklist = tmp_path / "videos.blocklist.txt"
    assert preprocessing_main(["index-videos", "--out", str(index), "--verify", "--blocklist", str(blocklist),
                               "--quiet"]) == 1
    assert [line.split("\t")[0] for line in blocklist.read_text().splitlines()] == ["a/clip0.avi"]
    caplog.clear()
    loader = PretrainLoader(str(index), CFG, LoaderSettings(batch_size=2, num_threads=1, seed=0),
                            blocklist=str(blocklist))
    assert ids(batches_of(loader, 1)) == ids(batches)
    assert not any("data pipeline failed" in r.getMessage() for r in caplog.records)

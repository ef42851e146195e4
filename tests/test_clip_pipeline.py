"""The supervised clip loader (finetune / val / test) executes clip plans exactly on the
CPU backend, agrees with the numpy/PIL reference executor, shards, resumes, replaces bad
videos, and reads video files like LMDBs.

Frames are colour-coded (R = frame index, G = x, B = y, tests/lmdb_fixtures.py): with
boxes of exactly the crop size nothing is resampled, so the output names the frames
and the box DALI used."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import lmdb_store as fmt
from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
from pipelines.clip_plan import ClipPlanConfig, test_clip_plan, test_clip_plans, train_clip_plan, val_clip_plan
from pipelines.lmdb_store import VideoMeta
from pipelines.video_source import VideoIndexError
from preprocessing.__main__ import main as preprocessing_main
from preprocessing.ffmpeg_tools import executable, locate
from tests.lmdb_fixtures import coded_frame, coded_video, decode_coded, encode_jpeg, write_lmdb

HEIGHT, WIDTH, CROP = 48, 64, 32
LENGTHS = [5, 12, 13, 30, 40, 25, 61, 18, 9, 33]    # T=4, s=4: clip range 12, so 5/12/9 wrap
# Every box is CROP×CROP (train: area and ratio pinned; val/test: short side 48 -> 48, so
# the centre crop is 32 source pixels), so no resampling blurs the colour code.
EXACT = ClipPlanConfig(frames=4, stride=4, crop_size=CROP, test_short_side=HEIGHT,
                       min_area=CROP * CROP / (HEIGHT * WIDTH), max_area=CROP * CROP / (HEIGHT * WIDTH),
                       min_ratio=1.0, max_ratio=1.0, jitter_prob=0.0)
JPEG_TOLERANCE = 3  # grey levels: quality-100 4:4:4 JPEG of smooth gradients
# Mean |DALI - reference| per clip in grey levels when boxes are resampled and jittered
# (DALI's antialiased cubic vs PIL's bicubic; the jitter replays PIL's integer maths).
# Measured (CPU, DALI 2.4): at most 0.29 on smooth random frames and 0.27 on real
# clips, single pixels up to 10 levels apart. A 34-pixel box read as 38 pixels is
# 15-18 levels off on average, a clip without its jitter ~30
# (test_a_wrong_box_is_caught_by_the_reference_comparison).
MEAN_TOLERANCE = 1.0
REAL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-clips"


def settings(batch_size=2, **kw):
    return ClipLoaderSettings(batch_size=batch_size, num_threads=1, **kw)


@pytest.fixture(scope="module")
def coded_db(tmp_path_factory):
    return write_lmdb(tmp_path_factory.mktemp("db") / "coded.lmdb",
                      [coded_video(n, HEIGHT, WIDTH) for n in LENGTHS])


def meta(video, height=HEIGHT, width=WIDTH):
    return VideoMeta(f"class{video % 2}/video{video:03d}", video % 2, LENGTHS[video], height, width)


def to_pixels(clip) -> np.ndarray:
    """(3, T, S, S) float in [-1, 1] -> (T, S, S, 3) in grey levels."""
    return torch.as_tensor(clip).permute(1, 2, 3, 0).numpy().astype(np.float64) * 127.5 + 127.5


def expected_clip(plan, height=HEIGHT, width=WIDTH) -> np.ndarray:
    b = plan.box
    return np.stack([coded_frame(int(f), height, width)[b.y:b.y + b.h, b.x:b.x + b.w]
                     for f in plan.frames]).astype(np.float64)


def collect(loader, epochs=1):
    return [{k: v.clone() for k, v in batch.items()} for _ in range(epochs) for batch in loader]


def plan_of(mode, seed, epoch, video, clip_index, cfg=EXACT, crop_index=0, height=HEIGHT, width=WIDTH):
    if mode == "train":
        return train_clip_plan(seed, epoch, video, meta(video, height, width), cfg)
    if mode == "val":
        return val_clip_plan(video, meta(video, height, width), cfg)
    return test_clip_plan(video, meta(video, height, width), cfg, clip_index, crop_index)


def check_exact(batch, mode, seed, epoch, tolerance=JPEG_TOLERANCE, labels=True, cfg=EXACT, height=HEIGHT,
                width=WIDTH):
    for i, video in enumerate(batch["video_index"].tolist()):
        plan = plan_of(mode, seed, epoch, video, int(batch["clip_index"][i]), cfg, int(batch["crop_index"][i]),
                       height, width)
        got = to_pixels(batch["clip"][i])
        assert np.abs(got - expected_clip(plan, height, width)).max() <= tolerance + 1e-3, (mode, video, plan)
        # read back from the pixels alone (averaged over the clip, beyond JPEG noise):
        # frame indices, box corner, and a gradient of one level per pixel (no rescaling)
        frames, _, _ = decode_coded(got)
        assert np.array_equal(frames[:, 0, 0], plan.frames % 32)
        rows, cols = np.mgrid[0:CROP, 0:CROP]
        assert round(float((got[..., 1] - cols).mean())) == plan.box.x
        assert round(float((got[..., 2] - rows).mean())) == plan.box.y
        x_slope = np.polyfit(np.arange(CROP), got[..., 1].mean(axis=(0, 1)), 1)[0]
        y_slope = np.polyfit(np.arange(CROP), got[..., 2].mean(axis=(0, 2)), 1)[0]
        assert abs(x_slope - 1) < 0.02 and abs(y_slope - 1) < 0.02, (x_slope, y_slope)  # 33 px would be 1.03
        if labels:
            assert batch["label"][i] == video % 2


# ---------------------------------------------------------------- exact geometry


def test_train_clips_read_the_planned_frames_and_box(coded_db):
    loader = ClipLoader(coded_db, "train", EXACT, settings(batch_size=2, seed=3))
    assert loader.steps_per_epoch == 5 and loader.num_classes == 2
    batches = collect(loader, epochs=2)
    assert len(batches) == 10
    for epoch, group in enumerate((batches[:5], batches[5:])):
        videos = [v for b in group for v in b["video_index"].tolist()]
        assert sorted(videos) == list(range(10))     # one clip per video per epoch
        for batch in group:
            assert batch["clip"].shape == (2, 3, 4, CROP, CROP) and batch["clip"].dtype == torch.float32
            assert batch["valid"].dtype == torch.bool and batch["valid"].all()
            assert (batch["clip_index"] == 0).all() and (batch["substituted"] == 0).all()
            assert (batch["crop_index"] == 0).all()
            check_exact(batch, "train", 3, epoch)
    # a new epoch draws new starts
    first = {int(v): tuple(train_clip_plan(3, 0, v, meta(v), EXACT).frames) for v in range(10)}
    second = {int(v): tuple(train_clip_plan(3, 1, v, meta(v), EXACT).frames) for v in range(10)}
    assert first != second


@pytest.mark.parametrize("mode", ["val", "test"])
def test_val_and_test_clips_read_the_planned_frames_and_centre_box(coded_db, mode):
    loader = ClipLoader(coded_db, mode, EXACT, settings(batch_size=3))
    batches = collect(loader)
    items = [(v, c) for b in batches for v, c, ok in zip(b["video_index"].tolist(), b["clip_index"].tolist(),
                                                         b["valid"].tolist()) if ok]
    if mode == "val":
        assert items == [(v, 0) for v in range(10)]
    else:
        assert items == [(v, c) for v in range(10) for c in range(len(test_clip_plans(v, meta(v), EXACT)))]
    for batch in batches:
        check_exact(batch, mode, 1, 0)
        assert (batch["clip"].flatten(1).min(1).values >= -1).all()


@pytest.fixture(scope="module")
def portrait_db(tmp_path_factory):
    """The first four videos of coded_db, as portrait frames (64 high, 48 wide)."""
    return write_lmdb(tmp_path_factory.mktemp("portrait") / "portrait.lmdb",
                      [coded_video(n, WIDTH, HEIGHT) for n in LENGTHS[:4]])


@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
def test_three_test_crops_read_start_centre_and_end_of_the_long_side(coded_db, portrait_db, orientation):
    """spatial_crops=3: every (clip, crop) is one item, and the pixels DALI returns say
    where each crop sat: 32-pixel boxes at 0, 16 and 32 along the 64-pixel long side,
    8 pixels in from the 48-pixel short side."""
    three = ClipPlanConfig(**{**vars(EXACT), "spatial_crops": 3})
    db, videos, (height, width) = ((coded_db, 10, (HEIGHT, WIDTH)) if orientation == "landscape"
                                   else (portrait_db, 4, (WIDTH, HEIGHT)))
    loader = ClipLoader(db, "test", three, settings(batch_size=4))
    batches = collect(loader)
    rows = [(v, c, k) for b in batches for v, c, k, ok in zip(b["video_index"].tolist(), b["clip_index"].tolist(),
                                                              b["crop_index"].tolist(), b["valid"].tolist()) if ok]
    clips = [len(test_clip_plans(v, meta(v), EXACT)) for v in range(videos)]
    assert rows == [(v, c, k) for v in range(videos) for c in range(clips[v]) for k in range(3)]
    assert loader.num_items == 3 * sum(clips)
    placed = set()
    for batch in batches:
        check_exact(batch, "test", 1, 0, cfg=three, height=height, width=width)   # frames and box, from pixels
        rows_, cols_ = np.mgrid[0:CROP, 0:CROP]
        for i in range(len(batch["clip"])):
            got = to_pixels(batch["clip"][i])           # G = x, B = y of the source pixel, +- JPEG noise
            corner = round(float((got[..., 1] - cols_).mean())), round(float((got[..., 2] - rows_).mean()))
            placed.add((int(batch["crop_index"][i]), *corner))
    assert placed == ({(0, 0, 8), (1, 16, 8), (2, 32, 8)} if orientation == "landscape"
                      else {(0, 8, 0), (1, 8, 16), (2, 8, 32)})


# ---------------------------------------------------------------- reference-project LMDBs and lists

# name -> frames, for an LMDB in the reference project's layout; every video's frames carry
# its identity in B (y + 40 · its position in sorted order), so a video read in another's
# place is 40 levels off, a wrong frame 8 levels (R), a wrong box 1 level per pixel (G, B).
REF_VIDEOS = {"archery/a1": 9, "archery/a2": 14, "bowling/b1": 20, "bowling/b2": 11, "cycling/c1": 17,
              "cycling/c2": 8}


def ref_frame(name: str, index: int) -> np.ndarray:
    frame = coded_frame(index, HEIGHT, WIDTH)
    frame[..., 2] += 40 * sorted(REF_VIDEOS).index(name)
    return frame


def build_reference_layout_lmdb(path) -> list[str]:
    """As the reference's make_lmdb_kin.py writes it (tests/test_reference_lmdb.py): sorted
    names shuffled with seed 0, entry id = position in the shuffled list, only
    __keys__/__len__/__order__/__vlen__, none of our metadata."""
    import random

    import msgpack

    order = sorted(REF_VIDEOS)
    random.seed(0)
    random.shuffle(order)
    env = lmdb.open(str(path), map_size=1 << 28)
    with env.begin(write=True) as txn:
        for name in sorted(REF_VIDEOS):
            frames = [encode_jpeg(ref_frame(name, i)) for i in range(REF_VIDEOS[name])]
            txn.put(b"%09d" % order.index(name), msgpack.dumps(frames))
        txn.put(b"__keys__", msgpack.dumps([b"%09d" % i for i in range(len(order))]))
        txn.put(b"__len__", msgpack.dumps(len(order)))
        txn.put(b"__order__", msgpack.dumps(order))
        txn.put(b"__vlen__", msgpack.dumps([REF_VIDEOS[n] for n in sorted(REF_VIDEOS)]))
    env.close()
    return order


@pytest.mark.parametrize("executor", ["dali", "reference"])
def test_a_reference_lmdb_is_read_through_its_list_file(tmp_path, executor):
    db = tmp_path / "ref.lmdb"
    order = build_reference_layout_lmdb(db)
    listing = tmp_path / "testlist01_nframe.txt"
    # UCF style; neither sorted nor entry order; labels not in sorted-class order; one video
    # left out; one frame count a frame short of the entry's (the list wins)
    listed = [("cycling/c1", 0, 17), ("archery/a2", 2, 13), ("bowling/b1", 1, 20), ("cycling/c2", 0, 8),
              ("archery/a1", 2, 9)]
    listing.write_text("".join(f"{name}.avi {label} {frames}\n" for name, label, frames in listed))
    assert [order.index(n) for n, *_ in listed] != list(range(5))      # entry ids are not list positions
    loader = ClipLoader(db, "test", EXACT, settings(batch_size=3), list_path=listing, executor=executor)
    assert [(m.name, m.label, m.frames) for m in loader.metas] == listed
    assert loader.classes == ["cycling", "bowling", "archery"]
    batches = collect(loader)
    rows = [(v, c) for b in batches for v, c, ok in zip(b["video_index"].tolist(), b["clip_index"].tolist(),
                                                       b["valid"].tolist()) if ok]
    assert rows == [(v, c) for v, (_, _, n) in enumerate(listed) for c in range(len(test_clip_plans(
        v, VideoMeta("", 0, n, HEIGHT, WIDTH), EXACT)))]
    for batch in batches:
        for i, video in enumerate(batch["video_index"].tolist()):
            name, label, frames = listed[video]
            assert batch["label"][i] == label
            plan = test_clip_plan(video, loader.metas[video], EXACT, int(batch["clip_index"][i]))
            assert plan.frames.max() < frames
            b = plan.box
            want = np.stack([ref_frame(name, int(f))[b.y:b.y + b.h, b.x:b.x + b.w] for f in plan.frames])
            got = to_pixels(batch["clip"][i])
            assert np.abs(got - want).max() <= JPEG_TOLERANCE + 1e-3, (name, plan)
            assert np.array_equal(decode_coded(got)[0][:, 0, 0], plan.frames % 32)   # the frame indices
    listing.write_text("golf/g1.avi 0 30\n")
    with pytest.raises(ValueError, match="none of the 1 videos"):
        ClipLoader(db, "test", EXACT, settings(), list_path=listing, executor=executor)


# ---------------------------------------------------------------- DALI vs reference


@pytest.fixture(scope="module")
def smooth_db(tmp_path_factory):
    rng = np.random.default_rng(0)
    videos = []
    for n in (30, 20, 41, 16, 26, 33):
        base = rng.integers(0, 255, size=(n, 6, 8, 3)).astype(np.uint8)
        videos.append([np.asarray(Image.fromarray(f).resize((WIDTH, HEIGHT), Image.BICUBIC)) for f in base])
    return write_lmdb(tmp_path_factory.mktemp("smooth") / "smooth.lmdb", videos)


def mean_levels(a, b) -> float:
    return float((a - b).abs().flatten(1).mean(1).max()) * 127.5


@pytest.mark.parametrize("mode, crops", [("train", 1), ("test", 1), ("test", 3)])
def test_dali_equals_the_reference_executor(smooth_db, mode, crops):
    cfg = ClipPlanConfig(frames=4, stride=3, crop_size=24, test_short_side=30, jitter_prob=0.5,
                         spatial_crops=crops)
    dali_loader = ClipLoader(smooth_db, mode, cfg, settings(batch_size=3, seed=2))
    dali = collect(dali_loader)
    ref = collect(ClipLoader(smooth_db, mode, cfg, settings(batch_size=3, seed=2), executor="reference"))
    assert len(dali) == len(ref) > 0
    jittered = 0
    for d, r in zip(dali, ref):
        for key in ("label", "video_index", "clip_index", "valid", "substituted", "crop_index"):
            assert torch.equal(d[key], r[key]), key
        assert mean_levels(d["clip"], r["clip"]) < MEAN_TOLERANCE
        if mode == "train":
            jittered += sum(train_clip_plan(2, 0, v, dali_loader.metas[v], cfg).appearance.jitter
                            for v in d["video_index"].tolist())
    if mode == "train":
        assert 0 < jittered < 6  # both executors jittered some clips and left others alone


def test_a_wrong_box_is_caught_by_the_reference_comparison(smooth_db):
    """The tolerance above is tight enough to see a box shifted by a few pixels."""
    cfg = ClipPlanConfig(frames=4, stride=3, crop_size=24, test_short_side=30)
    dali = collect(ClipLoader(smooth_db, "val", cfg, settings(batch_size=3)))
    shifted = collect(ClipLoader(smooth_db, "val", ClipPlanConfig(frames=4, stride=3, crop_size=24,
                                                                  test_short_side=34), settings(batch_size=3),
                                 executor="reference"))
    assert mean_levels(dali[0]["clip"], shifted[0]["clip"]) > 3 * MEAN_TOLERANCE


def test_real_clips_agree_with_the_reference(tmp_path):
    clips = ["v_ApplyEyeMakeup_g01_c01.avi", "v_BaseballPitch_g01_c01.avi"]
    if not all((REAL_CLIPS / c).exists() for c in clips) or locate("ffmpeg") is None:
        pytest.skip(f"needs ffmpeg and {clips} in {REAL_CLIPS}")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{c}\n" for c in clips))
    db = tmp_path / "real.lmdb"
    assert preprocessing_main(["build-lmdb", "--videos", str(REAL_CLIPS), "--list", str(listing), "--out", str(db),
                               "--short-side", "64", "--quiet"]) == 0
    # test: 64 -> 72 px short side, crop 56: a 50-pixel source box resampled to 56
    cfg = ClipPlanConfig(frames=4, stride=8, crop_size=56, test_short_side=72, jitter_prob=1.0)
    for mode in ("train", "test"):
        dali = collect(ClipLoader(db, mode, cfg, settings(batch_size=2, seed=4)))
        ref = collect(ClipLoader(db, mode, cfg, settings(batch_size=2, seed=4), executor="reference"))
        assert len(dali) == len(ref) > 0
        for d, r in zip(dali, ref):
            assert torch.equal(d["video_index"], r["video_index"])
            assert mean_levels(d["clip"], r["clip"]) < MEAN_TOLERANCE, mode


# ---------------------------------------------------------------- sharding and resume


@pytest.mark.parametrize("mode", ["val", "test"])
def test_val_and_test_read_every_item_once_over_two_ranks(coded_db, mode):
    per_rank = []
    for rank in range(2):
        loader = ClipLoader(coded_db, mode, EXACT, settings(batch_size=4), rank=rank, world_size=2)
        batches = collect(loader)
        assert len(batches) == loader.steps_per_epoch
        per_rank.append([(v, c, ok) for b in batches for v, c, ok in
                         zip(b["video_index"].tolist(), b["clip_index"].tolist(), b["valid"].tolist())])
    assert len(per_rank[0]) == len(per_rank[1])
    valid = [(v, c) for items in per_rank for v, c, ok in items if ok]
    single = collect(ClipLoader(coded_db, mode, EXACT, settings(batch_size=4)))
    everything = [(v, c) for b in single for v, c, ok in
                  zip(b["video_index"].tolist(), b["clip_index"].tolist(), b["valid"].tolist()) if ok]
    assert valid == everything and len(set(valid)) == len(valid)
    assert sum(not ok for items in per_rank for *_, ok in items) == 2 * len(per_rank[0]) - len(valid)


def test_train_ranks_are_disjoint_and_equal(coded_db):
    per_rank = [[v for b in collect(ClipLoader(coded_db, "train", EXACT, settings(batch_size=2, seed=5),
                                               rank=rank, world_size=3))
                 for v in b["video_index"].tolist()] for rank in range(3)]
    assert [len(ids) for ids in per_rank] == [2, 2, 2]
    flat = [v for ids in per_rank for v in ids]
    assert len(set(flat)) == 6


def test_a_video_subset_is_all_that_is_read(coded_db):
    subset = [1, 4, 6, 9]
    train = collect(ClipLoader(coded_db, "train", EXACT, settings(batch_size=2), videos=subset))
    assert sorted(v for b in train for v in b["video_index"].tolist()) == subset
    val = collect(ClipLoader(coded_db, "val", EXACT, settings(batch_size=2), videos=subset))
    assert [v for b in val for v in b["video_index"].tolist()] == subset
    check_exact(val[1], "val", 1, 0)  # video_index indexes the full database


@pytest.mark.parametrize("mode", ["train", "test"])
def test_resume_at_sample_k_equals_the_uninterrupted_stream(coded_db, mode):
    full_loader = ClipLoader(coded_db, mode, EXACT, settings(batch_size=2, seed=9))
    full = collect(full_loader, epochs=2)
    steps = full_loader.steps_per_epoch
    resumed_loader = ClipLoader(coded_db, mode, EXACT, settings(batch_size=2, seed=9), start_sample=4)
    assert resumed_loader.steps_in_epoch(0) == steps - 2 and resumed_loader.steps_in_epoch(1) == steps
    resumed = collect(resumed_loader, epochs=2)
    assert len(resumed) == len(full) - 2
    for a, b in zip(full[2:], resumed):
        assert torch.equal(a["video_index"], b["video_index"]) and torch.equal(a["clip_index"], b["clip_index"])
        assert torch.equal(a["clip"], b["clip"])


# ---------------------------------------------------------------- bad data


def test_a_corrupt_jpeg_is_replaced_and_flagged(coded_db, tmp_path, caplog):
    path = tmp_path / "damaged.lmdb"
    shutil.copytree(coded_db, path)
    good = [encode_jpeg(f) for f in coded_video(LENGTHS[3], HEIGHT, WIDTH)]
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(fmt.video_key(3), fmt.pack([g[: len(g) // 2] for g in good]))   # truncated JPEGs
    env.close()
    caplog.set_level(logging.WARNING, logger="pipelines.clip_source")
    train = collect(ClipLoader(path, "train", EXACT, settings(batch_size=2, seed=3)))
    ids = [v for b in train for v in b["video_index"].tolist()]
    flags = [s for b in train for s in b["substituted"].tolist()]
    assert 3 not in ids and sum(flags) == 1 and len(ids) == 10
    assert all(b["valid"].all() for b in train)
    assert sum("skipping video 3" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    test = collect(ClipLoader(path, "test", EXACT, settings(batch_size=2)))
    rows = [(v, c, ok, s) for b in test for v, c, ok, s in zip(b["video_index"].tolist(), b["clip_index"].tolist(),
                                                               b["valid"].tolist(), b["substituted"].tolist())]
    replaced = [r for r in rows if r[3]]
    assert len(replaced) == len(test_clip_plans(3, meta(3), EXACT)) and not any(r[2] for r in replaced)
    assert all(v != 3 for v, *_ in rows)
    assert sum("skipping video 3" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------- video files


def write_coded_video(path, num_frames, codec_args):
    raw = b"".join(coded_frame(i, HEIGHT, WIDTH).tobytes() for i in range(num_frames))
    subprocess.run([executable("ffmpeg"), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                    f"{WIDTH}x{HEIGHT}", "-r", "25", "-i", "-", *codec_args, str(path)], input=raw, check=True)


VP9 = ["-c:v", "libvpx-vp9", "-lossless", "1", "-pix_fmt", "yuv444p"]
MJPEG = ["-c:v", "mjpeg", "-q:v", "1", "-pix_fmt", "yuvj444p"]
H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
VIDEO_TOLERANCE = 4  # grey levels; VP9 lossless 4:4:4 and MJPEG q1 4:4:4 (tests/test_video_path.py)


@pytest.fixture(scope="module")
def video_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    for video, n in enumerate(LENGTHS[:6]):
        folder = root / f"class{video}"   # one folder each: the index keeps the LMDB's video order
        folder.mkdir(exist_ok=True)
        ext, args = ("webm", VP9) if video % 2 == 0 else ("avi", MJPEG)
        write_coded_video(folder / f"video{video:03d}.{ext}", n, args)
    out = root / "index.json"
    assert preprocessing_main(["index-videos", "--videos", str(root), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("mode", ["train", "test"])
def test_video_files_give_the_lmdb_clips(video_index, coded_db, mode):
    index = json.loads(video_index.read_text())
    assert [v["frames"] for v in index["videos"]] == LENGTHS[:6]   # same ids as the LMDB's first six
    from_video = collect(ClipLoader(video_index, mode, EXACT, settings(batch_size=2, seed=7)))
    from_lmdb = collect(ClipLoader(coded_db, mode, EXACT, settings(batch_size=2, seed=7), videos=range(6)))
    assert len(from_video) == len(from_lmdb) > 0
    for v, l in zip(from_video, from_lmdb):
        assert torch.equal(v["video_index"], l["video_index"]) and torch.equal(v["clip_index"], l["clip_index"])
        diff = (v["clip"] - l["clip"]).abs().max().item() * 127.5
        assert diff <= VIDEO_TOLERANCE + JPEG_TOLERANCE, diff
        check_exact(v, mode, 7, 0, tolerance=VIDEO_TOLERANCE, labels=False)
        assert v["label"].tolist() == v["video_index"].tolist()  # the index's label: the folder's position


def test_h264_on_cpu_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    write_coded_video(tmp_path / "x" / "clip.mp4", 20, H264)
    index = tmp_path / "h264.json"
    assert preprocessing_main(["index-videos", "--videos", str(tmp_path), "--out", str(index), "--quiet"]) == 0
    with pytest.raises(VideoIndexError, match=r"clip\.mp4: codec h264 .*GPU.*build-lmdb"):
        ClipLoader(index, "test", EXACT, settings(), device="cpu")


@pytest.mark.parametrize("executor", ["dali", "reference"])
def test_worker_processes_give_the_same_batches(coded_db, executor):
    """Parallel external_source (DALI) or DataLoader workers (reference): same samples."""
    serial = collect(ClipLoader(coded_db, "train", EXACT, settings(batch_size=2, seed=6), executor=executor))
    parallel = collect(ClipLoader(coded_db, "train", EXACT, settings(batch_size=2, seed=6, workers=2),
                                  executor=executor))
    assert len(serial) == len(parallel) == 5
    for a, b in zip(serial, parallel):
        assert torch.equal(a["video_index"], b["video_index"]) and torch.equal(a["clip"], b["clip"])


@pytest.mark.parametrize("executor", ["dali", "reference"])
def test_resume_after_the_last_step_of_an_epoch_starts_the_next(coded_db, executor):
    full = collect(ClipLoader(coded_db, "train", EXACT, settings(batch_size=2, seed=9), executor=executor), epochs=2)
    loader = ClipLoader(coded_db, "train", EXACT, settings(batch_size=2, seed=9), start_epoch=0, start_sample=10,
                        executor=executor)
    assert loader.steps_in_epoch(0) == 0
    assert list(loader) == []                   # epoch 0: nothing left
    resumed = collect(loader)                   # epoch 1
    assert len(resumed) == 5
    for a, b in zip(full[5:], resumed):
        assert torch.equal(a["video_index"], b["video_index"]) and torch.equal(a["clip"], b["clip"])

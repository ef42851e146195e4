"""The reference executor (numpy/PIL in a torch DataLoader) applies the plans exactly,
and DALI's batches equal its batches one to one.

Frames are colour-coded (R = frame index, G = x, B = y) where exactness matters; smooth
random frames and real clips (ffmpeg-decoded) check the resampling paths."""

import subprocess
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import lmdb_store as fmt
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import Box, PlanConfig, ViewPlan, make_pretrain_plan
from pipelines.reference_executor import (BATCH_KEYS, LABEL_KEYS, ReferencePretrainDataset,
                                          ReferencePretrainLoader, execute_view_reference)
from preprocessing.ffmpeg_tools import executable, locate
from tests.lmdb_fixtures import coded_frame, coded_video, decode_coded, encode_jpeg, write_lmdb

HEIGHT, WIDTH, CROP = 80, 96, 32
# area fixed at CROP²/(W·H) and ratio 1: every box is CROP×CROP, so no resampling blurs the code
EXACT = PlanConfig(frames=8, crop_size=CROP, min_area=CROP * CROP / (HEIGHT * WIDTH),
                   max_area=CROP * CROP / (HEIGHT * WIDTH), min_ratio=1.0, max_ratio=1.0,
                   strong_prob=0.0)  # geometry only; appearance: tests/test_augment.py
JPEG_TOLERANCE = 3  # grey levels: quality-100 4:4:4 JPEG of smooth gradients
# Mean |DALI - reference| per view, in grey levels, when boxes are resampled (DALI's
# antialiased cubic vs PIL's bicubic). Measured: 0.17-0.21 on smooth random frames
# (max 1 level), 0.16-0.19 on real clips (max 7 levels, at 4:2:0 chroma edges). A flipped,
# rotated or wrong-frame view differs by 23-110 levels on average.
RESAMPLED_MEAN_TOLERANCE = 1.0
REAL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-clips"


@pytest.fixture(scope="module")
def coded_db(tmp_path_factory):
    lengths = [30, 64, 7, 130, 45, 90, 16, 200, 33, 120, 70, 25]
    return write_lmdb(tmp_path_factory.mktemp("db") / "coded.lmdb",
                      [coded_video(n, HEIGHT, WIDTH) for n in lengths]), lengths


def to_pixels(view) -> np.ndarray:
    """(3, T, S, S) float in [-1, 1] (tensor or array) -> (T, S, S, 3) in grey levels."""
    view = torch.as_tensor(view)
    return view.permute(1, 2, 3, 0).numpy().astype(np.float64) * 127.5 + 127.5


def expected_view(view_plan) -> np.ndarray:
    """The plan applied with numpy to the analytic coded frames: crop, rot90 (CCW), flip."""
    b = view_plan.box
    clips = []
    for f in view_plan.frames:
        crop = coded_frame(int(f), HEIGHT, WIDTH)[b.y:b.y + b.h, b.x:b.x + b.w]
        crop = np.rot90(crop, view_plan.rotation, axes=(0, 1))
        clips.append(crop[:, ::-1] if view_plan.flip else crop)
    return np.stack(clips).astype(np.float64)


def top_left_source(box: Box, rotation: int, flip: bool) -> tuple[int, int]:
    """(x, y) in the source frame of the output's top-left pixel, worked out by hand
    (not with np.rot90) for k counter-clockwise quarter turns followed by a mirror."""
    x0, y0, s = box.x, box.y, box.w - 1
    top_left = {0: (x0, y0), 1: (x0 + s, y0), 2: (x0 + s, y0 + s), 3: (x0, y0 + s)}
    top_right = {0: (x0 + s, y0), 1: (x0 + s, y0 + s), 2: (x0, y0 + s), 3: (x0, y0)}
    return (top_right if flip else top_left)[rotation]


def collect(loader, epochs=1):
    return [{k: v.clone() for k, v in batch.items()} for _ in range(epochs) for batch in loader]


def mean_abs_levels(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().mean()) * 127.5


# ---------------------------------------------------------------- the executor itself


@pytest.mark.parametrize("rotation", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_view_is_cropped_rotated_counter_clockwise_then_flipped(rotation, flip):
    frames = np.array([3, 0, 17, 3], dtype=np.int64)
    jpegs = [encode_jpeg(coded_frame(int(f), HEIGHT, WIDTH)) for f in frames]
    view = ViewPlan(frames, Box(41, 23, CROP, CROP), rotation, flip)
    out = execute_view_reference(jpegs, view, CROP)
    assert out.dtype == np.float32 and out.shape == (3, 4, CROP, CROP)
    assert out.min() >= -1 and out.max() <= 1
    pixels = to_pixels(out)
    assert np.abs(pixels - expected_view(view)).max() <= JPEG_TOLERANCE + 1e-3
    frame_ids, xs, ys = decode_coded(pixels)
    assert np.array_equal(frame_ids[:, 0, 0], frames)
    want_x, want_y = top_left_source(view.box, rotation, flip)
    assert abs(xs[0, 0, 0] - want_x) <= 2 and abs(ys[0, 0, 0] - want_y) <= 2


def test_reference_loader_follows_the_plans(coded_db):
    path, lengths = coded_db
    loader = ReferencePretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, seed=3))
    assert loader.batch_size == 4 and loader.steps_per_epoch == 3 and len(loader.metas) == 12
    batches = collect(loader, epochs=2)  # iterating twice = epochs 0 and 1
    assert len(batches) == 6
    seen = set()
    for step, batch in enumerate(batches):
        epoch = step // 3
        assert list(batch) == list(BATCH_KEYS)
        assert batch["view1"].dtype == torch.float32 and batch["view1"].shape == (4, 3, 8, CROP, CROP)
        assert all(batch[k].dtype == torch.int64 and batch[k].shape == (4,) for k in LABEL_KEYS)
        for i, video in enumerate(batch["video_index"].tolist()):
            plan = make_pretrain_plan(3, epoch, video, lengths[video], HEIGHT, WIDTH, EXACT)
            for name, vp in (("view1", plan.view1), ("view2", plan.view2)):
                assert np.abs(to_pixels(batch[name][i]) - expected_view(vp)).max() <= JPEG_TOLERANCE + 1e-3
                seen.add((vp.rotation, vp.flip))
            labels = (plan.spatial_label, plan.temporal_label, plan.speed_label,
                      plan.view1.rotation, plan.view2.rotation, plan.video_index)
            assert [int(batch[k][i]) for k in LABEL_KEYS] == list(labels)
    assert {r for r, _ in seen} == {0, 1, 2, 3} and {f for _, f in seen} == {False, True}
    loader.close()


# ---------------------------------------------------------------- DALI against the reference


def assert_same_batches(dali_batches, reference_batches, max_levels=None, mean_levels=None):
    assert len(dali_batches) == len(reference_batches) > 0
    for d, r in zip(dali_batches, reference_batches):
        for key in LABEL_KEYS:
            assert torch.equal(d[key], r[key]), key
        for key in ("view1", "view2"):
            assert d[key].shape == r[key].shape
            for i in range(d[key].shape[0]):
                diff = (d[key][i] - r[key][i]).abs() * 127.5
                if max_levels is not None:
                    assert float(diff.max()) <= max_levels + 1e-3, (key, int(d["video_index"][i]))
                if mean_levels is not None:
                    assert float(diff.mean()) < mean_levels, (key, int(d["video_index"][i]))


def test_dali_equals_the_reference_batch_for_batch(coded_db):
    path, _ = coded_db
    dali = collect(PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, num_threads=1, seed=7)), 2)
    # workers=2: the forked-worker path (LMDB reopened per process) must give the same batches
    reference = collect(ReferencePretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, seed=7,
                                                                                 workers=2)), 2)
    assert [b["video_index"].tolist() for b in dali] == [b["video_index"].tolist() for b in reference]
    assert_same_batches(dali, reference, max_levels=JPEG_TOLERANCE)


def smooth_random_videos(count, num_frames, seed=0):
    """Low-frequency noise, upsampled; every frame independent, so a wrong frame shows."""
    rng = np.random.default_rng(seed)
    videos = []
    for _ in range(count):
        base = rng.integers(0, 255, size=(num_frames, 6, 8, 3)).astype(np.uint8)
        videos.append([np.asarray(Image.fromarray(f).resize((WIDTH, HEIGHT), Image.BICUBIC)) for f in base])
    return videos


def test_resampled_boxes_agree_and_wrong_geometry_is_caught(tmp_path):
    path = write_lmdb(tmp_path / "smooth.lmdb", smooth_random_videos(8, 40))
    cfg = PlanConfig(frames=4, crop_size=48, strong_prob=0.0)  # boxes of ~34..96 px: both up- and down-sampling
    settings = LoaderSettings(batch_size=4, num_threads=1, seed=1)
    dali = collect(PretrainLoader(str(path), cfg, settings))
    reference = collect(ReferencePretrainLoader(str(path), cfg, settings))
    assert_same_batches(dali, reference, mean_levels=RESAMPLED_MEAN_TOLERANCE)
    # The bound is tight enough to see a wrong flip, rotation or frame in any view.
    wrong = {
        "flip": lambda v: v.flip(-1),
        "rotation": lambda v: torch.rot90(v, 1, (-2, -1)),
        "frame": lambda v: v.roll(1, dims=1),
    }
    for d, r in zip(dali, reference):
        for key in ("view1", "view2"):
            for i in range(d[key].shape[0]):
                for what, corrupt in wrong.items():
                    assert mean_abs_levels(d[key][i], corrupt(r[key][i])) > 5 * RESAMPLED_MEAN_TOLERANCE, what


def ffmpeg_jpegs(video: Path, out_dir: Path, num_frames: int, short_side: int, quality: int = 2) -> list[bytes]:
    """The first frames of a video as JPEGs (ffmpeg's own encoder, 4:2:0), scaled to a short
    side, without the preprocessing package (which other tests cover)."""
    out_dir.mkdir(parents=True)
    subprocess.run([executable("ffmpeg"), "-nostdin", "-loglevel", "error", "-i", str(video),
                    "-vf", f"scale=-2:{short_side}", "-frames:v", str(num_frames), "-q:v", str(quality), "-f", "image2",
                    str(out_dir / "%05d.jpg")], check=True, timeout=120)
    return [p.read_bytes() for p in sorted(out_dir.glob("*.jpg"))]


def write_lmdb_from_jpegs(path, videos: list[list[bytes]], heights: list[int], widths: list[int]):
    """An LMDB in our layout from already-encoded frames."""
    names = [f"real/video{i:03d}" for i in range(len(videos))]
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        metas = []
        for vid, (frames, h, w) in enumerate(zip(videos, heights, widths)):
            for key, value in fmt.layout_entries(vid, frames):
                txn.put(key, value)
            metas.append(fmt.VideoMeta(names[vid], 0, len(frames), h, w).to_dict())
        txn.put(fmt.KEYS_KEY, fmt.pack([fmt.video_key(i) for i in range(len(videos))]))
        txn.put(fmt.LEN_KEY, fmt.pack(len(videos)))
        txn.put(fmt.ORDER_KEY, fmt.pack(names))
        txn.put(fmt.VLEN_KEY, fmt.pack([len(v) for v in videos]))
        txn.put(fmt.META_KEY, fmt.pack(metas))
        txn.put(fmt.CLASSES_KEY, fmt.pack(["real"]))
        txn.put(fmt.INFO_KEY, fmt.pack({"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION}))
    env.close()
    return path


def test_real_clips_agree(tmp_path):
    clips = ["v_Basketball_g01_c01.avi", "demo.mp4"]
    if not all((REAL_CLIPS / c).exists() for c in clips) or locate("ffmpeg") is None:
        pytest.skip(f"needs ffmpeg and {clips} in {REAL_CLIPS}")
    videos = [ffmpeg_jpegs(REAL_CLIPS / c, tmp_path / c, num_frames=40, short_side=128) for c in clips]
    sizes = [fmt.jpeg_size(v[0]) for v in videos]
    path = write_lmdb_from_jpegs(tmp_path / "real.lmdb", videos, [h for h, _ in sizes], [w for _, w in sizes])
    cfg = PlanConfig(frames=8, crop_size=64, strong_prob=0.0)
    settings = LoaderSettings(batch_size=2, num_threads=1, seed=1)
    dali = collect(PretrainLoader(str(path), cfg, settings), epochs=3)
    reference = collect(ReferencePretrainLoader(str(path), cfg, settings), epochs=3)
    assert_same_batches(dali, reference, mean_levels=RESAMPLED_MEAN_TOLERANCE)
    for d, r in zip(dali, reference):  # and a mirrored view would not pass
        for i in range(2):
            assert mean_abs_levels(d["view1"][i], r["view1"][i].flip(-1)) > 5 * RESAMPLED_MEAN_TOLERANCE


# ---------------------------------------------------------------- sharding and resume


@pytest.mark.parametrize("world", [2, 3])
def test_shards_line_up_with_dali(coded_db, world):
    path, _ = coded_db
    settings = LoaderSettings(batch_size=2, num_threads=1, seed=4)
    for rank in range(world):
        dali = PretrainLoader(str(path), EXACT, settings, rank=rank, world_size=world)
        dali_ids = [b["video_index"].tolist() for b in collect(dali, epochs=2)]
        dataset = ReferencePretrainDataset(str(path), EXACT, seed=4, batch_size=2, rank=rank, world_size=world)
        assert len(dataset) == dali.samples_per_rank
        reference_ids = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            ids = [int(dataset[p]["video_index"]) for p in range(len(dataset))]
            reference_ids += [ids[k:k + 2] for k in range(0, len(ids), 2)]
        assert dali_ids == reference_ids


def test_resume_lines_up_with_dali(coded_db):
    path, _ = coded_db
    settings = LoaderSettings(batch_size=2, num_threads=1, seed=9)
    dali = PretrainLoader(str(path), EXACT, settings, start_epoch=1, start_sample=4)
    reference = ReferencePretrainLoader(str(path), EXACT, settings, start_epoch=1, start_sample=4)
    assert reference.steps_in_epoch(1) == dali.steps_in_epoch(1) == 4
    assert reference.steps_in_epoch(2) == dali.steps_in_epoch(2) == 6
    dali_batches, reference_batches = collect(dali, 2), collect(reference, 2)
    assert len(reference_batches) == 10
    assert [b["video_index"].tolist() for b in dali_batches] == \
        [b["video_index"].tolist() for b in reference_batches]
    assert_same_batches(dali_batches, reference_batches, max_levels=JPEG_TOLERANCE)

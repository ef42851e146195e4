"""The DALI pretraining pipeline executes plans exactly (CPU backend).

Frames are colour-coded (R = frame index, G = x, B = y), so the output tells which
frames, which box, which rotation and which flip DALI applied."""


import numpy as np
import pytest
from PIL import Image

from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig, make_pretrain_plan
from tests.lmdb_fixtures import coded_frame, coded_video, decode_coded, write_lmdb

HEIGHT, WIDTH, CROP = 80, 96, 32
# area fixed at CROP²/(W·H) and ratio 1: every box is CROP×CROP, so no resampling blurs the code
EXACT = PlanConfig(frames=8, crop_size=CROP, min_area=CROP * CROP / (HEIGHT * WIDTH),
                   max_area=CROP * CROP / (HEIGHT * WIDTH), min_ratio=1.0, max_ratio=1.0,
                   strong_prob=0.0)  # geometry only; appearance: tests/test_augment.py
JPEG_TOLERANCE = 3  # grey levels: quality-100 4:4:4 JPEG of smooth gradients


@pytest.fixture(scope="module")
def coded_db(tmp_path_factory):
    lengths = [30, 64, 7, 130, 45, 90, 16, 200, 33, 120, 70, 25]
    return write_lmdb(tmp_path_factory.mktemp("db") / "coded.lmdb",
                      [coded_video(n, HEIGHT, WIDTH) for n in lengths]), lengths


def to_pixels(view):
    """(3, T, S, S) float in [-1, 1] -> (T, S, S, 3) in grey levels."""
    return view.permute(1, 2, 3, 0).numpy() * 127.5 + 127.5


def expected_view(view_plan):
    """The plan applied with numpy to the analytic coded frames: crop, rot90 (CCW), flip."""
    b = view_plan.box
    clips = []
    for f in view_plan.frames:
        crop = coded_frame(int(f), HEIGHT, WIDTH)[b.y:b.y + b.h, b.x:b.x + b.w]
        crop = np.rot90(crop, view_plan.rotation, axes=(0, 1))
        clips.append(crop[:, ::-1] if view_plan.flip else crop)
    return np.stack(clips).astype(np.float64)


def collect(loader, epochs=1):
    out = []
    for _ in range(epochs):
        for batch in loader:
            out.append({k: v.clone() for k, v in batch.items()})
    return out


def test_dali_executes_the_plan_exactly(coded_db):
    path, lengths = coded_db
    loader = PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, num_threads=1, seed=3))
    batches = collect(loader, epochs=2)
    assert len(batches) == 6
    seen_rotations, seen_flips = set(), set()
    for epoch, group in enumerate((batches[:3], batches[3:])):
        for batch in group:
            assert batch["view1"].shape == (4, 3, 8, CROP, CROP)
            assert batch["view1"].min() >= -1 and batch["view1"].max() <= 1
            for i, video in enumerate(batch["video_index"].tolist()):
                plan = make_pretrain_plan(3, epoch, video, lengths[video], HEIGHT, WIDTH, EXACT)
                for name, vp in (("view1", plan.view1), ("view2", plan.view2)):
                    got = to_pixels(batch[name][i])
                    want = expected_view(vp)
                    assert np.abs(got - want).max() <= JPEG_TOLERANCE + 1e-3, (name, video, vp)
                    frames, xs, ys = decode_coded(got)
                    assert np.array_equal(frames[:, 0, 0], vp.frames % 32)
                    seen_rotations.add(vp.rotation)
                    seen_flips.add(vp.flip)
                assert batch["rot1"][i] == plan.view1.rotation and batch["rot2"][i] == plan.view2.rotation
                assert batch["spatial_label"][i] == plan.spatial_label
                assert batch["temporal_label"][i] == plan.temporal_label
                assert batch["speed_label"][i] == plan.speed_label
    assert seen_rotations == {0, 1, 2, 3} and seen_flips == {False, True}


def test_rotation_is_counter_clockwise_and_flip_horizontal(coded_db):
    """Direction check independent of the numpy oracle: read the corners back."""
    path, lengths = coded_db
    loader = PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, num_threads=1, seed=5))
    checked = 0
    for batch in loader:
        for i, video in enumerate(batch["video_index"].tolist()):
            plan = make_pretrain_plan(5, 0, video, lengths[video], HEIGHT, WIDTH, EXACT)
            vp = plan.view1
            _, xs, ys = decode_coded(to_pixels(batch["view1"][i])[0])
            x0, y0, s = vp.box.x, vp.box.y, CROP - 1
            # top-left output pixel's source, for k CCW quarter turns, before the flip
            top_left = {0: (x0, y0), 1: (x0 + s, y0), 2: (x0 + s, y0 + s), 3: (x0, y0 + s)}[vp.rotation]
            top_right = {0: (x0 + s, y0), 1: (x0 + s, y0 + s), 2: (x0, y0 + s), 3: (x0, y0)}[vp.rotation]
            corner = top_right if vp.flip else top_left
            assert abs(xs[0, 0] - corner[0]) <= 2 and abs(ys[0, 0] - corner[1]) <= 2, (vp, xs[0, 0], ys[0, 0])
            checked += 1
    assert checked == 12


def test_resized_crops_match_a_bicubic_reference(tmp_path):
    """General boxes (resampled to the crop size): DALI's cubic resize against PIL's bicubic."""
    rng = np.random.default_rng(0)
    # smooth natural-ish frames: low-frequency noise upsampled
    videos = []
    for _ in range(4):
        base = rng.integers(0, 255, size=(40, 6, 8, 3)).astype(np.uint8)
        videos.append([np.asarray(Image.fromarray(f).resize((WIDTH, HEIGHT), Image.BICUBIC)) for f in base])
    path = write_lmdb(tmp_path / "smooth.lmdb", videos)
    cfg = PlanConfig(frames=4, crop_size=24, strong_prob=0.0)
    loader = PretrainLoader(str(path), cfg, LoaderSettings(batch_size=4, num_threads=1, seed=1, shuffle=False))
    batch = next(iter(loader))
    diffs = []
    for i, video in enumerate(batch["video_index"].tolist()):
        plan = make_pretrain_plan(1, 0, video, 40, HEIGHT, WIDTH, cfg)
        vp = plan.view1
        want = []
        for f in vp.frames:
            b = vp.box
            crop = Image.fromarray(videos[video][f]).crop((b.x, b.y, b.x + b.w, b.y + b.h))
            crop = np.rot90(np.asarray(crop.resize((24, 24), Image.BICUBIC)), vp.rotation, axes=(0, 1))
            want.append(crop[:, ::-1] if vp.flip else crop)
        diffs.append(np.abs(to_pixels(batch["view1"][i]) - np.stack(want)).mean())
    assert max(diffs) < 4.0, diffs  # mean grey-level difference (JPEG + resampling kernels)


def test_resume_at_sample_k_equals_the_uninterrupted_stream(coded_db):
    path, _ = coded_db
    settings = LoaderSettings(batch_size=2, num_threads=1, seed=9)
    full = collect(PretrainLoader(str(path), EXACT, settings), epochs=2)
    resumed_loader = PretrainLoader(str(path), EXACT, settings, start_epoch=0, start_sample=4)
    assert resumed_loader.steps_in_epoch(0) == 4
    resumed = collect(resumed_loader, epochs=2)
    assert len(full) == 12 and len(resumed) == 10
    for a, b in zip(full[2:], resumed):
        assert a["video_index"].tolist() == b["video_index"].tolist()
        assert np.array_equal(a["view1"].numpy(), b["view1"].numpy())
        assert np.array_equal(a["view2"].numpy(), b["view2"].numpy())


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_equal_shards(coded_db, world):
    path, _ = coded_db
    per_rank = []
    for rank in range(world):
        loader = PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=2, num_threads=1, seed=4),
                                rank=rank, world_size=world)
        per_rank.append([v for b in collect(loader) for v in b["video_index"].tolist()])
    assert len({len(ids) for ids in per_rank}) == 1 and len(per_rank[0]) % 2 == 0
    flat = [v for ids in per_rank for v in ids]
    assert len(flat) == len(set(flat))
    assert len(flat) == (12 // world) // 2 * 2 * world


def test_parallel_workers_give_the_same_batches(coded_db):
    path, _ = coded_db
    serial = collect(PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, num_threads=1, seed=2)))
    parallel = collect(PretrainLoader(str(path), EXACT,
                                      LoaderSettings(batch_size=4, num_threads=1, seed=2, workers=2)))
    assert [b["video_index"].tolist() for b in serial] == [b["video_index"].tolist() for b in parallel]
    for a, b in zip(serial, parallel):
        assert np.array_equal(a["view1"].numpy(), b["view1"].numpy())

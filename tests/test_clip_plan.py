"""Clip plans of finetuning / validation / testing (pipelines/clip_plan.py): the test
protocol's clips for every video length against an independent rewrite of the
reference's 1-indexed rule, and the train plan's ranges, determinism and rates."""

import math
import re

import numpy as np
import pytest

from pipelines import clip_plan as cp
from pipelines.clip_plan import ClipPlanConfig, clip_config_from
from pipelines.lmdb_store import VideoMeta

CFG = ClipPlanConfig()   # T = 16, stride 4, crop 112, short side 128: the reference's


def reference_test_clips(n: int, frames: int = 16, stride: int = 4) -> list[list[int]]:
    """The reference test.py rule, written independently, in its own 1-indexed frames:
    for n > span, starts 1, 1+span, ... while start < n - span + 1, then the clip
    ending on frame n; otherwise one clip from frame 1, wrapping back to frame 1."""
    span = (frames - 1) * stride
    if n <= span:
        return [[(k * stride) % n + 1 for k in range(frames)]]
    clips, start = [], 1
    while start < n - span + 1:
        clips.append([start + k * stride for k in range(frames)])
        start += span
    clips.append([n - span + k * stride for k in range(frames)])
    return clips


@pytest.mark.parametrize("n", range(1, 301))
def test_test_clips_match_the_reference_for_every_length(n):
    meta = VideoMeta("v", 0, n, 240, 320)
    plans = cp.test_clip_plans(7, meta, CFG)
    want = reference_test_clips(n)
    assert [list(p.frames + 1) for p in plans] == want            # 0-indexed = 1-indexed - 1
    assert cp.test_clip_starts(n, CFG) == [c[0] - 1 for c in want]
    assert [p.clip_index for p in plans] == list(range(len(want)))
    assert all(p.frames.min() >= 0 and p.frames.max() < n for p in plans)
    if n > 60:
        assert plans[-1].frames[-1] == n - 1                      # the end-aligned clip


def test_reference_clip_counts():
    assert len(cp.test_clip_starts(181, CFG)) == 4
    assert len(cp.test_clip_starts(121, CFG)) == 3
    assert cp.test_clip_starts(181, CFG) == [0, 60, 120, 120]
    assert cp.test_clip_starts(182, CFG) == [0, 60, 120, 121]
    assert cp.test_clip_starts(60, CFG) == [0] and cp.test_clip_starts(61, CFG) == [0, 0]


def test_the_validation_clip_is_the_middle_test_clip_in_every_epoch():
    for n in (1, 30, 61, 100, 181, 250, 300):
        meta = VideoMeta("v", 3, n, 240, 320)
        starts = cp.test_clip_starts(n, CFG)
        plan = cp.val_clip_plan(5, meta, CFG)
        assert plan.frames[0] == starts[len(starts) // 2]
        assert plan.box == cp.test_box(320, 240, CFG) and plan.label == 3 and not plan.appearance.jitter
    assert cp.val_clip_start(250, CFG) == 120   # starts 0, 60, 120, 180, 189


def test_test_box_is_short_side_128_then_centre_crop_112():
    assert cp.test_box(340, 256, CFG) == cp.Box(58, 16, 224, 224)      # UCF frames: exact
    assert cp.test_box(256, 340, CFG) == cp.Box(16, 58, 224, 224)      # portrait
    assert cp.test_box(112, 112, ClipPlanConfig(test_short_side=112)) == cp.Box(0, 0, 112, 112)
    for width, height in ((454, 256), (320, 240), (171, 128), (640, 360), (100, 90)):
        box = cp.test_box(width, height, CFG)
        assert box.inside(width, height) and box.w == box.h
        # torchvision: Resize(128) then CenterCrop(112), whose offsets round in resized
        # pixels: the box agrees within one pixel of the resized frame
        k = 128 / min(width, height)
        resized_w, resized_h = int(round(width * k)), int(round(height * k))
        left, top = round((resized_w - 112) / 2), round((resized_h - 112) / 2)
        assert abs(box.x * k - left) <= 1 and abs(box.y * k - top) <= 1
        assert abs(box.w - 112 / k) <= 0.5


# ---------------------------------------------------------------- train


def train_plans(n, width=320, height=240, count=400, cfg=CFG):
    meta = VideoMeta("v", 2, n, height, width)
    return [cp.train_clip_plan(seed, 0, 11, meta, cfg) for seed in range(count)]


@pytest.mark.parametrize("n", [61, 70, 181, 300])
def test_train_starts_are_uniform_over_the_whole_video(n):
    plans = train_plans(n, count=600)
    starts = np.array([int(p.frames[0]) for p in plans])
    assert starts.min() >= 0 and starts.max() <= n - 61
    for p in plans:
        assert np.all(np.diff(p.frames) == 4) and p.frames[-1] <= n - 1 and p.label == 2
    if n <= 70:
        assert set(starts.tolist()) == set(range(n - 60))   # both ends reachable
    else:
        assert abs(starts.mean() - (n - 61) / 2) < 0.1 * (n - 61)   # sd of the mean: ~0.012·(n-61)


@pytest.mark.parametrize("n", [1, 7, 16, 59, 60])
def test_short_train_videos_wrap_inside_the_video(n):
    for p in train_plans(n, count=20):
        assert list(p.frames) == [(4 * k) % n for k in range(16)]


def test_train_plans_are_deterministic_per_seed_epoch_and_video():
    meta = VideoMeta("v", 0, 200, 240, 320)
    a = cp.train_clip_plan(3, 4, 5, meta, CFG)
    b = cp.train_clip_plan(3, 4, 5, meta, CFG)
    assert np.array_equal(a.frames, b.frames) and a.box == b.box and a.appearance == b.appearance
    others = [cp.train_clip_plan(*key, meta, CFG) for key in ((3, 5, 5), (3, 4, 6), (4, 4, 5))]
    assert all((o.box, int(o.frames[0])) != (a.box, int(a.frames[0])) for o in others)


def test_the_stride_is_a_setting():
    cfg = ClipPlanConfig(stride=2, frames=8)
    for p in train_plans(40, count=50, cfg=cfg):
        assert np.all(np.diff(p.frames) == 2) and p.frames[0] <= 40 - 1 - 14
    assert cp.test_clip_starts(40, cfg) == [0, 14, 25]


@pytest.mark.parametrize("width, height", [(340, 256), (256, 340), (454, 256), (160, 120)])
def test_random_resized_crops_stay_inside_and_within_area_and_ratio(width, height):
    swapped = 0
    for p in train_plans(100, width, height, count=500):
        b = p.box
        assert b.inside(width, height) and b.w >= 1 and b.h >= 1
        # rounding w and h to pixels moves the area and ratio by at most a pixel's worth
        assert 0.2 * width * height - (b.w + b.h) <= b.w * b.h <= width * height
        assert 3 / 4 - 1 / min(b.w, b.h) <= b.w / b.h <= 4 / 3 + 1 / min(b.w, b.h)
        swapped += b.w < b.h
    assert 0.25 < swapped / 500 < 0.75 if width > height else swapped > 0


def test_the_crop_falls_back_to_the_largest_centred_box_of_an_allowed_ratio():
    # 400x20: every drawn box (>= 0.2 of the area, ratio <= 4/3) is taller than 20 px
    for p in train_plans(100, 400, 20, count=20):
        assert p.box == cp.Box((400 - 27) // 2, 0, 27, 20)


def test_jitter_is_drawn_with_probability_0_3_and_within_its_ranges():
    plans = train_plans(100, count=2000)
    looks = [p.appearance for p in plans]
    rate = sum(look.jitter for look in looks) / len(looks)
    assert abs(rate - 0.3) < 0.04, rate             # binomial sd 0.01
    for look in looks:
        assert look.angle == 0 and look.grey_channels is None and look.blur_sigma == 0   # jitter only
        if look.jitter:
            assert all(0.6 <= v <= 1.4 for v in (look.brightness, look.contrast, look.saturation))
            assert -0.1 <= look.hue <= 0.1
        else:
            assert (look.brightness, look.contrast, look.saturation, look.hue) == (1, 1, 1, 0)
    assert not any(p.appearance.jitter for p in train_plans(100, count=200, cfg=ClipPlanConfig(jitter_prob=0)))


def test_jitter_arrays_are_what_color_jitter_reads():
    look = cp.Appearance(strong=True, jitter=True, brightness=1.2, contrast=0.7, saturation=1.1, hue=-0.05)
    on, b, c, s, h = cp.jitter_arrays(look)
    assert (float(on), float(h)) == (1.0, float(int(-0.05 * 255)))
    assert math.isclose(float(b), 1.2, rel_tol=1e-6) and math.isclose(float(c), 0.7, rel_tol=1e-6)
    assert all(a.shape == () and a.dtype == np.float32 for a in (on, b, c, s, h))


def test_config_validates_and_reads_yaml_sections():
    with pytest.raises(ValueError, match="test_short_side"):
        ClipPlanConfig(test_short_side=100)
    with pytest.raises(ValueError, match="jitter"):
        ClipPlanConfig(jitter_prob=1.5)
    with pytest.raises(ValueError, match="stride"):
        ClipPlanConfig(stride=0)
    for bad, message in [(dict(frames=1000), "frames must be in \\[1, "), (dict(stride=10 ** 6), "stride must be in"),
                         (dict(test_short_side=10 ** 5), "test_short_side must be <=")]:
        with pytest.raises(ValueError, match=message):
            ClipPlanConfig(**bad)
    # evaluate.py's key=value overrides and a checkpoint's clip section are typed here: 'abc' was a
    # TypeError message ('<=' not supported ...), stride=2.5 a silently fractional stride
    for bad, message in [({"frames": "abc"}, "frames must be an integer, got 'abc'"),
                         ({"stride": 2.5}, "stride must be an integer"), ({"frames": True}, "frames must be"),
                         ({"hue_range": 0.1}, "hue_range must be a pair of numbers"),
                         ({"min_area": "big"}, "min_area must be a number")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            clip_config_from(bad)
    assert clip_config_from({"min_area": 1}).min_area == 1
    cfg = clip_config_from({"stride": 2, "hue_range": [-0.2, 0.2], "unknown": 1})
    assert cfg.stride == 2 and cfg.hue_range == (-0.2, 0.2) and cfg.clip_range == 30


def test_videos_without_frames_are_refused():
    with pytest.raises(ValueError, match="no frames"):
        cp.train_clip_plan(0, 0, 1, VideoMeta("v", 0, 0, 240, 320), CFG)


# ---------------------------------------------------------------- spatial crops

THREE = ClipPlanConfig(spatial_crops=3)


def test_three_crops_of_ucf_frames_in_source_pixels():
    # 340x256 -> short side 128 (k = 1/2): 112-pixel crops at x = 0, 29, 58 of the 170-pixel-wide
    # resized frame, i.e. 224-pixel boxes at x = 0, 58, 116, centred vertically (y = 16)
    assert cp.test_boxes(340, 256, THREE) == [cp.Box(0, 16, 224, 224), cp.Box(58, 16, 224, 224),
                                              cp.Box(116, 16, 224, 224)]
    # portrait: top / centre / bottom, centred horizontally
    assert cp.test_boxes(256, 340, THREE) == [cp.Box(16, 0, 224, 224), cp.Box(16, 58, 224, 224),
                                              cp.Box(16, 116, 224, 224)]
    # 320x240: side round(112 * 240 / 128) = 210; the end box touches the right border
    assert cp.test_boxes(320, 240, THREE) == [cp.Box(0, 15, 210, 210), cp.Box(55, 15, 210, 210),
                                              cp.Box(110, 15, 210, 210)]
    # a square frame counts as landscape (pytorchvideo's uniform_crop: height > width is portrait)
    assert cp.test_boxes(128, 128, THREE) == [cp.Box(0, 8, 112, 112), cp.Box(8, 8, 112, 112),
                                              cp.Box(16, 8, 112, 112)]
    # one crop: the centre box, as before
    assert cp.test_boxes(340, 256, CFG) == [cp.test_box(340, 256, CFG)]


@pytest.mark.parametrize("width, height", [(454, 256), (171, 128), (640, 360), (240, 320), (100, 90)])
def test_three_crops_agree_with_resize_then_crop(width, height):
    """pytorchvideo's uniform_crop after Resize(128): offsets 0, (L - 112) // 2 and L - 112
    along the long side L, in resized pixels; the boxes agree within one resized pixel."""
    k = 128 / min(width, height)
    resized = (int(round(width * k)), int(round(height * k)))
    long_axis = 1 if height > width else 0
    boxes = cp.test_boxes(width, height, THREE)
    centre = cp.test_box(width, height, THREE)
    want = [0, (resized[long_axis] - 112) // 2, resized[long_axis] - 112]
    for box, offset in zip(boxes, want):
        assert box.inside(width, height) and (box.w, box.h) == (centre.w, centre.h)
        along, across = (box.y, box.x) if long_axis else (box.x, box.y)
        assert abs(along * k - offset) <= 1
        assert across == (centre.x if long_axis else centre.y)     # centred across the short side
    first, last = boxes[0], boxes[-1]
    assert (first.y if long_axis else first.x) == 0
    assert (last.y + last.h == height) if long_axis else (last.x + last.w == width)


def test_each_clip_and_crop_is_one_test_item_clip_major():
    meta = VideoMeta("v", 4, 182, 256, 340)
    plans = cp.test_clip_plans(2, meta, THREE)
    starts = cp.test_clip_starts(182, THREE)                      # [0, 60, 120, 121]
    assert [(p.clip_index, p.crop_index) for p in plans] == [(c, k) for c in range(4) for k in range(3)]
    assert [int(p.frames[0]) for p in plans] == [s for s in starts for _ in range(3)]
    assert [p.box.x for p in plans] == [0, 58, 116] * 4 and all(p.label == 4 for p in plans)
    for p in plans:
        q = cp.test_clip_plan(2, meta, THREE, p.clip_index, p.crop_index)
        assert (q.box, q.clip_index, q.crop_index) == (p.box, p.clip_index, p.crop_index)
        assert np.array_equal(q.frames, p.frames)
    with pytest.raises(IndexError, match="4 test clips x 3 crops"):
        cp.test_clip_plan(2, meta, THREE, 0, 3)
    # one crop: the same clips as before, crop_index 0
    assert [(p.clip_index, p.crop_index) for p in cp.test_clip_plans(2, meta, CFG)] == [(c, 0) for c in range(4)]
    # validation keeps the centre crop whatever the test's crop count
    assert cp.val_clip_plan(2, meta, THREE).box == cp.test_box(340, 256, CFG)
    with pytest.raises(ValueError, match="spatial_crops"):
        ClipPlanConfig(spatial_crops=2)
    assert clip_config_from({"spatial_crops": 3}).spatial_crops == 3

"""The CSTP sampling plan (docs/method.md#the-sampling-plan): ranges, labels against geometry, determinism."""

import numpy as np
import pytest

from pipelines.plan import (Box, PlanConfig, majority_label_rates, make_pretrain_plan, max_speed_label,
                            second_box_candidate, temporal_shift)

CFG = PlanConfig()  # reference: 16 frames, 112 px, strides 1/2/4/8


def plans(cfg, lengths, seeds, height=240, width=320):
    for n in lengths:
        for seed in seeds:
            yield n, make_pretrain_plan(seed, epoch=seed % 3, index=seed, num_frames=n, height=height,
                                        width=width, cfg=cfg)


@pytest.mark.parametrize("frames", [16, 8])
def test_every_index_inside_the_video_for_lengths_1_to_400(frames):
    cfg = PlanConfig(frames=frames)
    count = 0
    for n, p in plans(cfg, range(1, 401), range(3)):
        for view in (p.view1, p.view2):
            assert view.frames.shape == (frames,)
            assert view.frames.min() >= 0 and view.frames.max() < n, (n, view.frames)
        count += 1
    for n, p in plans(cfg, [1, 7, 15, 16, 31, 60, 121, 400], range(1000)):
        for view in (p.view1, p.view2):
            assert 0 <= view.frames.min() and view.frames.max() < n
        count += 1
    assert count == 400 * 3 + 8 * 1000


def test_strides_follow_the_length_cap():
    # docs/method.md#playback-rate-label: max_pb = int(log2(N / (T-1))), capped at 3 (stride 8)
    assert [max_speed_label(n, CFG) for n in (1, 14, 15, 29, 30, 59, 60, 119, 120, 400)] == \
        [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    for n, p in plans(CFG, [10, 29, 30, 59, 60, 119, 120, 300], range(300)):
        assert p.stride == CFG.strides[p.speed_label]
        assert p.speed_label <= max_speed_label(n, CFG)
        for view in (p.view1, p.view2):
            if n > p.clip_range:  # normal case: evenly strided, no wrap
                assert np.all(np.diff(view.frames) == p.stride)


def test_all_strides_occur_on_long_videos():
    seen = {p.speed_label for _, p in plans(CFG, [300], range(200))}
    assert seen == {0, 1, 2, 3}


def test_reference_shift_table():
    # docs/method.md#temporal-overlap-label table, including the truncation of (1-0.8)*15 to 2
    table = {1: [0, 2, 6, 9, 12], 2: [0, 5, 12, 18, 24], 4: [0, 11, 24, 36, 48], 8: [0, 23, 48, 72, 96]}
    for stride, shifts in table.items():
        assert [temporal_shift(r, 15 * stride) for r in CFG.temporal_rates] == shifts


def test_temporal_overlap_measured_from_windows_matches_the_class():
    labels = set()
    for n, p in plans(CFG, [20, 45, 90, 150, 300], range(1000)):
        rate = CFG.temporal_rates[p.temporal_label]
        measured = p.temporal_overlap
        if p.clip_range >= n:  # short video: both views are the same wrapped frames
            assert p.temporal_label == 0 and np.array_equal(p.view1.frames, p.view2.frames)
            continue
        # the shift truncates, so the overlap is the class rate plus less than one frame
        assert rate - 1e-9 <= measured < rate + 1 / p.clip_range + 1e-9, (rate, measured, p.clip_range)
        assert abs(p.starts[1] - p.starts[0]) == temporal_shift(rate, p.clip_range)
        assert np.array_equal(p.view1.frames, p.starts[0] + p.stride * np.arange(16))
        assert np.array_equal(p.view2.frames, p.starts[1] + p.stride * np.arange(16))
        labels.add(p.temporal_label)
    assert labels == {0, 1, 2, 3, 4}


@pytest.mark.parametrize("size", [(240, 320), (256, 340), (320, 240), (120, 160), (90, 400)])
def test_spatial_overlap_measured_from_boxes_matches_the_class(size):
    height, width = size
    labels = set()
    for _, p in plans(CFG, [100], range(1000), height=height, width=width):
        b1, b2 = p.view1.box, p.view2.box
        assert b1.inside(width, height) and b2.inside(width, height)
        assert (b1.w, b1.h) == (b2.w, b2.h)
        rate = CFG.spatial_rates[p.spatial_label]
        # overlap = w_o * floor(rate*A/w_o): short of rate*A by less than one row
        assert rate - 1 / b1.h - 1e-9 <= p.spatial_overlap <= rate + 1e-9, (rate, p.spatial_overlap, b1)
        labels.add(p.spatial_label)
    assert labels == {0, 1, 2, 3, 4}


def test_first_box_is_a_random_resized_crop():
    areas, ratios = [], []
    for _, p in plans(CFG, [100], range(1000)):
        b = p.view1.box
        areas.append(b.w * b.h / (320 * 240))
        ratios.append(max(b.w / b.h, b.h / b.w))
    assert min(areas) >= 0.19 and max(areas) <= 1.0
    assert max(ratios) <= 4 / 3 + 0.02
    assert np.mean(areas) == pytest.approx(0.5, abs=0.1)  # fits rejected; mean of U(0.2,1) is 0.6


def test_second_box_corners_shift_diagonally():
    first = Box(100, 80, 60, 40)
    expected_xy = {0: (90, 64), 1: (110, 64), 2: (90, 96), 3: (110, 96)}
    for corner, xy in expected_xy.items():
        box = second_box_candidate(first, 0.5, corner, 50)   # overlap 50 x int(0.5*2400/50)=24
        assert (box.x, box.y) == xy
        assert first.intersection_area(box) == 50 * 24


def test_rotations_and_flips_are_independent_per_view():
    rots = np.array([(p.view1.rotation, p.view2.rotation) for _, p in plans(CFG, [100], range(2000))])
    flips = np.array([(p.view1.flip, p.view2.flip) for _, p in plans(CFG, [100], range(2000))])
    assert set(rots[:, 0]) == {0, 1, 2, 3} and set(rots[:, 1]) == {0, 1, 2, 3}
    assert 0.2 < np.mean(rots[:, 0] == rots[:, 1]) < 0.3      # 1/4 if independent
    assert 0.4 < flips.mean() < 0.6
    assert 0.4 < np.mean(flips[:, 0] == flips[:, 1]) < 0.6


def test_plan_is_a_pure_function_of_seed_epoch_index_and_video():
    a = make_pretrain_plan(7, 3, 11, 200, 240, 320, CFG)
    b = make_pretrain_plan(7, 3, 11, 200, 240, 320, CFG)
    assert np.array_equal(a.view1.frames, b.view1.frames) and a.view1.box == b.view1.box
    assert (a.spatial_label, a.temporal_label, a.view2.rotation) == (b.spatial_label, b.temporal_label,
                                                                      b.view2.rotation)
    others = [make_pretrain_plan(7, 4, 11, 200, 240, 320, CFG), make_pretrain_plan(8, 3, 11, 200, 240, 320, CFG),
              make_pretrain_plan(7, 3, 12, 200, 240, 320, CFG)]
    for o in others:
        assert not (np.array_equal(a.view1.frames, o.view1.frames) and a.view1.box == o.view1.box)


def test_bad_videos_and_configs_are_refused():
    with pytest.raises(ValueError, match="no frames"):
        make_pretrain_plan(0, 0, 5, 0, 240, 320, CFG)
    with pytest.raises(ValueError, match="frames"):
        PlanConfig(frames=1)
    with pytest.raises(ValueError, match="full overlap"):
        PlanConfig(temporal_rates=(0.8, 1.0))
    # sizes are bounded (DALI stacks at most 999 frames; a 4000-px crop only ends out of memory),
    # strides are integers, rate lists are not empty: each was a traceback or a silent float stride
    for bad, message in [(dict(frames=1000), "frames must be in"), (dict(crop_size=4000), "crop_size must be in"),
                         (dict(strides=(1.5,)), "strides must be integers"), (dict(strides=()), "strides"),
                         (dict(temporal_rates=()), "temporal_rates must be a non-empty"),
                         (dict(spatial_rates=(1.0, 2.0)), "spatial_rates"),
                         (dict(min_ratio=0.0), "min_ratio")]:
        with pytest.raises(ValueError, match=message):
            PlanConfig(**bad)


def test_label_statistics_are_reported(capsys):
    """Not asserted uniform (rejection sampling biases them: docs/method.md#label-distributions); printed."""
    counts = {k: np.zeros(5, int) for k in ("speed", "temporal", "spatial")}
    for i in range(2000):
        p = make_pretrain_plan(1, 0, i, 120 + i % 180, 256, 340, CFG)
        counts["speed"][p.speed_label] += 1
        counts["temporal"][p.temporal_label] += 1
        counts["spatial"][p.spatial_label] += 1
    print({k: v.tolist() for k, v in counts.items()})
    assert counts["speed"][4] == 0 and all(v.sum() == 2000 for v in counts.values())
    assert all(c > 0 for c in counts["temporal"]) and all(c > 0 for c in counts["spatial"])


def test_majority_label_rates():
    ps = [make_pretrain_plan(0, 0, i, 20, 240, 320, CFG) for i in range(400)]  # 20 frames: stride 1 only
    rates = majority_label_rates(ps)
    assert rates["speed"] == 1.0
    assert 0.25 <= rates["rotation"] < 0.32
    spatial = np.bincount([p.spatial_label for p in ps])
    assert rates["spatial"] == spatial.max() / 400

"""Appearance augmentation (docs/method.md#appearance, the "base" pipeline): the plan
draws it, the DALI graph and the reference executor apply it, and they agree.

Measured |DALI - reference| per view, mean over pixels, in grey levels (smooth random
frames below; real clips, ffmpeg JPEGs 4:2:0, in brackets), on top of the ~0.2 that
resampling alone gives (DALI's antialiased cubic vs PIL's bicubic):
- nothing / small rotation / grey: 0.17-0.21 (0.17-0.20). The fused 90k+δ rotation
  equals the reference's rot90 then PIL rotate(δ, NEAREST) except at nearest-neighbour
  ties (< 0.5 % of pixels, where a neighbour's value is taken).
- colour jitter incl. hue: 0.11-0.35. Brightness and contrast are PIL's ImageEnhance
  (truncating blends, PIL's luma) in both executors; saturation and hue are one YIQ
  colour matrix (sources.saturation_hue_matrix) in both: DALI's fused ops and the
  reference's numpy agree exactly on the identical-input test below (16 random looks,
  0 of 14,400 values differ). The YIQ hue replaced torchvision's HSV hue shift in both
  executors for speed (pretrain_pipeline.color_jitter); it is NOT the HSV shift (6.7-22
  levels from it on these saturated frames), a documented deviation.
- blur: 0.5-0.75 (0.6-0.9); a true Gaussian (window 2·ceil(3σ)+1, reflect-101 border)
  against PIL's three-pass extended box blur with clamped borders.
- everything at once: 0.8-1.3.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from cstp.config import DEFAULTS
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import NO_APPEARANCE, Appearance, Box, PlanConfig, ViewPlan, make_pretrain_plan
from pipelines.reference_executor import ReferencePretrainLoader, execute_view_reference
from pipelines.sources import blur_window, grey_matrices, plan_to_arrays, PRETRAIN_PARAM_OUTPUTS
from tests.lmdb_fixtures import encode_jpeg, write_lmdb

HEIGHT, WIDTH, FRAMES, CROP = 80, 96, 4, 48
PLAIN_MEAN_TOLERANCE = 1.0     # nothing, rotation, grey (as tests/test_reference_executor.py)
JITTER_MEAN_TOLERANCE = 1.0    # brightness, contrast, saturation, hue
BLUR_MEAN_TOLERANCE = 1.5
ALL_MEAN_TOLERANCE = 2.0
OFF = dict(small_angle_range=(0.0, 0.0), jitter_prob=0.0, grey_prob=0.0, blur_prob=0.0)


def only(**kw) -> PlanConfig:
    """Every view strong, with only the given augmentations switched on."""
    return PlanConfig(frames=FRAMES, crop_size=CROP, strong_prob=1.0, **{**OFF, **kw})


# ---------------------------------------------------------------- the plan


def many_views(cfg, n=2000):
    views = []
    for i in range(n):
        plan = make_pretrain_plan(seed=11, epoch=i % 5, index=i, num_frames=90, height=HEIGHT, width=WIDTH,
                                  cfg=cfg)
        views += [plan.view1.appearance, plan.view2.appearance]
    return views


def test_frequencies_and_ranges_follow_the_reference():
    cfg = PlanConfig(frames=FRAMES)
    views = many_views(cfg)                              # 4000 views
    strong = [v for v in views if v.strong]
    assert abs(len(strong) / len(views) - 0.3) < 0.03    # sd 0.007
    assert abs(np.mean([v.jitter for v in strong]) - 0.8) < 0.05   # sd ~0.012 each below
    assert abs(np.mean([v.grey for v in strong]) - 0.2) < 0.05
    assert abs(np.mean([v.blur for v in strong]) - 0.5) < 0.06
    assert all(v == NO_APPEARANCE for v in views if not v.strong)
    for v in strong:
        assert -10 <= v.angle <= 10
        if v.jitter:
            assert all(0.6 <= f <= 1.4 for f in (v.brightness, v.contrast, v.saturation))
            assert -0.1 <= v.hue <= 0.1
        else:
            assert (v.brightness, v.contrast, v.saturation, v.hue) == (1.0, 1.0, 1.0, 0.0)
        if v.grey:
            assert len(v.grey_channels) == FRAMES and set(v.grey_channels) <= {0, 1, 2}
        assert 0.1 <= v.blur_sigma <= 2.0 if v.blur else v.blur_sigma == 0.0
    # the values really vary: per-frame channels differ within a view, angles spread
    assert any(len(set(v.grey_channels)) > 1 for v in strong if v.grey)
    assert np.std([v.angle for v in strong]) > 4


def test_appearance_is_deterministic_and_leaves_the_geometry_alone():
    cfg = PlanConfig(frames=FRAMES, strong_prob=0.5)
    geometry_only = PlanConfig(frames=FRAMES, strong_prob=0.0)
    seen = set()
    for index in range(200):
        args = dict(seed=3, epoch=1, index=index, num_frames=120, height=HEIGHT, width=WIDTH)
        a, b, g = make_pretrain_plan(cfg=cfg, **args), make_pretrain_plan(cfg=cfg, **args), \
            make_pretrain_plan(cfg=geometry_only, **args)
        assert (a.view1.appearance, a.view2.appearance) == (b.view1.appearance, b.view2.appearance)
        # appearance is drawn after everything else: the labels and geometry do not move
        for x, y in ((a.view1, g.view1), (a.view2, g.view2)):
            assert (x.box, x.rotation, x.flip) == (y.box, y.rotation, y.flip)
            assert np.array_equal(x.frames, y.frames)
        assert (a.spatial_label, a.temporal_label, a.speed_label) == (g.spatial_label, g.temporal_label,
                                                                     g.speed_label)
        assert g.view1.appearance == g.view2.appearance == NO_APPEARANCE
        seen.add(a.view1.appearance.angle)
    assert len(seen) > 50  # different samples, different draws


def test_probabilities_change_which_augmentations_apply_not_their_values():
    args = dict(seed=5, epoch=0, index=7, num_frames=120, height=HEIGHT, width=WIDTH)
    full = make_pretrain_plan(cfg=PlanConfig(frames=FRAMES, strong_prob=1.0, jitter_prob=1.0, grey_prob=1.0,
                                             blur_prob=1.0), **args).view1.appearance
    part = make_pretrain_plan(cfg=PlanConfig(frames=FRAMES, strong_prob=1.0, jitter_prob=1.0, grey_prob=0.0,
                                             blur_prob=0.0), **args).view1.appearance
    assert (part.angle, part.brightness, part.hue) == (full.angle, full.brightness, full.hue)
    assert not part.grey and not part.blur and full.grey and full.blur


def test_config_defaults_and_validation():
    plan = DEFAULTS["plan"]
    built = PlanConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()})
    assert built == PlanConfig()  # the config's defaults are PlanConfig's: the reference's
    assert plan["strong_prob"] == 0.3
    from pipelines.plan import plan_config_from
    assert set(plan) <= set(PlanConfig.__dataclass_fields__)   # every config key reaches the plan
    built = plan_config_from(plan)
    for key, value in plan.items():
        assert getattr(built, key) == (tuple(value) if isinstance(value, list) else value), key
    with pytest.raises(ValueError, match="strong_prob"):
        PlanConfig(strong_prob=1.5)
    with pytest.raises(ValueError, match="hue_range"):
        PlanConfig(hue_range=(0.2, 0.1))
    assert PlanConfig(blur_sigma_range=[0.5, 1]).blur_sigma_range == (0.5, 1.0)  # YAML lists


def test_plan_arrays():
    plan = make_pretrain_plan(2, 0, 1, 60, HEIGHT, WIDTH, only(small_angle_range=(5.0, 5.0), grey_prob=1.0,
                                                               blur_prob=1.0))
    arrays = dict(zip(PRETRAIN_PARAM_OUTPUTS, plan_to_arrays(plan)))
    assert float(arrays["angle1"]) == pytest.approx(90 * plan.view1.rotation + 5.0)
    assert arrays["grey_matrix1"].shape == (FRAMES, 3, 3) and arrays["brightness1"].shape == ()
    assert int(arrays["grey1"]) == 1 and int(arrays["jitter1"]) == 0
    channels = plan.view1.appearance.grey_channels
    assert np.array_equal(arrays["grey_matrix1"].argmax(-1), np.repeat(np.array(channels)[:, None], 3, 1))
    assert int(arrays["blur_window1"]) == blur_window(plan.view1.appearance.blur_sigma) >= 3
    assert blur_window(0.0) == 1 and np.array_equal(grey_matrices(None, 2), np.stack([np.eye(3)] * 2))


# ---------------------------------------------------------------- the executors


@pytest.fixture(scope="module")
def smooth_db(tmp_path_factory):
    """Low-frequency noise, upsampled: colourful, and every frame different."""
    rng = np.random.default_rng(0)
    videos = []
    for _ in range(8):
        base = rng.integers(0, 255, size=(30, 6, 8, 3)).astype(np.uint8)
        videos.append([np.asarray(Image.fromarray(f).resize((WIDTH, HEIGHT), Image.BICUBIC)) for f in base])
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "smooth.lmdb", videos))


SETTINGS = LoaderSettings(batch_size=4, num_threads=1, seed=1)


def dali_views(db, cfg):
    """[(plan view, (T, S, S, 3) grey levels)] of one epoch (8 samples, 16 views)."""
    out = []
    loader = PretrainLoader(db, cfg, SETTINGS)
    for batch in loader:
        for i, video in enumerate(batch["video_index"].tolist()):
            plan = loader.source.plan(0, video)
            for name, vp in (("view1", plan.view1), ("view2", plan.view2)):
                out.append((vp, batch[name][i].permute(1, 2, 3, 0).numpy().astype(np.float64) * 127.5 + 127.5))
    loader.close()
    return out


def reference_views(db, cfg):
    return [(None, b[name][i].permute(1, 2, 3, 0).numpy().astype(np.float64) * 127.5 + 127.5)
            for b in ReferencePretrainLoader(db, cfg, SETTINGS) for i in range(4) for name in ("view1", "view2")]


def mean_diffs(db, cfg):
    dali, ref = dali_views(db, cfg), reference_views(db, cfg)
    assert len(dali) == len(ref) == 16
    return dali, ref, [float(np.abs(d - r).mean()) for (_, d), (_, r) in zip(dali, ref)]


@pytest.mark.parametrize("what, cfg, tolerance", [
    ("rotation", only(small_angle_range=(-10.0, 10.0)), PLAIN_MEAN_TOLERANCE),
    ("grey", only(grey_prob=1.0), PLAIN_MEAN_TOLERANCE),
    ("jitter", only(jitter_prob=1.0), JITTER_MEAN_TOLERANCE),
    ("blur", only(blur_prob=1.0), BLUR_MEAN_TOLERANCE),
    ("everything", only(small_angle_range=(-10.0, 10.0), jitter_prob=1.0, grey_prob=1.0, blur_prob=1.0),
     ALL_MEAN_TOLERANCE),
])
def test_dali_matches_the_reference_one_augmentation_at_a_time(smooth_db, what, cfg, tolerance):
    dali, _, diffs = mean_diffs(smooth_db, cfg)
    assert max(diffs) < tolerance, (what, diffs)
    if what == "rotation":  # nearest-neighbour ties aside, the fused rotation is the reference's two
        for (vp, d), (_, r) in zip(dali, reference_views(smooth_db, cfg)):
            assert (np.abs(d - r).max(-1) > 8).mean() < 0.005, vp.appearance.angle


def test_hue_shifts_like_the_reference(smooth_db):
    """Hue alone: DALI lands on the reference's turned colours, far nearer than no turn
    would (a graph that ignored the hue, or turned it by another angle, fails this)."""
    kw = dict(jitter_prob=1.0, brightness_range=(1.0, 1.0), contrast_range=(1.0, 1.0), saturation_range=(1.0, 1.0))
    dali, ref, diffs = mean_diffs(smooth_db, only(**kw))
    unshifted = reference_views(smooth_db, only(**kw, hue_range=(0.0, 0.0)))
    assert max(diffs) < JITTER_MEAN_TOLERANCE, diffs
    checked = 0
    for (vp, _), (_, r), (_, r0), diff in zip(dali, ref, unshifted, diffs):
        if abs(vp.appearance.hue) > 0.04:
            assert diff < 0.1 * np.abs(r - r0).mean(), (vp.appearance.hue, diff, np.abs(r - r0).mean())
            checked += 1
    assert checked >= 5


def test_saturation_hue_matrix():
    """The YIQ colour matrix: neutral = identity; saturation blends with PIL's luma; a hue
    turn keeps luma and a grey pixel, turns red towards yellow for a positive hue (as
    torchvision's HSV shift does), and a full turn (255 units) comes back."""
    from pipelines.reference_executor import saturate_and_turn_hue
    from pipelines.sources import YIQ_FROM_RGB, saturation_hue_matrix

    assert np.allclose(saturation_hue_matrix(1.0, 0), np.eye(3), atol=1e-6)
    rgb = np.array([200.0, 60.0, 30.0], np.float32)
    luma = float(YIQ_FROM_RGB[0] @ rgb)
    assert np.allclose(saturation_hue_matrix(0.0, 0) @ rgb, luma, atol=1e-3)           # fully desaturated
    assert np.allclose(saturation_hue_matrix(0.5, 0) @ rgb, (rgb + luma) / 2, atol=1e-3)
    turned = saturation_hue_matrix(1.0, 25) @ rgb
    assert abs(float(YIQ_FROM_RGB[0] @ turned) - luma) < 1e-3 and np.abs(turned - rgb).max() > 20
    assert np.allclose(saturation_hue_matrix(1.0, 40) @ np.full(3, 90.0, np.float32), 90.0, atol=1e-3)
    assert np.allclose(saturation_hue_matrix(1.0, 255), np.eye(3), atol=1e-5)
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 220
    towards_yellow = saturate_and_turn_hue(red, 1.0, 0.08)[0, 0].astype(int)
    towards_magenta = saturate_and_turn_hue(red, 1.0, -0.08)[0, 0].astype(int)
    assert towards_yellow[1] > towards_yellow[2] and towards_magenta[2] > towards_magenta[1]


def test_jitter_replays_the_reference_on_identical_frames():
    """The colour graph alone, on the same uint8 frames the reference gets (no decode, no
    resize): PIL's brightness and contrast, the YIQ saturation+hue matrix."""
    from nvidia.dali import fn, pipeline_def

    from pipelines.pretrain_pipeline import color_jitter
    from pipelines.reference_executor import apply_appearance

    rng = np.random.default_rng(4)
    clips = [np.stack([np.asarray(Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).resize(
        (40, 40), Image.BICUBIC)) for _ in range(3)]) for _ in range(4)]
    clips[0][:, :12] = 128   # grey pixels: the HSV path's zero-chroma case
    looks = [Appearance(strong=True, jitter=True, brightness=b, contrast=c, saturation=s, hue=h)
             for b, c, s, h in ((1.37, 0.61, 1.2, 0.093), (0.62, 1.39, 0.7, -0.098), (1.0, 1.0, 1.0, -0.031),
                                (1.1, 0.9, 1.38, 0.0))]
    names = ("jitter", "brightness", "contrast", "saturation", "hue_shift")

    def sample(info):
        look = looks[info.idx_in_epoch % 4]
        values = (1.0, look.brightness, look.contrast, look.saturation, int(look.hue * 255))
        return (clips[info.idx_in_epoch % 4], *(np.array(v, np.float32) for v in values))

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def jitter_pipeline():
        clip, *params = fn.external_source(source=sample, num_outputs=6, batch=False,
                                           layout=["FHWC"] + [""] * 5)
        return color_jitter(clip, dict(zip(names, params)))

    pipe = jitter_pipeline()
    pipe.build()
    (out,) = pipe.run()
    for i, look in enumerate(looks):
        got = np.asarray(out[i]).astype(int)
        want = np.stack([apply_appearance(frame, look, None) for frame in clips[i]]).astype(int)
        assert np.abs(got - np.asarray(clips[i], int)).mean() > 3  # it did something
        assert (got != want).mean() < 0.01 and np.abs(got - want).max() <= 8, look


def test_neutral_parameters_change_nothing(smooth_db):
    """A strong view whose every sub-augmentation is off is bit-identical to a plain view:
    the neutral path of the graph (factors 1, hue 0, identity matrices, 1-tap blur)."""
    plain = dali_views(smooth_db, PlanConfig(frames=FRAMES, crop_size=CROP, strong_prob=0.0))
    neutral = dali_views(smooth_db, only())
    assert all(v.appearance.strong for v, _ in neutral)
    for (_, a), (_, b) in zip(plain, neutral):
        assert np.array_equal(a, b)


def test_grey_copies_the_planned_channel_of_each_frame(smooth_db):
    plain = dali_views(smooth_db, only())
    grey = dali_views(smooth_db, only(grey_prob=1.0))
    for (vp, g), (_, p) in zip(grey, plain):
        channels = vp.appearance.grey_channels
        assert len(set(channels)) >= 1
        for t, c in enumerate(channels):
            assert np.array_equal(g[t, ..., 0], g[t, ..., 1]) and np.array_equal(g[t, ..., 0], g[t, ..., 2])
            assert np.allclose(g[t, ..., 0], p[t, ..., c], atol=1e-3)  # exactly that channel
    assert {c for vp, _ in grey for c in vp.appearance.grey_channels} == {0, 1, 2}


def test_small_rotation_has_black_corners_and_blur_smooths(smooth_db):
    rotated = dali_views(smooth_db, only(small_angle_range=(-10.0, 10.0)))
    checked = 0
    for vp, clip in rotated:
        if abs(vp.appearance.angle) > 3:  # the corner pixel's source leaves the crop
            for corner in (clip[:, 0, 0], clip[:, 0, -1], clip[:, -1, 0], clip[:, -1, -1]):
                assert np.all(corner == 0), (vp.appearance.angle, corner)
            checked += 1
    assert checked >= 8
    plain = dali_views(smooth_db, only())
    blurred = dali_views(smooth_db, only(blur_prob=1.0))
    for (vp, b), (_, p) in zip(blurred, plain):
        roughness = lambda x: np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
        assert roughness(b) < roughness(p) if vp.appearance.blur_sigma > 0.5 else roughness(b) <= roughness(p)
        if vp.appearance.blur_sigma > 1:
            assert np.abs(b - p).mean() > BLUR_MEAN_TOLERANCE  # a skipped blur would pass the DALI-reference test


def test_reference_executor_applies_the_appearance():
    """Independent of DALI: grey per frame, black corners, jitter off = unchanged."""
    rng = np.random.default_rng(1)
    frames = [np.asarray(Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT),
                                                                                                 Image.BICUBIC))
              for _ in range(3)]
    jpegs = [encode_jpeg(f) for f in frames]
    box = Box(10, 5, 40, 40)
    base = execute_view_reference(jpegs, ViewPlan(np.arange(3), box, 1, False), 40)
    same = execute_view_reference(jpegs, ViewPlan(np.arange(3), box, 1, False, Appearance(strong=True)), 40)
    assert np.array_equal(base, same)
    grey = execute_view_reference(
        jpegs, ViewPlan(np.arange(3), box, 1, False, Appearance(strong=True, grey_channels=(2, 0, 1))), 40)
    for t, c in enumerate((2, 0, 1)):
        assert np.array_equal(grey[0, t], grey[1, t]) and np.array_equal(grey[0, t], grey[2, t])
        assert np.array_equal(grey[0, t], base[c, t])
    turned = execute_view_reference(
        jpegs, ViewPlan(np.arange(3), box, 1, True, Appearance(strong=True, angle=-8.0)), 40)
    assert np.all(turned[:, :, [0, 0, -1, -1], [0, -1, 0, -1]] == -1.0)
    darker = execute_view_reference(
        jpegs, ViewPlan(np.arange(3), box, 1, False, Appearance(strong=True, jitter=True, brightness=0.6)), 40)
    assert torch.as_tensor(darker).mean() < torch.as_tensor(base).mean() - 0.1

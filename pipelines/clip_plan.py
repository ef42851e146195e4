"""Clip plans for supervised finetuning, validation and testing (docs/method.md
#finetuning, #test-protocol): which frames one clip takes, which box of the source frame
becomes the S×S crop, and its colour jitter, decided up front in plain numpy.

Like the pretraining plan (plan.py), a clip plan is executed twice, by DALI
(clip_pipeline.py) and by numpy/PIL (clip_reference.py), so both executors share
the geometry exactly.

Conventions: frames are 0-indexed; a box is (x, y, w, h) in source pixels; the clip
is the box of each planned frame, bicubic-resized to crop_size × crop_size.

- train: one clip per video per epoch, start U{0 .. N-1-(T-1)s}, stride s; a
  RandomResizedCrop of the full frame; colour jitter with probability jitter_prob;
  no flip (the reference comments it out).
- test: back-to-back clips plus one aligned to the end (test_clip_starts); short
  side to test_short_side, then spatial_crops crops of each clip (test_boxes): 1 =
  the centre crop (the reference's protocol), 3 = start / centre / end of the long
  side (the 3-crop test of SlowFast and pytorchvideo). Each (clip, crop) is one test
  item, clip-major: (clip 0, crop 0), (clip 0, crop 1), ..., (clip 1, crop 0), ...
- val: the middle test clip of each video, centre crop only (whatever spatial_crops
  says: validation picks checkpoints, it does not report accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .lmdb_store import VideoMeta
from .plan import (MAX_CROP, MAX_FRAMES, NO_APPEARANCE, Appearance, Box, PlanConfig, plan_rng, sample_appearance,
                   sample_first_box)

MODES = ("train", "val", "test")
SPATIAL_CROPS = (1, 3)   # test crops per clip: the centre one, or start / centre / end of the long side


@dataclass(frozen=True)
class ClipPlanConfig:
    """Geometry and augmentation of supervised clips; the defaults are the reference's
    finetuning recipe (`--pb_rate 4`, `--sample_duration 16`, `--sample_size 112`)."""

    frames: int = 16                   # T
    stride: int = 4                    # s, frames between two clip frames (pb_rate)
    crop_size: int = 112               # S
    test_short_side: int = 128         # val/test: short side before the centre crop
    spatial_crops: int = 1             # test: crops per clip, 1 (centre) or 3 (start/centre/end of the long side)
    min_area: float = 0.2              # train RandomResizedCrop: area fraction range
    max_area: float = 1.0
    min_ratio: float = 3 / 4           # aspect ratio range (w/h)
    max_ratio: float = 4 / 3
    max_box_attempts: int = 10         # the reference's ClipRandomSizedCrop tries 10 times
    jitter_prob: float = 0.3           # ClipColorJitter(0.4, 0.4, 0.4, 0.1, p=0.3)
    brightness_range: tuple[float, float] = (0.6, 1.4)
    contrast_range: tuple[float, float] = (0.6, 1.4)
    saturation_range: tuple[float, float] = (0.6, 1.4)
    hue_range: tuple[float, float] = (-0.1, 0.1)

    def __post_init__(self):
        for name in ("brightness_range", "contrast_range", "saturation_range", "hue_range"):
            # lists from a YAML config become tuples (hashable, frozen)
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if not 1 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"frames must be in [1, {MAX_FRAMES}], got {self.frames}")
        if not 1 <= self.stride <= MAX_FRAMES:
            raise ValueError(f"stride must be in [1, {MAX_FRAMES}], got {self.stride}")
        if self.crop_size < 8:
            raise ValueError(f"crop_size must be >= 8, got {self.crop_size}")
        if self.test_short_side > 4 * MAX_CROP:
            raise ValueError(f"test_short_side must be <= {4 * MAX_CROP}, got {self.test_short_side}")
        if self.test_short_side < self.crop_size:
            raise ValueError(f"test_short_side {self.test_short_side} must be >= crop_size {self.crop_size}")
        if self.spatial_crops not in SPATIAL_CROPS:
            raise ValueError(f"spatial_crops must be one of {SPATIAL_CROPS}, got {self.spatial_crops}")
        if not 0 <= self.jitter_prob <= 1:
            raise ValueError(f"jitter_prob must be a probability in [0, 1], got {self.jitter_prob}")
        if self.max_box_attempts < 1:
            raise ValueError(f"max_box_attempts must be >= 1, got {self.max_box_attempts}")
        # The pretraining config validates the shared ranges and probabilities.
        self.as_plan_config()

    @property
    def clip_range(self) -> int:
        """(T-1)·s: frames from a clip's first index to its last."""
        return (self.frames - 1) * self.stride

    def as_plan_config(self) -> PlanConfig:
        """The pretraining PlanConfig whose box and appearance samplers draw exactly this
        config's train augmentation: the RandomResizedCrop ranges, and an appearance
        that is "strong" with probability jitter_prob and then always jitters, with no
        small rotation, no grey, no blur."""
        return PlanConfig(frames=max(self.frames, 2), crop_size=self.crop_size, min_area=self.min_area,
                          max_area=self.max_area, min_ratio=self.min_ratio, max_ratio=self.max_ratio,
                          max_box_attempts=self.max_box_attempts, strong_prob=self.jitter_prob,
                          small_angle_range=(0.0, 0.0), jitter_prob=1.0,
                          brightness_range=self.brightness_range, contrast_range=self.contrast_range,
                          saturation_range=self.saturation_range, hue_range=self.hue_range,
                          grey_prob=0.0, blur_prob=0.0)


def clip_config_from(section: dict) -> ClipPlanConfig:
    """A ClipPlanConfig from a config section (YAML lists become tuples; unknown keys
    are left out), so the finetune and evaluate CLIs never drift apart."""
    known = ClipPlanConfig.__dataclass_fields__
    values = {}
    for key, value in section.items():
        if key not in known:
            continue
        value = tuple(value) if isinstance(value, list) else value
        default = known[key].default
        number = (int,) if isinstance(default, int) else (int, float)
        items = value if isinstance(default, tuple) else (value,)
        # evaluate.py's key=value overrides and a checkpoint's clip section are not type-checked elsewhere
        if (isinstance(default, tuple) and not isinstance(value, tuple)) or \
                any(isinstance(v, bool) or not isinstance(v, number) for v in items):
            kind = "an integer" if number == (int,) else "a pair of numbers" if isinstance(default, tuple) \
                else "a number"
            raise ValueError(f"{key} must be {kind}, got {value!r}")
        values[key] = value
    return ClipPlanConfig(**values)


@dataclass(frozen=True)
class ClipPlan:
    video: int                 # index into the loader's metas (the LMDB / index order)
    clip_index: int            # which test clip of the video; 0 for train and val
    label: int
    frames: np.ndarray         # (T,) int64 frame indices, all in [0, N)
    box: Box                   # source pixels, inside the frame
    out_size: int              # the box is resized to out_size × out_size
    appearance: Appearance = NO_APPEARANCE   # colour jitter only (train); neutral otherwise
    crop_index: int = 0        # which spatial crop of the test clip (test_boxes); 0 for train and val


def clip_indices(start: int, num_frames: int, cfg: ClipPlanConfig) -> np.ndarray:
    """T indices from `start` with the stride; a video too short for one clip wraps
    back to frame 0 (idx mod N), as the reference does, so every index is in range."""
    idx = start + cfg.stride * np.arange(cfg.frames, dtype=np.int64)
    return idx % max(num_frames, 1)


# ---------------------------------------------------------------- temporal


def test_clip_starts(num_frames: int, cfg: ClipPlanConfig) -> list[int]:
    """First frame (0-indexed) of every test clip of an N-frame video (docs/method.md#test-protocol).

    The reference (test.py, frames 1-indexed, clip_range R = (T-1)·s = 60) takes, for
    N > R, the starts 1, 1+R, 1+2R, ... that are < N-R+1, i.e. back-to-back clips whose
    last frame start+R is <= N, plus one clip aligned to the end, frames N-R .. N; for
    N <= R one clip from frame 1, wrapping.

    Translated to 0-indexed frames (subtract 1 from every index): for N > R the starts
    0, R, 2R, ... with start + R <= N-1, plus the end clip starting at N-1-R (last
    frame N-1); for N <= R the single start 0 (indices wrap, clip_indices). The end
    clip is kept even when it repeats the last back-to-back clip (N-1 a multiple of
    R, e.g. N = 121): the reference keeps it too, so its counts are reproduced —
    181 frames give 4 clips, 121 give 3 — and its logit averaging weighs that clip
    twice, as ours does.
    """
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    span = cfg.clip_range
    if num_frames <= span:
        return [0]
    starts = list(range(0, num_frames - span, span))     # start + span <= N-1
    return starts + [num_frames - 1 - span]


def val_clip_start(num_frames: int, cfg: ClipPlanConfig) -> int:
    """The validation clip: the middle one of the test clips (index len//2), the same
    in every epoch, so the validation loss that drives the plateau scheduler and the
    checkpoint choice is not noisy from one epoch to the next. (The reference draws a
    random start per epoch and selects on the test split: both changed, docs/deviations.md.)"""
    starts = test_clip_starts(num_frames, cfg)
    return starts[len(starts) // 2]


def train_clip_start(rng: np.random.Generator, num_frames: int, cfg: ClipPlanConfig) -> int:
    """U{0 .. N-1-R}; 0 (wrapping indices) when the video is shorter than one clip."""
    last = num_frames - 1 - cfg.clip_range
    return int(rng.integers(0, last + 1)) if last >= 0 else 0


# ---------------------------------------------------------------- spatial


def test_box(width: int, height: int, cfg: ClipPlanConfig) -> Box:
    """"Resize the short side to test_short_side (bicubic), centre-crop crop_size" as
    the equivalent box of the source frame, to be resized to crop_size.

    The resize scales by k = test_short_side / short; a crop_size square of the
    resized frame is a square of side crop_size / k = crop_size · short /
    test_short_side source pixels. Rounding: the side is rounded to the nearest pixel
    and the box centred with the left/top offset rounded down, ((W - side) // 2).
    For UCF's 340×256 frames (k = 1/2) the box is exactly 224×224 at (58, 16), the
    same pixels torchvision's Resize(128) + CenterCrop(112) would keep; for other
    sizes its position may differ from resize-then-crop by up to one pixel of the
    resized frame (both round, in different units) and its side by half a source
    pixel. The filter taps at the box border see only box pixels (as in ROI decoding)
    where resize-then-crop would see their neighbours: a one-pixel-wide difference."""
    short = min(width, height)
    side = min(short, max(1, int(round(cfg.crop_size * short / cfg.test_short_side))))
    return Box((width - side) // 2, (height - side) // 2, side, side)


def test_boxes(width: int, height: int, cfg: ClipPlanConfig) -> list[Box]:
    """The spatial_crops boxes of a test clip, in crop_index order.

    1 crop: [test_box]. 3 crops: the same square, centred across the short side and
    placed at the start, the centre and the end of the long side, as pytorchvideo's
    uniform_crop / SlowFast's 3-crop test do after the short-side resize: left /
    centre / right for landscape frames (and square ones), top / centre / bottom for
    portrait frames. For UCF's 340×256: x = 0, 58, 116 at y = 16, side 224 (in the
    128-short-side frame: 0, 29, 58 — the end crop touches the right border)."""
    centre = test_box(width, height, cfg)
    if cfg.spatial_crops == 1:
        return [centre]
    if height > width:
        return [Box(centre.x, y, centre.w, centre.h) for y in (0, centre.y, height - centre.h)]
    return [Box(x, centre.y, centre.w, centre.h) for x in (0, centre.x, width - centre.w)]


def train_box(rng: np.random.Generator, width: int, height: int, cfg: ClipPlanConfig) -> Box:
    """RandomResizedCrop of the full frame (docs/method.md#finetuning): area U(min_area, max_area)·W·H,
    ratio U(min_ratio, max_ratio), w and h swapped with p = 0.5, max_box_attempts tries.

    Fallback after the tries (plan.sample_first_box, torchvision's): the largest centred
    box whose ratio is the frame's, clamped to the allowed range. The reference's
    ClipRandomSizedCrop falls back to scale + centre crop instead, i.e. the largest
    centred square; for 4:3 and 340×256 frames the two differ (ours keeps the frame's
    ratio up to 4/3). The fallback is rare: each try fails only when the drawn box is
    wider or taller than the frame."""
    return sample_first_box(rng, width, height, cfg.as_plan_config())


# ---------------------------------------------------------------- plans


def _check(video: int, meta: VideoMeta):
    if meta.frames < 1 or meta.height < 1 or meta.width < 1:
        raise ValueError(f"video {video} ({meta.name}) has no frames or no size "
                         f"({meta.frames} frames, {meta.width}x{meta.height})")


def train_clip_plan(seed: int, epoch: int, video: int, meta: VideoMeta, cfg: ClipPlanConfig) -> ClipPlan:
    """The training clip of `video` in `epoch`: a pure function of (seed, epoch, video),
    whatever the sharding, the worker count or the restart point."""
    _check(video, meta)
    rng = plan_rng(seed, epoch, video)
    start = train_clip_start(rng, meta.frames, cfg)
    box = train_box(rng, meta.width, meta.height, cfg)
    look = sample_appearance(rng, cfg.as_plan_config())
    return ClipPlan(video=video, clip_index=0, label=meta.label, frames=clip_indices(start, meta.frames, cfg),
                    box=box, out_size=cfg.crop_size, appearance=look)


def test_clip_plans(video: int, meta: VideoMeta, cfg: ClipPlanConfig) -> list[ClipPlan]:
    """Every test item of `video`, clip-major: position = clip_index · spatial_crops +
    crop_index (with one crop, the clips in order)."""
    _check(video, meta)
    boxes = test_boxes(meta.width, meta.height, cfg)
    return [ClipPlan(video=video, clip_index=i, label=meta.label, frames=clip_indices(s, meta.frames, cfg),
                     box=box, out_size=cfg.crop_size, crop_index=c)
            for i, s in enumerate(test_clip_starts(meta.frames, cfg)) for c, box in enumerate(boxes)]


def test_clip_plan(video: int, meta: VideoMeta, cfg: ClipPlanConfig, clip_index: int,
                   crop_index: int = 0) -> ClipPlan:
    """One test item of `video` (what test_clip_plans lists at that position)."""
    _check(video, meta)
    starts = test_clip_starts(meta.frames, cfg)
    if not 0 <= clip_index < len(starts) or not 0 <= crop_index < cfg.spatial_crops:
        raise IndexError(f"video {video} has {len(starts)} test clips x {cfg.spatial_crops} crops; "
                         f"no (clip {clip_index}, crop {crop_index})")
    return ClipPlan(video=video, clip_index=clip_index, label=meta.label,
                    frames=clip_indices(starts[clip_index], meta.frames, cfg),
                    box=test_boxes(meta.width, meta.height, cfg)[crop_index], out_size=cfg.crop_size,
                    crop_index=crop_index)


def val_clip_plan(video: int, meta: VideoMeta, cfg: ClipPlanConfig) -> ClipPlan:
    """The one validation clip of `video` (val_clip_start; test's spatial view)."""
    _check(video, meta)
    return ClipPlan(video=video, clip_index=0, label=meta.label,
                    frames=clip_indices(val_clip_start(meta.frames, cfg), meta.frames, cfg),
                    box=test_box(meta.width, meta.height, cfg), out_size=cfg.crop_size)


def num_test_clips(num_frames: int, cfg: ClipPlanConfig) -> int:
    """Temporal test clips of an N-frame video (each read spatial_crops times)."""
    return len(test_clip_starts(num_frames, cfg))


def jitter_arrays(look: Appearance) -> tuple[np.ndarray, ...]:
    """(jitter on, brightness, contrast, saturation, hue shift in PIL's 8-bit units) as
    0-d float32 arrays, the keys pretrain_pipeline.color_jitter reads; neutral when off."""
    f32 = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    return (f32(look.jitter), f32(look.brightness), f32(look.contrast), f32(look.saturation),
            f32(int(look.hue * 255)))


JITTER_KEYS = ("jitter", "brightness", "contrast", "saturation", "hue_shift")

# Names starting with "test_" are not tests: keep pytest from collecting them when a
# test module imports them.
for _name in ("test_clip_starts", "test_box", "test_boxes", "test_clip_plans", "test_clip_plan"):
    globals()[_name].__test__ = False

"""The CSTP sampling plan: every random decision of one pretraining sample, made up
front in plain numpy (docs/method.md#the-sampling-plan).

A plan is a pure function of (seed, epoch, sample index, video size). The DALI
executor applies it on the GPU or CPU; tests and the reference executor apply the
same plan with numpy, so labels are exact by construction and runs reproduce
across devices, thread counts and restarts.

Conventions: frames are 0-indexed; a box is (x, y, w, h) in pixels of the
*un-rotated* source frame (docs/method.md#spatial-overlap-label: boxes are placed in the un-rotated frame and
the crops rotated afterwards, so the spatial-overlap label describes shared
content); a rotation k means k·90° counter-clockwise (PIL's ROTATE_90, np.rot90);
label 0 of an overlap class means full overlap (rate 1.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

PLAN_RNG_VERSION = 1  # bump when a change alters the plans drawn for a given seed


# Bounds on sizes a config may ask for: DALI stacks at most 999 inputs, and a crop beyond
# these is a typo that would only end in running out of memory.
MAX_FRAMES = 256
MAX_CROP = 1024


@dataclass(frozen=True)
class PlanConfig:
    """Geometry and label sets of the pretraining plan; defaults are the reference's."""

    frames: int = 16                                   # T, frames per view
    crop_size: int = 112                               # S, output side
    strides: tuple[int, ...] = (1, 2, 4, 8)            # playback rates (PACE)
    temporal_rates: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4, 0.2)
    spatial_rates: tuple[float, ...] = (1.0, 0.8, 0.6, 0.4, 0.2)
    min_area: float = 0.2                              # RandomResizedCrop area range
    max_area: float = 1.0
    min_ratio: float = 3 / 4                           # aspect ratio range
    max_ratio: float = 4 / 3
    rotations: int = 4                                 # 0/90/180/270
    flip_prob: float = 0.5
    max_box_attempts: int = 100                        # bounded rejection sampling
    # Appearance ("base" pipeline, docs/method.md#appearance): per view, with probability strong_prob,
    # a small rotation, then colour jitter (p=jitter_prob), per-frame channel grey
    # (p=grey_prob), Gaussian blur (p=blur_prob); the flip comes after, as before.
    strong_prob: float = 0.3
    small_angle_range: tuple[float, float] = (-10.0, 10.0)   # degrees, counter-clockwise
    jitter_prob: float = 0.8
    brightness_range: tuple[float, float] = (0.6, 1.4)       # multiplicative factors
    contrast_range: tuple[float, float] = (0.6, 1.4)
    saturation_range: tuple[float, float] = (0.6, 1.4)
    hue_range: tuple[float, float] = (-0.1, 0.1)             # fraction of a full turn
    grey_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.1, 2.0)       # pixels

    def __post_init__(self):
        if not 2 <= self.frames <= MAX_FRAMES:
            raise ValueError(f"frames must be in [2, {MAX_FRAMES}], got {self.frames}")
        if not 8 <= self.crop_size <= MAX_CROP:
            raise ValueError(f"crop_size must be in [8, {MAX_CROP}], got {self.crop_size}")
        if not self.strides or any(isinstance(s, bool) or not isinstance(s, (int, np.integer))
                                   or not 1 <= s <= MAX_FRAMES for s in self.strides):
            raise ValueError(f"strides must be integers in [1, {MAX_FRAMES}], got {self.strides}")
        for name in ("temporal_rates", "spatial_rates"):
            rates = getattr(self, name)
            if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not 0 <= r <= 1
                                for r in rates):
                raise ValueError(f"{name} must be a non-empty list of overlap rates in [0, 1], got {rates}")
        if self.temporal_rates[0] != 1.0 or self.spatial_rates[0] != 1.0:
            raise ValueError("class 0 of the overlap rates must be 1.0 (full overlap)")
        if not 0 < self.min_area <= self.max_area <= 1:
            raise ValueError(f"need 0 < min_area <= max_area <= 1, got {self.min_area}, {self.max_area}")
        if not 0 < self.min_ratio <= self.max_ratio < math.inf:
            raise ValueError(f"need 0 < min_ratio <= max_ratio, got {self.min_ratio}, {self.max_ratio}")
        for name in ("small_angle_range", "brightness_range", "contrast_range", "saturation_range", "hue_range",
                     "blur_sigma_range"):  # lists from a YAML config become tuples (hashable, frozen)
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("flip_prob", "strong_prob", "jitter_prob", "grey_prob", "blur_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name, lowest, highest in (("small_angle_range", -45, 45), ("brightness_range", 0, math.inf),
                                      ("contrast_range", 0, math.inf), ("saturation_range", 0, math.inf),
                                      ("hue_range", -0.5, 0.5), ("blur_sigma_range", 1e-3, 50)):
            value = getattr(self, name)
            if len(value) != 2 or not lowest <= value[0] <= value[1] <= highest:
                raise ValueError(f"{name} must be (low, high) with {lowest} <= low <= high <= {highest}, "
                                 f"got {value}")


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    w: int
    h: int

    def intersection_area(self, other: "Box") -> int:
        dx = min(self.x + self.w, other.x + other.w) - max(self.x, other.x)
        dy = min(self.y + self.h, other.y + other.h) - max(self.y, other.y)
        return max(dx, 0) * max(dy, 0)

    def inside(self, width: int, height: int) -> bool:
        return self.x >= 0 and self.y >= 0 and self.x + self.w <= width and self.y + self.h <= height


@dataclass(frozen=True)
class Appearance:
    """The "base" (strong) augmentation of one view (docs/method.md); the defaults are the
    "null" pipeline (nothing). Applied after the k·90° rotation, before the flip, in
    this order: small rotation, colour jitter, channel grey, blur.

    Deviation from the reference: its ColorJitter applies brightness, contrast,
    saturation and hue in a random order per view; here the order is FIXED,
    brightness → contrast → saturation → hue, in both executors."""

    strong: bool = False                          # the base pipeline was drawn
    angle: float = 0.0                            # small rotation, degrees counter-clockwise
    jitter: bool = False
    brightness: float = 1.0                       # factors; 1.0 = unchanged
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0                              # shift, fraction of a full turn
    grey_channels: tuple[int, ...] | None = None  # per frame: the channel (0 R, 1 G, 2 B) copied to all three
    blur_sigma: float = 0.0                       # Gaussian blur σ in pixels; 0 = no blur

    @property
    def grey(self) -> bool:
        return self.grey_channels is not None

    @property
    def blur(self) -> bool:
        return self.blur_sigma > 0


NO_APPEARANCE = Appearance()


@dataclass(frozen=True)
class ViewPlan:
    frames: np.ndarray   # (T,) int64 frame indices into the video
    box: Box             # crop in the un-rotated frame
    rotation: int        # k: k·90° counter-clockwise, applied to the crop
    flip: bool           # horizontal flip, applied last
    appearance: Appearance = NO_APPEARANCE   # strong augmentation, between rotation and flip


@dataclass(frozen=True)
class PretrainPlan:
    video_index: int
    stride: int
    view1: ViewPlan
    view2: ViewPlan
    speed_label: int      # index into PlanConfig.strides
    temporal_label: int   # index into temporal_rates
    spatial_label: int    # index into spatial_rates
    clip_range: int       # (T-1)·stride, the span of one window in frames
    starts: tuple[int, int] = field(default=(0, 0))

    @property
    def temporal_overlap(self) -> float:
        """Overlap duration / window duration, measured from the two windows."""
        if self.clip_range == 0:
            return 1.0
        shift = abs(self.starts[1] - self.starts[0])
        return max(self.clip_range - shift, 0) / self.clip_range

    @property
    def spatial_overlap(self) -> float:
        """Intersection area / area of one box (not IoU; Fig. 1 of the paper)."""
        return self.view1.box.intersection_area(self.view2.box) / (self.view1.box.w * self.view1.box.h)


def plan_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Counter-based: independent streams per (seed, epoch, sample), whatever the
    sharding, worker count or restart point."""
    return np.random.default_rng([PLAN_RNG_VERSION, seed, epoch, index])


# ---------------------------------------------------------------- temporal


def max_speed_label(num_frames: int, cfg: PlanConfig) -> int:
    """Highest stride class a video of `num_frames` allows (docs/method.md#playback-rate-label:
    int(log2(N / (T-1))), capped by the number of strides, never negative)."""
    if num_frames <= 0:
        return 0
    return int(min(len(cfg.strides) - 1, max(0, math.floor(math.log2(num_frames / (cfg.frames - 1))))))


def temporal_shift(rate: float, clip_range: int) -> int:
    # The reference truncates: int((1-0.8)*15) == 2, so an "0.8" pair overlaps ~0.87.
    return int((1 - rate) * clip_range)


def sample_temporal(rng: np.random.Generator, num_frames: int, cfg: PlanConfig):
    """(stride, speed_label, start1, start2, temporal_label, clip_range)."""
    speed_label = int(rng.integers(0, max_speed_label(num_frames, cfg) + 1))
    stride = cfg.strides[speed_label]
    clip_range = (cfg.frames - 1) * stride
    last_start = num_frames - clip_range - 1        # inclusive; windows stay inside the video
    if last_start < 0:
        # Too short for even one window: both views read the same wrapped frames.
        return stride, speed_label, 0, 0, 0, clip_range
    start1 = int(rng.integers(0, last_start + 1))
    # The reference redraws (label, direction) until start2 fits; a uniform choice
    # among the valid pairs has exactly that distribution, without the loop.
    valid = []
    for label, rate in enumerate(cfg.temporal_rates):
        shift = temporal_shift(rate, clip_range)
        for direction in (-1, 1):
            start2 = start1 + direction * shift
            if 0 <= start2 <= last_start:
                valid.append((label, start2))
    label, start2 = valid[int(rng.integers(0, len(valid)))]
    return stride, speed_label, start1, start2, label, clip_range


def window_indices(start: int, stride: int, num_frames: int, cfg: PlanConfig) -> np.ndarray:
    """Frame indices of one window; for videos shorter than a window they wrap
    back to frame 0 (docs/method.md#short-videos), so every index is in range."""
    idx = start + stride * np.arange(cfg.frames, dtype=np.int64)
    return idx % max(num_frames, 1)


# ---------------------------------------------------------------- spatial


def sample_first_box(rng: np.random.Generator, width: int, height: int, cfg: PlanConfig) -> Box:
    """RandomResizedCrop of view 1 (docs/method.md#spatial-overlap-label), with bounded attempts."""
    area = width * height
    for _ in range(cfg.max_box_attempts):
        target = rng.uniform(cfg.min_area, cfg.max_area) * area
        ratio = rng.uniform(cfg.min_ratio, cfg.max_ratio)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if rng.random() < 0.5:
            w, h = h, w
        if 1 <= w <= width and 1 <= h <= height:
            return Box(int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
    # Extreme aspect ratios never fit: fall back to the largest centred box of an
    # allowed ratio (what torchvision does).
    ratio = min(max(width / height, cfg.min_ratio), cfg.max_ratio)
    w = min(width, int(round(height * ratio)))
    h = min(height, int(round(w / ratio)))
    return Box((width - w) // 2, (height - h) // 2, w, h)


def second_box_candidate(first: Box, rate: float, corner: int, overlap_w: int) -> Box | None:
    """Box of the same size as `first`, shifted diagonally towards `corner` so that
    the overlap is `overlap_w` wide and ~rate·area/overlap_w tall (docs/method.md#spatial-overlap-label)."""
    if overlap_w <= 0:
        return None
    overlap_h = int(rate * first.w * first.h / overlap_w)
    if not 1 <= overlap_h <= first.h:
        return None  # the reference would build a box whose overlap is not the class's
    dx = first.w - overlap_w
    dy = first.h - overlap_h
    x = first.x - dx if corner in (0, 2) else first.x + dx   # 0 up-left, 1 up-right,
    y = first.y - dy if corner in (0, 1) else first.y + dy   # 2 down-left, 3 down-right
    return Box(x, y, first.w, first.h)


def sample_second_box(rng: np.random.Generator, first: Box, width: int, height: int, cfg: PlanConfig):
    """(box, spatial_label). Rejection sampling as the reference (each retry redraws
    label, corner and overlap width); rate 1.0 always fits, and after the bounded
    attempts we take it."""
    for _ in range(cfg.max_box_attempts):
        label = int(rng.integers(0, len(cfg.spatial_rates)))
        rate = cfg.spatial_rates[label]
        corner = int(rng.integers(0, 4))
        overlap_w = int(rng.integers(int(rate * first.w), first.w + 1))
        box = second_box_candidate(first, rate, corner, overlap_w)
        if box is not None and box.inside(width, height):
            return box, label
    return first, 0


# ---------------------------------------------------------------- appearance


def sample_appearance(rng: np.random.Generator, cfg: PlanConfig) -> Appearance:
    """One view's strong augmentation (docs/method.md). Every value is drawn whatever the
    coin flips say (a fixed number of draws per view), so changing a probability
    changes which augmentations apply, not the values of the others."""
    u_strong, u_jitter, u_grey, u_blur = rng.random(4)
    angle = rng.uniform(*cfg.small_angle_range)
    brightness = rng.uniform(*cfg.brightness_range)
    contrast = rng.uniform(*cfg.contrast_range)
    saturation = rng.uniform(*cfg.saturation_range)
    hue = rng.uniform(*cfg.hue_range)
    channels = rng.integers(0, 3, size=cfg.frames)
    sigma = rng.uniform(*cfg.blur_sigma_range)
    if u_strong >= cfg.strong_prob:
        return NO_APPEARANCE
    jitter = bool(u_jitter < cfg.jitter_prob)
    return Appearance(
        strong=True, angle=float(angle), jitter=jitter,
        brightness=float(brightness) if jitter else 1.0, contrast=float(contrast) if jitter else 1.0,
        saturation=float(saturation) if jitter else 1.0, hue=float(hue) if jitter else 0.0,
        grey_channels=tuple(int(c) for c in channels) if u_grey < cfg.grey_prob else None,
        blur_sigma=float(sigma) if u_blur < cfg.blur_prob else 0.0)


# ---------------------------------------------------------------- the plan


def make_pretrain_plan(seed: int, epoch: int, index: int, num_frames: int, height: int, width: int,
                       cfg: PlanConfig) -> PretrainPlan:
    """The plan for sample `index` (the video's index in the dataset) of `epoch`."""
    if num_frames < 1 or height < 1 or width < 1:
        raise ValueError(f"video {index} has no frames or no size ({num_frames} frames, {width}x{height})")
    rng = plan_rng(seed, epoch, index)
    stride, speed_label, start1, start2, temporal_label, clip_range = sample_temporal(rng, num_frames, cfg)
    box1 = sample_first_box(rng, width, height, cfg)
    box2, spatial_label = sample_second_box(rng, box1, width, height, cfg)
    rot1, rot2 = (int(r) for r in rng.integers(0, cfg.rotations, size=2))
    flip1, flip2 = (bool(f) for f in rng.random(2) < cfg.flip_prob)
    # Drawn after everything above, so the geometry and labels of a (seed, epoch,
    # index) are the same as before appearance augmentation existed.
    look1, look2 = sample_appearance(rng, cfg), sample_appearance(rng, cfg)
    return PretrainPlan(
        video_index=index,
        stride=stride,
        view1=ViewPlan(window_indices(start1, stride, num_frames, cfg), box1, rot1, flip1, look1),
        view2=ViewPlan(window_indices(start2, stride, num_frames, cfg), box2, rot2, flip2, look2),
        speed_label=speed_label,
        temporal_label=temporal_label,
        spatial_label=spatial_label,
        clip_range=clip_range,
        starts=(start1, start2),
    )


def majority_label_rates(plans: list[PretrainPlan]) -> dict[str, float]:
    """Share of the most frequent label of each task: the accuracy a model reaches
    by always guessing it. Rejection sampling makes the labels far from uniform
    (docs/method.md#label-distributions), so this, not 1/classes, is the bar a pretext head must clear."""
    tasks = {
        "spatial": [p.spatial_label for p in plans],
        "temporal": [p.temporal_label for p in plans],
        "speed": [p.speed_label for p in plans],
        "rotation": [p.view1.rotation for p in plans] + [p.view2.rotation for p in plans],
    }
    return {task: float(np.bincount(labels).max() / len(labels)) for task, labels in tasks.items()}


def plan_config_from(section: dict) -> PlanConfig:
    """A PlanConfig from a config's `plan` section (YAML lists become tuples; keys
    PlanConfig does not know are left out). One place, so that train.py, the
    benchmark and the viewer never drift apart."""
    known = PlanConfig.__dataclass_fields__
    return PlanConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in known})

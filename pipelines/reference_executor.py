"""The reference executor: the same sampling plans as the DALI pipeline, applied with
numpy/PIL in a torch DataLoader (docs/architecture.md#one-plan-two-executors).

It loads data the way the reference project does (every JPEG frame decoded whole by
PIL in DataLoader worker processes), which makes it two things at once:

- the test oracle for DALI: for the same (seed, epoch, position) it reads the same
  video and applies the same plan, so DALI and reference batches line up one to one;
- the baseline the benchmark measures DALI against.

Per view (docs/method.md#appearance, plan order): crop the planned box of each
planned frame, bicubic resize to S×S, rotate k·90° counter-clockwise, then for a
"strong" view the base pipeline (small rotation, colour jitter, channel grey,
Gaussian blur), flip horizontally, "tf" normalisation x/255·2−1, output (3, T, S, S).

This module needs neither DALI nor the model code.
"""

from __future__ import annotations

from io import BytesIO
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import DataLoader, Dataset

from .faults import blocked_videos
from .lmdb_store import read_metadata
from .plan import Appearance, Box, PlanConfig, ViewPlan
from .sharding import samples_per_rank
from .sources import PretrainLmdbSource, saturation_hue_matrix

if TYPE_CHECKING:  # pipelines.loader imports DALI; the reference executor must not need it
    from .loader import LoaderSettings

# Same keys, in the same order, as the DALI loader's batches (pretrain_pipeline.PRETRAIN_OUTPUTS).
LABEL_KEYS = ("spatial_label", "temporal_label", "speed_label", "rot1", "rot2", "video_index")
BATCH_KEYS = ("view1", "view2", *LABEL_KEYS, "substituted")
# What PIL raises for a frame it cannot decode (damaged bytes behind intact markers):
# the sample is replaced, as the DALI loader replaces one its decoder fails on.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# ---------------------------------------------------------------- one view


def crop_and_resize(jpeg: bytes, box: Box, crop_size: int) -> np.ndarray:
    """(S, S, 3) uint8: decode the whole frame (as the reference does), crop, bicubic resize.

    Crop first, then resize (rather than `resize(box=...)`): pixels outside the box
    must not leak into the border taps of the filter, as they cannot in DALI's
    ROI decode."""
    with Image.open(BytesIO(jpeg)) as image:
        crop = image.convert("RGB").crop((box.x, box.y, box.x + box.w, box.y + box.h))
    return np.asarray(crop.resize((crop_size, crop_size), Image.BICUBIC))


def adjust_hue(image: Image.Image, hue: float) -> Image.Image:
    """torchvision's adjust_hue on a PIL image: shift H of PIL's 8-bit HSV by hue·255
    (truncated), wrapping around. No longer used by the executors (they turn hue in YIQ,
    saturate_and_turn_hue); kept to measure that deviation against."""
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(hue * 255)) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def saturate_and_turn_hue(frame: np.ndarray, saturation: float, hue: float) -> np.ndarray:
    """The jitter's saturation and hue as the DALI graph applies them: one YIQ colour
    matrix (sources.saturation_hue_matrix), rounded half away from zero, saturated to uint8.

    A deliberate change of this oracle, made with the DALI graph's (pretrain_pipeline.
    color_jitter): PIL's ImageEnhance.Color + torchvision's adjust_hue (8-bit HSV round
    trip) could only be replayed in DALI with ~60 elementwise ops, which made the DALI
    pipeline slower than this executor on a CPU. The factors and their ranges are the
    reference's; the hue turns chroma in YIQ (keeping luma) instead of shifting HSV hue."""
    matrix = saturation_hue_matrix(saturation, int(hue * 255))
    out = frame.astype(np.float32) @ matrix.T
    return np.clip(np.floor(out + np.float32(0.5)), 0, 255).astype(np.uint8)


def apply_appearance(frame: np.ndarray, look: Appearance, channel: int | None) -> np.ndarray:
    """The strong augmentation of one (S, S, 3) uint8 frame, as the reference: small
    rotation (PIL, nearest, no expand, black corners), colour jitter (brightness and
    contrast: PIL ImageEnhance, as torchvision's ColorJitter on PIL images; saturation and
    hue: the YIQ matrix of saturate_and_turn_hue), channel grey, PIL GaussianBlur(σ).

    Jitter order: FIXED brightness → contrast → saturation → hue, the same as the DALI
    graph; the reference draws a random order per view (a documented deviation)."""
    image = Image.fromarray(np.ascontiguousarray(frame))
    if look.angle:
        image = image.rotate(look.angle, resample=Image.NEAREST)
    if look.jitter:
        image = ImageEnhance.Brightness(image).enhance(look.brightness)
        image = ImageEnhance.Contrast(image).enhance(look.contrast)
        image = Image.fromarray(saturate_and_turn_hue(np.asarray(image), look.saturation, look.hue))
    if channel is not None:
        image = Image.fromarray(np.repeat(np.asarray(image)[..., channel:channel + 1], 3, axis=-1))
    if look.blur:
        image = image.filter(ImageFilter.GaussianBlur(look.blur_sigma))
    return np.asarray(image)


def execute_view_reference(jpegs: list[bytes], view: ViewPlan, crop_size: int) -> np.ndarray:
    """One planned view as float32 (3, T, S, S) in [-1, 1]."""
    clip = np.stack([crop_and_resize(jpeg, view.box, crop_size) for jpeg in jpegs])  # (T, H, W, C)
    # After the crop: boxes live in the un-rotated frame (plan.py), k·90° CCW on (H, W).
    clip = np.rot90(clip, view.rotation, axes=(1, 2))
    look = view.appearance
    if look.strong:
        channels = look.grey_channels or (None,) * len(clip)
        clip = np.stack([apply_appearance(frame, look, c) for frame, c in zip(clip, channels)])
    if view.flip:
        clip = clip[:, :, ::-1]  # horizontal, applied last
    scaled = clip.astype(np.float32) / 255.0 * 2.0 - 1.0  # "tf" normalisation (docs/method.md)
    return np.ascontiguousarray(scaled.transpose(3, 0, 1, 2))


# ---------------------------------------------------------------- dataset


class SourceBackedDataset(Dataset):
    """A map-style dataset over one rank's epoch of a DALI source (`self.source`): item
    `position` is the sample the source produces at that position of `self.epoch`."""

    source = None
    epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self) -> int:
        return self.source.per_rank

    def check_position(self, position: int) -> None:
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} outside this rank's {len(self)} samples")


class ReferencePretrainDataset(SourceBackedDataset):
    """Item `position` = the sample the DALI source produces at that position of this
    rank's epoch. The plan logic is not copied: a `PretrainLmdbSource` inside picks the
    video and draws the plan, so the two executors cannot drift apart."""

    def __init__(self, db_path: str, plan_cfg: PlanConfig, *, seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, epoch: int = 0, metas=None):
        if metas is None:
            metas, _ = read_metadata(db_path)
        self.source = PretrainLmdbSource(db_path, metas, plan_cfg, seed=seed, batch_size=batch_size,
                                         rank=rank, world_size=world_size, shuffle=shuffle)
        self.plan_cfg = plan_cfg
        self.epoch = epoch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        self.check_position(position)
        while True:
            # One read for both views, as the DALI source does; the source substitutes
            # unreadable videos and those marked below, deterministically.
            plan, jpegs, attempt = self.source.sample(self.epoch, position)
            t = len(plan.view1.frames)
            size = self.plan_cfg.crop_size
            try:
                item = {"view1": torch.from_numpy(execute_view_reference(jpegs[:t], plan.view1, size)),
                        "view2": torch.from_numpy(execute_view_reference(jpegs[t:], plan.view2, size))}
                break
            except DECODE_ERRORS as err:
                self.source.mark_undecodable(self.epoch, position, attempt, f"PIL: {type(err).__name__}: {err}")
        labels = (plan.spatial_label, plan.temporal_label, plan.speed_label,
                  plan.view1.rotation, plan.view2.rotation, plan.video_index, attempt)
        item.update({key: torch.tensor(value, dtype=torch.int64)
                     for key, value in zip(BATCH_KEYS[2:], labels, strict=True)})
        return item


def epoch_batches(dataset: SourceBackedDataset, epoch: int, *, batch_size: int, first_sample: int = 0,
                  workers: int = 0, prefetch: int = 2, target: torch.device | None = None):
    """One epoch of `dataset` from `first_sample` on, as dict batches from a torch
    DataLoader, moved to `target` (a CUDA device) when given. Workers are forked per
    epoch (persistent_workers=False) after set_epoch, as in the reference project, so
    each inherits the dataset at the right epoch."""
    dataset.set_epoch(epoch)
    extra = dict(multiprocessing_context="fork", prefetch_factor=prefetch) if workers else {}
    loader = DataLoader(dataset, batch_size=batch_size, sampler=range(first_sample, len(dataset)), shuffle=False,
                        drop_last=True, num_workers=workers, persistent_workers=False,
                        pin_memory=target is not None, **extra)
    for batch in loader:
        if target is not None:
            batch = {k: v.to(target, non_blocking=True) for k, v in batch.items()}
        yield batch


# ---------------------------------------------------------------- loader


class ReferencePretrainLoader:
    """Same iteration interface as `PretrainLoader`: `for batch in loader` is one epoch
    of dict batches, and each iteration moves on to the next epoch.

    `settings` is a `LoaderSettings` (batch_size, workers, prefetch, shuffle, seed);
    `num_threads` and `start_method` are DALI's and ignored here: workers are forked,
    as in the reference project."""

    def __init__(self, db_path: str, plan_cfg: PlanConfig, settings: "LoaderSettings", *,
                 device: str = "cpu", local_rank: int = 0, rank: int = 0, world_size: int = 1,
                 start_epoch: int = 0, start_sample: int = 0, list_path: str | None = None,
                 blocklist: str | None = None):
        if start_sample % settings.batch_size:
            raise ValueError(f"start_sample {start_sample} must be a multiple of the batch size "
                             f"{settings.batch_size}")
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        self.metas, self.classes = read_metadata(db_path, list_path)
        if not self.metas:
            raise ValueError(f"{db_path} holds no videos")
        self.settings = settings
        self.batch_size = settings.batch_size
        self.samples_per_rank = samples_per_rank(len(self.metas), world_size, settings.batch_size)
        self.steps_per_epoch = self.samples_per_rank // settings.batch_size
        self.start_epoch = start_epoch
        self.start_sample = start_sample
        self.device = device
        self._target = torch.device(f"cuda:{local_rank}") if device == "gpu" else None
        self._epoch = start_epoch
        self.dataset = ReferencePretrainDataset(db_path, plan_cfg, seed=settings.seed,
                                                batch_size=settings.batch_size, rank=rank,
                                                world_size=world_size, shuffle=settings.shuffle,
                                                epoch=start_epoch, metas=self.metas)
        self.dataset.source.blocked = blocked_videos(blocklist, self.metas)

    def steps_in_epoch(self, epoch: int) -> int:
        skipped = self.start_sample // self.batch_size if epoch == self.start_epoch else 0
        return self.steps_per_epoch - skipped

    def __iter__(self):
        """One epoch of batches; a resumed first epoch starts at `start_sample`, as
        PretrainLmdbSource does."""
        epoch = self._epoch
        self._epoch += 1
        yield from epoch_batches(self.dataset, epoch, batch_size=self.batch_size,
                                 first_sample=self.start_sample if epoch == self.start_epoch else 0,
                                 workers=self.settings.workers, prefetch=self.settings.prefetch, target=self._target)

    def close(self):
        # Workers end with each epoch's DataLoader; nothing long-lived to free but the dataset.
        self.dataset = None

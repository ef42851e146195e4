"""Per-sample `external_source` callables for supervised clips (finetune / val / test):
(epoch, position) -> the item this rank reads there, its ClipPlan and the encoded
bytes the plan needs. Like sources.PretrainLmdbSource (both build on
sample_source.EpochSampleSource): deterministic from
DALI's SampleInfo, so a pipeline restarted at (start_epoch, start_sample) produces
exactly what an uninterrupted run would have.

Sharding:
- train: one clip per video per epoch; sharding.shard_indices over the videos, as in
  pretraining (every rank the same number of samples, a multiple of the batch; the
  remainder is dropped and changes every epoch).
- val / test: the flattened list of (video, clip, crop) items is split across ranks in
  contiguous blocks (sizes differ by at most one), each block padded to the same
  length, a multiple of the batch, with copies of its last item flagged invalid.
  Every item is read exactly once with valid = True over all ranks.

A video that cannot be read is replaced by another item, chosen deterministically
(sample_source.MAX_SUBSTITUTIONS in a row means the database is broken), and flagged
`substituted`. In val/test a replacement is also flagged invalid: it is another
video's clip, and counting it would weigh that video twice.
"""

from __future__ import annotations

import numpy as np

from .clip_plan import JITTER_KEYS, MODES, ClipPlan, ClipPlanConfig, jitter_arrays, num_test_clips, test_clip_plan, \
    train_clip_plan, val_clip_plan
from .lmdb_store import VideoMeta
from .sample_source import EpochSampleSource
from .sharding import samples_per_rank
from .sources import read_checked_jpegs
from .video_source import read_video_file, video_stamps

# The batch keys every clip loader yields (both executors, both data paths).
# crop_index (last, so the older keys keep their positions): which spatial crop of a
# test clip (0 in train / val, and with one test crop).
CLIP_OUTPUTS = ("clip", "label", "video_index", "clip_index", "valid", "substituted", "crop_index")
LABEL_OUTPUTS = CLIP_OUTPUTS[1:]
JITTER_OUTPUTS = JITTER_KEYS  # the names pretrain_pipeline.color_jitter reads
# The LMDB source's outputs after the T JPEG buffers, in order.
CLIP_PARAM_OUTPUTS = ("anchor", "shape", *JITTER_OUTPUTS, *LABEL_OUTPUTS)
# The video source's outputs after the encoded file, in order.
VIDEO_CLIP_PARAM_OUTPUTS = ("frames", "order", "anchor", "shape", *JITTER_OUTPUTS, *LABEL_OUTPUTS)


def eval_items(metas: list[VideoMeta], videos, mode: str, cfg: ClipPlanConfig) -> list[tuple[int, int, int]]:
    """(video, clip_index, crop_index) of every val or test item, in video order, then
    clip, then crop (val: one centre crop of one clip per video)."""
    if mode == "val":
        return [(int(v), 0, 0) for v in videos]
    return [(int(v), c, k) for v in videos for c in range(num_test_clips(max(metas[v].frames, 1), cfg))
            for k in range(cfg.spatial_crops)]


def eval_block(num_items: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous block of item positions rank `rank` reads (np.array_split)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return np.array_split(np.arange(num_items, dtype=np.int64), world_size)[rank]


def eval_samples_per_rank(num_items: int, world_size: int, batch_size: int) -> int:
    """The largest block, rounded up to whole batches: every rank runs as many steps."""
    largest = -(-num_items // world_size)
    return max(1, -(-largest // batch_size)) * batch_size


class ClipLmdbSource(EpochSampleSource):
    """Sample source of the clip pipeline over an LMDB of JPEG frames.

    Returns, per sample: the T JPEG buffers of the plan's frames, then the arrays named
    in CLIP_PARAM_OUTPUTS (ROI anchor/shape in (x, y) order for decoders.image_slice,
    the jitter parameters, the labels)."""

    # A clip plan raises ValueError for a video without frames, IndexError past its end.
    SUBSTITUTED_ERRORS = (*EpochSampleSource.SUBSTITUTED_ERRORS, ValueError, IndexError)

    def __init__(self, db_path: str, metas: list[VideoMeta], cfg: ClipPlanConfig, mode: str, *, seed: int,
                 batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start_epoch: int = 0, start_sample: int = 0, videos=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(db_path, metas, seed=seed, batch_size=batch_size, rank=rank, world_size=world_size,
                         shuffle=shuffle, start_epoch=start_epoch, start_sample=start_sample)
        self.videos = np.arange(len(metas), dtype=np.int64) if videos is None else np.asarray(videos, np.int64)
        if len(self.videos) == 0:
            raise ValueError(f"{db_path}: no videos to read")
        if self.videos.min() < 0 or self.videos.max() >= len(metas):
            raise ValueError(f"video ids must lie in [0, {len(metas)}) for {db_path}")
        if len(np.unique(self.videos)) != len(self.videos):
            raise ValueError("the `videos` subset lists a video twice")
        self.cfg = cfg
        self.mode = mode
        if mode == "train":
            self.items = None
            self.per_rank = samples_per_rank(len(self.videos), world_size, batch_size)
        else:
            self.items = eval_items(metas, self.videos, mode, cfg)
            self.block = eval_block(len(self.items), rank, world_size)
            self.per_rank = eval_samples_per_rank(len(self.items), world_size, batch_size)
        if start_sample > self.per_rank:
            raise ValueError(f"start_sample {start_sample} is past the {self.per_rank} samples of an epoch")
        if start_sample == self.per_rank:
            # A checkpoint taken after the epoch's last step: the next sample is the next
            # epoch's first (DALI cannot start on an empty epoch).
            self.start_epoch, self.start_sample = start_epoch + 1, 0

    @property
    def num_outputs(self) -> int:
        return self.cfg.frames + len(CLIP_PARAM_OUTPUTS)

    @property
    def num_items(self) -> int:
        """Distinct samples of an epoch over all ranks (train: videos read per epoch)."""
        return self.per_rank * self.world_size if self.items is None else len(self.items)

    def item_for(self, epoch: int, position: int) -> tuple[int, int, int, bool]:
        """(video, clip_index, crop_index, valid) this rank reads at `position` of `epoch`."""
        if self.items is None:
            return int(self.videos[self.epoch_order(epoch, len(self.videos))[position]]), 0, 0, True
        if position < len(self.block):
            return (*self.items[self.block[position]], True)
        # Padding: repeat the block's last item (the first item when the block is empty).
        return (*self.items[self.block[-1] if len(self.block) else 0], False)

    def plan(self, epoch: int, video: int, clip_index: int = 0, crop_index: int = 0) -> ClipPlan:
        meta = self.metas[video]
        if self.mode == "train":
            return train_clip_plan(self.seed, epoch, video, meta, self.cfg)
        if self.mode == "val":
            return val_clip_plan(video, meta, self.cfg)
        return test_clip_plan(video, meta, self.cfg, clip_index, crop_index)

    def sample(self, epoch: int, position: int):
        """(plan, payload, substituted, valid) at `position` of `epoch`; the one place
        both executors take their samples from."""
        video, clip, crop, valid = self.item_for(epoch, position)
        (plan, payload), attempt = self.first_readable(epoch, position, (video, clip, crop),
                                                       lambda *item: self.read_item(epoch, *item))
        replaced = attempt > 0
        # val/test: a replacement is another video's clip; it must not count twice
        return plan, payload, int(replaced), valid and not (replaced and self.items is not None)

    def read_item(self, epoch: int, video: int, clip: int, crop: int) -> tuple:
        """(plan, payload) of one (video, clip, crop)."""
        plan = self.plan(epoch, video, clip, crop)
        return plan, self.read_payload(plan)

    def read_payload(self, plan: ClipPlan) -> list[bytes]:
        """The JPEG bytes of the plan's frames, or BadSampleError."""
        return read_checked_jpegs(self.reader, plan.video, plan.frames, self.metas[plan.video])

    def outputs(self, plan: ClipPlan, jpegs: list[bytes], substituted: int, valid: bool) -> tuple:
        b = plan.box
        return (*[np.frombuffer(j, dtype=np.uint8) for j in jpegs],
                np.array([b.x, b.y], np.float32), np.array([b.w, b.h], np.float32),
                *jitter_arrays(plan.appearance), *label_arrays(plan, substituted, valid))

    def replacement(self, epoch: int, position: int, attempt: int) -> tuple[int, int, int]:
        """Another (video, clip, crop), from the same epoch's pool, deterministically."""
        rng = np.random.default_rng([self.seed, epoch, self.rank, position, attempt, 0xBAD])
        if self.items is None:
            return int(self.videos[rng.integers(0, len(self.videos))]), 0, 0
        return self.items[int(rng.integers(0, len(self.items)))]


def label_arrays(plan: ClipPlan, substituted: int, valid: bool) -> tuple[np.ndarray, ...]:
    """LABEL_OUTPUTS as 0-d int32 arrays (parallel external_source rejects numpy scalars)."""
    i32 = lambda v: np.array(v, dtype=np.int32)  # noqa: E731
    return (i32(plan.label), i32(plan.video), i32(plan.clip_index), i32(valid), i32(substituted),
            i32(plan.crop_index))


class ClipVideoSource(ClipLmdbSource):
    """Video files (a JSON index): the encoded file plus the clip's distinct frames,
    sorted (a decoder seeking backwards is slow; short videos wrap and repeat frames),
    and where each clip frame sits in that list."""

    def __init__(self, index_path: str, metas: list[VideoMeta], files: list[str], cfg: ClipPlanConfig,
                 mode: str, **kwargs):
        super().__init__(index_path, metas, cfg, mode, **kwargs)
        self.files = files
        self.stamps = video_stamps(index_path)

    @property
    def num_outputs(self) -> int:
        return 1 + len(VIDEO_CLIP_PARAM_OUTPUTS)

    def read_payload(self, plan: ClipPlan) -> np.ndarray:
        """The encoded file, or BadSampleError for a missing, absurd or changed file. A
        file damaged inside fails in the decoder: the loader's recovery replaces it."""
        return read_video_file(self.files[plan.video], self.stamps[plan.video])

    def outputs(self, plan: ClipPlan, encoded: np.ndarray, substituted: int, valid: bool) -> tuple:
        frames, order = np.unique(plan.frames, return_inverse=True)
        b = plan.box  # (y, x) order, for fn.slice with axis_names="HW"
        return (encoded, frames.astype(np.int32), order.astype(np.int32),
                np.array([b.y, b.x], np.float32), np.array([b.h, b.w], np.float32),
                *jitter_arrays(plan.appearance), *label_arrays(plan, substituted, valid))

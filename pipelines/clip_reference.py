"""The reference executor of clip plans: numpy/PIL in a torch DataLoader, every JPEG
decoded whole by PIL, as the reference project's finetuning and test loaders do.

It is the test oracle of the DALI clip pipeline (same source, so the same items,
plans and substitutions, one to one) and the baseline the benchmark measures DALI
against. Per clip: crop the planned box of each planned frame, bicubic resize to S×S
(reference_executor.crop_and_resize), colour jitter when planned
(reference_executor.apply_appearance), x/255·2−1, (3, T, S, S).

Needs neither DALI nor the model code. LMDB only: the video-file path has no PIL
reference (decoding video files is DALI's job here).
"""

from __future__ import annotations

import numpy as np
import torch

from .clip_plan import ClipPlan
from .clip_source import CLIP_OUTPUTS, ClipLmdbSource
from .reference_executor import DECODE_ERRORS, SourceBackedDataset, apply_appearance, crop_and_resize, epoch_batches


def execute_clip_reference(jpegs: list[bytes], plan: ClipPlan) -> np.ndarray:
    """One planned clip as float32 (3, T, S, S) in [-1, 1]."""
    clip = np.stack([crop_and_resize(jpeg, plan.box, plan.out_size) for jpeg in jpegs])   # (T, S, S, 3)
    if plan.appearance.jitter:
        clip = np.stack([apply_appearance(frame, plan.appearance, None) for frame in clip])
    scaled = clip.astype(np.float32) / 255.0 * 2.0 - 1.0
    return np.ascontiguousarray(scaled.transpose(3, 0, 1, 2))


class ReferenceClipDataset(SourceBackedDataset):
    """Item `position` = the sample the DALI source produces at that position of this
    rank's `epoch`: the source picks the item, draws the plan and substitutes bad videos,
    so the two executors cannot drift apart."""

    def __init__(self, source: ClipLmdbSource, epoch: int = 0):
        if type(source) is not ClipLmdbSource:
            raise ValueError("the reference executor reads LMDBs of JPEG frames only; video files are decoded "
                             "by DALI (executor='dali')")
        self.source = source
        self.epoch = epoch

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        self.check_position(position)
        while True:
            plan, jpegs, substituted, valid = self.source.sample(self.epoch, position)
            try:
                item = {"clip": torch.from_numpy(execute_clip_reference(jpegs, plan))}
                break
            except DECODE_ERRORS as err:   # replaced as the DALI loader replaces what its decoder fails on
                self.source.mark_undecodable(self.epoch, position, self.source.last_attempt,
                                             f"PIL: {type(err).__name__}: {err}")
        values = (plan.label, plan.video, plan.clip_index, valid, substituted, plan.crop_index)
        item.update({key: torch.tensor(value, dtype=torch.bool if key == "valid" else torch.int64)
                     for key, value in zip(CLIP_OUTPUTS[1:], values, strict=True)})
        return item


class ReferenceClipBatches:
    """Batches of one epoch at a time from a torch DataLoader over ReferenceClipDataset.
    Workers are forked per epoch (after set_epoch), as in the reference project."""

    def __init__(self, source: ClipLmdbSource, *, batch_size: int, workers: int = 0, prefetch: int = 2,
                 target: torch.device | None = None):
        self.dataset = ReferenceClipDataset(source)
        self.batch_size = batch_size
        self.workers = workers
        self.prefetch = prefetch
        self.target = target

    def epoch(self, epoch: int, first_sample: int = 0):
        yield from epoch_batches(self.dataset, epoch, batch_size=self.batch_size, first_sample=first_sample,
                                 workers=self.workers, prefetch=self.prefetch, target=self.target)

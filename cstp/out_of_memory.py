"""Running out of GPU or host memory, told apart from other errors, and said as what to
change: the first thing a user meets when a batch size or clip size does not fit a card.
Shared by train.py, finetune.py and benchmark.py."""

from __future__ import annotations

import torch

# How torch's CUDA and CPU allocators, cuDNN and DALI word it (lower case).
OUT_OF_MEMORY_MARKS = ("out of memory", "can't allocate memory", "cuda allocation failed",
                       "cudaerrormemoryallocation", "cudnn_status_alloc_failed", "bad_alloc")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` means that an allocation failed (not another RuntimeError)."""
    if isinstance(err, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err).lower() for mark in OUT_OF_MEMORY_MARKS)


def out_of_memory_message(err: BaseException, batch_size: int, clip_section: str, clip: dict,
                          rank: int | None = None) -> str:
    """One line: what ran out (the error's first line, shortened), the settings that size the
    memory (the batch per rank; frames and crop size of the config's `clip_section`, `clip`)
    and what to lower. `rank` names the rank that hit it."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(first) > 200:
        first = first[:197] + "..."
    used = (f"data.batch_size={batch_size}, {clip_section}.frames={clip['frames']}, "
            f"{clip_section}.crop_size={clip['crop_size']}")
    where = f"rank {rank}: " if rank is not None else ""
    return (f"{where}out of memory ({first}) with {used}: lower the batch per rank (the first of these) or the "
            "clip size; `python benchmark.py model --config CONFIG --batch N` measures what a batch takes")

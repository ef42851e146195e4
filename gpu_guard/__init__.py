"""The one rule every entry point follows before DALI forks its workers.

DALI's parallel external_source forks worker processes, and it refuses to fork once
the CUDA driver is initialised in the process ("Cannot fork a process when the CUDA
has been initialized"). Two things initialise it early:

- `torch.cuda.is_available()` / `device_count()`, which call cuInit unless
  PYTORCH_NVML_BASED_CUDA_CHECK=1 makes torch ask NVML instead;
- building a GPU DALI pipeline: a second pipeline's workers cannot fork after the
  first one was built.

So: this module sets the NVML variable on import and resolves the device without
touching CUDA; the loaders (pipelines/) start their workers when they are constructed
and build their pipeline on first use, so an entry point that constructs all its
loaders before any CUDA work (set_device, a CUDA tensor, a first batch) is safe.
See docs/gpu.md.

Neutral ground: imported by the learning side (train.py, finetune.py, evaluate.py)
and the data-side tools (show.py, benchmark.py, bench/, scripts/) alike; it imports neither
`cstp` nor `pipelines` nor DALI.
"""

from __future__ import annotations

import os

NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
DEVICES = ("auto", "cpu", "gpu")


class DeviceError(ValueError):
    """A GPU was asked for but none is visible."""


def ask_nvml_not_cuda() -> None:
    """Make torch's availability checks use NVML (no cuInit, so DALI can still fork).
    Overrides a value set to anything else: a CUDA-initialising check breaks every
    recipe that sets data.workers > 0."""
    os.environ[NVML_CHECK] = "1"


ask_nvml_not_cuda()   # importing this module is the rule; resolve_device repeats it


def gpu_visible() -> bool:
    """Whether torch sees a CUDA GPU, asked through NVML (torch falls back to the CUDA
    runtime only when NVML itself cannot be loaded)."""
    ask_nvml_not_cuda()
    import torch

    return torch.cuda.is_available()


def resolve_device(requested: str) -> str:
    """'auto' | 'cpu' | 'gpu' to 'cpu' | 'gpu', without initialising CUDA.
    Raises DeviceError for 'gpu' without a visible GPU."""
    if requested not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    if gpu_visible():
        return "gpu"
    if requested == "gpu":
        raise DeviceError("device gpu requested but no CUDA GPU is visible")
    return "cpu"

"""What one benchmark run is: its config (the recipe plus the command line's flags), its
data choice and the errors a user can fix."""

from __future__ import annotations

import os
from pathlib import Path

from preprocessing.cli_args import int_at_least

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "quick.yaml"


class BenchmarkError(RuntimeError):
    """A problem the user can fix; printed as one line, exit status 2."""


def data_source(args) -> str:
    """lmdb or video: what the DALI runs read."""
    given = explicit_data_path(args)
    if given is not None:
        return "video" if given.endswith(".json") else "lmdb"
    return args.source or "lmdb"


def load_benchmark_config(args) -> dict:
    from cstp.config import ConfigError, load_config

    # The flags win over the overrides and are checked like them (--batch 1 was torch's BatchNorm
    # traceback, data.batch_size must be >= 2): they go last in the same list.
    flags = {"run.seed": args.seed, "data.batch_size": args.batch, "data.num_threads": args.threads,
             "data.decode": args.decode}
    try:
        cfg = load_config(args.config, [*args.overrides,
                                        *(f"{key}={value}" for key, value in flags.items() if value is not None)])
    except ConfigError as err:
        raise BenchmarkError(str(err)) from None
    d, t = cfg["data"], cfg["train"]
    d["device"] = args.device
    t["precision"] = args.precision or ("bf16" if args.device == "gpu" else "fp32")
    t["channels_last"] = bool(args.channels_last)
    return cfg


def workers_for(loader: str, args, cfg) -> int:
    if args.workers is not None:
        return args.workers
    return cfg["data"]["workers"] if loader == "dali" else (os.cpu_count() or 1)


def explicit_data_path(args) -> str | None:
    """--data, or a data.path given as an override (a config file's path is not used:
    recipes name databases that may not exist here)."""
    if args.data:
        return args.data
    for word in args.overrides:
        key, _, value = word.partition("=")
        if key.strip() in ("data.path", "path") and value:
            return value
    return None


def require_gpu_if_asked(device: str):
    if device != "gpu":
        return
    import gpu_guard   # NVML, not the CUDA driver: forked DALI workers must start before CUDA is initialised

    if not gpu_guard.gpu_visible():
        raise BenchmarkError("--device gpu needs a CUDA GPU, but torch sees none "
                             "(torch.cuda.is_available() is False); run with --device cpu")


def samples_needed(args, batch: int) -> int:
    # + 2 batches: DALI's prefetch queue runs ahead of the last timed step.
    return (args.warmup + args.steps + 2) * batch


def repeat_count(text: str):
    """An argparse type: auto or a count >= 1 (--repeat)."""
    return "auto" if text == "auto" else int_at_least(1)(text)

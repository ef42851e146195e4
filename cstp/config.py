"""Run configuration: plain nested values, read from YAML, overridden from the
command line with `key=value` (nanoGPT style, no framework).

    cfg = load_config("configs/quick.yaml", ["optim.lr=0.1", "max_steps=200"])

A key may be written in full (`optim.lr`) or by its last part when that is unique
(`lr`, `max_steps`). Unknown keys and wrongly typed values are refused with a
message that names the closest known key. Defaults are the reference recipe
(docs/method.md#the-sampling-plan, #optimisation, #recipes).
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path

import yaml

def run_defaults(out: str, epochs: int, keep_checkpoints: int) -> dict:
    """The `run` section that pretraining and finetuning share (cstp/finetune_config.py)."""
    return {
        "out": out,
        "seed": 1,
        "epochs": epochs,
        "max_steps": 0,             # stop after this many optimizer steps (0 = run all epochs)
        "log_every": 10,            # steps between JSONL records
        "checkpoint_every": 0,      # steps between checkpoints (0 = only at epoch ends)
        "keep_checkpoints": keep_checkpoints,   # the newest N checkpoints are kept (0 = all)
        "max_bad_steps": 20,        # consecutive non-finite losses before aborting (checked at log records)
        "progress": True,
        "tensorboard": True,        # OUT/tensorboard on rank 0 (skipped with a warning without the package)
    }


DEFAULTS: dict = {
    "run": {
        **run_defaults("runs/cstp", epochs=300, keep_checkpoints=3),
        "data_timeout_s": 300.0,    # warn (naming the batch) when a rank waits longer for data; 0 = off
        # test hooks, for the fault-tolerance tests only: the highest rank dies before this
        # step on torchrun's first attempt (0 = off); its loss is NaN at these steps
        "fail_at_step": 0,
        "nan_at_steps": [],
    },
    "data": {
        "path": "",                 # LMDB of JPEG frames, or a video index (.json)
        "list": "",                 # optional reference-format list: read a reference-project LMDB through it
        "blocklist": "",            # optional: videos not to read (path<TAB>reason lines, `preprocessing verify --decode`)
        "device": "auto",           # auto | cpu | gpu: where DALI decodes and augments
        "batch_size": 16,           # per rank
        "num_threads": 2,
        "workers": 0,               # external_source worker processes (0 = in-process)
        "prefetch": 2,
        "shuffle": True,
        "decode": "roi",            # LMDB JPEGs: roi (decode only the crop box) | full (whole frame, then slice)
        "graph": "views",           # LMDB: views (a decoder per frame position) | frames (one over B·2·T frames)
    },
    "plan": {
        "frames": 16,
        "crop_size": 112,
        "strides": [1, 2, 4, 8],
        "temporal_rates": [1.0, 0.8, 0.6, 0.4, 0.2],
        "spatial_rates": [1.0, 0.8, 0.6, 0.4, 0.2],
        "min_area": 0.2,
        "max_area": 1.0,
        "min_ratio": 0.75,
        "max_ratio": 1.3333333333333333,
        "flip_prob": 0.5,
        # appearance, per view (docs/method.md#appearance): with strong_prob the "base" pipeline, i.e. a
        # small rotation, then jitter/grey/blur each with its own probability
        "strong_prob": 0.3,
        "small_angle_range": [-10.0, 10.0],     # degrees
        "jitter_prob": 0.8,                     # fixed order: brightness, contrast, saturation, hue
        "brightness_range": [0.6, 1.4],
        "contrast_range": [0.6, 1.4],
        "saturation_range": [0.6, 1.4],
        "hue_range": [-0.1, 0.1],               # fraction of a full turn
        "grey_prob": 0.2,                       # per-frame random channel copied to R, G, B
        "blur_prob": 0.5,
        "blur_sigma_range": [0.1, 2.0],         # pixels
    },
    "model": {
        "width": 1.0,               # R(2+1)D-10 channel multiplier (1.0 = 14.37 M parameters)
        "proj_hidden": 4096,
        "proj_dim": 512,
        "ema_tau": 0.996,
        "target_init": "independent",   # the reference; "copy" = standard BYOL
    },
    "loss": {"byol": 0.1, "spatial": 1.0, "temporal": 1.0, "speed": 1.0, "rotation": 1.0},
    "optim": {
        "lr": 0.09,                 # peak learning rate
        "min_lr": 1e-5,
        "warmup_epochs": 150,
        "schedule_unit": "epoch",   # epoch (the reference) | step (smooth, for short runs)
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "clip_grad": 18.0,          # 0 disables
        # lr is the peak LR at reference_batch; linear: peak = lr x global batch / reference_batch
        "lr_scaling": "none",       # none | linear (the recipes use linear)
        "reference_batch": 128,
    },
    "train": {
        "precision": "auto",        # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
        "channels_last": False,     # channels_last_3d model weights and inputs
        "threads": 0,               # torch CPU threads per rank (0 = leave as is)
        "sync_bn": False,           # SyncBatchNorm across ranks (CUDA); off = per-GPU BN like the reference
        "compile": False,           # torch.compile the model
        "cudnn_benchmark": True,
    },
}


MAX_SEED = 2 ** 63 - 1    # run.seed: an int64 everywhere it goes (numpy, torch, DALI)
MAX_HEAD_WIDTH = 65_536     # projector / predictor widths, and finetuning's class count: beyond is a typo


class ConfigError(ValueError):
    pass


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _resolve_key(key: str, known: dict) -> str:
    if key in known:
        return key
    matches = [k for k in known if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"'{key}' is ambiguous: write one of {', '.join(sorted(matches))}")
    close = difflib.get_close_matches(key, list(known) + [k.rsplit('.', 1)[-1] for k in known], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(f"unknown config key '{key}'{hint}")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(key: str, value, default):
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float) and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)   # YAML 1.1 reads 1e-3 (no dot) as a string
    elif isinstance(default, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(default, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{key} must be an integer, got {value}")
        return type(default)(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    elif isinstance(default, list) and isinstance(value, list):
        return value
    raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}")


def _set(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value


def apply_overrides(cfg: dict, overrides: dict, defaults: dict | None = None) -> dict:
    """`cfg` with `overrides` ({key: value}) applied; keys and types are checked against
    `defaults` (the pretraining DEFAULTS unless another recipe's are given)."""
    cfg = copy.deepcopy(cfg)
    known = _flatten(DEFAULTS if defaults is None else defaults)
    for key, value in overrides.items():
        full = _resolve_key(key, known)
        _set(cfg, full, _coerce(full, value, known[full]))
    return cfg


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"expected key=value, got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot read the value of {key}: {err}") from None
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[str] | tuple = (), *, defaults: dict | None = None,
                validator=None) -> dict:
    """Defaults, then the YAML file, then the `key=value` overrides; checked by `validator`.
    Other recipes (finetuning) pass their own `defaults` and `validator`."""
    defaults = DEFAULTS if defaults is None else defaults
    cfg = copy.deepcopy(defaults)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
            first = " ".join(str(err).split())[:200]
            raise ConfigError(f"cannot read {path}: {type(err).__name__}: {first}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of sections")
        cfg = apply_overrides(cfg, _flatten(loaded), defaults)
    cfg = apply_overrides(cfg, dict(parse_override(o) for o in overrides), defaults)
    (validator or validate)(cfg)
    return cfg


def need(condition: bool, message: str):
    """A validator's check: ConfigError(message) unless `condition`."""
    if not condition:
        raise ConfigError(message)


def validate_shared(cfg: dict):
    """The checks that pretraining and finetuning configs share."""
    need(cfg["data"]["device"] in ("auto", "cpu", "gpu"), "data.device must be auto, cpu or gpu")
    need(cfg["data"]["batch_size"] >= 2, "data.batch_size must be >= 2 (the BatchNorm layers of the heads need "
         "2 samples per rank in training)")
    need(cfg["run"]["epochs"] >= 1, "run.epochs must be >= 1")
    need(cfg["train"]["precision"] in ("auto", "fp32", "bf16"), "train.precision must be auto, fp32 or bf16")
    r, d, o = cfg["run"], cfg["data"], cfg["optim"]
    # numpy's SeedSequence refuses a negative seed, torch.manual_seed one past 64 bits: tracebacks at the start
    need(0 <= r["seed"] <= MAX_SEED, f"run.seed must be in [0, {MAX_SEED}]")
    need(r["max_steps"] >= 0, "run.max_steps must be >= 0 (0 = run all epochs)")
    need(r["log_every"] >= 1, "run.log_every must be >= 1")
    need(r["checkpoint_every"] >= 0, "run.checkpoint_every must be >= 0 (0 = only at epoch ends)")
    need(r["keep_checkpoints"] >= 0, "run.keep_checkpoints must be >= 0 (0 = keep all)")
    need(r["max_bad_steps"] >= 1, "run.max_bad_steps must be >= 1")
    need(d["num_threads"] >= 1, "data.num_threads must be >= 1")
    need(d["workers"] >= 0, "data.workers must be >= 0 (0 = in-process)")
    need(d["prefetch"] >= 1, "data.prefetch must be >= 1")
    need(math.isfinite(o["lr"]) and o["lr"] > 0, "optim.lr must be a number > 0")
    need(0 <= o["momentum"] < 1, "optim.momentum must be in [0, 1)")
    need(0 <= o["weight_decay"] < math.inf, "optim.weight_decay must be >= 0")


def validate(cfg: dict):
    validate_shared(cfg)
    need(cfg["data"]["decode"] in ("roi", "full"), "data.decode must be roi or full")
    need(cfg["data"]["graph"] in ("views", "frames"), "data.graph must be views or frames")
    need(0 <= cfg["optim"]["warmup_epochs"] <= cfg["run"]["epochs"],
         "optim.warmup_epochs must be between 0 and run.epochs")
    need(cfg["optim"]["schedule_unit"] in ("epoch", "step"), "optim.schedule_unit must be epoch or step")
    need(cfg["optim"]["lr_scaling"] in ("none", "linear"), "optim.lr_scaling must be none or linear")
    need(cfg["optim"]["reference_batch"] >= 1, "optim.reference_batch must be >= 1")
    need(cfg["model"]["target_init"] in ("independent", "copy"), "model.target_init must be independent or copy")
    need(0 < cfg["model"]["width"] <= 4, "model.width must be in (0, 4]")
    for key in ("proj_hidden", "proj_dim"):   # 0 was a ZeroDivisionError or a 0-wide BYOL space; 1e9 no memory
        need(1 <= cfg["model"][key] <= MAX_HEAD_WIDTH, f"model.{key} must be in [1, {MAX_HEAD_WIDTH}]")
    need(0 <= cfg["model"]["ema_tau"] <= 1, "model.ema_tau must be in [0, 1]")
    need(0 <= cfg["optim"]["min_lr"] <= cfg["optim"]["lr"], "optim.min_lr must be in [0, optim.lr]")
    need(0 <= cfg["optim"]["clip_grad"] < math.inf, "optim.clip_grad must be >= 0 (0 disables)")
    need(cfg["run"]["data_timeout_s"] >= 0, "run.data_timeout_s must be >= 0 (0 = off)")
    weights = cfg["loss"]
    need(all(0 <= w < math.inf for w in weights.values()) and any(w > 0 for w in weights.values()),
         f"loss weights must be >= 0, at least one > 0; got {weights}")

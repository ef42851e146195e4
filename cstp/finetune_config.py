"""Finetuning configuration: the reference's supervised recipe (docs/method.md#finetuning,
#test-protocol) as plain nested values, with the same `key=value` overrides as pretraining
(see cstp/config.py: full `optim.lr` or a unique last part such as `lr`).
"""

from __future__ import annotations

from .config import MAX_HEAD_WIDTH, load_config, need, run_defaults, validate_shared

FINETUNE_DEFAULTS: dict = {
    "run": run_defaults("runs/finetune", epochs=100, keep_checkpoints=2),
    "data": {
        "train": "",                # LMDB (or .json video index) of the training list
        "train_list": "",           # reference-format list file selecting and labelling data.train's videos
        "blocklist": "",            # optional: videos not to read (path<TAB>reason lines, `preprocessing verify --decode`)
                                    # (an LMDB built by the reference project); "" = the LMDB's own metadata
        "device": "auto",           # auto | cpu | gpu: where DALI decodes and augments
        "batch_size": 30,           # per rank (the reference: 2 GPUs x 30)
        "num_threads": 2,
        "workers": 0,
        "prefetch": 2,
        # Model selection and the plateau scheduler read a validation split carved from
        # the training list (the reference used the test split: docs/deviations.md#finetuning-validation-split).
        "val_fraction": 0.1,        # per class, at least one video of every class with >= 2
        "val_every": 1,             # epochs between validations
    },
    "clip": {                       # pipelines.clip_plan.ClipPlanConfig
        "frames": 16,
        "stride": 4,
        "crop_size": 112,
        "test_short_side": 128,
        "min_area": 0.2,
        "max_area": 1.0,
        "jitter_prob": 0.3,
    },
    "model": {
        "width": 0.0,               # 0 = follow the checkpoint (1.0 when training from scratch)
        "init": "",                 # backbone checkpoint; "" = from scratch
        "mode": "all",              # all (finetune every layer) | linear (frozen backbone)
        "num_classes": 0,           # 0 = the training LMDB's class count
    },
    "optim": {
        "lr": 0.025,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "plateau_patience": 10,     # ReduceLROnPlateau on the validation loss
        "plateau_factor": 0.1,
        "plateau_threshold": 1e-4,  # relative improvement that counts (torch's default)
    },
    "train": {
        "precision": "auto",        # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
        "threads": 0,
    },
}


def load_finetune_config(path: str | None = None, overrides=()) -> dict:
    return load_config(path, overrides, defaults=FINETUNE_DEFAULTS, validator=validate)


def validate(cfg: dict):
    validate_shared(cfg)
    need(0 < cfg["data"]["val_fraction"] < 1, "data.val_fraction must be in (0, 1)")
    need(cfg["data"]["val_every"] >= 1, "data.val_every must be >= 1")
    need(cfg["model"]["mode"] in ("all", "linear"), "model.mode must be all or linear")
    need(0 <= cfg["model"]["width"] <= 4, "model.width must be in [0, 4] (0 = from the checkpoint)")
    need(0 < cfg["optim"]["plateau_factor"] < 1, "optim.plateau_factor must be in (0, 1)")
    need(0 <= cfg["model"]["num_classes"] <= MAX_HEAD_WIDTH,
         f"model.num_classes must be in [0, {MAX_HEAD_WIDTH}] (0 = the training data's class count)")

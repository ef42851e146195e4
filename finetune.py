#!/usr/bin/env python
r"""Finetune an R(2+1)D backbone for action recognition (the CSTP downstream protocol).

  python finetune.py --config configs/finetune_ucf101.yaml --out runs/ft_ucf \
      data.train=data/ucf101_train01.lmdb model.init=runs/ucf/backbone.pt
  python finetune.py --config configs/finetune_demo.yaml model.init=          # from scratch
  torchrun --nproc-per-node 2 finetune.py --config configs/finetune_ucf101.yaml --resume auto ...

model.init takes our exported backbone.pt, a pretraining ckpt_*.pt (online backbone)
or a reference-project checkpoint (module.online_net.* keys); empty = from scratch.
model.mode=linear trains only the head (frozen backbone, BN statistics included).
data.train_list reads an LMDB built by the reference project through its list file
(e.g. trainlist01_nframe.txt): the listed videos, in list order, with their labels.
A stratified validation split (data.val_fraction of each class) is carved out of
the training LMDB: it drives the plateau scheduler and picks OUT/best.pt; the test
split is never seen here (evaluate.py reads it). Writes OUT/config.yaml,
OUT/metrics.jsonl, OUT/ckpt_*.pt, OUT/best.pt and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

import yaml

import gpu_guard  # noqa: F401  before torch: CUDA availability through NVML (no cuInit before DALI forks)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/finetune_*.yaml); defaults are the reference's")
    parser.add_argument("--out", help="output directory (overrides run.out)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from the newest valid checkpoint in the output directory "
                             "(start fresh if there is none); or a checkpoint file")
    parser.add_argument("--executor", choices=("dali", "reference"), default="dali",
                        help="who runs the clip plans: DALI (default) or the numpy/PIL reference executor")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)   # key=value before, between or after the flags


def fail(message: str, code: int = 2) -> int:
    print(f"finetune.py: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    from cstp.config import ConfigError
    from cstp.finetune_config import load_finetune_config

    try:
        cfg = load_finetune_config(args.config, args.overrides)
    except ConfigError as err:
        return fail(str(err))
    if args.out:
        cfg["run"]["out"] = args.out
    from train import (distributed_env, find_resume_state, join_ranks, no_resume_message, refuse_on_every_rank,
                       resolve_device, unwritable)

    rank, world_size, local_rank = distributed_env()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    out_dir = Path(cfg["run"]["out"])
    if why := unwritable(out_dir, folder=True):
        return fail(f"run.out: {why}")
    d, m = cfg["data"], cfg["model"]
    if not d["train"]:
        return fail("set data.train to the training LMDB (python -m preprocessing build-lmdb ...)")

    import torch
    import torch.distributed as dist

    from cstp.backbone_io import BackboneLoadError, checked_width, load_backbone
    from cstp.checkpoint import CheckpointError, list_checkpoints
    from cstp.classifier import build_classifier
    from cstp.finetune_engine import FINETUNE_FORMAT, FinetuneTrainer, Position, validation_split
    from cstp.out_of_memory import is_out_of_memory, out_of_memory_message
    from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
    from pipelines.clip_plan import clip_config_from
    from pipelines.faults import BrokenDataError
    from pipelines.lmdb_store import LmdbFormatError

    if cfg["train"]["threads"]:
        torch.set_num_threads(cfg["train"]["threads"])
    device = resolve_device(d["device"])
    problem, resume_path, resume_state = None, None, None
    try:
        resume_path, resume_state = find_resume_state(
            args.resume, out_dir, FINETUNE_FORMAT,
            "--resume continues a finetuning run; a pretrained backbone goes to model.init")
    except CheckpointError as err:
        problem = str(err)
    else:
        if resume_state is None and list_checkpoints(out_dir):
            problem = no_resume_message(args.resume, out_dir)
    position = Position(**resume_state["position"]) if resume_state else Position()

    def refuse(problem: str) -> int:
        # before the process group is up: the other ranks, which may read other (node-local)
        # copies of the files, must not wait for this one in it until its timeout
        return refuse_on_every_rank(problem, fail, device, rank, local_rank, world_size)

    backbone = None
    width = m["width"] or 1.0
    if m["init"] and resume_state is None and problem is None:
        try:
            backbone = load_backbone(m["init"], expected_width=m["width"] or None)
        except BackboneLoadError as err:
            return refuse(f"model.init: {err}")
        width = backbone.width
    elif resume_state is not None:
        try:
            width = checked_width(resume_state.get("width"), str(resume_path))
        except BackboneLoadError as err:
            problem = f"--resume: {err}"
    if problem is not None:
        return refuse(problem)

    try:
        clip_cfg = clip_config_from(cfg["clip"])
    except ValueError as err:
        return fail(f"clip: {err}")
    settings = ClipLoaderSettings(batch_size=d["batch_size"], num_threads=d["num_threads"], workers=d["workers"],
                                  prefetch=d["prefetch"], seed=cfg["run"]["seed"])
    common = dict(device=device, local_rank=local_rank, rank=rank, world_size=world_size, executor=args.executor,
                  list_path=d["train_list"] or None, blocklist=d["blocklist"] or None)
    # Loaders (and their forked workers) come before the process group and before any CUDA
    # work: each forks its workers when constructed and builds its pipeline at its first
    # batch, so the val loader's fork is not after the train pipeline's CUDA set-up
    # (docs/gpu.md, docs/architecture.md#forked-workers).
    try:
        from pipelines.lmdb_store import read_metadata
        from pipelines.video_source import is_video_index, read_video_index
        if d["train_list"] and is_video_index(d["train"]):
            return refuse("data.train_list selects videos of an LMDB; a video index lists its videos itself")
        metas = read_video_index(d["train"])[0] if is_video_index(d["train"]) else \
            read_metadata(d["train"], d["train_list"] or None)[0]
        train_ids, val_ids = validation_split([mm.label for mm in metas], d["val_fraction"], cfg["run"]["seed"])
        if not val_ids:
            return refuse(f"{d['train']}: no class has 2 videos, so there is nothing to validate on")
        if resume_state is not None and resume_state.get("val_videos") not in (None, val_ids):
            return refuse("the validation split differs from the checkpoint's (data.val_fraction, run.seed or "
                          "the training LMDB changed)")
        train_loader = ClipLoader(d["train"], "train", clip_cfg, settings, start_epoch=position.epoch,
                                  start_sample=position.sample, videos=train_ids, **common)
        val_loader = ClipLoader(d["train"], "val", clip_cfg, settings, videos=val_ids, **common)
    except (FileNotFoundError, LmdbFormatError, ValueError) as err:
        return refuse(f"cannot read the data: {err}")
    num_classes = m["num_classes"] or train_loader.num_classes
    if num_classes < train_loader.num_classes:
        train_loader.close()
        val_loader.close()
        return refuse(f"model.num_classes={num_classes} but {d['train']} has {train_loader.num_classes} classes")
    problem = join_ranks(device, local_rank, world_size, position=resume_state and resume_state["position"])
    train_device = torch.device(f"cuda:{local_rank}" if device == "gpu" else "cpu")
    if device == "gpu":
        torch.backends.cudnn.benchmark = True
    try:
        if problem is not None:
            return fail(problem) if rank == 0 else 2
        torch.manual_seed(cfg["run"]["seed"])   # the head's (and a scratch backbone's) initialisation
        model = build_classifier(width, num_classes, backbone.state_dict if backbone else None,
                                 frozen=m["mode"] == "linear")
        meta = {"width": width, "classes": list(train_loader.classes), "num_videos": len(metas),
                "val_videos": val_ids, "init": {"kind": backbone.kind, "path": backbone.path} if backbone
                else (resume_state or {}).get("init", {"kind": "scratch", "path": ""}),
                "clip": dict(cfg["clip"])}
        try:
            trainer = FinetuneTrainer(cfg, model, train_loader, val_loader, out_dir, train_device,
                                      resume_state=resume_state, meta=meta)
        except CheckpointError as err:   # before config.yaml is written: the run's own stays as it was
            # the same on every rank; with several, it names the failing rank, whose path may differ
            return 2 if rank else fail(f"--resume: {resume_path}: {err}" if world_size == 1 else f"--resume: {err}")
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            logging.info("%s; %d train / %d validation videos, %d classes, %d ranks x batch %d, %d steps per "
                         "epoch", f"backbone from {backbone.kind} {backbone.path}" if backbone else
                         ("resuming " + str(resume_path) if resume_state else "from scratch"),
                         len(train_ids), len(val_ids), num_classes, world_size, d["batch_size"],
                         train_loader.steps_per_epoch)
        previous = {sig: signal.signal(sig, trainer.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            summary = trainer.run()
        except BrokenDataError as err:
            return fail(f"stopped: {err}", 1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except (RuntimeError, MemoryError) as err:   # building the model on the device, a step or a validation
        if not is_out_of_memory(err):
            raise
        return fail(out_of_memory_message(err, d["batch_size"], "clip", cfg["clip"],
                                          rank if world_size > 1 else None))
    finally:
        train_loader.close()
        val_loader.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        b = summary["best"]
        print(f"finetuned {summary['steps']} steps in {summary['seconds']:.0f} s; best validation top-1 "
              f"{b['val_top1']:.3f} (loss {b['val_loss']:.4f}) at epoch {b['epoch']} -> {out_dir / 'best.pt'}")
        if summary["stopped_early"]:
            print(f"stopped by a signal at step {summary['steps']}; continue with --resume auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())

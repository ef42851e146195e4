#!/usr/bin/env python
"""CSTP pretraining: DALI pipelines feed a (DDP) R(2+1)D BYOL trainer.

  python train.py --config configs/proof.yaml --out runs/demo   # make demo's pretraining
  python train.py --config configs/ucf101.yaml --out runs/ucf data.path=data/ucf101.lmdb lr=0.03
  torchrun --nproc-per-node 8 train.py --config configs/k400.yaml --resume auto

Any config value can be overridden with key=value (full `optim.lr` or a unique
last part such as `lr`, `max_steps`). Writes OUT/config.yaml, OUT/metrics.jsonl,
OUT/tensorboard/, OUT/ckpt_*.pt, OUT/backbone.pt and OUT/summary.json.

SIGTERM/SIGINT (preemption; torchrun forwards them): finish the step, checkpoint within
10 steps, exit 0. Multi-node and SLURM: scripts/slurm_pretrain.sbatch.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

import gpu_guard   # before torch: CUDA availability is asked through NVML (no cuInit before DALI forks)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml); defaults are the reference's")
    parser.add_argument("--out", help="output directory (overrides run.out)")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from the newest valid checkpoint in the output directory "
                             "(start fresh if there is none); or a checkpoint file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_intermixed_args(argv)   # key=value before, between or after the flags


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun sets them; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(requested: str) -> str:
    """data.device to 'cpu' | 'gpu' without initialising CUDA (gpu_guard: DALI must still
    be able to fork its workers); SystemExit for gpu without a GPU."""
    try:
        return gpu_guard.resolve_device(requested)
    except gpu_guard.DeviceError as err:
        raise SystemExit(f"data.device={requested}: {err}; use data.device=cpu") from None


def find_resume_state(resume: str | None, out_dir: Path, expected_format: str | None = None, hint: str = ""):
    """(path, state) to resume from, or (None, None). CheckpointError, with a one-line
    message, for a file that does not load or is not a checkpoint of `expected_format`
    (shared by train.py and finetune.py)."""
    from cstp.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint

    if not resume:
        return None, None
    if resume == "auto":
        found = latest_checkpoint(out_dir)
        path, state = found if found else (None, None)
    else:
        path, state = Path(resume), load_checkpoint(resume)
    if state is not None and expected_format is not None and state.get("format") != expected_format:
        raise CheckpointError(f"{path} is not a {expected_format} checkpoint (format {state.get('format')!r})"
                              + (f"; {hint}" if hint else ""))
    if state is not None:
        position = state.get("position")
        if not (isinstance(position, dict) and set(position) == {"epoch", "sample", "step"}
                and all(type(v) is int and v >= 0 for v in position.values())):
            raise CheckpointError(f"{path} has no valid 'position' entry (epoch, sample and step, integers >= 0): "
                                  f"{str(position)[:100]}")
    return path, state


def no_resume_message(resume: str | None, out_dir: Path) -> str:
    """Why a run without a checkpoint to resume from must not start in `out_dir`, which holds some."""
    if resume == "auto":
        return (f"--resume auto: no checkpoint in {out_dir} loads (the warnings above say why); move them "
                "aside to start afresh there, or choose another --out")
    return f"{out_dir} already holds checkpoints; pass --resume auto to continue that run or choose another --out"


# How long a rank that cannot resume waits for the others to join the process group (they
# build their loaders first) before it leaves with its own message: they may have stopped too.
REFUSING_RANK_WAIT_S = 300


def join_ranks(device: str, local_rank: int, world_size: int, problem: str | None = None,
               position: dict | None = None, timeout_s: float | None = None) -> str | None:
    """The process group (several ranks) and this rank's GPU, then checkpoint.agree_across_ranks:
    None when every rank can go on from the same resume position, else the message that stops
    them all (shared by train.py and finetune.py). A rank that cannot start (its checkpoint,
    data or backbone) joins only to pass on its `problem`: left out, the others would wait for
    it until the timeout."""
    import torch
    import torch.distributed as dist

    from cstp.checkpoint import agree_across_ranks

    if world_size > 1:
        timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
        dist.init_process_group("nccl" if device == "gpu" else "gloo", **timeout)
    if device == "gpu":
        torch.cuda.set_device(torch.device(f"cuda:{local_rank}"))
    return agree_across_ranks(problem, position)


def refuse_on_every_rank(problem: str, fail, device: str, rank: int, local_rank: int, world_size: int) -> int:
    """For a rank that cannot start (its checkpoint, data or backbone), before the process group
    is up: join_ranks to stop the others, `fail(message)` on rank 0 (or on this rank, with its
    own message, when the others do not join within REFUSING_RANK_WAIT_S); the exit code, 2."""
    import torch.distributed as dist

    if world_size == 1:
        return fail(problem)
    try:
        agreed = join_ranks(device, local_rank, world_size, problem, timeout_s=REFUSING_RANK_WAIT_S)
    except (RuntimeError, ValueError) as err:   # torch's DistError is a RuntimeError
        return fail(f"{problem} (the other ranks did not join within {REFUSING_RANK_WAIT_S} s: "
                    f"{type(err).__name__})")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return fail(agreed) if rank == 0 else 2


def unwritable(path: Path, folder: bool) -> str | None:
    """Why `path` cannot be written as a folder (`folder`) or as a file, or None: checked
    before the work whose results go there."""
    if path.exists() and path.is_dir() != folder:
        return f"{path} is {'a file' if folder else 'a folder'}"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"{parent} is a file, not a folder"
    return None


def fail(message: str) -> int:
    print(f"train.py: {message}", file=sys.stderr)
    return 2


def print_summary(summary: dict, baseline: dict):
    rows = [("loss_total", "total loss"), ("loss_byol", "BYOL loss"), ("loss_spatial", "spatial CE"),
            ("loss_temporal", "temporal CE"), ("loss_speed", "speed CE (per view)"),
            ("loss_rotation", "rotation CE (per view)"), ("spatial_accuracy", "spatial accuracy"),
            ("temporal_accuracy", "temporal accuracy"), ("speed_accuracy", "speed accuracy"),
            ("rotation_accuracy", "rotation accuracy")]
    start, end = summary["start"], summary["end"]
    print(f"\n{'':24s} {'start':>8s} {'end':>8s} {'majority':>9s}")
    for key, label in rows:
        c = f"{baseline[key]:9.2f}" if key in baseline else " " * 9
        print(f"{label:24s} {start.get(key, float('nan')):8.3f} {end.get(key, float('nan')):8.3f} {c}")
    print(f"({summary['steps_this_run']} steps in {summary['seconds']:.0f} s, {summary['steps']} in all; "
          f"start/end: means over the first/last {summary['window']} steps; majority: accuracy of always "
          "guessing the most frequent label)")


def main(argv=None) -> int:
    args = parse_args(argv)
    from cstp.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 2
    if args.out:
        cfg["run"]["out"] = args.out
    rank, world_size, local_rank = distributed_env()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    out_dir = Path(cfg["run"]["out"])
    if why := unwritable(out_dir, folder=True):
        return fail(f"run.out: {why}")
    if not cfg["data"]["path"]:
        print("train.py: set data.path to an LMDB (python -m preprocessing build-lmdb ...)", file=sys.stderr)
        return 2

    import torch
    import torch.distributed as dist

    from cstp.checkpoint import CheckpointError, list_checkpoints
    from cstp.engine import CHECKPOINT_FORMAT, NonFiniteLossError, Position, Trainer
    from cstp.out_of_memory import is_out_of_memory, out_of_memory_message
    from pipelines.faults import BrokenDataError
    from pipelines.lmdb_store import LmdbFormatError
    from pipelines.loader import LoaderSettings, PretrainLoader
    from pipelines.plan import majority_label_rates, plan_config_from

    if cfg["train"]["threads"]:
        torch.set_num_threads(cfg["train"]["threads"])
    device = resolve_device(cfg["data"]["device"])
    problem = None
    try:
        resume_path, resume_state = find_resume_state(
            args.resume, out_dir, CHECKPOINT_FORMAT,
            "--resume continues a pretraining run of train.py (finetuning runs resume with finetune.py)")
    except CheckpointError as err:
        problem = f"--resume: {err}"
    else:
        if resume_state is None and list_checkpoints(out_dir):
            problem = no_resume_message(args.resume, out_dir)
    if problem is not None:
        return refuse_on_every_rank(problem, fail, device, rank, local_rank, world_size)
    position = Position(**resume_state["position"]) if resume_state else Position()
    if resume_state:
        logging.info("resuming from %s at epoch %d, sample %d, step %d", resume_path, position.epoch,
                     position.sample, position.step)

    p, d = cfg["plan"], cfg["data"]
    try:
        plan_cfg = plan_config_from(p)
    except (ValueError, TypeError) as err:
        return fail(f"plan: {err}")
    settings = LoaderSettings(batch_size=d["batch_size"], num_threads=d["num_threads"], workers=d["workers"],
                              prefetch=d["prefetch"], shuffle=d["shuffle"], seed=cfg["run"]["seed"],
                              decode=d["decode"], graph=d["graph"])
    # The pipeline (and its forked workers) comes before the process group: forked
    # workers must not inherit the group's sockets (docs/architecture.md#forked-workers).
    try:
        loader = PretrainLoader(d["path"], plan_cfg, settings, device=device, local_rank=local_rank, rank=rank,
                                world_size=world_size, start_epoch=position.epoch, start_sample=position.sample,
                                list_path=d["list"] or None, blocklist=d["blocklist"] or None)
    except (FileNotFoundError, LmdbFormatError, ValueError) as err:
        # nodes may read node-local copies of the data: one that cannot stops them all
        return refuse_on_every_rank(f"cannot read the data: {err}", fail, device, rank, local_rank, world_size)
    problem = join_ranks(device, local_rank, world_size, position=resume_state and resume_state["position"])
    train_device = torch.device(f"cuda:{local_rank}" if device == "gpu" else "cpu")
    if device == "gpu":
        torch.backends.cudnn.benchmark = cfg["train"]["cudnn_benchmark"]
    try:
        if problem is not None:
            return fail(problem) if rank == 0 else 2
        try:
            trainer = Trainer(cfg, loader, out_dir, train_device, resume_state=resume_state)
        except CheckpointError as err:   # before config.yaml is written: the run's own stays as it was
            # the same on every rank; with several, it names the failing rank, whose path may differ
            return 2 if rank else fail(f"--resume: {resume_path}: {err}" if world_size == 1 else f"--resume: {err}")
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            logging.info("%d videos, %d ranks x batch %d, %d steps per epoch, data on %s", len(loader.metas),
                         world_size, d["batch_size"], loader.steps_per_epoch, device)
        # Preemption (SLURM, torchrun forwarding Ctrl-C/SIGTERM): finish the step,
        # checkpoint, exit 0; `--resume auto` continues from there.
        previous = {sig: signal.signal(sig, trainer.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            summary = trainer.run()
        except NonFiniteLossError as err:
            print(f"train.py: aborted: {err}", file=sys.stderr)
            return 1
        except BrokenDataError as err:
            print(f"train.py: stopped: {err}", file=sys.stderr)
            return 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except (RuntimeError, MemoryError) as err:   # building the model on the device, or a step
        if not is_out_of_memory(err):
            raise
        return fail(out_of_memory_message(err, d["batch_size"], "plan", p, rank if world_size > 1 else None))
    finally:
        loader.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        # ~2000 plans over as many epochs as that takes: small datasets need several. Videos
        # without frames (unreadable entries of a reference LMDB read without a list) have no plan.
        usable = [v for v, m in enumerate(loader.metas) if m.frames > 0 and m.height > 0 and m.width > 0]
        plans = [loader.source.plan(epoch, v) for epoch in range(-(-2000 // max(len(usable), 1)))
                 for v in usable][:2000]
        baseline = {f"{task}_accuracy": rate for task, rate in majority_label_rates(plans).items()} if plans else {}
        final = {**summary["end"], "start": summary["start"], "steps": summary["steps"],
                 "seconds": summary["seconds"], "skipped_steps": summary["skipped_steps"],
                 "substituted_samples": summary["substituted_samples"],
                 "weight_digests": summary["weight_digests"],
                 "majority_baseline": baseline}
        (out_dir / "summary.json").write_text(json.dumps(final, indent=2))
        print_summary(summary, baseline)
        if summary["stopped_early"]:
            print(f"stopped by a signal at step {summary['steps']}; continue with --resume auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())

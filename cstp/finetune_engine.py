"""The finetuning loop (docs/method.md#finetuning, with the reference's bugs fixed): SGD on a
VideoClassifier, ReduceLROnPlateau on the validation loss, the best checkpoint
chosen on a validation split carved from the training list.

Like the pretraining engine it is pure PyTorch and takes any iterables of batch
dicts (`clip` (B,3,T,S,S), `label`, `video_index`, `valid`, optionally
`substituted`): one CPU process, one GPU, or torchrun/DDP.

Under DDP, validation sums the loss and the per-video logits over all ranks
before anything decides on them, so every rank steps the plateau scheduler with
the same number and keeps the same learning rate (the reference stepped it on
rank 0 only: docs/deviations.md#finetuning-validation-split).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import (atomic_save, check_optimizer_state, load_model_state, restore_on_every_rank,
                         restoring_training_state, save_from_rank0)
from .classifier import VideoClassifier
from .metrics import VideoAverager
from .run_logs import open_metrics, open_tensorboard

log = logging.getLogger(__name__)

FINETUNE_FORMAT = "cstp-dali-finetune"


@dataclass
class Position:
    """Where training stands: `sample` samples of `epoch` consumed on each rank."""
    epoch: int = 0
    sample: int = 0
    step: int = 0


def validation_split(labels, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train ids, validation ids): a deterministic split, stratified by class.

    Each class gives round(fraction · n) of its videos (at least one when it has two
    or more, never all of them) to validation, chosen by a seeded permutation; so the
    split depends only on the labels, the fraction and the seed. Both lists sorted.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 7919])   # a stream of its own, apart from the clip plans
    val = []
    for cls in np.unique(labels):
        ids = np.flatnonzero(labels == cls)
        if len(ids) < 2:
            continue
        take = min(len(ids) - 1, max(1, int(round(fraction * len(ids)))))
        val.extend(rng.permutation(ids)[:take].tolist())
    val_set = set(val)
    return [i for i in range(len(labels)) if i not in val_set], sorted(val)


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class NonFiniteLossError(RuntimeError):
    pass


class FinetuneTrainer:
    def __init__(self, cfg: dict, model: VideoClassifier, train_loader, val_loader, out_dir: str | Path,
                 device: torch.device, resume_state: dict | None = None, meta: dict | None = None):
        self.cfg = cfg
        self.model = model.to(device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.out_dir = Path(out_dir)
        self.device = device
        self.meta = dict(meta or {})   # width, classes, init, split: stored in every checkpoint
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.batch_size = cfg["data"]["batch_size"]
        o = cfg["optim"]
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(trainable, lr=o["lr"], momentum=o["momentum"],
                                         weight_decay=o["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=o["plateau_factor"], patience=o["plateau_patience"],
            threshold=o["plateau_threshold"])
        self.position = Position()
        self.best = {"val_top1": -1.0, "val_loss": math.inf, "epoch": -1, "step": 0}
        self.validated_epoch = -1
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self.substituted = torch.zeros((), dtype=torch.long)
        if resume_state is not None:   # on every rank before DDP's broadcast: one may fail alone
            restore_on_every_rank(self._restore, resume_state)
        self.ddp_model = self.model
        if self.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        precision = cfg["train"]["precision"]
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        self.stop_requested = False
        self.stopped_early = False
        self.tensorboard = None

    # ------------------------------------------------------------------ state

    def _restore(self, state: dict):
        if state.get("format") != FINETUNE_FORMAT:
            raise ValueError(f"not a finetuning checkpoint (format {state.get('format')!r}, "
                             f"expected {FINETUNE_FORMAT!r})")
        load_model_state(self.model, state.get("model"),
                         "set model.* as in the run that wrote it, on data with the same classes")
        check_optimizer_state(state.get("optimizer"))
        with restoring_training_state():
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.position = Position(**state["position"])
            self.best = dict(state["best"])
            self.validated_epoch = int(state.get("validated_epoch", -1))
            self.skipped_steps = int(state.get("skipped_steps", 0))

    def state_dict(self, with_optimizer: bool = True) -> dict:
        state = {"format": FINETUNE_FORMAT, "version": 1, **self.meta,
                 "num_classes": self.model.num_classes, "mode": self.cfg["model"]["mode"],
                 "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "position": vars(self.position).copy(), "best": dict(self.best),
                 "validated_epoch": self.validated_epoch, "skipped_steps": self.skipped_steps,
                 "world_size": self.world_size, "config": self.cfg}
        if with_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
            state["scheduler"] = self.scheduler.state_dict()
        return state

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def total_steps(self) -> int:
        steps = self.cfg["run"]["epochs"] * self.train_loader.steps_per_epoch
        max_steps = self.cfg["run"]["max_steps"]
        return min(steps, max_steps) if max_steps > 0 else steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ steps

    def train_step(self, batch: dict) -> tuple[torch.Tensor, bool]:
        """One SGD step; returns ([loss, correct, count] summed over this rank's valid
        clips, stepped?)."""
        self.ddp_model.train()
        clips = batch["clip"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True).long()
        valid = (batch["valid"].to(self.device).bool() if "valid" in batch
                 else torch.ones_like(labels, dtype=torch.bool))
        with self._autocast():
            logits = self.ddp_model(clips)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        weights = valid.float()
        loss = (losses * weights).sum() / weights.sum().clamp(min=1)
        stats = torch.stack([(losses * weights).sum(), ((logits.argmax(1) == labels).float() * weights).sum(),
                             weights.sum()]).detach()
        self.optimizer.zero_grad(set_to_none=True)
        if not self._agree(torch.isfinite(loss.detach())):
            return stats, False
        loss.backward()
        self.optimizer.step()
        return stats, True

    def _agree(self, flag: torch.Tensor) -> bool:
        """True on every rank only when true on all ranks (DDP needs every rank to step)."""
        value = flag.float().reshape(1).to(self.device)
        if self.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0)

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and video top-1 on the validation loader, summed over every rank."""
        self.model.eval()
        # video_index counts videos of the whole database (the loader may read a subset)
        num_videos = self.meta.get("num_videos") or len(self.val_loader.metas)
        averager = VideoAverager(num_videos, self.model.num_classes, device=self.device)
        video_labels = torch.full((num_videos,), -1, dtype=torch.long, device=self.device)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)   # loss sum, clip count
        for batch in self.val_loader:
            clips = batch["clip"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device).long()
            valid = batch["valid"].to(self.device).bool()
            with self._autocast():
                logits = self.model(clips).float()
            losses = F.cross_entropy(logits, labels, reduction="none")
            totals[0] += losses[valid].double().sum()
            totals[1] += valid.sum()
            averager.add(batch["video_index"], logits, valid)
            video_labels[batch["video_index"].to(self.device).long()[valid]] = labels[valid]
        if self.world_size > 1:
            dist.all_reduce(totals)
            dist.all_reduce(video_labels, op=dist.ReduceOp.MAX)
        averager.all_reduce()
        seen = averager.seen
        predictions = averager.means().argmax(1)
        correct = (predictions[seen] == video_labels[seen]).float()
        self.model.train()
        return {"val_loss": (totals[0] / totals[1].clamp(min=1)).item(),
                "val_top1": correct.mean().item() if len(correct) else float("nan"),
                "val_videos": int(seen.sum())}

    # ------------------------------------------------------------------ loop

    def request_stop(self, *_):
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopped_early = bool(flag.item() > 0)
        return self.stopped_early

    def run(self) -> dict:
        run_cfg = self.cfg["run"]
        total_steps = self.total_steps
        progress = None
        if is_rank0() and run_cfg["progress"]:
            from tqdm import tqdm
            progress = tqdm(total=total_steps, initial=min(self.position.step, total_steps), unit="step",
                            dynamic_ncols=True, desc="finetune")
        metrics_file = self._open_metrics() if is_rank0() else None
        self.tensorboard = self._open_tensorboard() if is_rank0() and run_cfg["tensorboard"] else None
        window = torch.zeros(3, dtype=torch.float64)
        window_wait = window_seconds = 0.0
        window_steps = 0
        start = time.perf_counter()
        try:
            done = self.position.step >= total_steps
            for epoch in range(self.position.epoch, run_cfg["epochs"]):
                if done:
                    break
                step_in_epoch = self.position.sample // self.batch_size
                wait_start = time.perf_counter()
                for batch in self.train_loader:
                    data_wait = time.perf_counter() - wait_start
                    if "substituted" in batch:
                        self.substituted = self.substituted + (batch["substituted"].cpu() > 0).sum()
                    stats, stepped = self.train_step(batch)
                    if stepped:
                        self.bad_steps_in_a_row = 0
                        window += stats.cpu().double()
                        window_steps += 1
                        window_wait += data_wait
                        window_seconds += time.perf_counter() - wait_start
                    else:
                        self._on_skipped_step()
                    step_in_epoch += 1
                    self.position = Position(epoch, step_in_epoch * self.batch_size, self.position.step + 1)
                    if progress is not None:
                        progress.update(1)
                    if self.position.step % run_cfg["log_every"] == 0 and window_steps:
                        record = self._train_record(window, window_steps, window_wait, window_seconds)
                        window = torch.zeros(3, dtype=torch.float64)
                        window_wait = window_seconds = 0.0
                        window_steps = 0
                        self._write(metrics_file, record)
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_top1']:.2f}",
                                                 lr=f"{self.lr:.2g}")
                    if run_cfg["checkpoint_every"] and self.position.step % run_cfg["checkpoint_every"] == 0:
                        self.save()
                    if self.position.step >= total_steps or self._stop_agreed():
                        done = True
                        break
                    wait_start = time.perf_counter()
                epoch_finished = not done or step_in_epoch == self.train_loader.steps_per_epoch
                if epoch_finished:
                    self.position = Position(epoch + 1, 0, self.position.step)
                    last = epoch + 1 == run_cfg["epochs"] or self.position.step >= total_steps
                    if (epoch + 1) % self.cfg["data"]["val_every"] == 0 or last:
                        self._validate_and_schedule(epoch, metrics_file, progress)
                self.save()
            if not (self.out_dir / "best.pt").exists() and not self.stopped_early:
                # a run too short to finish an epoch: keep its final weights as "best"
                self._validate_and_schedule(self.position.epoch, metrics_file, progress, step_scheduler=False)
        finally:
            if progress is not None:
                progress.close()
            if metrics_file is not None:
                metrics_file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()
        return {"steps": self.position.step, "epochs": self.position.epoch, "best": dict(self.best),
                "lr": self.lr, "seconds": time.perf_counter() - start, "skipped_steps": self.skipped_steps,
                "substituted_samples": self._total_substituted(), "stopped_early": self.stopped_early}

    def _validate_and_schedule(self, epoch: int, metrics_file, progress, step_scheduler: bool = True):
        val = self.validate()
        if step_scheduler:
            # The same all-reduced loss on every rank: every rank takes the same decision.
            self.scheduler.step(val["val_loss"])
        self.validated_epoch = epoch
        improved = (val["val_top1"], -val["val_loss"]) > (self.best["val_top1"], -self.best["val_loss"])
        if improved:
            self.best = {"val_top1": val["val_top1"], "val_loss": val["val_loss"], "epoch": epoch,
                         "step": self.position.step}
            if is_rank0():
                atomic_save(self.state_dict(with_optimizer=False), self.out_dir / "best.pt")
        record = {"step": self.position.step, "epoch": epoch, "lr": self.lr, **val,
                  "best_val_top1": self.best["val_top1"]}
        record["lr_ranks"] = self._gather_float(self.lr)
        record["plateau_bad_epochs_ranks"] = self._gather_float(float(self.scheduler.num_bad_epochs))
        record["plateau_best_ranks"] = self._gather_float(float(self.scheduler.best))
        self._write(metrics_file, record)
        if progress is not None:
            progress.write(f"epoch {epoch}: val loss {val['val_loss']:.4f}, val top-1 {val['val_top1']:.3f} "
                           f"({val['val_videos']} videos), lr {self.lr:.3g}" + ("  [best]" if improved else ""))

    def _gather_float(self, value: float) -> list[float]:
        """The value on every rank (what the DDP test compares)."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        if self.world_size == 1:
            return [value]
        parts = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t)
        return [p.item() for p in parts]

    def _on_skipped_step(self):
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        limit = self.cfg["run"]["max_bad_steps"]
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.position.step,
                    self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= limit:
            raise NonFiniteLossError(f"{self.bad_steps_in_a_row} non-finite losses in a row "
                                     f"(run.max_bad_steps={limit}); lower optim.lr or check the data")

    def _train_record(self, window: torch.Tensor, steps: int, wait: float, seconds: float) -> dict:
        sums = window.to(self.device)
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, count = sums.tolist()
        record = {"step": self.position.step, "epoch": self.position.epoch, "lr": self.lr,
                  "loss": loss_sum / max(count, 1), "train_top1": correct / max(count, 1),
                  "samples_per_s": steps * self.batch_size * self.world_size / max(seconds, 1e-9),
                  "data_wait_fraction": wait / max(seconds, 1e-9), "skipped_steps": self.skipped_steps,
                  "substituted_samples": self._total_substituted()}
        if self.device.type == "cuda":
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

    def _total_substituted(self) -> int:
        count = self.substituted.to(self.device).reshape(1).clone()
        if self.world_size > 1:
            dist.all_reduce(count)
        return int(count.item())

    def _write(self, metrics_file, record: dict):
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    group = "val" if key.startswith(("val_", "best_")) else "train"
                    self.tensorboard.add_scalar(f"{group}/{key.removeprefix('val_')}", value, record["step"])

    def _open_tensorboard(self):
        return open_tensorboard(self.out_dir, self.position.step)

    def _open_metrics(self):
        def keep(record):
            # a validation record at the resume step belongs to the checkpoint only if it validated
            return record["step"] < self.position.step or (
                record["step"] == self.position.step and
                ("val_loss" not in record or record["epoch"] <= self.validated_epoch))
        return open_metrics(self.out_dir, self.position.step, keep)

    def save(self):
        save_from_rank0(self.state_dict, self.out_dir, self.position.step, keep=self.cfg["run"]["keep_checkpoints"])

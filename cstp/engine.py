"""The CSTP pretraining loop, one for every scale: a single CPU process, one GPU, or
torchrun/DDP across nodes. It knows nothing about how batches are made: any
iterable of dicts with `view1`, `view2` and the label tensors will do.

Read it top to bottom in `Trainer.run`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import save_checkpoint
from .losses import CSTPLossWeights, cstp_loss
from .models.cstp_model import CSTPModel
from .schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cstp-dali-checkpoint"
LABEL_KEYS = ("spatial_label", "temporal_label", "speed_label", "rot1", "rot2")
LOSS_TERMS = ("total", "byol", "spatial", "temporal", "speed", "rotation")
ACCURACIES = ("spatial", "temporal", "speed", "rotation")
METRIC_NAMES = tuple(f"loss_{t}" for t in LOSS_TERMS) + tuple(f"{a}_accuracy" for a in ACCURACIES)
SUMMARY_WINDOW = 20  # steps averaged for the "start" and "end" of a run


@dataclass
class Position:
    """Where training stands: `sample` samples of `epoch` consumed on each rank."""
    epoch: int = 0
    sample: int = 0
    step: int = 0


class NonFiniteLossError(RuntimeError):
    pass


def build_model(cfg: dict) -> CSTPModel:
    m = cfg["model"]
    return CSTPModel(backbone_width=m["width"], proj_hidden=m["proj_hidden"], proj_dim=m["proj_dim"],
                     ema_tau=m["ema_tau"], target_init=m["target_init"])


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Trainer:
    def __init__(self, cfg: dict, loader, out_dir: str | Path, device: torch.device,
                 resume_state: dict | None = None):
        self.cfg = cfg
        self.loader = loader
        self.out_dir = Path(out_dir)
        self.device = device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        torch.manual_seed(cfg["run"]["seed"])
        self.model = build_model(cfg).to(device)
        if cfg["train"]["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        o = cfg["optim"]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o["min_lr"], momentum=o["momentum"],
                                         weight_decay=o["weight_decay"])
        self.position = Position()
        self.bad_steps_in_a_row = 0
        self.skipped_steps = 0
        # samples the loader had to take from another video (unreadable data); a
        # tensor, so that counting costs no device sync per step
        self.substituted_samples = torch.zeros((), dtype=torch.long)
        if resume_state is not None:
            self._restore(resume_state)
        self.ddp_model = self.model
        if self.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.loss_weights = CSTPLossWeights(**cfg["loss"])
        self.autocast_dtype = self._autocast_dtype()
        self.stop_requested = False   # set by a signal handler (preemption); acted on at a step boundary
        self.stopped_early = False
        self.first_metrics: list[torch.Tensor] = []
        self.recent_metrics: collections.deque = collections.deque(maxlen=SUMMARY_WINDOW)

    # ------------------------------------------------------------------ setup

    def _autocast_dtype(self):
        precision = self.cfg["train"]["precision"]
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else None

    def _restore(self, state: dict):
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a CSTP-DALI pretraining checkpoint (no 'format' entry)")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])
        self.skipped_steps = int(state.get("skipped_steps", 0))

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "position": vars(self.position).copy(),
            "skipped_steps": self.skipped_steps,
            "world_size": self.world_size,
            "config": self.cfg,
        }

    # ------------------------------------------------------------------ schedule

    @property
    def total_steps(self) -> int:
        steps = self.cfg["run"]["epochs"] * self.loader.steps_per_epoch
        max_steps = self.cfg["run"]["max_steps"]
        return min(steps, max_steps) if max_steps > 0 else steps

    def learning_rate(self, epoch: int, step_in_epoch: int) -> float:
        o, epochs = self.cfg["optim"], self.cfg["run"]["epochs"]
        progress = float(epoch)
        if o["schedule_unit"] == "step":
            progress += step_in_epoch / self.loader.steps_per_epoch
        return warmup_cosine_lr(progress, epochs, o["warmup_epochs"], o["lr"], o["min_lr"])

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: dict, lr: float) -> tuple[torch.Tensor, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The reference updates the target once per iteration before its forward pass.
        self.model.update_target()
        view1, view2 = batch["view1"], batch["view2"]
        if self.cfg["train"]["channels_last"]:
            view1 = view1.contiguous(memory_format=torch.channels_last_3d)
            view2 = view2.contiguous(memory_format=torch.channels_last_3d)
        labels = {k: batch[k].to(self.device, non_blocking=True) for k in LABEL_KEYS}
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            outputs = self.ddp_model(view1.to(self.device, non_blocking=True),
                                     view2.to(self.device, non_blocking=True))
            total, terms, accuracies = cstp_loss(outputs, labels, self.loss_weights)
        metrics = torch.stack([terms[t].float() for t in LOSS_TERMS] +
                              [accuracies[a].float() for a in ACCURACIES]).detach()
        if not self._all_finite(total):
            self.optimizer.zero_grad(set_to_none=True)
            return metrics, float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        clip = self.cfg["optim"]["clip_grad"]
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip) if clip > 0
                     else torch.zeros((), device=self.device))
        self.optimizer.step()
        return metrics, float(grad_norm)

    def _all_finite(self, total: torch.Tensor) -> bool:
        """Every rank must agree, or DDP's backward would hang on the ranks that go on."""
        flag = torch.isfinite(total.detach()).float().reshape(1)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def request_stop(self, *_):
        """Safe to call from a signal handler: only sets a flag."""
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        """Stop when any rank was asked to: every rank must leave at the same step."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.stopped_early = bool(flag.item() > 0)
        if self.stopped_early:
            log.warning("stop requested: saving a checkpoint at step %d and exiting", self.position.step)
        return self.stopped_early

    def _on_skipped_step(self):
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        limit = self.cfg["run"]["max_bad_steps"]
        log.warning("non-finite loss at step %d: step skipped (%d in a row)", self.position.step,
                    self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.bad_steps_in_a_row} non-finite losses in a row (run.max_bad_steps={limit}); "
                "lower optim.lr or check the data")

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        run_cfg = self.cfg["run"]
        total_steps = self.total_steps
        progress = None
        if is_rank0() and run_cfg["progress"]:
            from tqdm import tqdm
            progress = tqdm(total=total_steps, initial=min(self.position.step, total_steps),
                            unit="step", dynamic_ncols=True, desc="pretrain")
        metrics_file = self._open_metrics() if is_rank0() else None
        window = _Window()
        start = time.perf_counter()
        try:
            done = self.position.step >= total_steps
            for epoch in range(self.position.epoch, run_cfg["epochs"]):
                if done:
                    break
                step_in_epoch = self.position.sample // self.loader.batch_size
                wait_start = time.perf_counter()
                for batch in self.loader:
                    data_wait = time.perf_counter() - wait_start
                    if "substituted" in batch:
                        self.substituted_samples = self.substituted_samples.to(batch["substituted"].device) \
                            + (batch["substituted"] > 0).sum()
                    lr = self.learning_rate(epoch, step_in_epoch)
                    metrics, grad_norm = self.train_step(batch, lr)
                    if math.isnan(grad_norm):
                        self._on_skipped_step()
                    else:
                        self.bad_steps_in_a_row = 0
                        self._remember(metrics)
                        window.add(metrics, grad_norm, data_wait, time.perf_counter() - wait_start)
                    step_in_epoch += 1
                    self.position = Position(epoch, step_in_epoch * self.loader.batch_size,
                                             self.position.step + 1)
                    if progress is not None:
                        progress.update(1)
                    if self.position.step % run_cfg["log_every"] == 0 and window.steps:
                        record = self._log_record(window, lr)
                        window = _Window()
                        if metrics_file is not None:
                            metrics_file.write(json.dumps(record) + "\n")
                            metrics_file.flush()
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['loss_total']:.3f}",
                                                 rot=f"{record['rotation_accuracy']:.2f}")
                    if run_cfg["checkpoint_every"] and self.position.step % run_cfg["checkpoint_every"] == 0:
                        self.save()
                    if self.position.step >= total_steps or self._stop_agreed():
                        done = True
                        break
                    wait_start = time.perf_counter()
                if not done or step_in_epoch == self.loader.steps_per_epoch:
                    self.position = Position(epoch + 1, 0, self.position.step)
                self.save()
            if is_rank0():
                self.export_backbone(self.out_dir / "backbone.pt")
        finally:
            if progress is not None:
                progress.close()
            if metrics_file is not None:
                metrics_file.close()
        return self.summary(time.perf_counter() - start)

    # ------------------------------------------------------------------ logging

    def _open_metrics(self):
        """metrics.jsonl, without records past the step we resume from (a run that
        died after logging but before its next checkpoint would repeat them)."""
        path = self.out_dir / "metrics.jsonl"
        kept = []
        if self.position.step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.position.step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def _remember(self, metrics: torch.Tensor):
        if len(self.first_metrics) < SUMMARY_WINDOW:
            self.first_metrics.append(metrics)
        self.recent_metrics.append(metrics)

    def _log_record(self, window: "_Window", lr: float) -> dict:
        sums = window.reduced(self.world_size)
        steps = window.steps
        record = {"step": self.position.step, "epoch": self.position.epoch,
                  "loss": None, "lr": lr}
        for name, value in zip(METRIC_NAMES, (sums[:len(METRIC_NAMES)] / steps).tolist()):
            record[name] = value
        record["loss"] = record["loss_total"]
        record["grad_norm"] = window.grad_norm / steps
        record["samples_per_s"] = steps * self.loader.batch_size * self.world_size / max(window.seconds, 1e-9)
        record["data_wait_fraction"] = window.data_wait / max(window.seconds, 1e-9)
        record["skipped_steps"] = self.skipped_steps
        record["substituted_samples"] = self._total_substituted()
        if self.device.type == "cuda":
            record["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return record

    def _total_substituted(self) -> int:
        count = self.substituted_samples.to(self.device).reshape(1).clone()
        if self.world_size > 1:
            dist.all_reduce(count)
        return int(count.item())

    def summary(self, seconds: float) -> dict:
        def mean(rows):
            if not rows:
                return {}
            values = torch.stack(rows).mean(0)
            if self.world_size > 1:
                dist.all_reduce(values)
                values /= self.world_size
            return dict(zip(METRIC_NAMES, values.tolist()))

        return {"start": mean(self.first_metrics), "end": mean(list(self.recent_metrics)),
                "steps": self.position.step, "epochs": self.position.epoch, "seconds": seconds,
                "skipped_steps": self.skipped_steps, "substituted_samples": self._total_substituted(),
                "stopped_early": self.stopped_early,
                "window": SUMMARY_WINDOW}

    def export_backbone(self, path: Path):
        """The online backbone as a plain state dict (plus its width), loadable into
        `R2Plus1D10(width)` without this project's training classes; what finetuning uses."""
        state = {"format": "cstp-dali-backbone", "arch": "r2plus1d10", "width": self.cfg["model"]["width"],
                 "step": self.position.step,
                 "state_dict": {k: v.detach().cpu() for k, v in self.model.online_backbone_state_dict().items()}}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def save(self):
        if is_rank0():
            save_checkpoint(self.state_dict(), self.out_dir, self.position.step,
                            keep=self.cfg["run"]["keep_checkpoints"])
        if self.world_size > 1:
            dist.barrier()


class _Window:
    """Sums over the steps between two log records (tensors: no device sync per step)."""

    def __init__(self):
        self.steps = 0
        self.metrics = None
        self.grad_norm = 0.0
        self.data_wait = 0.0
        self.seconds = 0.0

    def add(self, metrics: torch.Tensor, grad_norm: float, data_wait: float, seconds: float):
        self.metrics = metrics.clone() if self.metrics is None else self.metrics + metrics
        self.steps += 1
        self.grad_norm += grad_norm
        self.data_wait += data_wait
        self.seconds += seconds

    def reduced(self, world_size: int) -> torch.Tensor:
        values = self.metrics.clone()
        if world_size > 1:
            dist.all_reduce(values)
            values /= world_size
        return values.cpu()

"""The CSTP pretraining loop, one for every scale: a single CPU process, one GPU, or
torchrun/DDP across nodes. It knows nothing about how batches are made: any
iterable of dicts with `view1`, `view2` and the label tensors will do.

Read it top to bottom in `Trainer.run`.

The loop never waits for the GPU inside a step: losses, accuracies, the gradient
norm and the "was this step skipped" flag stay on the device and are summed there;
the host reads them (one all-reduce, one copy) only every `run.log_every` steps,
which is also when the ranks agree on a stop request and on aborting after
too many non-finite losses.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import (atomic_save, check_optimizer_state, load_model_state, restore_on_every_rank,
                         restoring_training_state, save_from_rank0)
from .losses import CSTPLossWeights, cstp_loss
from .models.cstp_model import CSTPModel
from .run_logs import open_metrics, open_tensorboard
from .schedule import warmup_cosine_lr

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cstp-dali-checkpoint"
LABEL_KEYS = ("spatial_label", "temporal_label", "speed_label", "rot1", "rot2")
LOSS_TERMS = ("total", "byol", "spatial", "temporal", "speed", "rotation")
ACCURACIES = ("spatial", "temporal", "speed", "rotation")
METRIC_NAMES = tuple(f"loss_{t}" for t in LOSS_TERMS) + tuple(f"{a}_accuracy" for a in ACCURACIES)
SUMMARY_WINDOW = 20  # steps averaged for the "start" and "end" of a run
TEST_HOOK_EXIT_CODE = 17  # run.fail_at_step: how a rank "crashes"
STOP_CHECK_EVERY = 10     # steps between stop-request checks when no log record falls due


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


def peak_learning_rate(optim_cfg: dict, global_batch: int) -> float:
    """`optim.lr` is the peak LR at `optim.reference_batch`; with `lr_scaling: linear`
    it scales with the global batch (Goyal et al.): lr × global_batch / reference_batch."""
    if optim_cfg["lr_scaling"] == "linear":
        return optim_cfg["lr"] * global_batch / optim_cfg["reference_batch"]
    return optim_cfg["lr"]


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter (not the BN running statistics: with per-GPU BN each
    rank keeps its own). Equal digests on every rank = the replicas hold the same weights."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def convert_sync_batchnorm(model: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """`train.sync_bn`: BN statistics over the global batch instead of each GPU's own
    (the reference uses per-GPU BN). torch's SyncBatchNorm runs on CUDA only."""
    if world_size <= 1:
        return model
    if device.type != "cuda":
        log.warning("train.sync_bn ignored: SyncBatchNorm needs CUDA; BN stays per process")
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


class Trainer:
    def __init__(self, cfg: dict, loader, out_dir: str | Path, device: torch.device,
                 resume_state: dict | None = None):
        self.cfg = cfg
        self.loader = loader
        self.out_dir = Path(out_dir)
        self.device = device
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        torch.manual_seed(cfg["run"]["seed"])
        t = cfg["train"]
        self.model = build_model(cfg).to(device)
        if t["sync_bn"]:
            self.model = convert_sync_batchnorm(self.model, device, self.world_size)
        if t["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        o = cfg["optim"]
        self.peak_lr = peak_learning_rate(o, loader.batch_size * self.world_size)
        # fused: its kernels read `found_inf` on the device, so a step with a
        # non-finite gradient is skipped without the host having to look at it.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o["min_lr"], momentum=o["momentum"],
                                         weight_decay=o["weight_decay"], fused=True)
        self.position = Position()
        # Device-side counters (read at log records only).
        self.skipped_steps = torch.zeros((), device=device)      # non-finite losses, all time
        self.bad_in_a_row = torch.zeros((), device=device)       # current run of them
        self.worst_in_a_row = torch.zeros((), device=device)     # longest run since the last check
        # samples the loader had to take from another video (unreadable data)
        self.substituted_samples = torch.zeros((), dtype=torch.long, device=device)
        if resume_state is not None:   # on every rank before DDP's broadcast: one may fail alone
            restore_on_every_rank(self._restore, resume_state)
        self._prepare_optimizer_state()
        self.ddp_model = self.model
        if self.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if t["compile"]:
            self.ddp_model = torch.compile(self.ddp_model)
        self.loss_weights = CSTPLossWeights(**cfg["loss"])
        self.autocast_dtype = self._autocast_dtype()
        self.stop_requested = False   # set by a signal handler (preemption); acted on at a log record
        self.stopped_early = False
        self.first_metrics: list[torch.Tensor] = []
        self.recent_metrics: collections.deque = collections.deque(maxlen=SUMMARY_WINDOW)
        self.weight_digests: list[str] = []
        if is_rank0():
            rule = (f" = {o['lr']:g} x {loader.batch_size * self.world_size} / {o['reference_batch']} "
                    "(optim.lr_scaling=linear)" if o["lr_scaling"] == "linear" else " (optim.lr_scaling=none)")
            log.info("peak lr %.6g%s; global batch %d = %d ranks x %d", self.peak_lr, rule,
                     loader.batch_size * self.world_size, self.world_size, loader.batch_size)

    # ------------------------------------------------------------------ setup

    def _autocast_dtype(self):
        precision = self.cfg["train"]["precision"]
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else None

    def _prepare_optimizer_state(self):
        """Zero momentum buffers up front: SGD's first step then gives exactly what it
        gives without them (buf = grad), and a skipped first step cannot leave the
        fused kernel an uninitialised buffer. Also re-enables `fused` after loading a
        checkpoint written by a non-fused optimizer.

        Loaded buffers keep the checkpoint's strides; after a resume with
        train.channels_last toggled they no longer match their parameters', and CUDA's
        fused SGD refuses parameters, gradients and buffers of different strides. So
        every buffer is re-laid like its parameter (same values)."""
        for group in self.optimizer.param_groups:
            group["fused"], group["foreach"] = True, None
            if group["momentum"] == 0:
                continue
            for p in group["params"]:
                state = self.optimizer.state[p]
                buffer = state.get("momentum_buffer")
                if buffer is None:
                    if p.requires_grad:
                        state["momentum_buffer"] = torch.zeros_like(p)
                elif buffer.stride() != p.stride():
                    state["momentum_buffer"] = torch.empty_like(p).copy_(buffer)
                if p.grad is not None and p.grad.stride() != p.stride():
                    p.grad = torch.empty_like(p).copy_(p.grad)

    def _restore(self, state: dict):
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not a CSTP-DALI pretraining checkpoint (no 'format' entry)")
        load_model_state(self.model, state.get("model"), "set model.* as in the run that wrote it")
        check_optimizer_state(state.get("optimizer"))
        with restoring_training_state():
            self.optimizer.load_state_dict(state["optimizer"])
            self.position = Position(**state["position"])
            self.skipped_steps.fill_(float(state.get("skipped_steps", 0)))
            rng = state.get("rng", {})
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "model": self.model.state_dict(),           # online and target networks, BN buffers
            "optimizer": self.optimizer.state_dict(),   # momentum buffers, last lr
            "position": vars(self.position).copy(),     # the data position and the schedule's
            "skipped_steps": int(self.skipped_steps.item()),
            "rng": rng,
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
        return warmup_cosine_lr(progress, epochs, o["warmup_epochs"], self.peak_lr, o["min_lr"])

    # ------------------------------------------------------------------ one step

    def train_step(self, batch: dict, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Returns (metrics, grad_norm), both on the device;
        grad_norm is NaN when the step was skipped (non-finite loss or gradient)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The reference updates the target once per iteration before its forward pass.
        self.model.update_target()
        view1 = batch["view1"].to(self.device, non_blocking=True)
        view2 = batch["view2"].to(self.device, non_blocking=True)
        if self.cfg["train"]["channels_last"]:
            view1 = view1.contiguous(memory_format=torch.channels_last_3d)
            view2 = view2.contiguous(memory_format=torch.channels_last_3d)
        labels = {k: batch[k].to(self.device, non_blocking=True) for k in LABEL_KEYS}
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())
        with autocast:
            outputs = self.ddp_model(view1, view2)
            total, terms, accuracies = cstp_loss(outputs, labels, self.loss_weights)
        total = self._test_hook_nan(total)
        metrics = torch.stack([terms[t].float() for t in LOSS_TERMS] +
                              [accuracies[a].float() for a in ACCURACIES]).detach()
        self.optimizer.zero_grad(set_to_none=True)
        # A non-finite loss gives non-finite gradients; DDP's all-reduce spreads them to
        # every rank, so every rank sees the same norm and skips the same steps.
        total.backward()
        clip = self.cfg["optim"]["clip_grad"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        finite = torch.isfinite(grad_norm)
        self.optimizer.found_inf = (~finite).float()   # read by the fused kernel: skip the update
        self.optimizer.step()
        return metrics, torch.where(finite, grad_norm.detach(), torch.full_like(grad_norm, float("nan")))

    def _test_hook_nan(self, total: torch.Tensor) -> torch.Tensor:
        """Test hook `run.nan_at_steps`: the highest rank's loss is NaN at these steps."""
        if (self.position.step + 1) in self.cfg["run"]["nan_at_steps"] and self.rank == self.world_size - 1:
            return total * float("nan")
        return total

    def _test_hook_fail(self):
        """Test hook `run.fail_at_step`: the highest rank dies (exit code 17, no cleanup)
        before that step, on the first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT = 0)."""
        step = self.cfg["run"]["fail_at_step"]
        if (step and self.position.step + 1 == step and self.rank == self.world_size - 1
                and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"):
            log.error("test hook run.fail_at_step: rank %d exits before step %d", self.rank, step)
            logging.shutdown()
            os._exit(TEST_HOOK_EXIT_CODE)

    def request_stop(self, *_):
        """Safe to call from a signal handler: only sets a flag."""
        self.stop_requested = True

    def _stop_agreed(self) -> bool:
        """Between log records: has any rank been asked to stop? (one tiny all-reduce and
        one host read every STOP_CHECK_EVERY steps, so that a preempted run checkpoints
        well within torchrun's 30 s and SLURM's grace time even with a large log_every)."""
        flag = torch.tensor([float(self.stop_requested)], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag)
        return flag.item() > 0

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
        tensorboard = self._open_tensorboard() if is_rank0() and run_cfg["tensorboard"] else None
        watchdog = _DataWatchdog(run_cfg["data_timeout_s"], self.rank)
        window = _Window(self.device)
        start = time.perf_counter()
        steps_at_start = self.position.step
        try:
            done = self.position.step >= total_steps
            for epoch in range(self.position.epoch, run_cfg["epochs"]):
                if done:
                    break
                step_in_epoch = self.position.sample // self.loader.batch_size
                wait_start = time.perf_counter()
                watchdog.waiting(epoch, self.position.sample, self.loader.batch_size, self.position.step + 1)
                for batch in self.loader:
                    watchdog.got()
                    window.data_wait += time.perf_counter() - wait_start
                    self._test_hook_fail()
                    if "substituted" in batch:
                        self.substituted_samples += (batch["substituted"] > 0).sum().to(self.device)
                    lr = self.learning_rate(epoch, step_in_epoch)
                    metrics, grad_norm = self.train_step(batch, lr)
                    self._count(metrics, grad_norm, window)
                    step_in_epoch += 1
                    self.position = Position(epoch, step_in_epoch * self.loader.batch_size,
                                             self.position.step + 1)
                    if progress is not None:
                        progress.update(1)
                    last = self.position.step >= total_steps
                    if (self.position.step % run_cfg["log_every"] == 0 or last
                            or (self.position.step % STOP_CHECK_EVERY == 0 and self._stop_agreed())):
                        record = self._log_record(window, lr)   # the one host sync in N steps
                        window = _Window(self.device)
                        self._write_record(record, metrics_file, tensorboard, progress)
                        self.stopped_early = record.pop("_stop") and not last
                        if self.stopped_early:
                            log.warning("stop requested: saving a checkpoint at step %d and exiting",
                                        self.position.step)
                    end_of_epoch = step_in_epoch == self.loader.steps_per_epoch
                    if (run_cfg["checkpoint_every"] and self.position.step % run_cfg["checkpoint_every"] == 0
                            and not (end_of_epoch or last or self.stopped_early)):   # saved below anyway
                        self.save()
                    if last or self.stopped_early:
                        done = True
                        break
                    wait_start = time.perf_counter()
                    watchdog.waiting(epoch, self.position.sample, self.loader.batch_size, self.position.step + 1)
                watchdog.got()
                if not done or step_in_epoch == self.loader.steps_per_epoch:
                    self.position = Position(epoch + 1, 0, self.position.step)
                self.save()
            self.weight_digests = self._gather_digests()
            if is_rank0():
                self.export_backbone(self.out_dir / "backbone.pt")
        finally:
            watchdog.close()
            if progress is not None:
                progress.close()
            if metrics_file is not None:
                metrics_file.close()
            if tensorboard is not None:
                tensorboard.close()
        return self.summary(time.perf_counter() - start, self.position.step - steps_at_start)

    def _count(self, metrics: torch.Tensor, grad_norm: torch.Tensor, window: "_Window"):
        """Book-keeping of one step, all on the device."""
        ok = torch.isfinite(grad_norm)
        bad = (~ok).float()
        kept = torch.where(ok, metrics, torch.full_like(metrics, float("nan")))
        if len(self.first_metrics) < SUMMARY_WINDOW:
            self.first_metrics.append(kept)
        self.recent_metrics.append(kept)
        window.add(torch.where(ok, metrics, torch.zeros_like(metrics)),
                   torch.where(ok, grad_norm, torch.zeros_like(grad_norm)), ok.float())
        self.skipped_steps += bad
        self.bad_in_a_row = (self.bad_in_a_row + 1) * bad
        torch.maximum(self.worst_in_a_row, self.bad_in_a_row, out=self.worst_in_a_row)

    # ------------------------------------------------------------------ logging

    def _open_metrics(self):
        return open_metrics(self.out_dir, self.position.step)

    def _open_tensorboard(self):
        return open_tensorboard(self.out_dir, self.position.step)

    def _write_record(self, record: dict, metrics_file, tensorboard, progress):
        public = {k: v for k, v in record.items() if not k.startswith("_")}
        if metrics_file is not None:
            metrics_file.write(json.dumps(public) + "\n")
            metrics_file.flush()
        if tensorboard is not None:
            for key, value in public.items():
                if key in ("step", "loss") or not isinstance(value, (int, float)) or value is None:
                    continue
                group = "loss" if key.startswith("loss_") else "accuracy" if key.endswith("_accuracy") else "train"
                tensorboard.add_scalar(f"{group}/{key.removeprefix('loss_').removesuffix('_accuracy')}",
                                       value, record["step"])
        if progress is not None and record["loss_total"] is not None:
            progress.set_postfix(loss=f"{record['loss_total']:.3f}", rot=f"{record['rotation_accuracy']:.2f}")
        if record["_skipped_in_window"]:
            log.warning("%d of the last %d steps skipped: non-finite loss (%d in all, up to step %d)",
                        record["_skipped_in_window"], record["_window_steps"], record["skipped_steps"],
                        record["step"])
        limit = self.cfg["run"]["max_bad_steps"]
        if record["_worst_in_a_row"] >= limit:
            raise NonFiniteLossError(
                f"{record['_worst_in_a_row']} non-finite losses in a row by step {record['step']} "
                f"(run.max_bad_steps={limit}); lower optim.lr or check the data, then continue from "
                "the last checkpoint with --resume auto")

    def _log_record(self, window: "_Window", lr: float) -> dict:
        """Everything the ranks must agree on, in one all-reduce and one device-to-host copy."""
        n = len(METRIC_NAMES)
        packed = torch.cat([window.metric_sums, torch.stack([
            window.ok_steps, window.grad_norm_sum, self.skipped_steps, self.worst_in_a_row,  # same on all ranks
            self.substituted_samples.float(),                                                 # summed over ranks
            torch.tensor(float(self.stop_requested), device=self.device)])])
        if self.world_size > 1:
            dist.all_reduce(packed)
        values = packed.tolist()
        same = [v / self.world_size for v in values[n:n + 4]]
        ok_steps, grad_norm_sum, skipped, worst = same
        substituted, stop = values[n + 4], values[n + 5]
        self.worst_in_a_row.zero_()
        seconds = max(time.perf_counter() - window.started, 1e-9)
        record = {"step": self.position.step, "epoch": self.position.epoch, "loss": None, "lr": lr}
        for name, total in zip(METRIC_NAMES, values[:n]):
            record[name] = total / (ok_steps * self.world_size) if ok_steps else None
        record["loss"] = record["loss_total"]
        record["grad_norm"] = grad_norm_sum / ok_steps if ok_steps else None
        record["samples_per_s"] = window.steps * self.loader.batch_size * self.world_size / seconds
        record["data_wait_fraction"] = min(window.data_wait / seconds, 1.0)
        record["skipped_steps"] = round(skipped)
        record["substituted_samples"] = round(substituted)
        if self.device.type == "cuda":
            record["gpu_mem_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        record.update(_stop=stop > 0, _skipped_in_window=window.steps - round(ok_steps),
                      _window_steps=window.steps, _worst_in_a_row=round(worst))
        return record

    def _gather_digests(self) -> list[str]:
        digest = parameter_digest(self.model)
        if self.world_size == 1:
            return [digest]
        digests: list = [None] * self.world_size
        dist.all_gather_object(digests, digest)
        if is_rank0() and len(set(digests)) > 1:
            log.error("the ranks hold different weights at the end (parameter digests %s)", digests)
        return digests

    def summary(self, seconds: float, steps_run: int = 0) -> dict:
        def mean(rows):
            if not rows:
                return {}
            values = torch.stack(rows).nanmean(0)
            if self.world_size > 1:
                dist.all_reduce(values)
                values /= self.world_size
            return dict(zip(METRIC_NAMES, values.tolist()))

        substituted = self.substituted_samples.float().reshape(1).clone()
        if self.world_size > 1:
            dist.all_reduce(substituted)
        return {"start": mean(self.first_metrics), "end": mean(list(self.recent_metrics)),
                "steps": self.position.step, "epochs": self.position.epoch, "seconds": seconds,
                "steps_this_run": steps_run, "skipped_steps": int(self.skipped_steps.item()),
                "substituted_samples": int(substituted.item()), "stopped_early": self.stopped_early,
                "weight_digests": self.weight_digests, "window": SUMMARY_WINDOW}

    def export_backbone(self, path: Path):
        """The online backbone as a plain state dict (plus its width), loadable into
        `R2Plus1D10(width)` without this project's training classes; what finetuning uses."""
        state = {"format": "cstp-dali-backbone", "arch": "r2plus1d10", "width": self.cfg["model"]["width"],
                 "step": self.position.step,
                 "state_dict": {k: v.detach().cpu().contiguous()
                                for k, v in self.model.online_backbone_state_dict().items()}}
        atomic_save(state, path)

    def save(self):
        save_from_rank0(self.state_dict, self.out_dir, self.position.step, keep=self.cfg["run"]["keep_checkpoints"])


class _Window:
    """Sums over the steps between two log records, on the device (no sync per step)."""

    def __init__(self, device: torch.device):
        self.steps = 0
        self.metric_sums = torch.zeros(len(METRIC_NAMES), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.ok_steps = torch.zeros((), device=device)
        self.data_wait = 0.0
        self.started = time.perf_counter()

    def add(self, metrics: torch.Tensor, grad_norm: torch.Tensor, ok: torch.Tensor):
        self.metric_sums += metrics
        self.grad_norm_sum += grad_norm
        self.ok_steps += ok
        self.steps += 1


class _DataWatchdog:
    """Warns when this rank has waited for its next batch longer than
    `run.data_timeout_s`, naming the batch (epoch, sample positions in the rank's
    shard): a stalled file system or a stuck decoder shows up in the log instead of
    as a silent hang of every rank in the next all-reduce."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s = timeout_s
        self.rank = rank
        self._lock = threading.Lock()
        self._since = None
        self._what = ""
        self._warned = 0
        self._closed = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="data-watchdog", daemon=True)
            self._thread.start()

    def waiting(self, epoch: int, sample: int, batch_size: int, step: int):
        with self._lock:
            self._since = time.monotonic()
            self._what = (f"epoch {epoch}, samples {sample}..{sample + batch_size - 1} of rank {self.rank}'s "
                          f"shard (step {step})")
            self._warned = 0

    def got(self):
        with self._lock:
            self._since = None

    def _watch(self):
        poll = min(max(self.timeout_s / 4, 0.01), 5.0)
        while not self._closed.wait(poll):
            with self._lock:
                if self._since is None:
                    continue
                waited = time.monotonic() - self._since
                if waited < self.timeout_s * (self._warned + 1):
                    continue
                self._warned += 1
                what = self._what
            log.warning("rank %d has waited %.1f s for data: %s (run.data_timeout_s=%g)", self.rank, waited,
                        what, self.timeout_s)

    def close(self):
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

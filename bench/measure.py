"""The three measured modes: loader (the input pipeline alone), model (training steps on
synthetic inputs on the device) and e2e (training steps fed by the loader)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from bench.data import prepare_data
from bench.settings import BenchmarkError, data_source, workers_for
from bench.system import (CpuSnapshot, gpu_memory, gpu_name, host_memory_mb, host_memory_split_mb,
                          peak_rss_mb)

FIXED_LR = 1e-3  # throughput does not depend on the learning rate; a small one never diverges


def make_loader(kind: str, db: str, cfg: dict, args):
    from pipelines.loader import LoaderSettings
    from pipelines.plan import plan_config_from

    d = cfg["data"]
    settings = LoaderSettings(batch_size=d["batch_size"], num_threads=d["num_threads"],
                              workers=workers_for(kind, args, cfg), prefetch=d["prefetch"],
                              shuffle=d["shuffle"], seed=cfg["run"]["seed"], decode=d["decode"],
                              graph=d["graph"])
    from pipelines.lmdb_store import LmdbFormatError
    # data.list: an LMDB's videos through a list, e.g. repeated logically (bench/gpu_data.py repeat-list)
    listed = (d["list"] or None) if not db.endswith(".json") else None
    try:
        if kind == "dali":
            from pipelines.loader import PretrainLoader
            return PretrainLoader(db, plan_config_from(cfg["plan"]), settings, device=args.device, list_path=listed)
        from pipelines.reference_executor import ReferencePretrainLoader
        return ReferencePretrainLoader(db, plan_config_from(cfg["plan"]), settings, device=args.device,
                                       list_path=listed)
    except (FileNotFoundError, LmdbFormatError, ValueError) as err:  # VideoIndexError is a ValueError
        raise BenchmarkError(f"cannot use the data: {err}") from None


def endless(loader):
    while True:
        yield from loader


def _sync(device: str):
    if device == "gpu":
        import torch
        torch.cuda.synchronize()


def _make_trainer(cfg: dict, steps_per_epoch: int, device):
    from cstp.engine import Trainer

    class _Shape:  # what Trainer reads of a loader; the steps are driven here, not by Trainer.run
        batch_size = cfg["data"]["batch_size"]

    _Shape.steps_per_epoch = max(steps_per_epoch, 1)
    return Trainer(cfg, _Shape(), tempfile.gettempdir(), device)


def _torch_device(args):
    import torch

    if args.device == "gpu":
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda:0")
    return torch.device("cpu")


class TimedSteps:
    """A mode's timed window: wall and CPU seconds from start() to stop(), the device
    synchronised at both ends; stop() also records host and GPU memory (call it while the
    loader is alive: DALI's pools count)."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        _sync(self.device)
        self.cpu0, self.t0 = CpuSnapshot(), time.perf_counter()

    def stop(self) -> dict:
        _sync(self.device)
        seconds = time.perf_counter() - self.t0
        cpu1 = CpuSnapshot()
        cpu = cpu1.seconds_since(self.cpu0)
        return dict(seconds=seconds, cpu_seconds=cpu, other_cpu_seconds=cpu1.others_since(self.cpu0, cpu),
                    host_rss_mb=host_memory_mb(), **gpu_memory(self.device))


def run_loader(cfg: dict, args, db: str) -> dict:
    loader = make_loader(args.loader, db, cfg, args)
    batches = endless(loader)
    try:
        for _ in range(args.warmup):
            next(batches)
        window = TimedSteps(args.device)
        window.start()
        for _ in range(args.steps):
            batch = next(batches)
        measured = window.stop()
    finally:
        batches.close()
        loader.close()
    result = dict(measured, output_device=batch["view1"].device.type,
                  workers=workers_for(args.loader, args, cfg), steps_per_epoch=loader.steps_per_epoch)
    if args.soak_epochs:
        result.update(soak(cfg, args, db))
    return result


def soak(cfg: dict, args, db: str) -> dict:
    """Whole epochs on a fresh loader, host memory (PSS of the process and its workers)
    after each: a leak grows it by the same amount every epoch."""
    from tqdm import tqdm

    loader = make_loader(args.loader, db, cfg, args)
    memory, anon, mapped, t0 = [], [], [], time.perf_counter()
    try:
        with tqdm(total=args.soak_epochs * loader.steps_per_epoch, desc="soak", unit="batch",
                  disable=None) as bar:
            for _ in range(args.soak_epochs):
                for _ in loader:
                    bar.update()
                memory.append(host_memory_mb())
                split = host_memory_split_mb()
                if split is not None:
                    anon.append(split["anon"] + split["shmem"])
                    mapped.append(split["file"])
    finally:
        loader.close()
    # The total includes the file pages of the LMDB's memory map, which grow until every
    # page of the database has been read once and are page cache, not a leak; the
    # anonymous part is what a leak would grow.
    return dict(soak_epochs=args.soak_epochs, soak_steps_per_epoch=loader.steps_per_epoch,
                soak_seconds=time.perf_counter() - t0, soak_host_mb=memory,
                soak_slope_mb_per_epoch=memory_slope(memory),
                soak_anon_mb=anon or None, soak_anon_slope_mb_per_epoch=memory_slope(anon) if anon else None,
                soak_file_mb=mapped or None)


def memory_slope(memory: list[float]) -> float | None:
    """Least-squares slope of memory over epochs, MB per epoch (None for one epoch)."""
    if len(memory) < 2:
        return None
    n = len(memory)
    mean_x, mean_y = (n - 1) / 2, sum(memory) / n
    return (sum((x - mean_x) * (y - mean_y) for x, y in enumerate(memory))
            / sum((x - mean_x) ** 2 for x in range(n)))


def synthetic_batch(cfg: dict, device) -> dict:
    """One batch shaped like the loader's, generated on the training device."""
    import torch

    p, b = cfg["plan"], cfg["data"]["batch_size"]
    gen = torch.Generator(device=device).manual_seed(cfg["run"]["seed"])
    shape = (b, 3, p["frames"], p["crop_size"], p["crop_size"])
    view = lambda: torch.rand(shape, generator=gen, device=device) * 2 - 1  # noqa: E731
    label = lambda n: torch.randint(0, n, (b,), generator=gen, device=device)  # noqa: E731
    return {"view1": view(), "view2": view(), "spatial_label": label(len(p["spatial_rates"])),
            "temporal_label": label(len(p["temporal_rates"])), "speed_label": label(len(p["strides"])),
            "rot1": label(4), "rot2": label(4)}


def run_model(cfg: dict, args) -> dict:
    import math

    device = _torch_device(args)
    trainer = _make_trainer(cfg, 1, device)
    batch = synthetic_batch(cfg, device)
    skipped = 0
    for _ in range(args.warmup):
        trainer.train_step(batch, FIXED_LR)
    window = TimedSteps(args.device)
    window.start()
    for _ in range(args.steps):
        _, grad_norm = trainer.train_step(batch, FIXED_LR)  # ends in a host sync (finite check)
        skipped += math.isnan(grad_norm)
    return dict(window.stop(), skipped_steps=skipped)


def run_e2e(cfg: dict, args, db: str) -> dict:
    import math

    # The loader first: forked DALI workers must start before CUDA is initialised.
    loader = make_loader(args.loader, db, cfg, args)
    device = _torch_device(args)
    trainer = _make_trainer(cfg, loader.steps_per_epoch, device)
    batches = endless(loader)
    skipped, wait = 0, 0.0
    try:
        for _ in range(args.warmup):
            trainer.train_step(next(batches), FIXED_LR)
        window = TimedSteps(args.device)
        window.start()
        for _ in range(args.steps):
            asked = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - asked
            _, grad_norm = trainer.train_step(batch, FIXED_LR)
            skipped += math.isnan(grad_norm)
        measured = window.stop()
    finally:
        batches.close()
        loader.close()
    return dict(measured, data_wait_seconds=wait, data_wait_fraction=wait / measured["seconds"],
                skipped_steps=skipped, workers=workers_for(args.loader, args, cfg),
                steps_per_epoch=loader.steps_per_epoch)




# The modes that read data: each measures its timed steps on the prepared data.
DATA_MODES = {"loader": run_loader, "e2e": run_e2e}


def run_one(args, cfg: dict, work: Path) -> dict:
    import torch

    if cfg["train"]["threads"]:
        torch.set_num_threads(cfg["train"]["threads"])
    p, d = cfg["plan"], cfg["data"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others' work on the same cores
    reference = args.mode != "model" and args.loader == "reference"
    source = "synthetic tensors" if args.mode == "model" else "lmdb" if reference else data_source(args)
    result = dict(mode=args.mode, device=args.device, loader=None if args.mode == "model" else args.loader,
                  source=source, data=None, videos=None, repeat=None,
                  decode=d["decode"] if source == "lmdb" and args.loader == "dali" else None)
    if args.mode == "model":
        measured = run_model(cfg, args)
    else:
        db, origin, videos, copies = prepare_data(args, cfg, work, for_reference=reference)
        result.update(data=origin, videos=videos, repeat=copies)
        measured = DATA_MODES[args.mode](cfg, args, db)
    seconds = measured.pop("seconds")
    samples_per_s = args.steps * d["batch_size"] / seconds
    cores = os.cpu_count() or 1
    others = measured.pop("other_cpu_seconds")
    result.update(
        other_cpu_cores=None if others is None else others / seconds,  # other processes' use of the cores
        samples_per_s=samples_per_s,
        frames_per_s=2 * p["frames"] * samples_per_s,
        step_ms=1000 * seconds / args.steps,
        seconds=seconds,
        data_wait_fraction=measured.pop("data_wait_fraction", None),
        cpu_cores_used=measured["cpu_seconds"] / seconds,
        cpu_share=measured["cpu_seconds"] / seconds / cores,
        cpu_ms_per_sample=1000 * measured["cpu_seconds"] / (args.steps * d["batch_size"]),
        peak_rss_mb=peak_rss_mb(),
        gpu_name=gpu_name(args.device),
        batch=d["batch_size"], frames=p["frames"], crop_size=p["crop_size"], steps=args.steps,
        warmup=args.warmup, threads=d["num_threads"], precision=cfg["train"]["precision"],
        channels_last=cfg["train"]["channels_last"], model_width=cfg["model"]["width"],
        torch_threads=torch.get_num_threads(), cpu_count=cores, load_average_before=load, seed=cfg["run"]["seed"],
        **measured)
    result.setdefault("workers", None)
    return result


"""--all: loader(dali), loader(reference), model and e2e, each in its own process (fresh
thread pools, its own memory peak), and the headline ratios between them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.data import prepare_data
from bench.settings import REPO, BenchmarkError, data_source
from bench.system import machine_info

ALL_RUNS = (("loader", "dali"), ("loader", "reference"), ("model", None), ("e2e", None))


def child_command(args, mode: str, loader: str | None, db: str, origin: str, out: Path) -> list[str]:
    cmd = [sys.executable, str(REPO / "benchmark.py"), mode, *args.overrides, "--config", args.config,
           "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--json", str(out), "--data", db, "--repeat", "1", "--data-origin", origin,
           "--loader", loader or args.loader]
    for flag, value in (("--batch", args.batch), ("--threads", args.threads), ("--workers", args.workers),
                        ("--precision", args.precision), ("--seed", args.seed), ("--decode", args.decode)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.channels_last:
        cmd.append("--channels-last")
    return cmd


def run_all(args, cfg: dict, work: Path) -> dict:
    db, origin, _, _ = prepare_data(args, cfg, work)
    # the reference executor reads an LMDB: the same one, or with a video index --reference-data
    ref_db, ref_origin = (db, origin) if data_source(args) == "lmdb" else \
        prepare_data(args, cfg, work, for_reference=True)[:2]
    results = {}
    for mode, loader in ALL_RUNS:
        name = f"{mode}_{loader}" if loader else mode
        print(f"benchmark.py: running {name.replace('_', ' ')} ...", file=sys.stderr, flush=True)
        out = work / f"{name}.json"
        data, data_origin = (ref_db, ref_origin) if loader == "reference" else (db, origin)
        proc = subprocess.run(child_command(args, mode, loader, data, data_origin, out), cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise BenchmarkError(f"the {name} run failed (exit {proc.returncode}); its output is above")
        results[name] = json.loads(out.read_text())
    model, e2e = results["model"]["samples_per_s"], results["e2e"]["samples_per_s"]
    dali, reference = results["loader_dali"]["samples_per_s"], results["loader_reference"]["samples_per_s"]
    first = results["e2e"]
    summary = {key: first[key] for key in ("device", "gpu_name", "batch", "frames", "crop_size", "steps",
                                           "warmup", "precision", "channels_last", "model_width", "data")}
    return dict(mode="all", loader=args.loader, source=data_source(args), decode=results["e2e"]["decode"],
                **summary,
                compute_bound_ratio=e2e / model, loader_speedup=dali / reference,
                # the same comparison in CPU time per sample: steadier on a shared machine
                loader_cpu_speedup=(results["loader_reference"]["cpu_ms_per_sample"]
                                    / results["loader_dali"]["cpu_ms_per_sample"]),
                data_wait_fraction=first["data_wait_fraction"], samples_per_s=e2e,
                frames_per_s=first["frames_per_s"],
                host_rss_mb=max(r["host_rss_mb"] for r in results.values()),
                machine=machine_info(), results=results)


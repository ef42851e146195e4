"""What scripts/gpu_check.sh needs besides benchmark.py's runs (docs/gpu.md):

  python -m bench.gpu_data repeat-list DB LIST NEED
      a reference-format list naming every video of DB often enough for NEED samples:
      the loaders read it through `data.list`, so a short LMDB is repeated logically
      (the same LMDB entries listed again), with nothing written but the list;
  python -m bench.gpu_data synthetic DB [config args]
      a small synthetic LMDB (8 colour-coded videos, bench/data.py's) for a machine without
      prepared data: with repeat-list it stands in for any number of samples;
  python -m bench.gpu_data graph-facts --device gpu --out FILE.json [--data DB] [config args]
      per data graph (LMDB views, clip LMDB; a video index when given): decoder operators,
      the rank's threads and worker processes, pipeline build time, first-batch time;
  python -m bench.gpu_data summary WORK
      the lines gpu_check.sh appends to its summary: those facts, and the GPU tests with
      every skip counted as a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path


SYNTHETIC_VIDEOS = 8


def repeat_list(db: str, list_path: str, need: int) -> tuple[int, int]:
    """Write a reference-format list ("<name>.avi <label> <frames>") naming each of DB's
    videos `copies` times, copies = ceil(need / videos). Returns (videos, copies)."""
    from pipelines.lmdb_store import read_metadata

    metas, _ = read_metadata(db)
    if not metas:
        raise ValueError(f"{db} holds no videos")
    bad = [m.name for m in metas if not m.name or any(c.isspace() for c in m.name)]
    if bad:
        raise ValueError(f"{db}: a list cannot name videos with spaces in their names, e.g. {bad[0]!r}")
    copies = max(1, -(-need // len(metas)))
    lines = [f"{m.name}.avi {m.label} {m.frames}\n" for _ in range(copies) for m in metas]
    Path(list_path).write_text("".join(lines))
    return len(metas), copies


def process_threads() -> int:
    """Threads of this process (the rank), from /proc; 0 where there is no /proc."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def decoder_operators(pipeline) -> int:
    """Decoder operator instances in a pipeline's graph (its Python graph must be built,
    as the loaders do at construction). Relies on DALI's Pipeline._ops and the
    operators' _schema (as tests/test_gpu_graphs.py)."""
    return sum(instance._op._schema.Name().startswith("decoders__") for instance in pipeline._ops)


def worker_processes() -> int:
    """Live child processes of this process (the DALI workers)."""
    try:
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    except OSError:
        return 0
    return len(children)


def measure_loader(name: str, make) -> dict:
    """Construct a loader (workers fork), time its first batch (the pipeline builds there)."""
    threads_before = process_threads()
    start = time.perf_counter()
    loader = make()
    constructed = time.perf_counter() - start
    workers = worker_processes()
    start = time.perf_counter()
    next(iter(loader))
    first_batch = time.perf_counter() - start
    facts = dict(graph=name, decoder_operators=decoder_operators(loader.pipeline),
                 dali_threads=loader.pipeline.num_threads, worker_processes=workers,
                 rank_threads_added=process_threads() - threads_before, rank_threads=process_threads(),
                 construct_s=round(constructed, 3),
                 build_s=None if loader.build_seconds is None else round(loader.build_seconds, 3),
                 first_batch_s=round(first_batch, 3), batch=loader.batch_size)
    loader.close()
    return facts


def graph_facts(args) -> list[dict]:
    import gpu_guard

    device = gpu_guard.resolve_device(args.device)
    from cstp.config import load_config
    from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
    from pipelines.clip_plan import ClipPlanConfig
    from pipelines.loader import LoaderSettings, PretrainLoader
    from pipelines.plan import plan_config_from

    cfg = load_config(args.config, args.overrides)
    d, plan_cfg = cfg["data"], plan_config_from(cfg["plan"])
    settings = LoaderSettings(batch_size=args.batch, num_threads=d["num_threads"], workers=d["workers"],
                              prefetch=d["prefetch"], seed=cfg["run"]["seed"], decode=d["decode"], graph=d["graph"])
    facts = []
    # every loader is measured in a process of its own (gpu_check.sh runs one graph per call):
    # after the first GPU build, CUDA is initialised and a second loader's workers cannot fork
    if args.graph == "lmdb":
        name = f"LMDB pretraining ({d['graph']} graph, {d['decode']} decode)"
        facts.append(measure_loader(name, lambda: PretrainLoader(args.data, plan_cfg, settings, device=device,
                                                                 list_path=d["list"] or None)))
    elif args.graph == "clip":
        clip_cfg = ClipPlanConfig(frames=plan_cfg.frames, crop_size=plan_cfg.crop_size)
        clip_settings = ClipLoaderSettings(batch_size=args.batch, num_threads=d["num_threads"], workers=d["workers"],
                                           seed=cfg["run"]["seed"])
        facts.append(measure_loader("clip LMDB (finetuning)", lambda: ClipLoader(
            args.data, "train", clip_cfg, clip_settings, device=device, list_path=d["list"] or None)))
    else:
        facts.append(measure_loader("pretraining video files", lambda: PretrainLoader(
            args.data, plan_cfg, settings, device=device)))
    for f in facts:
        f.update(device=device, config=args.config)
    return facts


def pytest_outcome(log: str) -> tuple[str, bool]:
    """(pytest's last line, whether the GPU tests passed): a skipped test counts as a
    failure (a GPU test that did not run proved nothing)."""
    lines = [line for line in log.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", last)}
    ok = counts.get("passed", 0) > 0 and not any(counts.get(k) for k in ("failed", "skipped", "error", "errors"))
    return last, ok


def summary_lines(work: Path) -> list[str]:
    lines = ["", "GPU tests (a skip counts as a failure):"]
    log = work / "pytest_gpu.log"
    if log.is_file():
        last, ok = pytest_outcome(log.read_text(errors="replace"))
        lines.append(f"  {'PASSED' if ok else 'FAILED'}: {last}")
    else:
        lines.append("  FAILED: not run")
    lines += ["", "data graphs per rank (decoder operators, threads, build):"]
    facts = []
    for path in sorted(work.glob("graph_*.json")):
        try:
            facts += json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(f"  {path.name}: unreadable")
    if not facts:
        lines.append("  none measured")
    for f in facts:
        lines.append(f"  {f['graph']}, batch {f['batch']} on {f['device']}: {f['decoder_operators']} decoder "
                     f"operators, {f['dali_threads']} DALI threads + {f['worker_processes']} worker processes, "
                     f"{f['rank_threads']} threads in the rank ({f['rank_threads_added']} added); "
                     f"build {f['build_s']} s, first batch {f['first_batch_s']} s")
    lines += ["", "LMDB loader samples/s, views graph (2·T decoders) vs frames graph (one decoder):"]
    found = False
    for path in sorted(work.glob("frames_loader_b*.json")):
        batch = path.stem.rsplit("_b", 1)[1]
        try:
            frames = json.loads(path.read_text())["samples_per_s"]
            views = json.loads((work / f"all_lmdb_b{batch}.json").read_text())
            views = views["results"]["loader_dali"]["samples_per_s"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        found = True
        lines.append(f"  batch {batch}: views {views:.1f}, frames {frames:.1f} -> {frames / views:.2f}x "
                     f"(default data.graph=views; switch if frames is clearly faster)")
    if not found:
        lines.append("  not measured")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("repeat-list")
    rep.add_argument("db")
    rep.add_argument("list")
    rep.add_argument("need", type=int)
    facts = sub.add_parser("graph-facts")
    facts.add_argument("--graph", choices=("lmdb", "clip", "video"), default="lmdb")
    facts.add_argument("--device", choices=("auto", "cpu", "gpu"), default="gpu")
    facts.add_argument("--data", required=True, help="LMDB (lmdb, clip) or video index (video)")
    facts.add_argument("--config", default="configs/ucf101.yaml")
    facts.add_argument("--batch", type=int, default=32)
    facts.add_argument("--out", required=True)
    facts.add_argument("overrides", nargs="*", metavar="key=value")
    syn = sub.add_parser("synthetic")
    syn.add_argument("db")
    syn.add_argument("--config", default="configs/ucf101.yaml")
    syn.add_argument("overrides", nargs="*", metavar="key=value")
    summ = sub.add_parser("summary")
    summ.add_argument("work")
    # key=value overrides may sit before and after the options (as benchmark.py takes them)
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if "=" not in w or w.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "repeat-list":
            videos, copies = repeat_list(args.db, args.list, args.need)
            print(f"{args.db}: {videos} videos, each listed {copies}x in {args.list} (logical repetition: "
                  "nothing copied)")
        elif args.command == "synthetic":
            from bench.data import write_synthetic_db
            from cstp.config import load_config

            print(write_synthetic_db(Path(args.db), load_config(args.config, args.overrides), SYNTHETIC_VIDEOS))
        elif args.command == "graph-facts":
            found = graph_facts(args)
            Path(args.out).write_text(json.dumps(found, indent=1) + "\n")
            for facts in found:
                print(json.dumps(facts))
        else:
            print("\n".join(summary_lines(Path(args.work))))
    except (OSError, ValueError) as err:
        print(f"bench.gpu_data: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""CSTP-DALI throughput benchmark: is pretraining compute-bound?

Modes (one per run, or all four with --all):
  loader   the input pipeline alone (--loader dali|reference): samples/s, decoded
           frames/s (= 2·T·samples/s, both views), CPU cores used, host memory
  model    real CSTP training steps (forward, loss, backward, SGD, EMA) on synthetic
           inputs already on the device: the compute ceiling for this batch,
           precision and memory format
  e2e      real training steps fed by the loader, with the share of time spent
           waiting for data

--all runs loader(dali), loader(reference), model and e2e, each in its own process
(fresh thread pools, its own memory peak), and adds the headline ratios:
  compute-bound ratio = e2e ÷ model samples/s   (1.0: the loader never holds training back)
  loader speed-up     = DALI ÷ reference samples/s
It writes a Markdown report and, when matplotlib is importable, a PNG bar chart.

Data: --data DB (an LMDB from `python -m preprocessing build-lmdb`) or --data INDEX.json
(a video index from `python -m preprocessing index-videos`: the video-file path, NVDEC on
--device gpu); without it, temporary colour-coded synthetic data is made (an LMDB, or with
--source video one ffmpeg-encoded file listed many times: H.264 for gpu, MJPEG for cpu), so
the benchmark runs anywhere. The reference executor reads LMDBs only: with a video index
its runs read --reference-data DB (build it from the same videos). A dataset with fewer
videos than the run needs is copied into a temporary one that lists each video several
times (--repeat), so that epoch ends (DALI resets, DataLoader worker forks) do not fall
inside the timed steps. --decode roi|full picks how the LMDB path decodes JPEGs.

examples:
  python benchmark.py --all --device cpu --batch 8 --steps 20 --warmup 3 plan.frames=16 crop_size=112 \\
      --data data/ucf101_256.lmdb
  python benchmark.py loader --loader reference --workers 2 --data /tmp/rc.lmdb
  python benchmark.py loader --threads 2 --workers 2 --soak-epochs 10 --data /tmp/rc.lmdb   # memory slope
  python benchmark.py model --config configs/ucf101.yaml --device gpu --batch 32 --precision bf16 --channels-last
  python benchmark.py loader --device gpu --decode full --data data/ucf101_256.lmdb      # roi vs full decode
  python benchmark.py --all --device gpu --data data/ucf101_nvdec.json --reference-data data/ucf101_256.lmdb
  python benchmark.py e2e --config configs/k400.yaml --device gpu --batch 64 --threads 4 --workers 6 \\
      --data data/k400_320.lmdb --json runs/bench/e2e.json

`benchmark.py source --data DB|INDEX.json ...`: the host side of a data path alone (plan, read,
checks, hand-over; storage bytes per sample): see bench/host_source.py.
`benchmark.py gpu-check-summary WORK OUT`: scripts/gpu_check.sh's headline table of its runs.

Any config value can be overridden with key=value as in train.py (model.width=0.5,
plan.frames=16, crop_size=112, ...); the flags below win over the overrides.
Exit status: 0 done, 2 bad arguments, missing data or no GPU for --device gpu.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bench.gpu_check import gpu_check_summary
from bench.measure import run_one
from bench.report import default_json, headline_lines, print_results, write_report
from bench.settings import (DEFAULT_CONFIG, BenchmarkError, explicit_data_path, int_at_least, load_benchmark_config,
                            repeat_count, require_gpu_if_asked)
from bench.suite import run_all
from cstp.out_of_memory import is_out_of_memory, out_of_memory_message
from pipelines.faults import BrokenDataError
from train import unwritable

MODES = ("loader", "model", "e2e")
SOURCES = ("lmdb", "video")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", metavar="[MODE] key=value",
                   help=f"the mode ({', '.join(MODES)}; omit with --all) followed by config overrides")
    p.add_argument("--all", action="store_true", help="run loader(dali), loader(reference), model and e2e; "
                                                      "write the report")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML recipe for model width and plan sizes (default: configs/quick.yaml)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: DALI decodes on the GPU (mixed) and the model runs on CUDA (default: cpu)")
    p.add_argument("--loader", choices=("dali", "reference"), default="dali",
                   help="loader of the loader and e2e modes (default: dali)")
    p.add_argument("--batch", type=int_at_least(1), help="samples per step (default: the config's data.batch_size)")
    p.add_argument("--threads", type=int_at_least(1), help="DALI num_threads (default: the config's data.num_threads)")
    p.add_argument("--workers", type=int_at_least(0),
                   help="DALI external_source worker processes / reference DataLoader workers "
                        "(default: the config's data.workers for DALI, the CPU count for reference)")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="timed steps (default: 20)")
    p.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed steps first (default: 3)")
    p.add_argument("--soak-epochs", type=int_at_least(1), metavar="N",
                   help="loader mode: afterwards run N whole epochs on a fresh loader, record host memory at "
                        "the end of each, and report the slope in MB/epoch (a leak shows as a positive slope)")
    p.add_argument("--data", metavar="DB|INDEX.json",
                   help="LMDB of JPEG frames, or a video index (.json) for the video-file path "
                        "(default: temporary synthetic data of --source)")
    p.add_argument("--source", choices=SOURCES,
                   help="data path: lmdb or video (default: video for a .json --data, else lmdb)")
    p.add_argument("--reference-data", metavar="DB",
                   help="with a video index: the LMDB (of the same videos) that the reference executor reads")
    p.add_argument("--decode", choices=("roi", "full"),
                   help="LMDB path: decode only the crop box (roi) or whole frames, then slice (full) "
                        "(default: the config's data.decode)")
    p.add_argument("--repeat", type=repeat_count, default="auto", metavar="auto|N",
                   help="store each video N times in a temporary copy of --data; auto: as often as the "
                        "timed steps need to stay within one epoch (up to 4 GiB); 1: use --data as it is")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="autocast precision (default: bf16 on gpu, fp32 on cpu)")
    p.add_argument("--channels-last", action="store_true", help="channels-last 3D memory format")
    p.add_argument("--seed", type=int, help="plan and model seed (default: the config's run.seed)")
    p.add_argument("--json", metavar="PATH", help="result file (default: runs/benchmark/<mode>-<device>.json)")
    p.add_argument("--report", metavar="PATH", help="Markdown report of --all (default: beside --json, .md)")
    p.add_argument("--data-origin", help=argparse.SUPPRESS)  # passed from --all to its child runs
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    plain = [w for w in args.words if "=" not in w]
    if len(plain) > 1:
        parser.error(f"one mode at most, got {' '.join(plain)} (config overrides are key=value)")
    args.mode = plain[0] if plain else None
    args.overrides = [w for w in args.words if "=" in w]
    if args.all:
        if args.mode is not None:
            parser.error(f"--all runs every mode; drop {args.mode!r}")
    elif args.mode is None:
        parser.error(f"choose a mode ({', '.join(MODES)}) or --all")
    elif args.mode not in MODES:
        parser.error(f"unknown mode {args.mode!r}: choose {', '.join(MODES)} (or --all); "
                     "config overrides are key=value")
    if args.soak_epochs and args.mode != "loader":
        parser.error("--soak-epochs needs the loader mode")
    given = explicit_data_path(args)
    if given is not None:
        implied = "video" if given.endswith(".json") else "lmdb"
        if args.source not in (None, implied):
            parser.error(f"--source {args.source} does not fit --data {given} (a .json is a video index, "
                         "anything else an LMDB)")
    return args


def gpu_check_command(argv: list[str]) -> int:
    """scripts/gpu_check.sh's summary: gpu-check-summary WORK OUT."""
    if len(argv) != 2:
        print("usage: benchmark.py gpu-check-summary WORK_DIR OUT_DIR", file=sys.stderr)
        return 2
    print("\n".join(gpu_check_summary(Path(argv[0]), Path(argv[1]))))
    return 0


def source_command(argv: list[str]) -> int:
    """The host side of a data path alone: bench/host_source.py (imported only when asked for)."""
    from bench.host_source import main as source_main

    return source_main(argv)


# Commands with arguments of their own (not the modes' flags): name -> function(argv) -> exit status.
COMMANDS = {"source": source_command, "gpu-check-summary": gpu_check_command}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    args = parse_args(argv)
    try:
        cfg = load_benchmark_config(args)
        require_gpu_if_asked(args.device)
        json_path = Path(args.json) if args.json else default_json(args)
        for flag, path in (("--json", json_path), ("--report", Path(args.report) if args.report else None)):
            if path is not None and (why := unwritable(path, folder=False)):   # before the measurement, not after
                raise BenchmarkError(f"{flag}: {why}")
        with tempfile.TemporaryDirectory(prefix="cstp_benchmark_") as tmp:
            if args.all:
                summary = run_all(args, cfg, Path(tmp))
                results = list(summary["results"].values())
            else:
                summary = run_one(args, cfg, Path(tmp))
                results = [summary]
    except (BenchmarkError, BrokenDataError) as err:
        print(f"benchmark.py: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:   # a batch size that does not fit, the usual sweep's end
        if not is_out_of_memory(err):
            raise
        print(f"benchmark.py: {out_of_memory_message(err, cfg['data']['batch_size'], 'plan', cfg['plan'])}",
              file=sys.stderr)
        return 2
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print_results(results)
    if args.all:
        for line in headline_lines(summary):
            print(line)
        report = Path(args.report) if args.report else json_path.with_suffix(".md")
        chart = write_report(summary, report)
        print(f"report: {report}" + (f", chart: {chart}" if chart else " (no chart: matplotlib is not installed)"))
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

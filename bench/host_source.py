"""`benchmark.py source`: the host-side work of a data path, without decoding.

Every sample starts on the host: plan, read, checks, hand-over to DALI. A GPU
decodes faster than this CPU, but it cannot hide this part; at Kinetics scale it
decides how many host cores and how much storage bandwidth each GPU needs. This
mode runs the pretraining source exactly as a DALI worker process calls it (one
core, no decoding) and reports per sample:

  cpu_ms           CPU time of the source call plus the hand-over copy (DALI copies
                   every output once into its own buffer; here into a reused buffer),
                   caches warm, one core
  storage_bytes    bytes read from storage, caches cold: the data file's pages are
                   evicted first (posix_fadvise DONTNEED on the file, no root needed),
                   then counted two ways: this process's /proc/self/io read_bytes, and
                   the file's pages that became resident (mincore)
  handed_bytes     bytes handed to the decoders (JPEGs with repeats, or the encoded file)
  needed_bytes     LMDB: the JPEG bytes of the sample's distinct planned frames;
                   video files: the file (the decoder needs the container)
  ratio            storage_bytes / needed_bytes
  cold_cpu_ms      CPU time per sample of the cold pass: page faults and reads cost
                   kernel time, which process_time counts
  cold_wall_ms     wall time per sample of the cold pass (storage latency included)
  gop_span_fraction  video files: the share of a video's frames in the GOPs from the
                   sample's first to its last frame (what a GOP-range reader would fetch)

The cold pass reads `--samples` samples of one epoch (distinct videos); the LMDB
should be much larger than what they read (`--repeat N` lists every video N times
in a temporary copy), or the pages of one sample serve the next.

example (the K400 recipe's plan; both LMDB layouts and the video path in one table):
  python benchmark.py source --data data/k400_v1.lmdb --data data/k400_320.lmdb \
      --data data/k400_nvdec.json --repeat 15 --samples 48
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import json
import mmap
import os
import pstats
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.settings import BenchmarkError, int_at_least

PAGE = mmap.PAGESIZE
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "k400.yaml"


@dataclass
class SampleInfo:
    """What DALI passes a batch-less (per-sample) external_source callable."""
    idx_in_epoch: int
    epoch_idx: int = 0
    idx_in_batch: int = 0
    iteration: int = 0


# ---------------------------------------------------------------- storage accounting

def data_files(data: str, files: list[str] | None) -> list[str]:
    """The files a data path reads: the LMDB's data.mdb, or the video files."""
    if files is not None:
        return sorted(set(files))
    return [os.path.join(data, "data.mdb") if os.path.isdir(data) else data]


def evict(paths) -> None:
    """Drop the files' clean pages from the page cache (pages mapped by a process stay)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte))


def resident_bytes(paths) -> int:
    """Bytes of the files that are in the page cache now (mincore over a private map)."""
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
            pages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * pages)()
            if _libc.mincore(ctypes.c_void_p(_map_address(mapped)), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            total += int(np.frombuffer(vec, np.uint8).astype(bool).sum()) * PAGE
    return total


def _map_address(mapped: mmap.mmap) -> int:
    # A read-only mmap exposes no writable buffer; numpy gives its address without copying.
    return np.frombuffer(mapped, dtype=np.uint8).ctypes.data


def io_read_bytes() -> int | None:
    """This process's bytes fetched from storage so far (/proc/self/io), None where absent."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# ---------------------------------------------------------------- the source under test

def make_source(data: str, plan_cfg, seed: int, batch_size: int):
    """(source, metas, files or None, jpeg outputs per sample or 0 for the video path)."""
    from pipelines.lmdb_store import read_metadata
    from pipelines.sources import PretrainLmdbSource
    from pipelines.video_source import PretrainVideoSource, is_video_index, read_video_index

    if not os.path.exists(data):
        raise BenchmarkError(f"--data {data}: not found")
    if is_video_index(data):
        metas, _, files = read_video_index(data)
        source = PretrainVideoSource(data, metas, files, plan_cfg, seed=seed, batch_size=batch_size, shuffle=True)
        return source, metas, files, 0
    metas, _ = read_metadata(data)
    source = PretrainLmdbSource(data, metas, plan_cfg, seed=seed, batch_size=batch_size, shuffle=True)
    return source, metas, None, 2 * plan_cfg.frames


def gop_span_fraction(source, epoch: int, position: int, gop: int) -> float:
    """Video path: the share of the video's frames in the GOPs from the one holding the
    sample's first frame to the one holding its last, i.e. what a reader of only the
    needed GOPs would fetch (frames as a proxy for bytes)."""
    video = source.video_for(epoch, position)
    plan = source.plan(epoch, video)
    both = np.concatenate([plan.view1.frames, plan.view2.frames])
    frames = source.metas[video].frames
    first, last = int(both.min()) // gop * gop, min(frames, (int(both.max()) // gop + 1) * gop)
    return (last - first) / frames


def needed_bytes(source, files, epoch: int, position: int) -> int:
    """LMDB: the bytes of the sample's distinct planned frames. Video: the file."""
    video = source.video_for(epoch, position)
    if files is not None:
        return os.path.getsize(files[video])
    plan = source.plan(epoch, video)
    wanted = np.unique(np.concatenate([plan.view1.frames, plan.view2.frames]))
    return sum(len(f) for f in source.reader.frames(video, wanted))


class HandOver:
    """The copy DALI makes of every output, into a buffer it reuses."""

    def __init__(self):
        self.buffer = bytearray(1 << 20)

    def __call__(self, outputs) -> None:
        for array in outputs:
            n = array.nbytes
            if n > len(self.buffer):
                self.buffer = bytearray(2 * n)
            memoryview(self.buffer)[:n] = memoryview(np.ascontiguousarray(array)).cast("B")


def run_samples(source, jpeg_outputs: int, epoch: int, positions, hand_over: HandOver) -> tuple[int, float, float]:
    """Call the source for each position as a DALI worker would, then hand the outputs
    over. (bytes handed to the decoders, CPU seconds in the source, CPU seconds in the
    hand-over)."""
    handed, in_source, in_hand_over = 0, 0.0, 0.0
    clock = time.process_time
    for position in positions:
        t0 = clock()
        outputs = source(SampleInfo(idx_in_epoch=position, epoch_idx=epoch))
        t1 = clock()
        hand_over(outputs)
        t2 = clock()
        in_source += t1 - t0
        in_hand_over += t2 - t1
        encoded = outputs[:jpeg_outputs] if jpeg_outputs else outputs[:1]
        handed += sum(a.nbytes for a in encoded)
    return handed, in_source, in_hand_over


def measure(data: str, plan_cfg, *, samples: int, warm_rounds: int, seed: int, batch_size: int,
            profile: bool = False, gop: int = 16) -> dict:
    source, metas, files, jpeg_outputs = make_source(data, plan_cfg, seed, batch_size)
    paths = data_files(data, files)
    per_epoch = source.per_rank
    if per_epoch < 1:
        raise BenchmarkError(f"{data}: {len(metas)} videos make no batch of {batch_size}")
    cold_n = min(samples, per_epoch)
    positions = list(range(cold_n))
    hand_over = HandOver()
    layout = None
    if files is None:
        from pipelines.lmdb_store import layout_version
        layout = layout_version(data)

    # Cold: evict, then read cold_n samples of epoch 0 (distinct videos).
    evict(paths)
    resident_before = resident_bytes(paths)
    io_before, cold0 = io_read_bytes(), time.perf_counter()
    handed, cold_source, cold_hand_over = run_samples(source, jpeg_outputs, 0, positions, hand_over)
    cold_wall = time.perf_counter() - cold0
    io_after = io_read_bytes()
    resident_after = resident_bytes(paths)
    needed = sum(needed_bytes(source, files, 0, p) for p in positions)
    span = None if files is None else float(np.mean([gop_span_fraction(source, 0, p, gop) for p in positions]))

    # Warm: the same samples again (their pages are cached now), timed on one core.
    warm_positions = positions * warm_rounds
    profiler = cProfile.Profile() if profile else None
    wall0 = time.perf_counter()
    if profiler:
        profiler.enable()
    _, in_source, in_hand_over = run_samples(source, jpeg_outputs, 0, warm_positions, hand_over)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - wall0

    resident = max(resident_after - resident_before, 0) / cold_n
    read = None if io_before is None or io_after is None else (io_after - io_before) / cold_n
    storage = read if read else resident
    result = dict(
        data=data, path="video" if files is not None else "lmdb", layout=layout, videos=len(metas),
        data_bytes=sum(os.path.getsize(p) for p in paths), frames_per_view=plan_cfg.frames,
        cold_samples=cold_n, warm_samples=len(warm_positions),
        cpu_ms=1e3 * (in_source + in_hand_over) / len(warm_positions), source_ms=1e3 * in_source / len(warm_positions),
        hand_over_ms=1e3 * in_hand_over / len(warm_positions), wall_ms=1e3 * wall / len(warm_positions),
        cold_wall_ms=1e3 * cold_wall / cold_n, cold_cpu_ms=1e3 * (cold_source + cold_hand_over) / cold_n,
        storage_bytes=storage, storage_bytes_io=read, storage_bytes_resident=resident,
        resident_before_bytes=resident_before, handed_bytes=handed / cold_n, needed_bytes=needed / cold_n,
        ratio=storage / (needed / cold_n) if needed else None, gop=gop if files is not None else None,
        gop_span_fraction=span,
    )
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        result["profile"] = text.getvalue()
    return result


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py source", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", metavar="key=value", help="config overrides (plan.frames=16, ...)")
    p.add_argument("--data", action="append", required=True, metavar="DB|INDEX.json",
                   help="an LMDB or a video index; repeat to compare data paths or layouts in one run")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="recipe of the plan sizes (default: configs/k400.yaml)")
    p.add_argument("--samples", type=int_at_least(1), default=48, help="samples of the cold pass, distinct videos (default: 48)")
    p.add_argument("--warm-rounds", type=int_at_least(1), default=5, help="times the warm pass repeats them (default: 5)")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="batch size the epoch is cut into (default: 1)")
    p.add_argument("--repeat", type=int_at_least(1), default=1, metavar="N",
                   help="read an LMDB through a temporary copy that lists every video N times (default: 1)")
    p.add_argument("--gop", type=int_at_least(1), default=16,
                   help="video path: the files' GOP length in frames, for the share of frames in the GOPs a "
                        "sample spans (default: 16, what `preprocessing transcode` writes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="print cProfile's top functions of the warm pass")
    p.add_argument("--json", metavar="PATH", help="write the results here too")
    return p


def format_table(results: list[dict]) -> list[str]:
    head = ("data", "path", "layout", "cpu ms", "(source + copy)", "cold cpu/wall ms", "storage KB", "(io / resident)",
            "handed KB", "needed KB", "storage/needed")
    rows = [head]
    for r in results:
        io_kb = "-" if r["storage_bytes_io"] is None else f"{r['storage_bytes_io'] / 1e3:.0f}"
        rows.append((Path(r["data"]).name, r["path"], str(r["layout"] or "-"), f"{r['cpu_ms']:.3f}",
                     f"{r['source_ms']:.3f} + {r['hand_over_ms']:.3f}",
                     f"{r['cold_cpu_ms']:.2f} / {r['cold_wall_ms']:.2f}",
                     f"{r['storage_bytes'] / 1e3:.0f}", f"{io_kb} / {r['storage_bytes_resident'] / 1e3:.0f}",
                     f"{r['handed_bytes'] / 1e3:.0f}", f"{r['needed_bytes'] / 1e3:.0f}",
                     "-" if r["ratio"] is None else f"{r['ratio']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def main(argv) -> int:
    args = build_parser().parse_args(argv)
    from bench.data import write_repeated_db
    from cstp.config import ConfigError, load_config
    from pipelines.plan import plan_config_from

    try:
        cfg = load_config(args.config, [*args.words, f"run.seed={args.seed}"])   # --seed checked like run.seed
    except ConfigError as err:
        print(f"benchmark.py source: {err}", flush=True)
        return 2
    plan_cfg = plan_config_from(cfg["plan"])
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="cstp_source_") as tmp:
            for i, data in enumerate(args.data):
                if args.repeat > 1 and not data.endswith(".json"):
                    if not os.path.exists(data):
                        raise BenchmarkError(f"--data {data}: not found")
                    repeated = Path(tmp) / f"repeated{i}.lmdb"
                    write_repeated_db(data, repeated, args.repeat)
                    data = str(repeated)
                results.append(measure(data, plan_cfg, samples=args.samples, warm_rounds=args.warm_rounds,
                                       seed=cfg["run"]["seed"], batch_size=args.batch, profile=args.profile, gop=args.gop))
    except BenchmarkError as err:
        print(f"benchmark.py source: {err}")
        return 2
    print(f"T={plan_cfg.frames} per view, 2 views; cold pass {results[0]['cold_samples']} samples, "
          f"warm pass {results[0]['warm_samples']}; one core, no decoding")
    for line in format_table(results):
        print(line)
    for r in results:
        if r["gop_span_fraction"] is not None:
            print(f"{Path(r['data']).name}: the whole file is read and handed to the decoder; the GOPs "
                  f"(of {r['gop']} frames) a sample spans hold {100 * r['gop_span_fraction']:.0f}% of its frames")
    for r in results:
        if r.get("profile"):
            print(f"--- profile of {r['data']} (warm pass)\n{r['profile']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in results],
                                              indent=2) + "\n")
    return 0

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

`python benchmark.py gpu-check-summary WORK OUT` builds scripts/gpu_check.sh's headline table
from the JSON files of its runs.

Any config value can be overridden with key=value as in train.py (model.width=0.5,
plan.frames=16, crop_size=112, ...); the flags below win over the overrides.
Exit status: 0 done, 2 bad arguments, missing data or no GPU for --device gpu.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
MODES = ("loader", "model", "e2e")
SOURCES = ("lmdb", "video")
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
# A copied ("repeated") database is never made larger than this; past it, epoch
# ends fall inside the timed steps (and the result says so).
REPEAT_LIMIT_BYTES = 4 << 30
FIXED_LR = 1e-3  # throughput does not depend on the learning rate; a small one never diverges


class BenchmarkError(RuntimeError):
    """A problem the user can fix; printed as one line, exit status 2."""


# ---------------------------------------------------------------- command line


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _repeat(text: str):
    return "auto" if text == "auto" else _int_at_least(1)(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", metavar="[MODE] key=value",
                   help=f"the mode ({', '.join(MODES)}; omit with --all) followed by config overrides")
    p.add_argument("--all", action="store_true", help="run loader(dali), loader(reference), model and e2e; "
                                                      "write the report")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="YAML recipe for model width and plan sizes (default: configs/demo.yaml)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: DALI decodes on the GPU (mixed) and the model runs on CUDA (default: cpu)")
    p.add_argument("--loader", choices=("dali", "reference"), default="dali",
                   help="loader of the loader and e2e modes (default: dali)")
    p.add_argument("--batch", type=_int_at_least(1), help="samples per step (default: the config's data.batch_size)")
    p.add_argument("--threads", type=_int_at_least(1), help="DALI num_threads (default: the config's data.num_threads)")
    p.add_argument("--workers", type=_int_at_least(0),
                   help="DALI external_source worker processes / reference DataLoader workers "
                        "(default: the config's data.workers for DALI, the CPU count for reference)")
    p.add_argument("--steps", type=_int_at_least(1), default=20, help="timed steps (default: 20)")
    p.add_argument("--warmup", type=_int_at_least(0), default=3, help="untimed steps first (default: 3)")
    p.add_argument("--soak-epochs", type=_int_at_least(1), metavar="N",
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
    p.add_argument("--repeat", type=_repeat, default="auto", metavar="auto|N",
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


def data_source(args) -> str:
    """lmdb or video: what the DALI runs read."""
    given = explicit_data_path(args)
    if given is not None:
        return "video" if given.endswith(".json") else "lmdb"
    return args.source or "lmdb"


def load_benchmark_config(args) -> dict:
    from cstp.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        raise BenchmarkError(str(err)) from None
    d, t = cfg["data"], cfg["train"]
    d["device"] = args.device
    if args.batch:
        d["batch_size"] = args.batch
    if args.threads:
        d["num_threads"] = args.threads
    if args.decode:
        d["decode"] = args.decode
    t["precision"] = args.precision or ("bf16" if args.device == "gpu" else "fp32")
    t["channels_last"] = bool(args.channels_last)
    if args.seed is not None:
        cfg["run"]["seed"] = args.seed
    return cfg


def workers_for(loader: str, args, cfg) -> int:
    if args.workers is not None:
        return args.workers
    return cfg["data"]["workers"] if loader == "dali" else (os.cpu_count() or 1)


def explicit_data_path(args) -> str | None:
    """--data, or a data.path given as an override (a config file's path is not used:
    recipes name databases that may not exist here)."""
    if args.data:
        return args.data
    for word in args.overrides:
        key, _, value = word.partition("=")
        if key.strip() in ("data.path", "path") and value:
            return value
    return None


def require_gpu_if_asked(device: str):
    if device != "gpu":
        return
    import gpu_guard   # NVML, not the CUDA driver: forked DALI workers must start before CUDA is initialised

    if not gpu_guard.gpu_visible():
        raise BenchmarkError("--device gpu needs a CUDA GPU, but torch sees none "
                             "(torch.cuda.is_available() is False); run with --device cpu")


# ---------------------------------------------------------------- data


def plan_config(cfg: dict):
    """Every `plan.*` value that PlanConfig knows (lists as tuples), so that new plan
    options reach the benchmark without an edit here."""
    from dataclasses import fields

    from pipelines.plan import PlanConfig

    p = cfg["plan"]
    return PlanConfig(**{f.name: tuple(p[f.name]) if isinstance(p[f.name], list) else p[f.name]
                         for f in fields(PlanConfig) if f.name in p})


def samples_needed(args, batch: int) -> int:
    # + 2 batches: DALI's prefetch queue runs ahead of the last timed step.
    return (args.warmup + args.steps + 2) * batch


def _index_entries(fmt, metas: list[dict], classes: list[str], info: dict) -> dict:
    return {fmt.KEYS_KEY: fmt.pack([fmt.video_key(i) for i in range(len(metas))]),
            fmt.LEN_KEY: fmt.pack(len(metas)),
            fmt.ORDER_KEY: fmt.pack([m["name"] for m in metas]),
            fmt.VLEN_KEY: fmt.pack([m["frames"] for m in metas]),
            fmt.META_KEY: fmt.pack(metas),
            fmt.CLASSES_KEY: fmt.pack(classes),
            fmt.INFO_KEY: fmt.pack(info)}


def write_synthetic_db(path: Path, cfg: dict, videos: int) -> str:
    """Colour-coded frames (R = 8·(frame mod 32) + 4, G = x, B = y, as tests/lmdb_fixtures.py)
    at short side 2·crop_size (≥ 64), 4:3, JPEG quality 90. Only 32 distinct frames are
    encoded; every video stores its own copy of the bytes, as a real LMDB would."""
    import io

    import lmdb
    import numpy as np
    from PIL import Image

    from pipelines import lmdb_store as fmt

    p = cfg["plan"]
    height = max(64, 2 * p["crop_size"]) // 2 * 2
    width = height * 4 // 3 // 2 * 2
    length = min(128, max(32, (p["frames"] - 1) * max(p["strides"]) + 1))
    y, x = np.mgrid[0:height, 0:width]
    pool = []
    for f in range(32):
        frame = np.stack([np.full_like(x, 8 * f + 4), x % 256, y % 256], axis=-1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    value = fmt.pack([pool[f % 32] for f in range(length)])
    env = lmdb.open(str(path), map_size=len(value) * videos * 2 + (64 << 20))
    metas = [fmt.VideoMeta(f"synthetic/video{v:05d}", 0, length, height, width, 25.0, "synthetic").to_dict()
             for v in range(videos)]
    with env.begin(write=True) as txn:
        for v in range(videos):
            txn.put(fmt.video_key(v), value)
        for key, entry in _index_entries(fmt, metas, ["synthetic"], {"format": fmt.FORMAT_NAME,
                                                                     "version": fmt.FORMAT_VERSION}).items():
            txn.put(key, entry)
    env.close()
    return f"synthetic colour-coded frames: {videos} videos × {length} frames, {width}×{height} JPEG q90"


def write_repeated_db(source: str, path: Path, copies: int) -> None:
    """`source` with every video stored `copies` times (names get a #k suffix)."""
    import lmdb

    from pipelines import lmdb_store as fmt

    metas, classes = fmt.read_metadata(source)
    src = fmt.shared_env(source)
    with src.begin() as txn:
        raw_info = txn.get(fmt.INFO_KEY)
    info = fmt.unpack(raw_info) if raw_info is not None else {}
    size = _db_bytes(source)
    env = lmdb.open(str(path), map_size=int(size * copies * 1.2) + (64 << 20))
    out_metas = []
    for k in range(copies):
        with src.begin(buffers=False) as read, env.begin(write=True) as write:
            for v, meta in enumerate(metas):
                value = read.get(fmt.video_key(v))
                if value is None:
                    raise BenchmarkError(f"{source}: no entry for video {v}")
                write.put(fmt.video_key(k * len(metas) + v), value)
                out_metas.append({**meta.to_dict(), "name": f"{meta.name}#{k}"})
    with env.begin(write=True) as txn:
        for key, entry in _index_entries(fmt, out_metas, classes, info).items():
            txn.put(key, entry)
    env.close()


def _db_bytes(path: str) -> int:
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    return os.path.getsize(data_file)


def prepare_data(args, cfg: dict, work: Path, *, for_reference: bool = False) -> tuple[str, str, int, int]:
    """(data path, where it came from, videos, copies) for the data modes. `for_reference`:
    the LMDB that the reference executor reads (with a video index: --reference-data)."""
    batch = cfg["data"]["batch_size"]
    need = samples_needed(args, batch)
    given = explicit_data_path(args)
    video = data_source(args) == "video"
    if video and for_reference:
        if given is not None and not args.reference_data:
            raise BenchmarkError(f"the reference executor reads LMDBs only, and {given} is a video index: pass "
                                 "--reference-data DB, an LMDB of the same videos (python -m preprocessing "
                                 "build-lmdb --videos DIR --out DB)")
        given = args.reference_data
    if given is None:
        if video and not for_reference:
            index = work / "synthetic_videos.json"
            return str(index), write_synthetic_videos(index, cfg, max(8, need), args.device), max(8, need), 1
        db = work / "synthetic.lmdb"
        origin = write_synthetic_db(db, cfg, max(8, need))
        return str(db), origin, max(8, need), 1
    if video and not for_reference:
        return _prepare_video_index(args, given, batch, need, work)
    from pipelines.lmdb_store import LmdbFormatError, read_metadata

    try:
        metas, _ = read_metadata(given, cfg["data"]["list"] or None)   # data.list: a logical repetition
    except (FileNotFoundError, LmdbFormatError, OSError) as err:
        raise BenchmarkError(f"cannot read the data: {err}") from None
    if not metas:
        raise BenchmarkError(f"{given} holds no videos")
    origin = args.data_origin or f"LMDB {given}"
    copies = 1
    if args.repeat == "auto":
        if len(metas) < need:
            wanted = -(-need // len(metas))
            copies = max(1, min(wanted, REPEAT_LIMIT_BYTES // max(_db_bytes(given), 1)))
            if copies < wanted:
                print(f"benchmark.py: storing {given} {copies}× (not {wanted}×) keeps the copy under "
                      f"{REPEAT_LIMIT_BYTES >> 30} GiB; epoch ends fall inside the timed steps", file=sys.stderr)
    else:
        copies = args.repeat
    if len(metas) * copies < batch:
        raise BenchmarkError(f"{given} holds {len(metas)} videos, fewer than one batch of {batch}; "
                             "pass --repeat N or a smaller --batch")
    if copies == 1:
        return given, origin, len(metas), 1
    db = work / ("repeated_reference.lmdb" if for_reference else "repeated.lmdb")
    write_repeated_db(given, db, copies)
    return str(db), f"{origin}, each video stored {copies}×", len(metas) * copies, copies


def _prepare_video_index(args, given: str, batch: int, need: int, work: Path) -> tuple[str, str, int, int]:
    """A video index, listed `copies` times in a temporary index when it is short (the
    files are not copied: an index entry is a path)."""
    from pipelines.video_source import VideoIndexError, read_video_index

    try:
        metas, _, files = read_video_index(given)
    except (FileNotFoundError, VideoIndexError, OSError, ValueError, KeyError) as err:
        raise BenchmarkError(f"cannot read the data: {err}") from None
    if not metas:
        raise BenchmarkError(f"{given} holds no videos")
    origin = args.data_origin or f"video index {given}"
    copies = -(-need // len(metas)) if args.repeat == "auto" else args.repeat
    copies = max(copies, 1)
    if len(metas) * copies < batch:
        raise BenchmarkError(f"{given} holds {len(metas)} videos, fewer than one batch of {batch}; "
                             "pass --repeat N or a smaller --batch")
    if copies == 1:
        return given, origin, len(metas), 1
    index = json.loads(Path(given).read_text())
    entries = [{**entry, "name": f"{meta.name}#{k}", "file": file}
               for k in range(copies)
               for entry, meta, file in zip(index["videos"], metas, files)]
    out = work / "repeated_videos.json"
    out.write_text(json.dumps({**index, "root": "/", "videos": entries}))
    return str(out), f"{origin}, each video listed {copies}×", len(metas) * copies, copies


def find_ffmpeg() -> str | None:
    """The ffmpeg binary: on PATH, else the static one of the imageio-ffmpeg wheel (a GPU
    machine without system packages can carry that wheel)."""
    import shutil

    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None


# What the synthetic video file is encoded with: H.264 needs NVDEC (gpu); DALI decodes
# MJPEG on the CPU too. Short GOP, as `preprocessing transcode` writes them.
SYNTHETIC_VIDEO_CODECS = {
    "gpu": ("h264", ".mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "18", "-g", "16",
                             "-pix_fmt", "yuv420p"]),
    "cpu": ("mjpeg", ".avi", ["-c:v", "mjpeg", "-q:v", "3", "-pix_fmt", "yuvj420p"]),
}


# what the index records of either file's stream (both 8-bit 4:2:0; checked on a GPU)
SYNTHETIC_STREAM = dict(chroma="4:2:0", bit_depth=8, profile="")


def write_synthetic_videos(index_path: Path, cfg: dict, videos: int, device: str) -> str:
    """One video file of the synthetic LMDB's colour-coded frames (plus noise, so that
    the encoder has texture to code), listed `videos` times in a video index."""
    import numpy as np

    from pipelines.video_source import VIDEO_INDEX_FORMAT

    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        raise BenchmarkError("synthetic video data needs ffmpeg (install it, or `pip install imageio-ffmpeg`), "
                             "or pass --data INDEX.json")
    p = cfg["plan"]
    height = max(64, 2 * p["crop_size"]) // 2 * 2
    width = height * 4 // 3 // 2 * 2
    length = min(128, max(32, (p["frames"] - 1) * max(p["strides"]) + 1))
    codec, ext, codec_args = SYNTHETIC_VIDEO_CODECS[device]
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    raw = b"".join((np.stack([np.full_like(x, 8 * (f % 32) + 4), x % 256, y % 256], axis=-1)
                    + rng.integers(0, 16, size=(height, width, 3))).clip(0, 255).astype(np.uint8).tobytes()
                   for f in range(length))
    video = index_path.with_name("synthetic" + ext)
    proc = subprocess.run([ffmpeg, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                           f"{width}x{height}", "-r", "25", "-i", "-", *codec_args, str(video)],
                          input=raw, capture_output=True)
    if proc.returncode != 0:
        raise BenchmarkError(f"ffmpeg could not write the synthetic video: {proc.stderr.decode()[-300:]}")
    entries = [dict(name=f"synthetic/video{v:05d}", file=video.name, label=0, frames=length, height=height,
                    width=width, fps=25.0, codec=codec,
                    pix_fmt=codec_args[codec_args.index("-pix_fmt") + 1], **SYNTHETIC_STREAM) for v in range(videos)]
    index_path.write_text(json.dumps({"format": VIDEO_INDEX_FORMAT, "version": 2, "root": ".",
                                      "classes": ["synthetic"], "videos": entries}))
    return f"synthetic colour-coded {codec} video: 1 file of {length} frames, {width}×{height}, listed {videos}×"


# ---------------------------------------------------------------- host measurements


def _proc_table() -> dict[int, tuple[int, float]] | None:
    """pid -> (parent pid, CPU seconds) of every process, from /proc (None elsewhere)."""
    if not os.path.isdir("/proc/self"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def descendants(table: dict | None, root: int) -> dict[int, float]:
    """pid -> CPU seconds of every live descendant of `root` (workers, their helpers)."""
    if not table:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuSnapshot:
    """CPU seconds of this process, its reaped children and its live descendants
    (and of the whole machine, to tell how much other processes took)."""

    def __init__(self):
        t = os.times()
        self.own = t.user + t.system
        self.reaped = t.children_user + t.children_system
        self.live = descendants(_proc_table(), os.getpid())
        self.machine = _machine_busy_seconds()

    def seconds_since(self, start: "CpuSnapshot") -> float:
        # A child that ended inside the window counts in `reaped` with its whole
        # lifetime: subtract what it had used before the window began.
        ended = sum(cpu for pid, cpu in start.live.items() if pid not in self.live)
        still = sum(cpu - start.live.get(pid, 0.0) for pid, cpu in self.live.items())
        return (self.own - start.own) + max(self.reaped - start.reaped - ended, 0.0) + still

    def others_since(self, start: "CpuSnapshot", ours: float) -> float | None:
        """CPU seconds that processes outside this benchmark used in the window."""
        if self.machine is None or start.machine is None:
            return None
        return max(self.machine - start.machine - ours, 0.0)


def host_memory_mb() -> float:
    """Resident memory of this process and its live descendants, as PSS where Linux
    gives it (pages shared after fork count once), else RSS of this process."""
    pids = [os.getpid(), *descendants(_proc_table(), os.getpid())]
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            if pid == os.getpid():
                total_kb += peak_rss_mb() * 1024
    return total_kb / 1024


def host_memory_split_mb() -> dict[str, float] | None:
    """PSS of this process and its live descendants split into anonymous memory (heaps,
    DALI's buffers: where a leak shows) and file-backed pages (the LMDB's memory map,
    shared libraries: page cache that the kernel can reclaim). None without
    /proc/PID/smaps_rollup."""
    pids = [os.getpid(), *descendants(_proc_table(), os.getpid())]
    fields = {"Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}
    total = dict.fromkeys(fields.values(), 0.0)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, *rest = line.split()
                    if key in fields:
                        total[fields[key]] += int(rest[0]) / 1024
        except (OSError, ValueError, IndexError):
            if pid == os.getpid():
                return None
    return total


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------- the three modes


def make_loader(kind: str, db: str, cfg: dict, args):
    from pipelines.loader import LoaderSettings

    d = cfg["data"]
    settings = LoaderSettings(batch_size=d["batch_size"], num_threads=d["num_threads"],
                              workers=workers_for(kind, args, cfg), prefetch=d["prefetch"],
                              shuffle=d["shuffle"], seed=cfg["run"]["seed"], decode=d["decode"],
                              graph=d["graph"])
    from pipelines.lmdb_store import LmdbFormatError
    # data.list: an LMDB's videos through a list, e.g. repeated logically (bench/gpu_data.py repeat-list)
    listed = cfg["data"]["list"] or None if not db.endswith(".json") else None
    try:
        if kind == "dali":
            from pipelines.loader import PretrainLoader
            return PretrainLoader(db, plan_config(cfg), settings, device=args.device, list_path=listed)
        from pipelines.reference_executor import ReferencePretrainLoader
        return ReferencePretrainLoader(db, plan_config(cfg), settings, device=args.device, list_path=listed)
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


def run_loader(cfg: dict, args, db: str) -> dict:
    loader = make_loader(args.loader, db, cfg, args)
    batches = endless(loader)
    try:
        for _ in range(args.warmup):
            next(batches)
        _sync(args.device)
        cpu0, t0 = CpuSnapshot(), time.perf_counter()
        for _ in range(args.steps):
            batch = next(batches)
        _sync(args.device)
        seconds = time.perf_counter() - t0
        cpu1 = CpuSnapshot()
        cpu = cpu1.seconds_since(cpu0)
        memory = host_memory_mb()
        on_device = batch["view1"].device.type
    finally:
        batches.close()
        loader.close()
    result = dict(seconds=seconds, cpu_seconds=cpu, other_cpu_seconds=cpu1.others_since(cpu0, cpu),
                  host_rss_mb=memory, output_device=on_device,
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
    _sync(args.device)
    cpu0, t0 = CpuSnapshot(), time.perf_counter()
    for _ in range(args.steps):
        _, grad_norm = trainer.train_step(batch, FIXED_LR)  # ends in a host sync (finite check)
        skipped += math.isnan(grad_norm)
    _sync(args.device)
    seconds = time.perf_counter() - t0
    cpu1 = CpuSnapshot()
    cpu = cpu1.seconds_since(cpu0)
    return dict(seconds=seconds, cpu_seconds=cpu, other_cpu_seconds=cpu1.others_since(cpu0, cpu),
                host_rss_mb=host_memory_mb(), skipped_steps=skipped,
                **_gpu_memory(args.device))


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
        _sync(args.device)
        cpu0, t0 = CpuSnapshot(), time.perf_counter()
        for _ in range(args.steps):
            asked = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - asked
            _, grad_norm = trainer.train_step(batch, FIXED_LR)
            skipped += math.isnan(grad_norm)
        _sync(args.device)
        seconds = time.perf_counter() - t0
        cpu1 = CpuSnapshot()
        cpu = cpu1.seconds_since(cpu0)
        memory = host_memory_mb()
    finally:
        batches.close()
        loader.close()
    return dict(seconds=seconds, cpu_seconds=cpu, other_cpu_seconds=cpu1.others_since(cpu0, cpu),
                host_rss_mb=memory, data_wait_seconds=wait,
                data_wait_fraction=wait / seconds, skipped_steps=skipped,
                workers=workers_for(args.loader, args, cfg), steps_per_epoch=loader.steps_per_epoch,
                **_gpu_memory(args.device))


def _gpu_memory(device: str) -> dict:
    if device != "gpu":
        return {}
    import torch
    return {"gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30}


def gpu_name(device: str) -> str | None:
    if device != "gpu":
        return None
    import torch
    return torch.cuda.get_device_name(0)


def dali_version() -> str | None:
    """The installed DALI wheel's version, read without importing DALI."""
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{name} {dist.version}"
    return None


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
        measured = run_loader(cfg, args, db) if args.mode == "loader" else run_e2e(cfg, args, db)
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


# ---------------------------------------------------------------- --all


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


def machine_info() -> dict:
    import torch

    return dict(platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count(),
                torch=torch.__version__, dali=dali_version(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                  time.gmtime()))


# ---------------------------------------------------------------- output


def busy_machine(r: dict) -> bool:
    """Did processes outside the benchmark take over a quarter of the cores while it ran?"""
    return (r.get("other_cpu_cores") or 0) > 0.25 * r["cpu_count"]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# CPU ms/sample: CPU time of the process and its workers per sample, the cost that
# decides samples/s at equal cores and that other processes on the machine barely move.
TABLE_HEAD = ("run", "loader", "source", "samples/s", "frames/s", "ms/step", "data wait", "CPU cores", "CPU ms/sample",
              "host MB")


def _source_cell(r: dict) -> str:
    source = r.get("source") or "-"
    if source == "synthetic tensors":
        return "-"
    return f"{source} ({r['decode']})" if r.get("decode") else source


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    return [(r["mode"], r["loader"] or "-", _source_cell(r), _fmt(r["samples_per_s"], ".1f"),
             _fmt(r["frames_per_s"], ".0f"),
             _fmt(r["step_ms"], ".1f"), _fmt(r["data_wait_fraction"], ".1%"), _fmt(r["cpu_cores_used"], ".2f"),
             _fmt(r.get("cpu_ms_per_sample"), ".1f"), _fmt(r["host_rss_mb"], ".0f")) for r in results]


def print_table(results: list[dict]):
    rows = [TABLE_HEAD, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEAD))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def headline_lines(summary: dict) -> list[str]:
    return [f"compute-bound ratio (e2e ÷ model samples/s): {summary['compute_bound_ratio']:.2f}"
            f"  (1.00 = the loader never holds training back; data wait {summary['data_wait_fraction']:.1%})",
            f"loader speed-up (DALI ÷ reference samples/s): {summary['loader_speedup']:.2f}×"] + (
        [f"loader CPU-cost ratio (reference ÷ DALI CPU ms/sample): {summary['loader_cpu_speedup']:.2f}×"]
        if summary.get("loader_cpu_speedup") else [])


def settings_line(r: dict) -> str:
    return (f"device {r['device']}{' (' + r['gpu_name'] + ')' if r.get('gpu_name') else ''}, batch {r['batch']}, "
            f"{r['frames']} frames, {r['crop_size']} px, model width {r['model_width']}, {r['precision']}"
            f"{', channels-last' if r['channels_last'] else ''}, {r['warmup']} warm-up + {r['steps']} timed steps")


def write_report(summary: dict, path: Path) -> Path | None:
    """Markdown report; a PNG chart beside it when matplotlib is importable."""
    results = list(summary["results"].values())
    m = summary["machine"]
    lines = ["# CSTP-DALI throughput benchmark", "",
             f"{settings_line(summary)}.  ",
             f"Data: {summary['data']}.  ",
             f"Machine: {m['platform']}, {m['cpu_count']} CPU cores, Python {m['python']}, torch {m['torch']}, "
             f"{m['dali'] or 'DALI not found'}; {m['date']}.  ",
             "CPU cores used by other processes during each run's timed steps (they slow every number): "
             + ", ".join(_fmt(r.get("other_cpu_cores"), ".2f") for r in results)
             + (": the machine was busy, these numbers are low." if any(busy_machine(r) for r in results)
                else "."), "",
             "| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["", *[f"- {line}" for line in headline_lines(summary)], "",
              "samples/s: training samples (two views each) per second; frames/s = 2·T·samples/s, the decoded "
              "frames the views need. CPU cores: CPU seconds of the process and its workers per wall second; "
              "CPU ms/sample: their CPU time per sample (the cost behind samples/s at equal cores). "
              "host MB: resident memory (PSS) of the process and its workers at the end of the timed steps. "
              "model: synthetic inputs already on the device (the compute ceiling); e2e: the same steps fed by "
              "the loader. On a CPU-only machine the loader and the model share the same cores, so e2e should "
              "come out below both the loader and the model rates; where it does not, the load on the "
              "machine changed between the runs."]
    chart = path.with_suffix(".png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        chart = None
        lines += ["", "(matplotlib is not installed: no chart. `pip install matplotlib` and rerun to get one.)"]
    if chart is not None:
        names = [f"{r['mode']}\n{r['loader']}" if r["loader"] else r["mode"] for r in results]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(names, [r["samples_per_s"] for r in results], color=["#4c72b0", "#8c8c8c", "#55a868", "#c44e52"])
        ax.set_ylabel("samples / s")
        ax.set_title(f"batch {summary['batch']}, {summary['frames']}×{summary['crop_size']}², "
                     f"{summary['device']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(chart, dpi=120)
        plt.close(fig)
        lines += ["", f"![samples per second]({chart.name})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return chart


def default_json(args) -> Path:
    return REPO / "runs" / "benchmark" / f"{'all' if args.all else args.mode}-{args.device}.json"


# ---------------------------------------------------------------- scripts/gpu_check.sh's summary
#
# gpu_check.sh writes one JSON per benchmark run into its work folder, named
#   all_lmdb_b<B>            --all on the LMDB (loader dali + reference, model, e2e)
#   video_loader_b<B>, video_e2e_b<B>    the video-file path (NVDEC on a GPU)
#   decode_roi_b<B>, decode_full_b<B>    loader mode, the LMDB path's two JPEG decode modes
#   model_<precision>[_cl]               model mode at the first batch
# plus marks.txt (one "name start end" line per run, Unix seconds) and the GPU's
# utilisation log (nvidia-smi dmon, or a --query-gpu CSV). The table below holds every
# headline figure of issue #6.

UTIL_COLUMNS = {"sm": "sm", "dec": "dec", "jpg": "jpg", "utilization.gpu": "sm", "utilization.decoder": "dec",
                "utilization.jpeg": "jpg"}


def parse_gpu_utilisation(text: str) -> list[dict]:
    """Samples {t: Unix seconds, sm, dec, jpg: percent or None} from `nvidia-smi dmon -s u -o DT`
    or from `nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.decoder[,...]
    --format=csv,nounits` output. Lines it cannot read are skipped."""
    from datetime import datetime

    samples, names, csv = [], None, False
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            tokens = line[1:].split()
            if names is None and "gpu" in [t.lower() for t in tokens]:
                names = [t.lower() for t in tokens]
            continue
        if line.startswith("timestamp"):   # the CSV header
            names = [c.strip().split(" [")[0].lower() for c in line.split(",")]
            csv = True
            continue
        if names is None:
            continue
        cells = [c.strip() for c in line.split(",")] if csv else line.split()
        if len(cells) != len(names):
            continue
        row = dict(zip(names, cells))
        try:
            if csv:
                t = datetime.strptime(row["timestamp"], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            else:
                t = datetime.strptime(f"{row['date']} {row['time']}", "%Y%m%d %H:%M:%S").timestamp()
        except (KeyError, ValueError):
            continue
        sample = {"t": t, "sm": None, "dec": None, "jpg": None}
        for name, key in UTIL_COLUMNS.items():
            if name in row:
                try:
                    sample[key] = float(row[name])
                except ValueError:   # "-": the counter is not available
                    pass
        samples.append(sample)
    return samples


def utilisation_between(samples: list[dict], start: float, end: float) -> dict:
    """Mean and max of each counter over the samples in [start, end] (None where none)."""
    inside = [s for s in samples if int(start) <= s["t"] <= end]   # dmon's times are whole seconds
    out = {"samples": len(inside)}
    for key in ("sm", "dec", "jpg"):
        values = [s[key] for s in inside if s[key] is not None]
        out[key] = (sum(values) / len(values), max(values)) if values else None
    return out


def read_marks(text: str) -> dict[str, tuple[float, float]]:
    marks = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                marks[parts[0]] = (float(parts[1]), float(parts[2]))
            except ValueError:
                pass
    return marks


def _get(runs: dict, name: str, *keys):
    value = runs.get(name)
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _ratio(a, b):
    return a / b if a is not None and b else None


def check_batches(runs: dict) -> list[int]:
    import re

    found = {int(m.group(1)) for name in runs
             if (m := re.fullmatch(r"(?:all_lmdb|video_loader|video_e2e)_b(\d+)", name))}
    return sorted(found)


def gpu_check_rows(runs: dict, util: dict | None = None) -> list[tuple[str, ...]]:
    """The headline table: (figure, one column per batch, target)."""
    util = util or {}
    batches = check_batches(runs)
    rows = [("figure", *([f"batch {b}" for b in batches] or ["value"]), "target")]

    def row(label, values, spec, target=""):
        rows.append((label, *[_fmt(v, spec) for v in values or [None]], target))

    def single(label, text, target=""):   # one figure: in the first batch column
        rows.append((label, *([text] + [""] * len(batches))[:max(len(batches), 1)], target)
                    if batches else (label, text, target))

    model = [_get(runs, f"all_lmdb_b{b}", "results", "model", "samples_per_s") for b in batches]
    ref = [_get(runs, f"all_lmdb_b{b}", "results", "loader_reference", "samples_per_s") for b in batches]
    row("model samples/s (synthetic inputs on the device)", model, ".1f")
    for source in ("lmdb", "video"):
        if source == "lmdb":
            loader = [_get(runs, f"all_lmdb_b{b}", "results", "loader_dali", "samples_per_s") for b in batches]
            e2e = [_get(runs, f"all_lmdb_b{b}", "results", "e2e", "samples_per_s") for b in batches]
            wait = [_get(runs, f"all_lmdb_b{b}", "results", "e2e", "data_wait_fraction") for b in batches]
        else:
            loader = [_get(runs, f"video_loader_b{b}", "samples_per_s") for b in batches]
            e2e = [_get(runs, f"video_e2e_b{b}", "samples_per_s") for b in batches]
            wait = [_get(runs, f"video_e2e_b{b}", "data_wait_fraction") for b in batches]
        if not any(v is not None for v in loader + e2e):
            continue
        row(f"{source}: DALI loader samples/s", loader, ".1f")
        row(f"{source}: decoded frames/s (DALI loader)",
            [_get(runs, f"all_lmdb_b{b}", "results", "loader_dali", "frames_per_s") if source == "lmdb"
             else _get(runs, f"video_loader_b{b}", "frames_per_s") for b in batches], ".0f")
        row(f"{source}: loader speed-up DALI ÷ reference (PIL, same cores)",
            [_ratio(a, r) for a, r in zip(loader, ref)], ".2f", ">=5x")
        row(f"{source}: e2e samples/s", e2e, ".1f")
        row(f"{source}: compute-bound ratio e2e ÷ model", [_ratio(a, m) for a, m in zip(e2e, model)], ".3f",
            ">=0.95")
        row(f"{source}: data wait in e2e", wait, ".1%")
    row("reference loader samples/s (LMDB, PIL)", ref, ".1f")
    for name in sorted(n for n in runs if n.startswith("decode_roi_b")):
        roi, full = runs[name], runs.get(name.replace("roi", "full"))
        if not full:
            continue
        faster = "roi" if roi["samples_per_s"] >= full["samples_per_s"] else "full"
        gain = max(roi["samples_per_s"], full["samples_per_s"]) / min(roi["samples_per_s"], full["samples_per_s"])
        single(f"LMDB JPEG decode, loader at batch {roi['batch']}: roi / full samples/s",
               f"{roi['samples_per_s']:.1f} / {full['samples_per_s']:.1f}", f"faster: {faster} ({gain:.2f}x)")
    # model mode at the first batch: the precision / channels-last runs, and the --all run's model
    models = {}
    first = _get(runs, f"all_lmdb_b{batches[0]}", "results", "model") if batches else None
    for r in [first] + [r for name, r in sorted(runs.items()) if name.startswith("model_")]:
        if isinstance(r, dict) and "precision" in r:
            models.setdefault((r["precision"], r["channels_last"], r["batch"]), r)
    for r in (models[key] for key in sorted(models)):
        single(f"model {r['precision']}{' channels-last' if r['channels_last'] else ''}, batch {r['batch']}: "
               "samples/s", f"{r['samples_per_s']:.1f}")
    for key, engine, prefix in (("dec", "NVDEC", "video_"), ("jpg", "NVJPG", "all_lmdb_")):
        picked = [(name, u[key]) for name, u in util.items() if name.startswith(prefix) and u.get(key)]
        if picked:
            name, (mean, peak) = max(picked, key=lambda item: item[1][1])
            single(f"{engine} utilisation % (mean / max, busiest run: {name})", f"{mean:.0f} / {peak:.0f}")
    rss = [r.get("host_rss_mb") for r in runs.values() if isinstance(r, dict) and r.get("host_rss_mb")]
    if rss:
        single("host memory MB (largest run)", f"{max(rss):.0f}")
    return rows


def format_rows(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def gpu_check_summary(work: Path, out: Path) -> list[str]:
    """Read gpu_check.sh's results, write results.json and summary.txt into `out`, return
    the summary's lines (the headline table last)."""
    runs = {}
    for path in sorted(work.glob("*.json")):
        try:
            runs[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    marks = read_marks((work / "marks.txt").read_text()) if (work / "marks.txt").is_file() else {}
    samples = []
    for log in (out / "dmon.log", out / "smi_query.csv"):
        if log.is_file() and not samples:
            samples = parse_gpu_utilisation(log.read_text())
    util = {name: utilisation_between(samples, *span) for name, span in marks.items()} if samples else {}
    gpu = (out / "gpu.csv").read_text().splitlines()[1:] if (out / "gpu.csv").is_file() else []
    tests = (work / "pytest_gpu.txt").read_text().strip() if (work / "pytest_gpu.txt").is_file() else "not run"
    (out / "results.json").write_text(json.dumps({"gpu": gpu, "gpu_tests": tests, "runs": runs,
                                                  "utilisation": util, "marks": marks}, indent=2) + "\n")
    first = next((r for r in runs.values() if isinstance(r, dict) and "device" in r), {})
    lines = [f"GPU: {', '.join(gpu) or '?'}; device {first.get('device')}; DALI: {dali_version() or '?'}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"data: {_get(runs, 'all_lmdb_b' + str((check_batches(runs) or [0])[0]), 'data') or '-'}; "
             f"{_get(runs, 'video_loader_b' + str((check_batches(runs) or [0])[0]), 'data') or '-'}",
             f"pytest -m gpu: {tests}"]
    if util:
        lines += ["", "GPU utilisation per run, % mean/max (sm = SMs, dec = NVDEC, jpg = NVJPG; '-' not reported):"]
        cell = lambda v: "-" if v is None else f"{v[0]:.0f}/{v[1]:.0f}"  # noqa: E731
        lines += format_rows([("run", "sm", "dec", "jpg", "samples")]
                             + [(name, cell(u["sm"]), cell(u["dec"]), cell(u["jpg"]), str(u["samples"]))
                                for name, u in util.items()])
    lines += ["", *format_rows(gpu_check_rows(runs, util))]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check-summary"]:   # used by scripts/gpu_check.sh: gpu-check-summary WORK OUT
        if len(argv) != 3:
            print("usage: benchmark.py gpu-check-summary WORK_DIR OUT_DIR", file=sys.stderr)
            return 2
        print("\n".join(gpu_check_summary(Path(argv[1]), Path(argv[2]))))
        return 0
    args = parse_args(argv)
    try:
        cfg = load_benchmark_config(args)
        require_gpu_if_asked(args.device)
        json_path = Path(args.json) if args.json else default_json(args)
        with tempfile.TemporaryDirectory(prefix="cstp_benchmark_") as tmp:
            if args.all:
                summary = run_all(args, cfg, Path(tmp))
                results = list(summary["results"].values())
            else:
                summary = run_one(args, cfg, Path(tmp))
                results = [summary]
    except BenchmarkError as err:
        print(f"benchmark.py: {err}", file=sys.stderr)
        return 2
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(settings_line(results[-1]))
    print(f"data: {results[-1]['data'] or 'synthetic tensors on the device'}")
    print_table(results)
    for r in results:
        if r.get("soak_host_mb"):
            slope = r["soak_slope_mb_per_epoch"]
            print(f"soak: host MB after each of {r['soak_epochs']} epochs ({r['soak_steps_per_epoch']} steps each): "
                  + ", ".join(f"{m:.0f}" for m in r["soak_host_mb"])
                  + ("" if slope is None else f"; slope {slope:+.2f} MB/epoch"))
            if r.get("soak_anon_mb"):
                anon_slope = r["soak_anon_slope_mb_per_epoch"]
                print("      of which anonymous (heaps, DALI buffers): "
                      + ", ".join(f"{m:.0f}" for m in r["soak_anon_mb"])
                      + ("" if anon_slope is None else f"; slope {anon_slope:+.2f} MB/epoch")
                      + "; file-backed (LMDB map, libraries): " + ", ".join(f"{m:.0f}" for m in r["soak_file_mb"]))
    busy = [r["other_cpu_cores"] for r in results if busy_machine(r)]
    if busy:
        print(f"warning: other processes used up to {max(busy):.2f} of the {results[0]['cpu_count']} CPU cores "
              "during the timed steps, so these numbers are low")
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

"""Throughput of the DALI pretraining loader against the reference executor (PIL in
torch DataLoader workers, as the reference project loads data), on the same LMDB
with the same plans.

    python scripts/compare_loaders.py                     # builds an LMDB from real clips
    python scripts/compare_loaders.py --db path/to.lmdb   # or measures an existing one

Each configuration runs in its own process (fresh thread pools, no inherited
workers), iterates `--warmup` batches, then times `--batches` batches. Epoch
boundaries are crossed where the database is small (DALI resets its iterator,
the DataLoader forks new workers) and are part of what is timed, as in training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocessing.ffmpeg_tools import executable, locate  # noqa: E402 (after the path line)

REAL_CLIPS = REPO.parent / "shared" / "data" / "real-clips"
VIDEO_SUFFIXES = {".avi", ".mp4", ".mkv", ".webm", ".mov"}

# (name, executor, DALI python workers / DataLoader workers)
CONFIGS = (
    ("dali-cpu workers=0", "dali", 0),
    ("dali-cpu workers=2", "dali", 2),
    ("reference workers=2", "reference", 2),
)


# ---------------------------------------------------------------- the database


def decode_with_ffmpeg(video: Path, out_dir: Path, short_side: int) -> list[bytes]:
    out_dir.mkdir(parents=True)
    subprocess.run([executable("ffmpeg"), "-nostdin", "-loglevel", "error", "-i", str(video),
                    "-vf", f"scale=-2:{short_side}", "-q:v", "2", "-f", "image2", str(out_dir / "%05d.jpg")],
                   check=True, timeout=600)
    return [p.read_bytes() for p in sorted(out_dir.glob("*.jpg"))]


def frames_via_preprocessing(clips: Path, work: Path, short_side: int) -> list[list[bytes]] | None:
    """The project's own builder when it is there and works; None otherwise."""
    if not (REPO / "preprocessing" / "build_lmdb.py").exists():
        return None
    db = work / "built.lmdb"
    result = subprocess.run([sys.executable, "-m", "preprocessing", "build-lmdb", "--videos", str(clips),
                             "--out", str(db), "--short-side", str(short_side), "--quiet"],
                            cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"preprocessing build-lmdb failed ({result.returncode}); decoding with ffmpeg instead",
              file=sys.stderr)
        return None
    from pipelines.lmdb_store import LmdbFrameReader, read_metadata

    metas, _ = read_metadata(str(db))
    reader = LmdbFrameReader(str(db))
    return [[bytes(f) for f in reader.all_frames(i)] for i in range(len(metas))]


def real_clip_frames(clips: Path, work: Path, short_side: int) -> tuple[list[list[bytes]], str]:
    videos = frames_via_preprocessing(clips, work, short_side)
    if videos is not None:
        return videos, "preprocessing build-lmdb"
    paths = sorted(p for p in clips.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    return [decode_with_ffmpeg(p, work / "frames" / p.stem, short_side) for p in paths], "ffmpeg -q:v 2"


def synthetic_frames(short_side: int, count: int = 8, num_frames: int = 160) -> list[list[bytes]]:
    """Smooth moving noise, for machines without the real clips."""
    import numpy as np
    from PIL import Image

    from tests.lmdb_fixtures import encode_jpeg

    rng = np.random.default_rng(0)
    width = short_side * 4 // 3
    videos = []
    for _ in range(count):
        base = rng.integers(0, 255, size=(short_side // 16, width // 8, 3)).astype(np.uint8)
        frames = []
        for t in range(num_frames):
            shifted = np.roll(base, t // 4, axis=1)
            frames.append(encode_jpeg(np.asarray(Image.fromarray(shifted).resize((width, short_side),
                                                                                 Image.BICUBIC)), quality=90))
        videos.append(frames)
    return videos


def write_db(path: Path, videos: list[list[bytes]], copies: int):
    """Each video stored `copies` times, so that the timed batches need few epochs."""
    import lmdb

    from pipelines import lmdb_store as fmt

    names, metas = [], []
    total = sum(len(b) for v in videos for b in v) * copies
    env = lmdb.open(str(path), map_size=int(total * 1.5) + (64 << 20))
    with env.begin(write=True) as txn:
        for copy in range(copies):
            for v, frames in enumerate(videos):
                vid = copy * len(videos) + v
                height, width = fmt.jpeg_size(frames[0])
                names.append(f"clips/video{v:03d}_copy{copy:02d}")
                metas.append(fmt.VideoMeta(names[-1], 0, len(frames), height, width).to_dict())
                for key, value in fmt.layout_entries(vid, frames):
                    txn.put(key, value)
        txn.put(fmt.KEYS_KEY, fmt.pack([fmt.video_key(i) for i in range(len(names))]))
        txn.put(fmt.LEN_KEY, fmt.pack(len(names)))
        txn.put(fmt.ORDER_KEY, fmt.pack(names))
        txn.put(fmt.VLEN_KEY, fmt.pack([m["frames"] for m in metas]))
        txn.put(fmt.META_KEY, fmt.pack(metas))
        txn.put(fmt.CLASSES_KEY, fmt.pack(["clips"]))
        txn.put(fmt.INFO_KEY, fmt.pack({"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION}))
    env.close()


def build_db(args, work: Path) -> tuple[Path, str]:
    if REAL_CLIPS.is_dir() and locate("ffmpeg"):
        videos, builder = real_clip_frames(REAL_CLIPS, work, args.short_side)
        origin = f"real clips in {REAL_CLIPS} (frames by {builder})"
    else:
        videos, origin = synthetic_frames(args.short_side), "synthetic frames (no real clips found)"
    samples_needed = (args.warmup + args.batches) * args.batch
    copies = args.copies or -(-samples_needed // len(videos))  # ceil: one epoch covers the run
    db = work / "bench.lmdb"
    write_db(db, videos, copies)
    frames = sum(len(v) for v in videos)
    return db, f"{origin}: {len(videos)} videos, {frames} frames, short side {args.short_side}, ×{copies} copies"


# ---------------------------------------------------------------- one measurement


def endless_batches(loader):
    while True:
        yield from loader


def measure(db: str, executor: str, workers: int, args) -> dict:
    from pipelines.loader import LoaderSettings
    from pipelines.plan import PlanConfig

    settings = LoaderSettings(batch_size=args.batch, num_threads=args.threads, workers=workers, seed=args.seed)
    cfg = PlanConfig(frames=args.frames, crop_size=args.crop)
    if executor == "dali":
        from pipelines.loader import PretrainLoader
        loader = PretrainLoader(db, cfg, settings, device="cpu")
    else:
        from pipelines.reference_executor import ReferencePretrainLoader
        loader = ReferencePretrainLoader(db, cfg, settings)
    batches = endless_batches(loader)
    for _ in range(args.warmup):
        next(batches)
    start = time.perf_counter()
    seen = []
    for _ in range(args.batches):
        seen += next(batches)["video_index"].tolist()
    elapsed = time.perf_counter() - start
    batches.close()
    loader.close()
    return dict(seconds=elapsed, samples_per_s=args.batches * args.batch / elapsed, first_videos=seen[:8])


def run_isolated(db: Path, executor: str, workers: int, args) -> dict:
    """One configuration in a child process; it prints one JSON line."""
    cmd = [sys.executable, __file__, "--db", str(db), "--measure-one", f"{executor}:{workers}",
           "--batch", str(args.batch), "--frames", str(args.frames), "--crop", str(args.crop),
           "--batches", str(args.batches), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--seed", str(args.seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------- main


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", help="an existing LMDB of JPEG frames (default: build one from real clips)")
    p.add_argument("--short-side", type=int, default=256, help="frame short side when building (UCF: 256)")
    p.add_argument("--copies", type=int, default=0, help="store each clip N times (default: enough for one epoch)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--batches", type=int, default=30, help="timed batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="DALI CPU threads")
    p.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best is reported")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--measure-one", help=argparse.SUPPRESS)
    return p.parse_args()


def main():
    args = parse_args()
    if args.measure_one:
        executor, workers = args.measure_one.split(":")
        print(json.dumps(measure(args.db, executor, int(workers), args)))
        return
    with tempfile.TemporaryDirectory(prefix="compare_loaders_") as tmp:
        if args.db:
            db, origin = Path(args.db), f"existing LMDB {args.db}"
        else:
            db, origin = build_db(args, Path(tmp))
        print(f"data: {origin}")
        print(f"batch {args.batch}, {args.frames} frames, {args.crop} px, {args.warmup} warm-up + "
              f"{args.batches} timed batches, DALI device cpu, {args.threads} DALI threads\n")
        results = {}
        for name, executor, workers in CONFIGS:
            runs = [run_isolated(db, executor, workers, args) for _ in range(args.repeats)]
            results[name] = max(runs, key=lambda r: r["samples_per_s"])
            if len({tuple(r["first_videos"]) for r in results.values()}) != 1:
                raise SystemExit("the loaders did not read the same videos: plans or shards differ")
        reference = results["reference workers=2"]["samples_per_s"]
        print(f"{'loader':<22}{'samples/s':>10}{'s / batch':>11}{'vs reference':>14}")
        for name, r in results.items():
            print(f"{name:<22}{r['samples_per_s']:>10.1f}{r['seconds'] / args.batches:>11.3f}"
                  f"{r['samples_per_s'] / reference:>13.2f}×")


if __name__ == "__main__":
    main()

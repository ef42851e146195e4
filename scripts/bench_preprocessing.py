"""Benchmark: our `build-lmdb` against the reference project's route to an LMDB.

    python scripts/bench_preprocessing.py --videos 24 --workers 2 --footage ../shared/data/real-clips

Makes N clips like Kinetics-400's (10 s, 30 fps, short side 320, H.264): cut from
the real videos in --footage (looped to length), or without it a test pattern
plus per-frame noise. Then times, on the same clips and the same number of
worker processes:

  ours       python -m preprocessing build-lmdb --short-side 320 --fps 30 [--encoder E]
             (one ffmpeg per video decodes; with the default turbo encoder it hands
             raw YUV frames to the worker, which encodes them with libjpeg-turbo at
             quality 94; the main process writes each video into the LMDB)
  reference  the reference's two steps (docs/data.md#reference-lmdb-layout): `extract_frames_kin.py`,
             i.e. per video ffprobe for the size, then
             `ffmpeg -i V -r 30 -q:v 2 -vf scale=-1:320 DIR/%05d.jpg` (a pool of W
             processes), then `make_lmdb_kin.py`, one process that reads every
             JPEG file back and writes msgpack lists into an LMDB, committing per
             class. (Its missing map_size is given here, or it could not run.)

Reports wall time, videos/s per core (videos / seconds / workers) and the ratio,
each database's size and how faithful its frames are (RGB PSNR against the
source decoded at the same size, on a sample of frames), and checks that both
databases hold the same number of frames per video. With
--cold the reference's packer reads the JPEG files from disk (they are evicted
from the page cache first, untimed), as it must at Kinetics scale. Both
routes run back to back in one run (--repeats alternates their order); on a
shared machine the numbers move with the load, so say what else was running.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import lmdb
import msgpack

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's preprocessing/, whatever is installed

from preprocessing.ffmpeg_tools import executable  # noqa: E402 (after the path line)


# --------------------------------------------------------------------------- clips

def make_clip(path: Path, seconds: float, short_side: int, fps: int, seed: int) -> None:
    width = (short_side * 16 // 9) // 2 * 2
    source = f"testsrc2=size={width}x{short_side}:rate={fps}:duration={seconds}"
    # Temporal noise: frames that do not compress to nothing, like camera footage.
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi",
                    "-i", source, "-vf", f"noise=alls=12:allf=t+u:all_seed={seed},hue=H={seed}*0.7",
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
                    "-movflags", "+faststart", str(path)], check=True)


def make_clip_from_footage(path: Path, seconds: float, short_side: int, fps: int, source: str) -> None:
    """A clip like Kinetics-400's cut from real footage: looped to `seconds`, short side
    `short_side` (even long side), `fps`, H.264 yuv420p, no audio."""
    # Looped with the loop filter after resampling (not -stream_loop, which never ends on
    # AVIs with packed B-frames), then stamped afresh at `fps`.
    scale = f"scale='if(gte(iw,ih),-2,{short_side})':'if(gte(iw,ih),{short_side},-2)'"
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", source, "-an",
                    "-vf", f"fps={fps},{scale},loop=loop=-1:size=32767:start=0,setpts=N/{fps}/TB",
                    "-frames:v", str(int(round(seconds * fps))),
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-pix_fmt", "yuv420p",
                    "-movflags", "+faststart", str(path)], check=True)


def make_clips(root: Path, n: int, seconds: float, short_side: int, fps: int, workers: int,
               footage: list[str] | None = None) -> list[Path]:
    jobs = []
    for i in range(n):
        path = root / f"class_{i % 4}" / f"clip_{i:04d}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        last = footage[i % len(footage)] if footage else i + 1
        jobs.append((path, seconds, short_side, fps, last))
    with Pool(workers) as pool:
        pool.starmap(make_clip_from_footage if footage else make_clip, jobs)
    return [job[0] for job in jobs]


def find_footage(folder: str) -> list[str]:
    found = sorted(str(p) for p in Path(folder).iterdir()
                   if p.suffix.lower() in {".mp4", ".mkv", ".avi", ".webm", ".mov"})
    if not found:
        raise SystemExit(f"--footage {folder}: no video files there")
    return found


# --------------------------------------------------------------------------- ours

def run_ours(videos: Path, out: Path, short_side: int, fps: int, workers: int, encoder: str) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "preprocessing", "build-lmdb", "--videos", str(videos), "--out", str(out),
                    "--short-side", str(short_side), "--fps", str(fps), "--workers", str(workers),
                    "--encoder", encoder,
                    "--quiet"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return dict(seconds=time.perf_counter() - started)


# --------------------------------------------------------------------------- the reference's route

def extract_one(job) -> None:
    """utils_dir/extract_frames_kin.py, per video: ffprobe the size, then ffmpeg to %05d.jpg files."""
    video, out_dir, short_side, fps = job
    probe = subprocess.run([executable("ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_entries",
                            "stream=width,height", "-of", "csv=p=0", video], capture_output=True, text=True,
                           check=True)
    width, height = (int(x) for x in probe.stdout.strip().split(",")[:2])
    scale = f"-1:{short_side}" if width >= height else f"{short_side}:-1"
    os.makedirs(out_dir, exist_ok=True)
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", video,
                    "-r", str(fps), "-q:v", "2", "-vf", f"scale={scale}", os.path.join(out_dir, "%05d.jpg")],
                   check=True)
    Path(out_dir, "done").touch()


def pack_frames(frame_root: Path, db_path: Path, map_size: int) -> None:
    """utils_dir/make_lmdb_kin.py (after CoCLR): one process reads each video's JPEG files in
    sorted order and stores msgpack(list of raw bytes) under %09d; commits per class."""
    import random

    video_list = sorted(os.path.relpath(p, frame_root) for p in glob.glob(str(frame_root / "*" / "*")))
    random.seed(0)
    random.shuffle(video_list)
    ids = {name: i for i, name in enumerate(video_list)}
    env = lmdb.open(str(db_path), map_size=map_size)
    keys, vlen = [], []
    for class_dir in sorted(glob.glob(str(frame_root / "*"))):
        txn = env.begin(write=True)
        for video_dir in sorted(glob.glob(os.path.join(class_dir, "*"))):
            name = os.path.relpath(video_dir, frame_root)
            frames = []
            for jpg in sorted(glob.glob(os.path.join(video_dir, "*.jpg"))):
                with open(jpg, "rb") as handle:
                    frames.append(handle.read())
            key = ("%09d" % ids[name]).encode("ascii")
            txn.put(key, msgpack.dumps(frames))
            keys.append(key)
            vlen.append(len(frames))
        txn.commit()
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", msgpack.dumps(keys))
        txn.put(b"__len__", msgpack.dumps(len(keys)))
        txn.put(b"__order__", msgpack.dumps(video_list))
        txn.put(b"__vlen__", msgpack.dumps(vlen))
    env.sync()
    env.close()


def evict_from_page_cache(frame_root: Path) -> None:
    """Write the JPEG files to disk and drop them from the page cache (only these files),
    so the packer reads them from disk as it must when a dataset's frames exceed RAM
    (Kinetics-400 at 320 px, q 2: about 2 TB of JPEG files)."""
    for path in frame_root.rglob("*.jpg"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_reference(videos: Path, clips: list[Path], work: Path, out: Path, short_side: int, fps: int,
                  workers: int, cold: bool) -> dict:
    frame_root = work / "frames"
    jobs = [(str(clip), str(frame_root / clip.parent.name / clip.stem), short_side, fps) for clip in clips]
    started = time.perf_counter()
    with Pool(workers) as pool:
        pool.map(extract_one, jobs, chunksize=1)
    extracted = time.perf_counter()
    if cold:  # not counted in the reference's time (its writeback would overlap the extraction)
        evict_from_page_cache(frame_root)
    pack_started = time.perf_counter()
    pack_frames(frame_root, out, map_size=64 << 30)
    finished = time.perf_counter()
    jpeg_files = sum(1 for _ in frame_root.rglob("*.jpg"))
    jpeg_bytes = sum(p.stat().st_size for p in frame_root.rglob("*.jpg"))
    shutil.rmtree(frame_root)
    return dict(seconds=(extracted - started) + (finished - pack_started), extract_seconds=extracted - started,
                pack_seconds=finished - pack_started, jpeg_files=jpeg_files, jpeg_bytes=jpeg_bytes)


# --------------------------------------------------------------------------- checks and report

def read_video_frames(txn, entry: int) -> list:
    """A video's frames from our LMDB, in either layout (this checkout's reader)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from pipelines.lmdb_store import read_video_frames as read

    return read(txn, entry)


def fidelity_psnr(db: Path, clips: list[Path], short_side: int, fps: int, every: int = 15, videos: int = 4) -> float:
    """RGB PSNR (dB) of the database's frames against the source decoded by ffmpeg at
    the same size and rate, over every `every`-th frame of the first `videos` clips:
    how faithful the stored JPEGs are, whichever encoder made them."""
    import io

    import numpy as np
    from PIL import Image

    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        order = [str(n) for n in msgpack.loads(txn.get(b"__order__"), raw=False)]
        errors = []
        for clip in clips[:videos]:
            index = next(i for i, name in enumerate(order) if name.split("/")[-1] == clip.stem)
            jpegs = [bytes(f) for f in read_video_frames(txn, index)]   # either LMDB layout
            first = Image.open(io.BytesIO(jpegs[0]))
            width, height = first.size
            raw = subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin",
                                  "-i", str(clip), "-vf", f"fps={fps},scale={width}:{height}", "-pix_fmt", "rgb24",
                                  "-f", "rawvideo", "-"], capture_output=True, check=True).stdout
            truth = np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)
            for i in range(0, min(len(jpegs), len(truth)), every):
                stored = np.asarray(Image.open(io.BytesIO(jpegs[i])).convert("RGB"), dtype=np.float64)
                errors.append(np.mean((stored - truth[i]) ** 2))
    env.close()
    return float(10 * np.log10(255 ** 2 / np.mean(errors)))


def frames_per_video(db: Path) -> dict[str, int]:
    env = lmdb.open(str(db), readonly=True, lock=False)
    with env.begin() as txn:
        order = msgpack.loads(txn.get(b"__order__"), raw=False)
        result = {}
        for i, name in enumerate(order):
            result[str(name)] = len(read_video_frames(txn, i))
    env.close()
    return result


def machine() -> str:
    try:
        load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, load average {load} (1/5/15 min) at the start"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8, help="number of clips (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both routes (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=10, help="clip length (default: %(default)s)")
    parser.add_argument("--short-side", type=int, default=320, help="clip and output short side (default: %(default)s)")
    parser.add_argument("--fps", type=int, default=30, help="clip and output frame rate (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed runs of each route, alternating which goes first (default: %(default)s)")
    parser.add_argument("--cold", action="store_true",
                        help="the reference's packer reads its JPEG files from disk, not from the page cache, as "
                             "on a dataset whose frames exceed RAM (eviction time is not counted)")
    parser.add_argument("--encoder", choices=("turbo", "ffmpeg"), default="turbo",
                        help="our build-lmdb's JPEG encoder, at its default quality (default: %(default)s)")
    parser.add_argument("--footage", metavar="DIR",
                        help="cut the clips from the real videos in DIR (looped to --seconds, scaled, re-encoded; "
                             "e.g. ../shared/data/real-clips) instead of a noisy test pattern")
    parser.add_argument("--work", help="scratch folder (default: a new temporary folder, deleted at the end)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_preprocessing_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"machine: {machine()}")
        videos = work / "videos"
        started = time.perf_counter()
        footage = find_footage(args.footage) if args.footage else None
        clips = make_clips(videos, args.videos, args.seconds, args.short_side, args.fps, args.workers, footage)
        size = sum(c.stat().st_size for c in clips)
        origin = f"cut from {len(footage)} real videos in {args.footage}" if footage else "noisy test pattern"
        print(f"clips ({origin}): {len(clips)} x {args.seconds:g} s, {args.fps} fps, short side {args.short_side}, "
              f"{size / len(clips) / 1e6:.2f} MB each (made in {time.perf_counter() - started:.1f} s)")

        runs = {"ours": [], "reference": []}
        for repeat in range(args.repeats):
            order = ["ours", "reference"] if repeat % 2 == 0 else ["reference", "ours"]
            for route in order:
                out = work / f"{route}_{repeat}.lmdb"
                if route == "ours":
                    result = run_ours(videos, out, args.short_side, args.fps, args.workers, args.encoder)
                else:
                    result = run_reference(videos, clips, work, out, args.short_side, args.fps, args.workers,
                                           args.cold)
                result["frames"] = frames_per_video(out)
                if repeat == 0:
                    result["psnr_db"] = fidelity_psnr(out, clips, args.short_side, args.fps)
                result["db_bytes"] = sum(p.stat().st_size for p in out.rglob("data.mdb"))
                runs[route].append(result)
                extra = (f" (extract {result['extract_seconds']:.2f} s + pack {result['pack_seconds']:.2f} s"
                         f"{' from disk' if args.cold else ''}, {result['jpeg_files']} JPEG files, "
                         f"{result['jpeg_bytes'] / 1e6:.1f} MB)" if route == "reference" else "")
                print(f"run {repeat + 1} {route:9s}: {result['seconds']:.2f} s{extra}, "
                      f"DB {result['db_bytes'] / 1e6:.1f} MB")
                shutil.rmtree(out)

        ours_frames = {k.split("/")[-1]: v for k, v in runs["ours"][0]["frames"].items()}
        ref_frames = {k.split("/")[-1]: v for k, v in runs["reference"][0]["frames"].items()}
        same = ours_frames == ref_frames
        summary = {}
        for route, results in runs.items():
            seconds = statistics.median(r["seconds"] for r in results)
            summary[route] = dict(seconds=seconds, videos_per_s_per_core=args.videos / seconds / args.workers,
                                  runs=[round(r["seconds"], 3) for r in results], db_bytes=results[0]["db_bytes"],
                                  psnr_db=results[0]["psnr_db"])
        ratio = summary["ours"]["videos_per_s_per_core"] / summary["reference"]["videos_per_s_per_core"]
        print(f"frames per video identical in both databases: {same} "
              f"({sum(ours_frames.values())} frames in all)")
        for route in ("ours", "reference"):
            s = summary[route]
            print(f"{route:9s}: {s['videos_per_s_per_core']:.3f} videos/s per core "
                  f"(median {s['seconds']:.2f} s over {len(s['runs'])} run(s), {args.workers} workers); "
                  f"DB {s['db_bytes'] / 1e6:.1f} MB, frames vs source {s['psnr_db']:.2f} dB PSNR")
        print(f"ratio ours / reference: {ratio:.2f}x")
        if args.json:
            Path(args.json).write_text(json.dumps(dict(machine=machine(), args=vars(args), summary=summary,
                                                       ratio=ratio, frames_identical=same), indent=1) + "\n")
        return 0 if same else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""`index-videos`: the index the video-file data path reads (pipelines/video_source.py).

Every video is probed and its frames counted by decoding it once with ffprobe
(`-count_frames`), so the index holds exact frame counts (container headers are
often wrong) and a file that cannot be decoded to the end is reported, not indexed (at
run time each of its samples would cost a pipeline rebuild, pipelines/faults.py). Each
entry records the file's size and mtime_ns: readers refuse files changed since.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines import lmdb_store
from pipelines.faults import file_stamp
from pipelines.video_source import VIDEO_INDEX_FORMAT

from .build_lmdb import plan_build
from .ffmpeg_io import VideoError, probe_video, summarize_stderr
from .ffmpeg_tools import executable
from .probe import bit_depth_of, chroma_of

COUNT_TIMEOUT_S = 600


def count_decoded_frames(path: str, stream_index: int) -> int:
    """Frames ffmpeg decodes from the stream; VideoError if decoding reports errors."""
    args = [executable("ffprobe"), "-v", "error", "-select_streams", str(stream_index), "-count_frames",
            "-show_entries", "stream=nb_read_frames", "-of", "json", str(Path(path).absolute())]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=COUNT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VideoError(path, f"counting frames took over {COUNT_TIMEOUT_S} s") from None
    if proc.returncode != 0 or proc.stderr.strip():
        raise VideoError(path, "decoding reports errors: " + (summarize_stderr(proc.stderr, path) or "unknown"))
    try:
        frames = int(json.loads(proc.stdout)["streams"][0]["nb_read_frames"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise VideoError(path, "ffprobe did not report a frame count") from None
    if frames <= 0:
        raise VideoError(path, "no decodable frames")
    if frames > lmdb_store.MAX_FRAMES_PER_VIDEO:
        # The index's readers refuse a record over this bound, and with it the whole index:
        # skip the one video here instead of writing an index that no run can open.
        raise VideoError(path, f"{frames} frames, more than {lmdb_store.MAX_FRAMES_PER_VIDEO} per video: "
                               "split it into shorter files (ffmpeg -f segment) and index those")
    return frames


def index_one(job) -> dict:
    try:
        info = probe_video(job.file)
        if info["rotation"]:
            raise VideoError(job.file, f"rotation metadata ({info['rotation']} deg): DALI's decoder does not "
                                       "apply it; transcode or build an LMDB instead")
        stamp = file_stamp(job.file)   # before decoding: a file changed meanwhile then fails at open
        frames = count_decoded_frames(job.file, info["stream_index"])
    except OSError as err:
        return {"file": job.source, "reason": f"cannot read it ({err})"}
    except VideoError as err:
        return {"file": job.source, "reason": err.reason}
    return {"name": job.name, "file": job.source, "label": job.label, "frames": frames,
            "height": info["height"], "width": info["width"], "fps": info["fps"], "codec": info["codec"],
            **stream_format(info),
            **stamp}  # size, mtime_ns: readers refuse the file once it changes (pipelines/faults.py)


def stream_format(info: dict) -> dict:
    """What the GPU path checks against NVDEC's limits before training (video_source.nvdec_problem)."""
    pix_fmt = info.get("pix_fmt") or ""
    try:
        depth = int(info.get("bits_per_raw_sample") or 0) or bit_depth_of(pix_fmt)
    except ValueError:
        depth = bit_depth_of(pix_fmt)
    return {"pix_fmt": pix_fmt, "chroma": chroma_of(pix_fmt), "bit_depth": depth, "profile": info.get("profile") or ""}


def index_videos(videos_dir, out_path, list_file=None, workers: int = 4, progress: bool = True) -> dict:
    start = time.perf_counter()
    plan = plan_build(videos_dir, list_file)
    results = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # each job is an ffprobe subprocess
        iterator = pool.map(index_one, plan.jobs)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, total=len(plan.jobs), unit="video", desc="index-videos")
        results = list(iterator)
    videos = [r for r in results if "reason" not in r]
    failed = [{"file": f.job.source, "reason": f.reason} for f in plan.failed] + \
        [r for r in results if "reason" in r]
    index = {"format": VIDEO_INDEX_FORMAT, "version": 2, "root": str(Path(videos_dir).absolute()),
             "classes": plan.classes, "videos": videos, "failed": failed,
             "seconds": round(time.perf_counter() - start, 2)}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(out)
    return index

"""Full-decode checks of a dataset, offline, in parallel, with a blocklist of the damaged
videos as their result (`verify --db DB --decode`, `index-videos --verify`).

The blocklist (`path<TAB>reason` lines, pipelines/faults.py) is honoured by build-lmdb
(--blocklist), train.py and finetune.py (data.blocklist) and evaluate.py (--blocklist):
a listed video is never read; the sample that would have read it is replaced.

LMDB: every frame of every video passes lmdb_store.jpeg_problem and decodes whole with
PIL (libjpeg-turbo, which refuses damaged Huffman tables, bad markers and broken data
streams: a superset of what DALI's CPU decoder rejected in our tests).
Video index: every file is decoded to the end once by ffprobe (-count_frames), must
decode without errors, give the indexed frame count and be unchanged since indexing.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ThreadPoolExecutor

from pipelines.faults import stamp_problem, write_blocklist
from pipelines.lmdb_store import LmdbFormatError, jpeg_problem, read_metadata, read_video_frames, shared_env

from .verify import decode_problem

MAX_FRAMES_NAMED = 3


def _check_video(job) -> tuple[int, str | None]:
    """(video id, why it is damaged or None). Runs in a worker process."""
    db_path, video_id, height, width = job
    try:
        with shared_env(db_path).begin(buffers=False) as txn:   # either layout (lmdb_store)
            frames = read_video_frames(txn, video_id)
    except KeyError:
        return video_id, "entry missing"
    except LmdbFormatError as err:
        return video_id, str(err)
    if not frames:
        return video_id, "entry holds no frames"
    bad = []
    for i, jpeg in enumerate(frames):
        why = (jpeg_problem(jpeg, height, width) if isinstance(jpeg, bytes) else "not bytes") or decode_problem(jpeg)
        if why:
            bad.append(f"frame {i}: {why}")
    if not bad:
        return video_id, None
    more = f" (+{len(bad) - MAX_FRAMES_NAMED} more frames)" if len(bad) > MAX_FRAMES_NAMED else ""
    return video_id, "; ".join(bad[:MAX_FRAMES_NAMED]) + more


def decode_check_lmdb(db_path: str, workers: int = 2, progress: bool = True) -> list[dict]:
    """[{video, name, entry, problem}] for every video with a frame that does not decode."""
    db_path = str(db_path)
    metas, _ = read_metadata(db_path)
    jobs = [(db_path, m.key if m.key >= 0 else i, m.height, m.width) for i, m in enumerate(metas)]
    by_entry = {job[1]: i for i, job in enumerate(jobs)}
    placeholders = [(job[1], metas[i].problem) for i, job in enumerate(jobs) if metas[i].problem]
    jobs = [job for i, job in enumerate(jobs) if not metas[i].problem]   # nothing to check them against
    # fork: workers open the database themselves (shared_env reopens it after a fork)
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        results = pool.imap_unordered(_check_video, jobs, chunksize=4)
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(jobs), unit="video", desc="decode", dynamic_ncols=True)
        damaged = placeholders + [(entry, why) for entry, why in results if why]
    out = []
    for entry, why in sorted(damaged):
        meta = metas[by_entry[entry]]
        out.append(dict(video=by_entry[entry], name=meta.name, entry=meta.source or meta.name, problem=why))
    return out


def decode_check_index(index_path: str, workers: int = 4, progress: bool = True) -> list[dict]:
    """[{video, name, entry, problem}] for every indexed file that changed since indexing,
    does not decode to the end without errors, or decodes to another frame count."""
    from pathlib import Path

    from pipelines.video_source import load_video_index_json, video_stamps

    from .ffmpeg_io import VideoError, probe_video
    from .index_videos import count_decoded_frames

    index = load_video_index_json(index_path)
    root = Path(index.get("root", Path(index_path).parent))
    if not root.is_absolute():
        root = Path(index_path).parent / root
    stamps = video_stamps(index)

    def check(i: int) -> str | None:
        v = index["videos"][i]
        file = str(root / v["file"])
        if not os.path.exists(file):
            return "file not found"
        changed = stamp_problem(file, stamps[i])
        if changed:
            return f"the file {changed}"
        try:
            frames = count_decoded_frames(file, probe_video(file)["stream_index"])
        except VideoError as err:
            return err.reason
        if frames != int(v["frames"]):
            return f"{frames} frames decode, the index says {v['frames']}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:   # each check is an ffprobe subprocess
        results = pool.map(check, range(len(index["videos"])))
        if progress:
            from tqdm import tqdm
            results = tqdm(results, total=len(index["videos"]), unit="video", desc="decode", dynamic_ncols=True)
        problems = list(results)
    return [dict(video=i, name=v["name"], entry=v["file"], problem=why)
            for i, (v, why) in enumerate(zip(index["videos"], problems)) if why]


def write_damaged_blocklist(path, damaged: list[dict]) -> None:
    write_blocklist(path, [(d["entry"], d["problem"]) for d in damaged])


def default_blocklist_path(data_path: str) -> str:
    return str(data_path).rstrip("/") + ".blocklist.txt"

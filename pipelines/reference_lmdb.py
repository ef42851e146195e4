"""Reading LMDBs built by the reference project (`utils_dir/make_lmdb_kin.py`,
docs/data.md#reference-lmdb-layout) through the reference's own list files (docs/data.md#list-formats).

Such a database has only `__keys__`, `__len__`, `__order__` and `__vlen__`: video i
is entry `%09d` % i, named `__order__[i]` ("<class>/<video>", no extension), in an
order shuffled at build time (`__vlen__` is in class order, not id order, so it is
not used). Labels and frame counts live in the list files:

    UCF101 / HMDB51   "<Class>/<video>.avi <label> <frames>"        single spaces
    Kinetics-400      "val/<class>/<id>.mp4  <label>  <frames>"     two spaces

The reference loader strips the extension but keeps a "train/"/"val/" prefix
that `__order__` lacks (docs/data.md#reference-lmdb-layout); here a name matches
with or without that prefix. Reading a video's metadata touches only the msgpack
header and the first frame's JPEG header, never the whole entry: a Kinetics LMDB
holds 240k videos and ~350 GB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

from .lmdb_store import (KEYS_KEY, MAX_FRAMES_PER_VIDEO, MAX_LABEL, ORDER_KEY, LmdbFormatError, VideoMeta, frame_key,
                         header_frames, jpeg_size, placeholder_problem, shared_env, unpack, video_key)

log = logging.getLogger(__name__)

SPLIT_PREFIXES = ("train/", "val/", "valid/", "validation/", "test/")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v", ".flv")
MAX_LIST_LINES = 10_000_000


class ReferenceListError(ValueError):
    """A list file that is not in one of the reference's formats."""


def canonical_name(name: str) -> str:
    """"val/<class>/<id>.mp4" and "<class>/<id>" both become "<class>/<id>"."""
    name = name.strip().replace("\\", "/")
    for prefix in SPLIT_PREFIXES:
        if name.startswith(prefix) and name.count("/") >= 2:
            name = name[len(prefix):]
            break
    root, ext = os.path.splitext(name)
    return root if ext.lower() in VIDEO_EXTENSIONS else name


def parse_list_line(line: str) -> tuple[str, int, int | None]:
    """(name, label, frames or None) of one line in any of the reference's list formats.
    The label and the frame count are the last fields, so names may hold spaces."""
    fields = line.rstrip("\n").rsplit(None, 2)
    if len(fields) == 3 and fields[1].lstrip("-").isdigit() and fields[2].isdigit():
        return fields[0].strip(), int(fields[1]), int(fields[2])
    fields = line.rstrip("\n").rsplit(None, 1)
    if len(fields) == 2 and fields[1].lstrip("-").isdigit():
        return fields[0].strip(), int(fields[1]), None
    raise ReferenceListError(f"expected '<name> <label> [<frames>]', got {line.strip()!r}")


def checked_list_line(line: str) -> tuple[str, int, int | None]:
    """parse_list_line, with the label in [0, MAX_LABEL] and a frame count >= 1."""
    name, label, frames = parse_list_line(line)
    if not 0 <= label <= MAX_LABEL:
        raise ReferenceListError(f"label {label} is not in [0, {MAX_LABEL}]")
    if frames is not None and not 1 <= frames <= MAX_FRAMES_PER_VIDEO:
        raise ReferenceListError(f"frame count {frames} is not in [1, {MAX_FRAMES_PER_VIDEO}]")
    return name, label, frames


def read_reference_list(path: str | Path) -> list[tuple[str, int, int | None]]:
    entries = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if number > MAX_LIST_LINES:
                raise ReferenceListError(f"{path}: more than {MAX_LIST_LINES} lines")
            if not line.strip():
                continue
            try:
                entries.append(checked_list_line(line))
            except ReferenceListError as err:
                raise ReferenceListError(f"{path}, line {number}: {err}") from None
    if not entries:
        raise ReferenceListError(f"{path} lists no videos")
    return entries


def entry_header(txn, entry: int) -> tuple[int, int, int] | str:
    """(frames, height, width) of an LMDB entry from its msgpack array header (or
    version 2 video header) and its first frame's JPEG header; when the entry is missing
    or unreadable, why (a str), which a placeholder carries as VideoMeta.problem: the
    readers' skip message and verify --decode then say what is wrong with the entry,
    not that a video has 0 frames and size 0x0."""
    key = video_key(entry).decode()
    raw = txn.get(video_key(entry))
    if raw is None:
        return placeholder_problem(f"its LMDB entry {key} is missing")
    try:
        frames = header_frames(raw)
        if frames is not None:   # a converted reference LMDB: the header, then frame 0's JPEG header
            first = txn.get(frame_key(entry, 0)) if frames else None
            if first is None:
                return placeholder_problem(f"its LMDB entry {key} has no frame 0" if frames else
                                                f"its LMDB entry {key} holds no frames")
            return (frames, *jpeg_size(first))
    except (LmdbFormatError, ValueError) as err:
        return placeholder_problem(f"its LMDB entry {key} is malformed ({err})")
    try:
        # raw=True: frames packed as msgpack str by old msgpack versions come back as bytes too.
        unpacker = msgpack.Unpacker(raw=True, max_buffer_size=len(raw))
        unpacker.feed(raw)
        frames = unpacker.read_array_header()
        if not 0 < frames <= MAX_FRAMES_PER_VIDEO:
            return placeholder_problem(f"its LMDB entry {key} holds {frames} frames, not 1 to "
                                            f"{MAX_FRAMES_PER_VIDEO}")
        height, width = jpeg_size(bytes(unpacker.unpack()))
    except Exception as err:  # noqa: BLE001 - msgpack and PIL raise several kinds for foreign data
        return placeholder_problem(f"its LMDB entry {key} could not be decoded as a msgpack list of JPEG "
                                        f"frames ({type(err).__name__}: {err})")
    return frames, height, width


def order_names(txn, path: str) -> list[str]:
    raw_order, raw_keys = txn.get(ORDER_KEY), txn.get(KEYS_KEY)
    if raw_order is None or raw_keys is None:
        raise LmdbFormatError(f"{path}: no {ORDER_KEY!r}/{KEYS_KEY!r} entries; not a video-frame LMDB")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in unpack(raw_order)]


def metadata_without_list(txn, path: str) -> tuple[list[VideoMeta], list[str]]:
    """Every video of a reference LMDB, labelled by its class folder in sorted order
    (pretraining needs no labels; finetuning should pass the list file)."""
    names = order_names(txn, path)
    classes = sorted({n.split("/")[0] for n in names if "/" in n})
    class_index = {c: i for i, c in enumerate(classes)}
    metas = []
    for entry, name in enumerate(names):
        header = entry_header(txn, entry)
        # An unreadable entry keeps its id as a placeholder (no frames, no size, its reason
        # as problem) that every reader skips, as read_metadata does for a malformed __meta__ record.
        frames, height, width = (0, 0, 0) if isinstance(header, str) else header
        metas.append(VideoMeta(name=name, label=class_index.get(name.split("/")[0], -1),
                               frames=frames, height=height, width=width,
                               problem=header if isinstance(header, str) else ""))
    return metas, classes


def metadata_from_list(db_path: str, list_path: str | Path) -> tuple[list[VideoMeta], list[str]]:
    """The videos of `list_path`, in list order, found in a reference LMDB by name.

    Listed videos that the database lacks, or whose entry cannot be read, are left out
    with one warning naming a few of them; a list that matches nothing is refused.
    The frame count is the smaller of the list's and the entry's (they can differ by
    one when frames were re-extracted)."""
    entries = read_reference_list(list_path)
    with shared_env(db_path).begin(buffers=True) as txn:
        names = order_names(txn, db_path)
        entry_of = {canonical_name(n): i for i, n in enumerate(names)}
        metas, missing, unreadable = [], [], []
        for name, label, listed_frames in entries:
            entry = entry_of.get(canonical_name(name))
            if entry is None:
                missing.append(name)
                continue
            header = entry_header(txn, entry)
            if isinstance(header, str):
                unreadable.append(name)
                continue
            frames, height, width = header
            if listed_frames is not None:
                frames = min(frames, listed_frames)
            metas.append(VideoMeta(name=canonical_name(name), label=label, frames=frames, height=height,
                                   width=width, key=entry))
    if missing or unreadable:
        log.warning("%s: %d listed videos are not in %s and %d have unreadable entries; they are left out "
                    "(e.g. %s)", list_path, len(missing), db_path, len(unreadable), (missing + unreadable)[:3])
    if not metas:
        raise ReferenceListError(f"none of the {len(entries)} videos of {list_path} is in {db_path} "
                                 f"(first listed: {entries[0][0]!r}, first in the LMDB: {names[:1]!r})")
    num_classes = max(m.label for m in metas) + 1
    classes = [""] * num_classes
    for meta in metas:
        if 0 <= meta.label < num_classes and not classes[meta.label]:
            classes[meta.label] = meta.name.split("/")[0]
    return metas, [c or f"class{i}" for i, c in enumerate(classes)]

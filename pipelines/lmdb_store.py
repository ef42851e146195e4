"""The LMDB of JPEG frames: its on-disk format and a reader.

Format (compatible with the reference project's `make_lmdb_kin.py`, plus our own
metadata so that readers never have to decode a frame to learn a video's size):

    b"%09d" % video_id      msgpack list of the video's JPEG frames (raw bytes), in order
    b"__keys__"             msgpack list of those keys, in id order
    b"__len__"              msgpack int, the number of videos
    b"__order__"            msgpack list of names ("class/video", no extension), in id order
    b"__vlen__"             msgpack list of frame counts, in id order
    b"__meta__"             ours: msgpack list of dicts {name, label, frames, height, width, fps, source}
    b"__classes__"          ours: msgpack list of class names; a label indexes it
    b"__info__"             ours: msgpack dict of build settings {format, version, short_side, fps, quality, encoder}

LMDBs built by the reference project lack the last three; the reader then derives
the metadata from `__order__`, each entry's msgpack header and its first frame's
JPEG header, or takes it from a reference list file (pipelines/reference_lmdb.py).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import lmdb
import msgpack

KEYS_KEY = b"__keys__"
LEN_KEY = b"__len__"
ORDER_KEY = b"__order__"
VLEN_KEY = b"__vlen__"
META_KEY = b"__meta__"
CLASSES_KEY = b"__classes__"
INFO_KEY = b"__info__"
FORMAT_NAME = "cstp-dali-lmdb"
FORMAT_VERSION = 1

# A sane ceiling for anything we size from file contents (frames per video).
MAX_FRAMES_PER_VIDEO = 1_000_000


def video_key(video_id: int) -> bytes:
    return b"%09d" % video_id


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


@dataclass(frozen=True)
class VideoMeta:
    name: str
    label: int
    frames: int
    height: int
    width: int
    fps: float = 0.0
    source: str = ""
    key: int = -1       # the LMDB entry id when it differs from the video's position (reference lists)

    def to_dict(self) -> dict:
        return dict(name=self.name, label=self.label, frames=self.frames, height=self.height,
                    width=self.width, fps=self.fps, source=self.source)


def lmdb_keys(metas: list[VideoMeta]) -> list[int] | None:
    """The LMDB entry id of each video, or None when every video sits at its own
    position (our databases); see LmdbFrameReader."""
    if all(m.key < 0 for m in metas):
        return None
    return [m.key if m.key >= 0 else i for i, m in enumerate(metas)]


class LmdbFormatError(RuntimeError):
    """The database is not an LMDB of JPEG frames in the expected layout."""


def open_readonly(path: str) -> lmdb.Environment:
    if not os.path.exists(path):
        raise FileNotFoundError(f"LMDB not found: {path} (build one with `python -m preprocessing build-lmdb`)")
    from .faults import check_lmdb_complete
    check_lmdb_complete(path)  # a partial copy would die of SIGBUS at its first read past the end
    return lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False,
                     readahead=False, meminit=False, max_readers=512)


# One read-only environment per database per process: py-lmdb refuses to open the
# same files twice in a process, and several readers (loaders, metadata) share one.
_SHARED_ENVS: dict[tuple, tuple[int, lmdb.Environment]] = {}


def shared_env(path: str) -> lmdb.Environment:
    # Keyed on the data file's identity too: a database rebuilt at the same path
    # (build-lmdb --overwrite) is new files, which must not be read through the old map.
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    try:
        st = os.stat(data_file)
        key = (os.path.realpath(path), st.st_dev, st.st_ino)
    except OSError:
        key = (os.path.realpath(path), 0, 0)
    cached = _SHARED_ENVS.get(key)
    if cached is not None:
        pid, env = cached
        if pid == os.getpid():
            return env
        # Inherited through fork (a DALI worker): an LMDB environment must not be
        # used after fork. Closing the child's copy only unmaps the child's view and
        # closes its file descriptors (lock=False: no locks to release), and lets
        # py-lmdb open the files afresh in this process.
        try:
            env.close()
        except lmdb.Error:
            pass
    env = open_readonly(path)
    _SHARED_ENVS[key] = (os.getpid(), env)
    return env


def jpeg_problem(jpeg: bytes, height: int, width: int) -> str | None:
    """Why a stored frame must not reach DALI's decoder, or None. Cheap checks only
    (markers and header, no decode): a decoder error inside a DALI pipeline ends
    the pipeline, so truncated or foreign data is caught here."""
    if len(jpeg) < 64:
        return f"frame of {len(jpeg)} bytes is too short to be a JPEG"
    if jpeg[:2] != b"\xff\xd8":
        return "frame does not start with a JPEG marker"
    if b"\xff\xd9" not in jpeg[-32:]:
        return "frame is truncated (no JPEG end marker)"
    try:
        size = jpeg_size(jpeg)
    except Exception as err:  # noqa: BLE001 - PIL raises several kinds for a bad header
        return f"unreadable JPEG header ({err})"
    if size != (height, width):
        return f"frame is {size[1]}x{size[0]}, metadata says {width}x{height}"
    return None


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG header, without decoding the image."""
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        width, height = im.size
    return height, width


def read_metadata(path: str, list_path: str | None = None) -> tuple[list[VideoMeta], list[str]]:
    """All videos' metadata and the class names. With `list_path` (a reference-format
    list), the listed videos of a reference-project LMDB, found by name."""
    from .reference_lmdb import metadata_from_list, metadata_without_list

    if list_path:
        return metadata_from_list(path, list_path)
    with shared_env(path).begin(buffers=False) as txn:
        raw_meta = txn.get(META_KEY)
        if raw_meta is not None:
            metas = [VideoMeta(**{k: m[k] for k in VideoMeta.__dataclass_fields__ if k in m})
                     for m in unpack(raw_meta)]
            raw_classes = txn.get(CLASSES_KEY)
            classes = list(unpack(raw_classes)) if raw_classes is not None else []
            return metas, classes
    with shared_env(path).begin(buffers=True) as txn:
        return metadata_without_list(txn, path)


class LmdbFrameReader:
    """Reads selected JPEG frames of a video. Picklable: the environment is opened
    lazily in whichever process reads (DALI worker processes included)."""

    def __init__(self, path: str, keys: list[int] | None = None):
        self.path = path
        # keys[video] = its LMDB entry id, when the videos are a list's selection of
        # a database (a reference-project LMDB read through its list file).
        self.keys = keys

    def all_frames(self, video_id: int) -> list[bytes]:
        entry = self.keys[video_id] if self.keys is not None else video_id
        with shared_env(self.path).begin(buffers=False) as txn:
            raw = txn.get(video_key(entry))
        if raw is None:
            raise KeyError(f"{self.path}: no entry for video {video_id} (key {video_key(entry).decode()})")
        frames = unpack(raw)
        if not isinstance(frames, list) or len(frames) > MAX_FRAMES_PER_VIDEO:
            raise LmdbFormatError(f"{self.path}: entry {video_id} is not a list of JPEG frames")
        return frames

    def frames(self, video_id: int, indices) -> list[bytes]:
        """The JPEG bytes of the given frame indices (repeats allowed)."""
        frames = self.all_frames(video_id)
        return [frames[int(i)] for i in indices]

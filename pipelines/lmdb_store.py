"""The LMDB of JPEG frames: its on-disk format and a reader.

Format (the reference project's `make_lmdb_kin.py` keys, plus our own metadata so
that readers never have to decode a frame to learn a video's size):

    b"%09d" % video_id      the video's frames, in one of two layouts:
                            version 2 (ours, written by build-lmdb): a small header,
                              b"CSF2" + uint32 little-endian n (the number of frames)
                              [+ read hints: n uint64 file offsets, then n uint32
                              lengths, of the frames' bytes in data.mdb], and each
                              frame i under its own key below;
                            version 1 (ours before, and the reference's): a msgpack list
                              of the video's JPEG frames (raw bytes), in order
    b"%09d/%06d" % (video_id, i)   version 2: frame i's JPEG bytes
    b"__keys__"             msgpack list of those keys, in id order
    b"__len__"              msgpack int, the number of videos
    b"__order__"            msgpack list of names ("class/video", no extension), in id order
    b"__vlen__"             msgpack list of frame counts, in id order
    b"__meta__"             ours: msgpack list of dicts {name, label, frames, height, width, fps, source}
    b"__classes__"          ours: msgpack list of class names; a label indexes it
    b"__info__"             ours: msgpack dict of build settings {format, version, short_side, fps, quality, encoder}

LMDBs built by the reference project lack the last three; the reader then derives
the metadata from `__order__`, each entry's header and its first frame's JPEG
header, or takes it from a reference list file (pipelines/reference_lmdb.py).
`__info__`'s version says the layout of the video entries; without it, version 1.
`python -m preprocessing convert` rewrites a version 1 database as version 2.

Why a key per frame: a sample needs 2T of a video's ~300 frames. py-lmdb touches
every page of a value it returns (it pre-faults values so that page faults happen
without the GIL), so reading one frame out of a whole-video value pulls the whole
video from storage. A frame of its own is its own overflow pages: a reader faults in
about the bytes it needs (plus a leaf page per few hundred frames), and with
`buffers=True` the frames reach DALI as read-only slices of the map, copied once
(by DALI). Frame keys sort right after their video's key, so a video's frames stay
together.

Read hints: with LMDB's readahead off (it would read 128 KiB around every fault),
each cold 4 KiB page of a frame is its own synchronous page fault, ~250 per sample:
latency-bound, and costly in kernel time. The header says where each frame's bytes
lie in data.mdb (build-lmdb and convert record it right after writing the video, and
check it against the file), so a reader asks the kernel for all of a sample's frames
at once (posix_fadvise WILLNEED, one request per frame) before touching them. Hints
are only advice: a wrong one costs a useless read, never wrong data. A header
without them (8 bytes) is valid too; frames under half a page (stored inside B-tree
pages, which later writes move) get none (offset 0).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

import lmdb
import msgpack
import numpy as np

log = logging.getLogger(__name__)

KEYS_KEY = b"__keys__"
LEN_KEY = b"__len__"
ORDER_KEY = b"__order__"
VLEN_KEY = b"__vlen__"
META_KEY = b"__meta__"
CLASSES_KEY = b"__classes__"
INFO_KEY = b"__info__"
FORMAT_NAME = "cstp-dali-lmdb"
FORMAT_VERSION = 2          # what build-lmdb and convert write
WHOLE_VIDEO_VERSION = 1     # a msgpack list per video (ours before, and the reference's)
VIDEO_HEADER_MAGIC = b"CSF2"   # a version 2 video entry: magic + uint32 frame count
_VIDEO_HEADER_SIZE = 8
_HINT_BYTES = 12            # per frame in a hinted header: uint64 file offset + uint32 length

# A sane ceiling for anything we size from file contents (frames per video).
MAX_FRAMES_PER_VIDEO = 1_000_000


def video_key(video_id: int) -> bytes:
    return b"%09d" % video_id


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


def frame_key(entry: int, index: int) -> bytes:
    """Version 2: the key of frame `index` of the video stored under entry id `entry`."""
    return b"%09d/%06d" % (entry, index)


def video_entries(entry: int, frames) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of a version 2 video: its header, then every frame."""
    if len(frames) > MAX_FRAMES_PER_VIDEO:
        raise ValueError(f"{len(frames)} frames: more than {MAX_FRAMES_PER_VIDEO}")
    header = VIDEO_HEADER_MAGIC + len(frames).to_bytes(4, "little")
    return [(video_key(entry), header), *((frame_key(entry, i), bytes(f)) for i, f in enumerate(frames))]


def layout_entries(entry: int, frames, layout: int = FORMAT_VERSION) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs that store a video's JPEG frames in `layout` (2 or 1)."""
    if layout == FORMAT_VERSION:
        return video_entries(entry, frames)
    if layout == WHOLE_VIDEO_VERSION:
        return [(video_key(entry), pack([bytes(f) for f in frames]))]
    raise ValueError(f"layout must be {WHOLE_VIDEO_VERSION} or {FORMAT_VERSION}, got {layout}")


def stored_video_entries(txn, entry: int, new_entry: int) -> list[tuple[bytes, bytes]]:
    """Video `entry`'s pairs as stored (either layout, not re-encoded), keyed for
    entry id `new_entry`: for copying videos between databases. KeyError when missing."""
    raw = txn.get(video_key(entry))
    if raw is None:
        raise KeyError(f"no entry for video {entry} (key {video_key(entry).decode()})")
    n = header_frames(raw)
    if n is None:
        return [(video_key(new_entry), bytes(raw))]
    return video_entries(new_entry, read_video_frames(txn, entry))


def header_frames(raw) -> int | None:
    """A version 2 video entry's frame count; None for a version 1 entry (not a
    header); LmdbFormatError for a broken header."""
    if raw[:4] != VIDEO_HEADER_MAGIC:
        return None
    n = int.from_bytes(raw[4:8], "little")
    if n > MAX_FRAMES_PER_VIDEO or len(raw) not in (_VIDEO_HEADER_SIZE, _VIDEO_HEADER_SIZE + _HINT_BYTES * n):
        raise LmdbFormatError(f"broken version 2 video header ({len(raw)} bytes, {n} frames)")
    return n


def header_hints(raw, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The read hints of a version 2 header with n frames: (file offsets, lengths) of
    every frame's bytes in data.mdb, or None when the header has none."""
    if len(raw) == _VIDEO_HEADER_SIZE:
        return None
    return (np.frombuffer(raw, "<u8", n, _VIDEO_HEADER_SIZE),
            np.frombuffer(raw, "<u4", n, _VIDEO_HEADER_SIZE + 8 * n))


def hinted_header(n: int, offsets, lengths) -> bytes:
    """A version 2 header with read hints (see the module docstring)."""
    return (VIDEO_HEADER_MAGIC + n.to_bytes(4, "little") + np.asarray(offsets, "<u8").tobytes()
            + np.asarray(lengths, "<u4").tobytes())


def data_file(path: str) -> str:
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def map_base(env: lmdb.Environment, path: str) -> int | None:
    """The address at which this process maps `env`'s data file (Linux), else None."""
    target = os.stat(data_file(path))
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and int(fields[2], 16) == 0 and fields[3].count(":") == 1:
                    inode = int(fields[4])
                    if inode == target.st_ino and os.path.exists(fields[5]) and \
                            os.path.samefile(fields[5], data_file(path)):
                        return int(fields[0].split("-")[0], 16)
    except (OSError, ValueError):
        return None
    return None


def hint_entry(write, env: lmdb.Environment, path: str, entry: int, n: int) -> None:
    """After version 2 video `entry` (n frames) is committed: put its hinted header with
    `write([(key, value)])` (a writer's transaction); nothing where hints cannot be had."""
    hinted = read_hints(env, path, entry, n)
    if hinted is not None:
        write([(video_key(entry), hinted)])


def read_hints(env: lmdb.Environment, path: str, entry: int, n: int) -> bytes | None:
    """A hinted header for version 2 video `entry` of the database at `path`, open as
    `env`: where each frame's bytes lie in data.mdb, read from this process's map and
    checked against the file. None where the map cannot be located. The frames' pages
    should be in the page cache (just written), or this reads them all."""
    base = map_base(env, path)
    if base is None:
        return None
    # Only frames in overflow pages of their own: smaller values live inside B-tree leaf
    # pages, which later transactions copy elsewhere (and share their pages anyway).
    smallest = env.stat()["psize"] // 2
    offsets, lengths = np.zeros(n, np.uint64), np.zeros(n, np.uint32)
    with env.begin(buffers=True) as txn, open(data_file(path), "rb") as handle:
        for i in range(n):
            frame = txn.get(frame_key(entry, i))
            if frame is None:
                return None
            if len(frame) < smallest:
                continue
            offset = np.frombuffer(frame, np.uint8).ctypes.data - base
            head = bytes(frame[:16])
            if offset <= 0 or os.pread(handle.fileno(), len(head), offset) != head:
                return None   # not where the map says: leave the header without hints
            offsets[i], lengths[i] = offset, len(frame)
    return hinted_header(n, offsets, lengths) if offsets.any() else None


def read_video_frames(txn, entry: int) -> list:
    """Every frame of a video entry of either layout (KeyError when it is missing,
    LmdbFormatError when it is neither layout or a frame is missing). For tools that
    read whole videos (verify, convert); training reads planned frames with
    LmdbFrameReader."""
    raw = txn.get(video_key(entry))
    if raw is None:
        raise KeyError(f"entry {video_key(entry).decode()} is missing")
    n = header_frames(raw)
    if n is not None:
        frames = [txn.get(frame_key(entry, i)) for i in range(n)]
        missing = [i for i, f in enumerate(frames) if f is None]
        if missing:
            raise LmdbFormatError(f"{len(missing)} of the {n} frames are missing (e.g. frame {missing[0]})")
        return frames
    try:
        # raw=True: frames packed as msgpack str by old msgpack versions come back as bytes too.
        frames = msgpack.unpackb(raw, raw=True)
    except Exception as err:  # noqa: BLE001 - msgpack raises several kinds for foreign data
        raise LmdbFormatError(f"entry is neither a version 2 header nor msgpack ({type(err).__name__})") from None
    if not isinstance(frames, list) or len(frames) > MAX_FRAMES_PER_VIDEO or \
            not all(isinstance(f, bytes) for f in frames):
        raise LmdbFormatError("entry is not a list of JPEG frames")
    return frames


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
    problem: str = ""   # why it is never read, on a placeholder that keeps a video's id (read_metadata)

    def to_dict(self) -> dict:
        return dict(name=self.name, label=self.label, frames=self.frames, height=self.height,
                    width=self.width, fps=self.fps, source=self.source)


MAX_LABEL = 100_000      # class labels are 0-based indices; a larger one is a typo, not a dataset
MAX_SIDE = 65_535        # the largest JPEG side


def video_meta_from(fields, where: str) -> VideoMeta:
    """A VideoMeta from a record read from a file (__meta__, a video index), every value checked:
    ValueError naming `where` and the video otherwise (a count of 0, a label of 10**11, a
    missing field would fail, or be trusted, far from the file that holds it)."""
    if not isinstance(fields, dict):
        raise ValueError(f"{where}: a video's record is a {type(fields).__name__}, not a mapping")
    name = fields.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a video without a name ({str(fields)[:80]})")

    def whole(key, low, high, default=None):
        value = fields.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}: video {name!r} has {key} {value!r}, not an integer in [{low}, {high}]")
        return value

    fps = fields.get("fps", 0.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 <= fps < 10_000:
        raise ValueError(f"{where}: video {name!r} has fps {fps!r}")
    return VideoMeta(name=name, label=whole("label", 0, MAX_LABEL), frames=whole("frames", 1, MAX_FRAMES_PER_VIDEO),
                     height=whole("height", 1, MAX_SIDE), width=whole("width", 1, MAX_SIDE), fps=float(fps),
                     source=str(fields.get("source", "")), key=whole("key", -1, 2 ** 63 - 1, -1))


def placeholder_problem(what: str) -> str:
    """VideoMeta.problem of a placeholder that keeps the id of a video that cannot be read
    (`what` says why): its __meta__ record here, its entry in a reference LMDB (reference_lmdb)."""
    return f"{what}; rebuild the database (python -m preprocessing build-lmdb)"


def malformed_record_problem(err: ValueError) -> str:
    """What the readers say of a video whose __meta__ record video_meta_from refused (`err`)."""
    return placeholder_problem(f"its __meta__ record is malformed ({err})")


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
    try:
        return lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False,
                         readahead=False, meminit=False, max_readers=512)
    except lmdb.Error as err:   # a folder of videos, a stray file: not a traceback
        why = "a folder without data.mdb" if os.path.isdir(path) and not os.path.exists(
            os.path.join(path, "data.mdb")) else f"{type(err).__name__}: {err}"
        raise LmdbFormatError(f"{path} is not an LMDB ({why}); build one with "
                              "`python -m preprocessing build-lmdb`") from None


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


def jpeg_problem(jpeg, height: int, width: int) -> str | None:
    """Why a stored frame (bytes or a buffer) must not reach DALI's decoder, or None.
    Cheap checks only (markers and header, no decode): a decoder error inside a DALI
    pipeline ends the pipeline, so truncated or foreign data is caught here."""
    if len(jpeg) < 64:
        return f"frame of {len(jpeg)} bytes is too short to be a JPEG"
    if jpeg[:2] != b"\xff\xd8":
        return "frame does not start with a JPEG marker"
    if jpeg[-2:] != b"\xff\xd9" and b"\xff\xd9" not in bytes(jpeg[-32:]):   # (encoders may pad after it)
        return "frame is truncated (no JPEG end marker)"
    try:
        size = jpeg_size(jpeg)
    except ValueError as err:
        return f"unreadable JPEG header ({err})"
    if size != (height, width):
        return f"frame is {size[1]}x{size[0]}, metadata says {width}x{height}"
    return None


# Start-of-frame markers (SOF0..SOF15 except DHT, JPG and DAC), which carry the size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MAX_HEADER_SEGMENTS = 256
_MARKER = struct.Struct(">HH")    # marker, segment length
_SIZE = struct.Struct(">HH")      # a SOF segment's height, width (after the length and the precision byte)


def jpeg_size(jpeg) -> tuple[int, int]:
    """(height, width) from a JPEG's frame header (bytes or a buffer), without decoding
    the image: walks the marker segments up to the first SOF. ValueError when there is
    none before the scan, or the segments run past the data."""
    size = len(jpeg)
    if size < 4 or jpeg[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start marker")
    pos = 2
    for _ in range(_MAX_HEADER_SEGMENTS):
        if pos + 9 > size:
            break
        marker, length = _MARKER.unpack_from(jpeg, pos)
        if marker >> 8 != 0xFF:
            raise ValueError(f"no marker at byte {pos}")
        marker &= 0xFF
        if marker in _SOF_MARKERS:
            height, width = _SIZE.unpack_from(jpeg, pos + 5)
            if not height or not width:
                raise ValueError(f"frame header says {width}x{height}")
            return height, width
        if marker == 0xFF:              # fill byte
            pos += 1
        elif marker in (0xD9, 0xDA):
            raise ValueError("no frame header before the image data")
        else:
            pos += 2 + length
    raise ValueError("no frame header within the data")


def read_metadata(path: str, list_path: str | None = None) -> tuple[list[VideoMeta], list[str]]:
    """All videos' metadata and the class names. With `list_path` (a reference-format
    list), the listed videos of a reference-project LMDB, found by name."""
    from .reference_lmdb import metadata_from_list, metadata_without_list

    note_layout(path)
    if list_path:
        return metadata_from_list(path, list_path)
    with shared_env(path).begin(buffers=False) as txn:
        raw_meta = txn.get(META_KEY)
        if raw_meta is not None:
            raw_classes = txn.get(CLASSES_KEY)
            try:
                records = unpack(raw_meta)
                classes = unpack(raw_classes) if raw_classes is not None else []
            except Exception as err:  # noqa: BLE001 - msgpack raises several kinds for damaged data
                raise LmdbFormatError(f"{path}: __meta__ or __classes__ is not readable ({type(err).__name__})") \
                    from None
            if not isinstance(records, list) or not isinstance(classes, list) or \
                    not all(isinstance(c, str) for c in classes):
                raise LmdbFormatError(f"{path}: __meta__ must be a list of video records and __classes__ a list "
                                      "of names")
            metas, malformed = [], []
            for i, record in enumerate(records):
                try:
                    metas.append(video_meta_from(record, f"__meta__[{i}]"))
                except ValueError as err:
                    # The video keeps its id, as an unreadable one: no frames, no size, so every
                    # reader skips it (as a reference LMDB's unreadable entry, reference_lmdb.py).
                    name = record.get("name") if isinstance(record, dict) else None
                    metas.append(VideoMeta(name=name if isinstance(name, str) and name else f"__meta__[{i}]",
                                           label=0, frames=0, height=0, width=0,
                                           problem=malformed_record_problem(err)))
                    malformed.append(str(err))
            if malformed and len(malformed) == len(records):
                raise LmdbFormatError(f"{path}: every one of its {len(records)} __meta__ records is malformed "
                                      f"(first: {malformed[0]}); rebuild the database "
                                      "(python -m preprocessing build-lmdb)")
            if malformed and path not in _malformed_warned:
                _malformed_warned.add(path)
                more = f"; and {len(malformed) - 3} more" if len(malformed) > 3 else ""
                log.warning("%s: %d of its %d videos have a malformed __meta__ record; each keeps its id and is "
                            "skipped like an unreadable video (rebuild the database to read them): %s%s", path,
                            len(malformed), len(records), "; ".join(malformed[:3]), more)
            return metas, classes
    with shared_env(path).begin(buffers=True) as txn:
        return metadata_without_list(txn, path)


_whole_video_warned: set[str] = set()
_malformed_warned: set[str] = set()


def layout_version(path: str) -> int:
    """The layout of a database's video entries: __info__'s version, 1 without one."""
    with shared_env(path).begin(buffers=False) as txn:
        raw = txn.get(INFO_KEY)
    try:
        info = unpack(raw) if raw is not None else {}
        return int(info.get("version", WHOLE_VIDEO_VERSION)) if isinstance(info, dict) else WHOLE_VIDEO_VERSION
    except Exception:  # noqa: BLE001 - foreign __info__: treat as the old layout
        return WHOLE_VIDEO_VERSION


def note_layout(path: str) -> int:
    """The layout version; for the old one, one log line per database and process
    saying what it costs and how to convert."""
    version = layout_version(path)
    if version < FORMAT_VERSION and path not in _whole_video_warned:
        _whole_video_warned.add(path)
        log.warning("%s has the whole-video layout (version %d, or a reference-built LMDB): every sample reads and "
                    "unpacks all of its video's frames to keep the few it needs. Convert it once with "
                    "`python -m preprocessing convert --db %s --out NEW` (version %d reads only the planned "
                    "frames)", path, version, path, FORMAT_VERSION)
    return version


class LmdbFrameReader:
    """Reads selected JPEG frames of a video, from entries of either layout (told
    apart by their first bytes). Picklable: the environment is opened lazily in
    whichever process reads (DALI worker processes included).

    Version 2 entries come back as memoryviews into LMDB's memory map, not copies.
    They stay valid while the read transaction that returned them lives: the reader
    keeps one per process open for its whole life (a read-only database never
    changes under it, so this costs nothing), hence a frame handed to DALI is still
    valid when DALI copies it into its own buffer, the one copy on this path."""

    def __init__(self, path: str, keys: list[int] | None = None):
        self.path = path
        # keys[video] = its LMDB entry id, when the videos are a list's selection of
        # a database (a reference-project LMDB read through its list file).
        self.keys = keys
        self._txn = None
        self._txn_pid = None
        self._fd = None

    def __del__(self):
        if self._fd is not None and self._txn_pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __getstate__(self):
        return {"path": self.path, "keys": self.keys}

    def __setstate__(self, state):
        self.__init__(state["path"], state["keys"])

    def _read_txn(self):
        if self._txn_pid != os.getpid():   # new, or inherited through fork: not usable here
            self._txn = shared_env(self.path).begin(buffers=True)
            self._fd = os.open(data_file(self.path), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)) \
                if hasattr(os, "posix_fadvise") else None
            self._txn_pid = os.getpid()
        return self._txn

    def _prefetch(self, raw, n: int, wanted) -> None:
        """Ask the kernel for the wanted frames' bytes all at once (the header's read
        hints), so that the page faults of the reads that follow find them in the page
        cache: one request per frame instead of a synchronous fault per 4 KiB page."""
        fd, hints = self._fd, header_hints(raw, n)
        if fd is None or hints is None:
            return
        offsets, lengths = hints
        advise, willneed = os.posix_fadvise, os.POSIX_FADV_WILLNEED
        for offset, length in zip(offsets[wanted].tolist(), lengths[wanted].tolist()):
            if offset:
                advise(fd, offset, length, willneed)

    def _entry_id(self, video_id: int) -> int:
        return self.keys[video_id] if self.keys is not None else video_id

    def all_frames(self, video_id: int) -> list:
        try:
            return read_video_frames(self._read_txn(), self._entry_id(video_id))
        except (KeyError, LmdbFormatError) as err:
            raise type(err)(f"{self.path}: video {video_id}: {err}") from None

    def frames(self, video_id: int, indices) -> list:
        """The JPEG bytes of the given frame indices (repeats allowed): read-only
        buffers into the map for version 2 videos, bytes for version 1 ones. KeyError
        for a missing entry or frame, IndexError for a frame the video does not have."""
        entry = self._entry_id(video_id)
        txn = self._read_txn()
        raw = txn.get(video_key(entry))
        if raw is None:
            raise KeyError(f"{self.path}: no entry for video {video_id} (key {video_key(entry).decode()})")
        n = header_frames(raw)
        if n is None:    # version 1: the whole video, unpacked
            frames = unpack(raw)
            if not isinstance(frames, list) or len(frames) > MAX_FRAMES_PER_VIDEO:
                raise LmdbFormatError(f"{self.path}: entry {video_id} is not a list of JPEG frames")
            return [frames[int(i)] for i in indices]
        wanted = np.asarray(indices, dtype=np.int64).tolist()
        if wanted and (min(wanted) < 0 or max(wanted) >= n):
            raise IndexError(f"frame {max(wanted)} of a video with {n} frames")
        self._prefetch(raw, n, list(dict.fromkeys(wanted)))
        get, found = txn.get, {}
        for i in wanted:   # each distinct frame once (views overlap)
            if i not in found:
                jpeg = found[i] = get(b"%09d/%06d" % (entry, i))
                if jpeg is None:
                    raise KeyError(f"{self.path}: video {video_id} lacks frame {i}")
        return [found[i] for i in wanted]

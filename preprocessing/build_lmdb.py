"""Build an LMDB of JPEG frames from a folder of videos.

The on-disk format is defined (and documented) in `pipelines/lmdb_store.py`;
this module only writes it. Videos are decoded in parallel worker processes
(one ffmpeg process per video) and written, in a deterministic order, by the
main process, so the database is the same whatever the number of workers.

A video that cannot be converted never stops the build: it is logged as one
line `skipped <file>: <reason>`, listed in the report, and does not consume a
video id (ids stay dense, 0..n-1).

Resumable: the database grows in `<out>.partial`, one transaction per video
holding its frames and a progress record (`__build_job__<job index>`), next to a
fingerprint of the settings and the list (`__build_state__`). A rerun after a
crash, a kill or Ctrl-C with the same fingerprint continues after the last
committed job; since ids follow the list order, the result equals an
uninterrupted build. The last transaction writes the index entries and removes
the progress records; then `.partial` is renamed to `<out>`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import lmdb
from tqdm import tqdm

from pipelines.faults import parse_blocklist
from pipelines.lmdb_store import (
    CLASSES_KEY, FORMAT_NAME, FORMAT_VERSION, INFO_KEY, KEYS_KEY, LEN_KEY, MAX_LABEL, META_KEY, ORDER_KEY,
    VLEN_KEY, WHOLE_VIDEO_VERSION, VideoMeta, hint_entry, jpeg_size, layout_entries, pack, unpack, video_key,
)

from .ffmpeg_io import DEFAULT_QUALITY, VideoError, iter_jpeg_frames, probe_video, resolve_quality, turbo_encoder

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg",
                              ".flv", ".wmv", ".3gp"})
# An unfinished build (the .partial database) also holds these; the final transaction removes them.
BUILD_PREFIX = b"__build_"
BUILD_STATE_KEY = b"__build_state__"     # the fingerprint of the build (settings + list of videos)
JOB_RECORD_PREFIX = b"__build_job__"     # + %09d job index: that job's outcome, committed with its frames
MAX_VIDEO_BYTES = 2 * 1024 * 1024 * 1024  # one video's frames form one LMDB value
MAX_MAP_SIZE = 1 << 46                    # 64 TiB: stop doubling the map there
LMDB_FILES = frozenset({"data.mdb", "lock.mdb"})


class BuildError(RuntimeError):
    """The build cannot start (bad input folder, list file or output path)."""


class OutputExistsError(BuildError):
    """The output database exists and overwriting was not requested."""


@dataclass(frozen=True)
class VideoJob:
    """One video to convert. `source` is the path relative to the videos folder,
    `name` the same without its extension (the id under which readers find it)."""
    file: str
    source: str
    name: str
    class_name: str
    label: int


@dataclass(frozen=True)
class ConvertSettings:
    short_side: int | None = None
    fps: float | None = None
    quality: int = DEFAULT_QUALITY["turbo"]
    encoder: str = "turbo"
    layout: int = FORMAT_VERSION   # video entries: 2 = a key per frame (ours), 1 = a msgpack list (the reference's)


@dataclass
class ConvertedVideo:
    job: VideoJob
    frames: list = field(repr=False)
    height: int
    width: int
    fps: float


@dataclass
class FailedVideo:
    job: VideoJob
    reason: str


@dataclass
class BuildPlan:
    jobs: list
    classes: list
    failed: list          # FailedVideo found while planning (e.g. duplicate names)
    warnings: list


# --------------------------------------------------------------------------- planning

def find_videos(videos_dir) -> list[str]:
    """Relative POSIX paths of all video files under videos_dir, recursively, sorted.
    Hidden files and folders (".*", e.g. macOS "._x.mp4" resource forks) are skipped."""
    root = Path(videos_dir)
    found = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        stat = os.stat(dirpath)
        if (stat.st_dev, stat.st_ino) in seen_dirs:  # a symlink loop: do not walk forever
            dirnames[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if not filename.startswith(".") and Path(filename).suffix.lower() in VIDEO_EXTENSIONS:
                found.append(Path(dirpath, filename).relative_to(root).as_posix())
    return sorted(found)


def parse_list_line(line: str) -> tuple[str, int | None]:
    """`relative/path.ext [label [extra...]]` -> (path, label or None).

    Fields are split on whitespace, so UCF's single spaces and Kinetics' double
    spaces both work; a line containing a TAB is split on TABs instead, which
    allows paths with spaces."""
    fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
    fields = [f for f in fields if f]
    if not fields:
        raise ValueError("empty line")
    if len(fields) == 1:
        return fields[0], None
    try:
        label = int(fields[1])
    except ValueError:
        raise ValueError(f"label {fields[1]!r} is not an integer (expected `path [label [extra...]]`; "
                         "separate with a TAB if the path contains spaces)") from None
    if label < 0:
        raise ValueError(f"label {label} is negative")
    if label > MAX_LABEL:
        raise ValueError(f"label {label} is larger than {MAX_LABEL} (labels are 0-based class indices)")
    return fields[0], label


def read_list_file(list_file) -> list[tuple[int, str, int | None]]:
    """(line number, path, label or None) for every non-empty line of a list file."""
    entries = []
    text = Path(list_file).read_text(encoding="utf-8-sig")
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            path, label = parse_list_line(line)
        except ValueError as err:
            raise BuildError(f"{list_file}, line {line_no}: {err}") from None
        entries.append((line_no, path, label))
    return entries


def class_of(source: str, videos_dir: Path) -> str:
    """A video's class: the name of the folder it is in."""
    parent = PurePosixPath(source).parent.name
    return parent or videos_dir.resolve().name


def name_of(source: str) -> str:
    """The name stored in the database: the relative path without extension."""
    return PurePosixPath(source).with_suffix("").as_posix()


def class_names(folders_and_labels: list[tuple[str, int | None]]) -> list[str]:
    """The class names that labels index (`__classes__`).

    When every video has a label and the labels name the folders one-to-one as
    0..K-1 (any complete list file: UCF, HMDB, Kinetics, the demo set), the names
    follow the labels. Otherwise (no labels, or partial / inconsistent ones) they
    are the sorted folder names, and a missing label is its folder's index there."""
    folders = sorted({folder for folder, _ in folders_and_labels})
    pairs = {(folder, label) for folder, label in folders_and_labels}
    labels = {label for _, label in pairs}
    if None not in labels and len(pairs) == len(folders) == len(labels) and labels == set(range(len(labels))):
        return [folder for folder, _ in sorted(pairs, key=lambda pair: pair[1])]
    return folders


CONTROL_CHARACTERS = frozenset(map(chr, [*range(32), 127]))


def shown(name: str) -> str:
    """`name` for a one-line message: control characters escaped (a newline as \\n), the rest as is."""
    return "".join(repr(c)[1:-1] if c in CONTROL_CHARACTERS else c for c in name)


def name_problem(source: str) -> str | None:
    """Why a video's path cannot go into an LMDB, an index or a list, or None: list files,
    blocklists and reports hold one video per line, fields split on TABs."""
    if any(c in CONTROL_CHARACTERS for c in source):
        return ("its name holds a newline, TAB or other control character, which list files and blocklists "
                "cannot hold; rename the file")
    return None


def outside_problem(source: str) -> str | None:
    """Why a listed path is not a file under --videos (absolute, or going up with '..'),
    or None. List entries are relative to --videos; such an entry is skipped, never read."""
    path = PurePosixPath(source.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        return "path leaves --videos (absolute or '..'); list paths are relative to --videos"
    return None


def plan_build(videos_dir, list_file=None) -> BuildPlan:
    """Which videos to convert, in id order, with their labels and the class names."""
    videos_dir = Path(videos_dir)
    failed = []
    if list_file is None:
        entries = [(None, source, None) for source in find_videos(videos_dir)]
    else:
        entries = []
        for line_no, source, label in read_list_file(list_file):
            source = source.replace("\\", "/")
            if problem := outside_problem(source):   # skipped before it can name a class
                failed.append(FailedVideo(VideoJob(file=source, source=source, name=source, class_name="",
                                                   label=-1 if label is None else label), problem))
            else:
                entries.append((line_no, source, label))
    classes = class_names([(class_of(source, videos_dir), label) for _, source, label in entries])
    class_index = {name: i for i, name in enumerate(classes)}

    jobs, warnings = [], []
    first_line_of_name: dict[str, int | None] = {}
    for line_no, source, label in entries:
        class_name = class_of(source, videos_dir)
        folder_label = class_index[class_name]
        job = VideoJob(file=str((videos_dir / source).absolute()), source=source, name=name_of(source),
                       class_name=class_name, label=folder_label if label is None else label)
        problem = name_problem(source)
        if problem:
            failed.append(FailedVideo(job, problem))
            continue
        if job.name in first_line_of_name:
            where = f" (line {first_line_of_name[job.name]})" if first_line_of_name[job.name] else ""
            failed.append(FailedVideo(job, f"duplicate name {job.name!r}: another file{where} has the same "
                                           "path without extension"))
            continue
        first_line_of_name[job.name] = line_no
        if label is not None and label != folder_label and not warnings:
            warnings.append(f"labels in the list do not match the folders (line {line_no}: label {label}, but "
                            f"folder {class_name!r} is class {folder_label} of the sorted folder names); labels "
                            "are kept as given, __classes__ lists the sorted folder names")
        jobs.append(job)
    return BuildPlan(jobs=jobs, classes=classes, failed=failed, warnings=warnings)


# --------------------------------------------------------------------------- blocklist

def read_blocklist(path, videos_dir) -> dict[str, str]:
    """{relative path: reason} from a blocklist as `validate` writes it: one file per
    line, `path<TAB>reason` (a line without a TAB is just a path). Blank lines and
    lines starting with '#' are ignored. Absolute paths under videos_dir are made
    relative to it, so they match the build's list."""
    root = Path(videos_dir).absolute()
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise BuildError(f"cannot read the blocklist {path}: {err}") from None
    blocked: dict[str, str] = {}
    for source, reason in parse_blocklist(text).items():   # the format train.py's data.blocklist reads too
        if os.path.isabs(source):
            try:
                source = Path(source).relative_to(root).as_posix()
            except ValueError:
                pass  # outside --videos: it cannot match a job, and is reported as unused
        blocked[source] = reason
    return blocked


# --------------------------------------------------------------------------- converting (worker side)

def convert_video(job: VideoJob, settings: ConvertSettings) -> ConvertedVideo | FailedVideo:
    """Decode one video into JPEG frames. Runs in a worker process; never raises."""
    try:
        info = probe_video(job.file)
        frames, total_bytes = [], 0
        for frame in iter_jpeg_frames(job.file, short_side=settings.short_side, fps=settings.fps,
                                      quality=settings.quality, encoder=settings.encoder, info=info):
            total_bytes += len(frame)
            if total_bytes > MAX_VIDEO_BYTES:
                raise VideoError(job.file, f"frames exceed {MAX_VIDEO_BYTES >> 30} GiB; "
                                           "use a smaller --short-side or split the video")
            frames.append(frame)
        height, width = jpeg_size(frames[0])
        fps = float(settings.fps) if settings.fps is not None else float(info["fps"])
        return ConvertedVideo(job=job, frames=frames, height=height, width=width, fps=fps)
    except VideoError as err:
        return FailedVideo(job, err.reason)
    except Exception as err:  # noqa: BLE001 - one bad video must not stop the build
        return FailedVideo(job, f"{type(err).__name__}: {err}")


def _pool_context():
    # fork: workers start instantly and need no re-import; they only run ffmpeg and PIL.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _worker_init() -> None:
    """Runs first in every worker process.

    Ctrl-C at a terminal signals the whole foreground process group. The workers
    leave it (and so do the ffmpeg processes they start), so that only the main
    process sees the interrupt: otherwise ffmpeg would die mid-video and that
    video would be recorded as failed. The main process stops the workers itself.
    If the main process dies (SIGKILL, OOM killer), the kernel kills the workers
    too (Linux), instead of leaving them waiting forever for work."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.setpgrp()
    except OSError:
        pass
    _die_with_parent()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    except (OSError, AttributeError):
        pass


class OrderedConverter:
    """Converts jobs in worker processes and yields `(index, result)` in job order.

    `items` are `(index, job, blocked_reason)`: a job with a blocked reason is not
    decoded, it comes out as a FailedVideo in its place. At most `window` videos
    are in flight or waiting to be written, so memory stays bounded when the
    writer is slower than the workers (Pool.imap would run ahead without limit).
    workers <= 1 converts in this process."""

    def __init__(self, items: list, settings: ConvertSettings, workers: int):
        self.items, self.settings, self.workers = items, settings, max(1, int(workers))
        self.window = 2 * self.workers
        self._executor = None
        self._pending: deque = deque()
        self._next = 0

    def __enter__(self):
        to_convert = sum(1 for _, _, blocked in self.items if blocked is None)
        if self.workers > 1 and to_convert > 1:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=_pool_context(), initializer=_worker_init)
            self._fill()
        return self

    def __exit__(self, exc_type, *exc):
        if self._executor is None:
            return False
        if exc_type is None:
            self._executor.shutdown(wait=True)
        else:  # interrupted or failed: stop now, do not wait for the videos in progress
            self._kill_workers()
        return False

    def _kill_workers(self) -> None:
        # `_processes` is private but has been there since Python 3.2; without it we
        # could only wait for every running ffmpeg to finish its video.
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the worker and its ffmpeg
            except (ProcessLookupError, PermissionError, OSError):
                process.kill()
        for process in processes:
            process.join(timeout=10)
        self._executor.shutdown(wait=True)

    def __iter__(self):
        if self._executor is None:
            for index, job, blocked in self.items:
                yield index, (FailedVideo(job, blocked) if blocked is not None else convert_video(job, self.settings))
            return
        while self._pending:
            index, job, outcome = self._pending.popleft()
            self._fill()
            if isinstance(outcome, FailedVideo):
                yield index, outcome
                continue
            try:
                result = outcome.result()
            except BrokenProcessPool:
                raise BuildError(f"a worker process died (killed by the system, out of memory?) while converting "
                                 f"{job.source}; rerun the same command to continue, with fewer --workers, a "
                                 "smaller --short-side, or that file in a --blocklist") from None
            yield index, result

    def _fill(self) -> None:
        while self._next < len(self.items) and len(self._pending) < self.window:
            index, job, blocked = self.items[self._next]
            self._next += 1
            outcome = FailedVideo(job, blocked) if blocked is not None else \
                self._executor.submit(convert_video, job, self.settings)
            self._pending.append((index, job, outcome))


# --------------------------------------------------------------------------- writing (main process)

def initial_map_size(jobs: list) -> int:
    """A first LMDB map size. JPEG frames at high quality are often 5-20x larger than
    the compressed source, so start generously; LmdbWriter doubles it when full.
    (The map is address space, not disk: the file grows only with the data.)"""
    source_bytes = sum(_file_size(job.file) for job in jobs)
    return 8 * source_bytes + 256 * 1024 * 1024


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def job_record_key(job_index: int) -> bytes:
    return JOB_RECORD_PREFIX + b"%09d" % job_index


class LmdbWriter:
    """Writes the database in small transactions and grows the map when full.

    Each transaction is atomic: after a crash the database holds exactly the
    transactions committed before it, never half of one. sync=True with
    metasync=False keeps that true even across a power cut (a system crash may
    lose the last transaction, but never corrupts the database)."""

    def __init__(self, path: Path, map_size: int):
        self.path = path
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, sync=True, metasync=False,
                             meminit=False, readahead=False)
        self.grew = 0

    def write(self, puts: list[tuple[bytes, bytes]], delete_prefix: bytes | None = None) -> None:
        """One transaction: the puts, after deleting every key starting with delete_prefix."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    if delete_prefix is not None:
                        _delete_prefix(txn, delete_prefix)
                    for key, value in puts:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:  # the transaction was aborted: grow the map and redo it
                self._grow()

    def _grow(self) -> None:
        size = self.env.info()["map_size"] * 2
        if size > MAX_MAP_SIZE:
            raise BuildError(f"LMDB map would exceed {MAX_MAP_SIZE >> 40} TiB; is the input sane?")
        self.env.set_mapsize(size)
        self.grew += 1
        logger.debug("LMDB map grown to %d MiB", size >> 20)

    def get(self, key: bytes):
        with self.env.begin(buffers=False) as txn:
            return txn.get(key)

    def records(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        with self.env.begin(buffers=False) as txn:
            cursor = txn.cursor()
            found = []
            if cursor.set_range(prefix):
                for key, value in cursor:
                    if not key.startswith(prefix):
                        break
                    found.append((key, value))
            return found

    def is_empty(self) -> bool:
        return self.env.stat()["entries"] == 0

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


def _delete_prefix(txn, prefix: bytes) -> None:
    cursor = txn.cursor()
    if not cursor.set_range(prefix):
        return
    while cursor.key().startswith(prefix):
        if not cursor.delete():  # moves to the next entry; False at the end
            break


def metadata_entries(metas: list[VideoMeta], classes: list[str], settings: ConvertSettings) -> dict:
    """The index entries documented in pipelines/lmdb_store.py."""
    keys = [video_key(i) for i in range(len(metas))]
    info = dict(format=FORMAT_NAME, version=settings.layout, short_side=settings.short_side,
                fps=settings.fps, quality=settings.quality, encoder=settings.encoder)
    return {
        KEYS_KEY: pack(keys),
        LEN_KEY: pack(len(metas)),
        ORDER_KEY: pack([m.name for m in metas]),
        VLEN_KEY: pack([m.frames for m in metas]),
        META_KEY: pack([m.to_dict() for m in metas]),
        CLASSES_KEY: pack(list(classes)),
        INFO_KEY: pack(info),
    }


# --------------------------------------------------------------------------- resuming

def build_fingerprint(plan: BuildPlan, settings: ConvertSettings) -> dict:
    """What must match for an unfinished build to be continued: the settings and the
    list of videos (paths, names, labels, class names) in order. The blocklist is not
    part of it, so a file can be blocked after it crashed a build."""
    listing = json.dumps({"jobs": [[job.source, job.name, job.label] for job in plan.jobs],
                          "classes": list(plan.classes)}, sort_keys=True)
    return dict(format=FORMAT_NAME, state_version=1, videos=len(plan.jobs),
                list_sha256=hashlib.sha256(listing.encode("utf-8")).hexdigest(),
                short_side=settings.short_side, fps=settings.fps, quality=settings.quality,
                encoder=settings.encoder, layout=settings.layout)


def _mismatch(previous: dict, current: dict) -> str:
    names = {"short_side": "--short-side", "fps": "--fps", "quality": "--quality", "encoder": "--encoder",
             "layout": "--layout"}
    parts = [f"{flag} {previous.get(key)} then, {current[key]} now" for key, flag in names.items()
             if previous.get(key) != current[key]]
    if previous.get("list_sha256") != current["list_sha256"]:
        parts.append(f"a different list of videos ({previous.get('videos')} then, {current['videos']} now, "
                     "or other paths/labels/order)")
    return "; ".join(parts) or "a different build format"


@dataclass
class Progress:
    """What an unfinished build already did: jobs 0..done-1."""
    done: int = 0
    metas: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def load_progress(writer: LmdbWriter, plan: BuildPlan) -> Progress:
    progress = Progress()
    for key, value in writer.records(JOB_RECORD_PREFIX):
        index = int(key[len(JOB_RECORD_PREFIX):])
        if index != progress.done or index >= len(plan.jobs):
            raise BuildError(f"{writer.path}: progress records are not contiguous (job {index} after "
                             f"{progress.done}); delete it (or pass --overwrite) to start over")
        record = unpack(value)
        if record["ok"]:
            progress.metas.append(VideoMeta(**record["meta"]))
        else:
            progress.failures.append(FailedVideo(plan.jobs[index], record["reason"]))
        progress.done += 1
    return progress


def open_partial(partial: Path, fingerprint: dict, map_size: int, overwrite: bool, *, what: str = "build",
                 error: type = BuildError, mismatch=None) -> tuple[LmdbWriter, bool]:
    """The writer on `partial`, continuing an unfinished build (or `what`: e.g. a
    conversion) with the same fingerprint. Returns (writer, resumed). A partial from
    other settings is refused with `error`, or with `overwrite` deleted; `mismatch(then,
    now)` says how the fingerprints differ (default: the build settings that changed)."""
    if partial.exists() and not (partial.is_dir() and {p.name for p in partial.iterdir()} <= LMDB_FILES):
        raise error(f"{partial} is in the way and is not an LMDB folder; remove it or choose another --out")
    writer = LmdbWriter(partial, map_size)
    raw_state = writer.get(BUILD_STATE_KEY)
    if raw_state is not None and unpack(raw_state) == fingerprint:
        return writer, True
    if raw_state is not None or not writer.is_empty():
        if raw_state is not None:
            reason = (mismatch or _mismatch)(unpack(raw_state), fingerprint)
        elif writer.get(LEN_KEY) is not None:
            reason = (f"it looks complete: the build stopped while renaming it; rename it to "
                      f"{partial.name[:-len('.partial')]} yourself")
        else:
            reason = "no build record in it"
        writer.env.close()
        if not overwrite:
            raise error(f"{partial} holds an unfinished {what} that cannot be continued with these settings "
                        f"({reason}). Rerun with the earlier settings to continue it, or pass --overwrite "
                        "(or delete it) to start over")
        logger.warning("discarding the unfinished %s in %s (%s)", what, partial, reason)
        _remove_lmdb_dir(partial)
        writer = LmdbWriter(partial, map_size)
    writer.write([(BUILD_STATE_KEY, pack(fingerprint))])
    return writer, False


# --------------------------------------------------------------------------- output folder handling

def _is_nonempty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() and path.stat().st_size > 0


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to clobber an existing database unless asked, and never delete
    something that is not an LMDB folder."""
    if not _is_nonempty(out):
        return
    if not overwrite:
        raise OutputExistsError(f"{out} already exists and is not empty; pass --overwrite to replace it, "
                                "or choose another --out")
    if not out.is_dir() or not {p.name for p in out.iterdir()} <= LMDB_FILES:
        raise BuildError(f"{out} does not look like an LMDB folder (only data.mdb/lock.mdb); "
                         "refusing to delete it even with --overwrite. Remove it yourself or choose another --out")


def _remove_lmdb_dir(path: Path) -> None:
    if not path.exists():
        return
    if path.is_dir() and {p.name for p in path.iterdir()} <= LMDB_FILES:
        shutil.rmtree(path)
    elif path.is_dir() or path.stat().st_size > 0:
        raise BuildError(f"{path} is in the way and is not an LMDB folder; remove it or choose another --out")
    else:
        path.unlink()


def _db_bytes(path: Path) -> int:
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.iterdir() if p.name == "data.mdb")


def partial_path(out_path) -> Path:
    """Where an unfinished build lives until it is complete."""
    out = Path(out_path)
    return out.with_name(out.name + ".partial")


# --------------------------------------------------------------------------- the build

def build_lmdb(videos_dir, out_path, list_file=None, short_side=None, fps=None, quality=None, workers=None,
               progress=True, overwrite=False, map_size=None, blocklist=None, encoder="turbo",
               layout=FORMAT_VERSION) -> dict:
    """Convert the videos under `videos_dir` into an LMDB of JPEG frames at `out_path`.

    list_file: optional `path [label ...]` lines (relative to videos_dir) that pick the
        videos and their order; without it every video file under videos_dir is used,
        sorted, labelled by its folder.
    short_side / fps: frame size (shorter side in pixels) and frame rate; None keeps
        the source size / rate.
    encoder / quality: the JPEG encoder, "turbo" (libjpeg-turbo, quality 1..100, default
        94) or "ffmpeg" (ffmpeg's MJPEG encoder, -q:v 2 best..31, default 2); see
        preprocessing/ffmpeg_io.py.
    workers: decoding processes (default: all CPUs). map_size: initial LMDB map size
        in bytes (default: estimated from the sources; it doubles whenever full).
    blocklist: a file of videos not to convert (`path<TAB>reason` lines, as `validate`
        writes); they are listed as failed with that reason.
    layout: the video entries' layout (pipelines/lmdb_store.py): 2 (default), a key per
        frame, so that a reader touches only the planned frames; 1, a msgpack list per
        video, which the reference project's own loader reads.

    The database is built at `<out_path>.partial`, one video per transaction, and
    renamed to out_path when complete. If a `.partial` from an interrupted build with
    the same settings and list is there, the build continues it (the result is the
    same as an uninterrupted build); one with other settings is refused (overwrite:
    deleted). Ctrl-C raises BuildInterrupted after saving what is done.

    Returns the report (also written to `<out_path>.report.json`): ok (names),
    failed ({file, reason}), counts, classes, warnings, resumed, db_bytes, seconds.
    Raises BuildError / OutputExistsError for problems that prevent starting.
    """
    started = time.monotonic()
    videos_dir, out = Path(videos_dir), Path(out_path)
    if not videos_dir.is_dir():
        raise BuildError(f"videos folder not found: {videos_dir}")
    if list_file is not None and not Path(list_file).is_file():
        raise BuildError(f"list file not found: {list_file}")
    if blocklist is not None and not Path(blocklist).is_file():
        raise BuildError(f"blocklist not found: {blocklist}")
    try:
        quality = resolve_quality(encoder, quality)
        if encoder == "turbo":
            turbo_encoder()  # refuse now, not once per video
    except (ValueError, RuntimeError) as err:
        raise BuildError(str(err)) from None
    if layout not in (WHOLE_VIDEO_VERSION, FORMAT_VERSION):
        raise BuildError(f"layout must be {WHOLE_VIDEO_VERSION} or {FORMAT_VERSION}, got {layout}")
    settings = ConvertSettings(short_side=None if short_side is None else int(short_side),
                               fps=None if fps is None else float(fps), quality=quality, encoder=encoder,
                               layout=int(layout))
    _validate_settings(settings)
    check_output(out, overwrite)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)

    plan = plan_build(videos_dir, list_file)
    for warning in plan.warnings:
        logger.warning("warning: %s", warning)
    if not plan.jobs and not plan.failed:
        where = f"listed in {list_file}" if list_file else f"under {videos_dir}"
        raise BuildError(f"no video files {where} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    blocked = _blocked_jobs(plan, blocklist, videos_dir)

    for failure in plan.failed:
        logger.warning("skipped %s: %s", shown(failure.job.source), failure.reason)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    writer, resumed = open_partial(partial, build_fingerprint(plan, settings),
                                   map_size or initial_map_size(plan.jobs), overwrite)
    try:
        done = load_progress(writer, plan) if resumed else Progress()
        if resumed:
            logger.warning("continuing the unfinished build in %s: %d of %d videos already done",
                           partial, done.done, len(plan.jobs))
        metas = _convert_all(plan, done, blocked, settings, workers, writer, progress)
        if metas:
            # The index entries and the removal of the progress records: one transaction.
            writer.write(list(metadata_entries(metas, plan.classes, settings).items()), delete_prefix=BUILD_PREFIX)
    except KeyboardInterrupt:
        saved = len(writer.records(JOB_RECORD_PREFIX))
        writer.close()
        raise BuildInterrupted(f"interrupted; {saved} of {len(plan.jobs)} videos are done and saved in {partial}. "
                               "Run the same command again to continue from there.") from None
    except BaseException:
        writer.close()  # the partial keeps every committed video: a rerun continues it
        raise
    map_grew = writer.grew
    writer.close()
    failures = list(plan.failed) + done.failures
    if metas:
        _move_into_place(partial, out, overwrite)
    else:
        _remove_lmdb_dir(partial)
        logger.warning("no video could be converted; %s was not written", out)

    report = _report(videos_dir, list_file, out, settings, workers, plan, metas, failures,
                     time.monotonic() - started, resumed=done.done if resumed else 0,
                     blocklist=blocklist, blocked_unused=blocked.unused, map_grew=map_grew)
    _write_report(out, report)
    return report


class BuildInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM in the CLI) during a build; the message says how to continue."""


@dataclass
class _Blocked:
    reasons: dict          # job index -> reason
    unused: list           # blocklist paths that name no job of this build


def _blocked_jobs(plan: BuildPlan, blocklist, videos_dir) -> _Blocked:
    if blocklist is None:
        return _Blocked({}, [])
    listed = read_blocklist(blocklist, videos_dir)
    reasons = {index: f"blocklisted ({Path(blocklist).name}): {listed[job.source]}"
               for index, job in enumerate(plan.jobs) if job.source in listed}
    unused = sorted(set(listed) - {job.source for job in plan.jobs})
    logger.info("blocklist %s: %d of this build's videos skipped, %d entries name no video of this build",
                blocklist, len(reasons), len(unused))
    return _Blocked(reasons, unused)


def _validate_settings(settings: ConvertSettings) -> None:
    if settings.short_side is not None and settings.short_side < 2:
        raise BuildError(f"short side must be at least 2 pixels, got {settings.short_side}")
    if settings.fps is not None and not settings.fps > 0:
        raise BuildError(f"fps must be positive, got {settings.fps}")


def _convert_all(plan: BuildPlan, done: Progress, blocked: _Blocked, settings, workers, writer: LmdbWriter,
                 progress: bool) -> list[VideoMeta]:
    """Convert the jobs not done yet; each result is committed with its progress
    record in one transaction. Successes get dense ids 0..n-1 in job order."""
    metas = list(done.metas)
    items = [(index, plan.jobs[index], blocked.reasons.get(index)) for index in range(done.done, len(plan.jobs))]
    skipped = len(done.failures) + len(plan.failed)
    # The workers start before the progress bar, so they are not forked from a process with its thread.
    with OrderedConverter(items, settings, workers) as converter:
        with tqdm(total=len(plan.jobs), initial=done.done, unit="video", desc="build-lmdb", disable=not progress,
                  dynamic_ncols=True) as bar:
            for index, result in converter:
                if isinstance(result, FailedVideo):
                    writer.write([(job_record_key(index), pack(dict(ok=False, reason=result.reason)))])
                    done.failures.append(result)
                    skipped += 1
                    logger.warning("skipped %s: %s", shown(result.job.source), result.reason)
                else:
                    meta = _video_meta(result)
                    writer.write([*layout_entries(len(metas), result.frames, settings.layout),
                                  (job_record_key(index), pack(dict(ok=True, meta=meta.to_dict())))])
                    if settings.layout == FORMAT_VERSION:   # while its pages are in the page cache
                        hint_entry(writer.write, writer.env, str(writer.path), len(metas), len(result.frames))
                    metas.append(meta)
                bar.update(1)
                bar.set_postfix(ok=len(metas), skipped=skipped, refresh=False)
    return metas


def _video_meta(video: ConvertedVideo) -> VideoMeta:
    job = video.job
    return VideoMeta(name=job.name, label=job.label, frames=len(video.frames), height=video.height,
                     width=video.width, fps=video.fps, source=job.source)


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    """Replace `out` by the finished database (the old one survives until this moment)."""
    if out.exists():
        check_output(out, overwrite)  # re-check: something may have appeared there during the build
        _remove_lmdb_dir(out)
    os.replace(partial, out)


def _report(videos_dir, list_file, out, settings, workers, plan, metas, failures, seconds, resumed=0,
            blocklist=None, blocked_unused=(), map_grew=0) -> dict:
    n_found = len(plan.jobs) + len(plan.failed)
    return {
        "videos_dir": str(videos_dir),
        "list_file": None if list_file is None else str(list_file),
        "blocklist": None if blocklist is None else str(blocklist),
        "out": str(out),
        "settings": dict(short_side=settings.short_side, fps=settings.fps, quality=settings.quality,
                         encoder=settings.encoder, layout=settings.layout, workers=workers),
        "counts": dict(found=n_found, ok=len(metas), failed=len(failures),
                       frames=sum(m.frames for m in metas)),
        "blocklisted": sum(1 for f in failures if f.reason.startswith("blocklisted")),
        "ok": [m.name for m in metas],
        "failed": [dict(file=f.job.source, reason=f.reason) for f in failures],
        "classes": list(plan.classes),
        "warnings": list(plan.warnings),
        "blocklist_unused": list(blocked_unused),
        "resumed": resumed,
        "map_grew": map_grew,
        "db_bytes": _db_bytes(out) if metas else 0,
        "seconds": round(seconds, 3),
    }


def report_path(out_path) -> Path:
    return Path(str(out_path) + ".report.json")


def _write_report(out: Path, report: dict) -> None:
    path = report_path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)

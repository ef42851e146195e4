"""Build an LMDB of JPEG frames from a folder of videos.

The on-disk format is defined (and documented) in `pipelines/lmdb_store.py`;
this module only writes it. Videos are decoded in parallel worker processes
(one ffmpeg process per video) and written, in a deterministic order, by the
main process, so the database is the same whatever the number of workers.

A video that cannot be converted never stops the build: it is logged as one
line `skipped <file>: <reason>`, listed in the report, and does not consume a
video id (ids stay dense, 0..n-1).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import lmdb
from tqdm import tqdm

from pipelines.lmdb_store import (
    CLASSES_KEY, FORMAT_NAME, FORMAT_VERSION, INFO_KEY, KEYS_KEY, LEN_KEY, META_KEY, ORDER_KEY,
    VLEN_KEY, VideoMeta, jpeg_size, pack, video_key,
)

from .ffmpeg_io import VideoError, iter_jpeg_frames, probe_video

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg",
                              ".flv", ".wmv", ".3gp"})
COMMIT_EVERY_VIDEOS = 32
COMMIT_EVERY_BYTES = 256 * 1024 * 1024   # also commit early so pending writes stay bounded in memory
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
    quality: int = 2


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


def plan_build(videos_dir, list_file=None) -> BuildPlan:
    """Which videos to convert, in id order, with their labels and the class names."""
    videos_dir = Path(videos_dir)
    if list_file is None:
        entries = [(None, source, None) for source in find_videos(videos_dir)]
    else:
        entries = [(line_no, source.replace("\\", "/"), label)
                   for line_no, source, label in read_list_file(list_file)]
    classes = class_names([(class_of(source, videos_dir), label) for _, source, label in entries])
    class_index = {name: i for i, name in enumerate(classes)}

    jobs, failed, warnings = [], [], []
    first_line_of_name: dict[str, int | None] = {}
    for line_no, source, label in entries:
        class_name = class_of(source, videos_dir)
        folder_label = class_index[class_name]
        job = VideoJob(file=str((videos_dir / source).absolute()), source=source, name=name_of(source),
                       class_name=class_name, label=folder_label if label is None else label)
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


# --------------------------------------------------------------------------- converting (worker side)

def convert_video(job: VideoJob, settings: ConvertSettings) -> ConvertedVideo | FailedVideo:
    """Decode one video into JPEG frames. Runs in a worker process; never raises."""
    try:
        info = probe_video(job.file)
        frames, total_bytes = [], 0
        for frame in iter_jpeg_frames(job.file, short_side=settings.short_side, fps=settings.fps,
                                      quality=settings.quality, info=info):
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


class OrderedConverter:
    """Converts jobs in worker processes and yields the results in job order.

    At most `window` videos are in flight or waiting to be written, so memory
    stays bounded when the writer is slower than the workers (Pool.imap would
    run ahead without limit). workers <= 1 converts in this process."""

    def __init__(self, jobs: list, settings: ConvertSettings, workers: int):
        self.jobs, self.settings, self.workers = jobs, settings, max(1, int(workers))
        self.window = 2 * self.workers
        self._executor = None
        self._pending: deque = deque()
        self._next = 0

    def __enter__(self):
        if self.workers > 1 and len(self.jobs) > 1:
            self._executor = ProcessPoolExecutor(self.workers, mp_context=_pool_context())
            while self._next < len(self.jobs) and len(self._pending) < self.window:
                self._submit_next()
        return self

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        return False

    def __iter__(self):
        if self._executor is None:
            for job in self.jobs:
                yield convert_video(job, self.settings)
            return
        while self._pending:
            job, future = self._pending.popleft()
            if self._next < len(self.jobs):
                self._submit_next()
            try:
                result = future.result()
            except BrokenProcessPool:
                raise BuildError(f"a worker process died (killed by the system, out of memory?) while converting "
                                 f"{job.source}; rerun with fewer --workers or a smaller --short-side") from None
            yield result

    def _submit_next(self):
        job = self.jobs[self._next]
        self._next += 1
        self._pending.append((job, self._executor.submit(convert_video, job, self.settings)))


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


class LmdbWriter:
    """Writes key/value pairs in batched transactions and grows the map when full."""

    def __init__(self, path: Path, map_size: int):
        self.path = path
        # sync off during the build (much faster); finish() syncs once. A crash loses
        # only the ".partial" database, never a finished one.
        self.env = lmdb.open(str(path), map_size=map_size, subdir=True, sync=False, metasync=False,
                             meminit=False, readahead=False)
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_bytes = 0
        self._pending_videos = 0
        self.grew = 0

    def add_video(self, key: bytes, value: bytes) -> None:
        self._pending.append((key, value))
        self._pending_bytes += len(value)
        self._pending_videos += 1
        if self._pending_videos >= COMMIT_EVERY_VIDEOS or self._pending_bytes >= COMMIT_EVERY_BYTES:
            self.commit()

    def commit(self) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self._pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:  # the transaction was aborted: grow and redo it
                self._grow()
        self._pending.clear()
        self._pending_bytes = self._pending_videos = 0

    def _grow(self) -> None:
        size = self.env.info()["map_size"] * 2
        if size > MAX_MAP_SIZE:
            raise BuildError(f"LMDB map would exceed {MAX_MAP_SIZE >> 40} TiB; is the input sane?")
        self.env.set_mapsize(size)
        self.grew += 1
        logger.debug("LMDB map grown to %d MiB", size >> 20)

    def write_metadata(self, items: dict) -> None:
        for key, value in items.items():
            self._pending.append((key, value))
        self.commit()

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


def metadata_entries(metas: list[VideoMeta], classes: list[str], settings: ConvertSettings) -> dict:
    """The index entries documented in pipelines/lmdb_store.py."""
    keys = [video_key(i) for i in range(len(metas))]
    info = dict(format=FORMAT_NAME, version=FORMAT_VERSION, short_side=settings.short_side,
                fps=settings.fps, quality=settings.quality)
    return {
        KEYS_KEY: pack(keys),
        LEN_KEY: pack(len(metas)),
        ORDER_KEY: pack([m.name for m in metas]),
        VLEN_KEY: pack([m.frames for m in metas]),
        META_KEY: pack([m.to_dict() for m in metas]),
        CLASSES_KEY: pack(list(classes)),
        INFO_KEY: pack(info),
    }


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


# --------------------------------------------------------------------------- the build

def build_lmdb(videos_dir, out_path, list_file=None, short_side=None, fps=None, quality=2, workers=None,
               progress=True, overwrite=False, map_size=None) -> dict:
    """Convert the videos under `videos_dir` into an LMDB of JPEG frames at `out_path`.

    list_file: optional `path [label ...]` lines (relative to videos_dir) that pick the
        videos and their order; without it every video file under videos_dir is used,
        sorted, labelled by its folder.
    short_side / fps / quality: frame size (shorter side in pixels), frame rate, and
        JPEG quality (ffmpeg -q:v, 2 best..31); None keeps the source size / rate.
    workers: decoding processes (default: all CPUs). map_size: initial LMDB map size
        in bytes (default: estimated from the sources; it grows as needed).

    Returns the report (also written to `<out_path>.report.json`): ok (names),
    failed ({file, reason}), counts, classes, warnings, db_bytes, seconds.
    Raises BuildError / OutputExistsError for problems that prevent starting.
    """
    started = time.monotonic()
    videos_dir, out = Path(videos_dir), Path(out_path)
    if not videos_dir.is_dir():
        raise BuildError(f"videos folder not found: {videos_dir}")
    if list_file is not None and not Path(list_file).is_file():
        raise BuildError(f"list file not found: {list_file}")
    settings = ConvertSettings(short_side=None if short_side is None else int(short_side),
                               fps=None if fps is None else float(fps), quality=int(quality))
    _validate_settings(settings)
    check_output(out, overwrite)
    workers = (os.cpu_count() or 1) if workers is None else int(workers)

    plan = plan_build(videos_dir, list_file)
    for warning in plan.warnings:
        logger.warning("warning: %s", warning)
    if not plan.jobs and not plan.failed:
        where = f"listed in {list_file}" if list_file else f"under {videos_dir}"
        raise BuildError(f"no video files {where} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")

    failures = list(plan.failed)
    for failure in plan.failed:
        logger.warning("skipped %s: %s", failure.job.source, failure.reason)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    _remove_lmdb_dir(partial)  # left over from an interrupted build
    metas = _build_partial(plan, settings, workers, partial, map_size or initial_map_size(plan.jobs),
                           failures, progress)
    if metas:
        _move_into_place(partial, out, overwrite)
    else:
        _remove_lmdb_dir(partial)
        logger.warning("no video could be converted; %s was not written", out)

    report = _report(videos_dir, list_file, out, settings, workers, plan, metas, failures,
                     time.monotonic() - started)
    _write_report(out, report)
    return report


def _validate_settings(settings: ConvertSettings) -> None:
    if settings.short_side is not None and settings.short_side < 2:
        raise BuildError(f"short side must be at least 2 pixels, got {settings.short_side}")
    if settings.fps is not None and not settings.fps > 0:
        raise BuildError(f"fps must be positive, got {settings.fps}")
    if not 2 <= settings.quality <= 31:
        raise BuildError(f"quality (ffmpeg -q:v) must be 2 (best) to 31 (worst), got {settings.quality}")


def _build_partial(plan: BuildPlan, settings, workers, db_path: Path, map_size: int, failures: list,
                   progress: bool) -> list[VideoMeta]:
    """Build the complete database at db_path; returns the metadata of the videos written.
    On any error (or Ctrl-C) the half-written database is removed."""
    writer = LmdbWriter(db_path, map_size)
    try:
        metas = _convert_all(plan.jobs, settings, workers, writer, failures, progress)
        if metas:
            writer.write_metadata(metadata_entries(metas, plan.classes, settings))
        writer.close()
    except BaseException:
        writer.env.close()
        _remove_lmdb_dir(db_path)
        raise
    return metas


def _convert_all(jobs, settings, workers, writer: LmdbWriter, failures: list, progress: bool) -> list[VideoMeta]:
    """Convert every job and write the successes under dense ids 0..n-1."""
    metas: list[VideoMeta] = []
    # The workers start before the progress bar, so they are not forked from a process with its thread.
    with OrderedConverter(jobs, settings, workers) as converter:
        with tqdm(total=len(jobs), unit="video", desc="build-lmdb", disable=not progress,
                  dynamic_ncols=True) as bar:
            for result in converter:
                if isinstance(result, FailedVideo):
                    failures.append(result)
                    logger.warning("skipped %s: %s", result.job.source, result.reason)
                else:
                    metas.append(_write_video(writer, len(metas), result))
                bar.update(1)
                bar.set_postfix(ok=len(metas), skipped=len(failures), refresh=False)
    writer.commit()
    return metas


def _write_video(writer: LmdbWriter, video_id: int, video: ConvertedVideo) -> VideoMeta:
    writer.add_video(video_key(video_id), pack(video.frames))
    job = video.job
    return VideoMeta(name=job.name, label=job.label, frames=len(video.frames), height=video.height,
                     width=video.width, fps=video.fps, source=job.source)


def _move_into_place(partial: Path, out: Path, overwrite: bool) -> None:
    """Replace `out` by the finished database (the old one survives until this moment)."""
    if out.exists():
        check_output(out, overwrite)  # re-check: something may have appeared there during the build
        _remove_lmdb_dir(out)
    os.replace(partial, out)


def _report(videos_dir, list_file, out, settings, workers, plan, metas, failures, seconds) -> dict:
    n_found = len(plan.jobs) + len(plan.failed)
    return {
        "videos_dir": str(videos_dir),
        "list_file": None if list_file is None else str(list_file),
        "out": str(out),
        "settings": dict(short_side=settings.short_side, fps=settings.fps, quality=settings.quality,
                         workers=workers),
        "counts": dict(found=n_found, ok=len(metas), failed=len(failures),
                       frames=sum(m.frames for m in metas)),
        "ok": [m.name for m in metas],
        "failed": [dict(file=f.job.source, reason=f.reason) for f in failures],
        "classes": list(plan.classes),
        "warnings": list(plan.warnings),
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

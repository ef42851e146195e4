"""`convert`: rewrite an LMDB of JPEG frames in the whole-video layout (our version 1,
or the reference project's) as version 2, a key per frame, in which a reader
touches only the frames a sample needs (pipelines/lmdb_store.py).

Every frame is copied byte for byte; keys, video ids and the index entries stay as
they are, and `__info__` says version 2 (and `converted_from`). An entry that cannot
be read is left out with a one-line reason (a reader then replaces that video's
samples, as it would have before).

Resumable like build-lmdb: the new database grows in `<out>.partial`, one
transaction per video holding its entry and a progress record, next to a
fingerprint of the source; a rerun after a crash, a kill or Ctrl-C continues after
the last committed video, and the result equals an uninterrupted conversion. The
last transaction writes the index entries and removes the progress records; then
`.partial` is renamed to `<out>`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import lmdb
from tqdm import tqdm

from pipelines.lmdb_store import (
    FORMAT_NAME, FORMAT_VERSION, INFO_KEY, KEYS_KEY, LmdbFormatError, hint_entry, layout_version, pack,
    read_video_frames, shared_env, unpack, video_entries,
)

from .build_lmdb import (
    BUILD_PREFIX, JOB_RECORD_PREFIX, BuildError, LmdbWriter, _db_bytes, _move_into_place, check_output,
    job_record_key, open_partial, partial_path,
)

logger = logging.getLogger(__name__)

_VIDEO_KEY = re.compile(rb"^\d{9}(/\d{6})?$")   # a video's entry, or a frame's (version 2)
MAX_INDEX_KEYS = 100_000_000


class ConvertError(BuildError):
    """The conversion cannot start (missing or foreign source, output in the way)."""


class ConvertInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM in the CLI) during a conversion; the message says how to continue."""


@dataclass
class _Source:
    env: lmdb.Environment
    keys: list          # the video keys, in key order
    version: int
    fingerprint: dict


def _open_source(db_path: Path) -> _Source:
    if not db_path.exists():
        raise ConvertError(f"LMDB not found: {db_path}")
    try:
        env = shared_env(str(db_path))  # the process-wide read-only environment (py-lmdb opens a database once)
    except (LmdbFormatError, ValueError) as err:   # not an LMDB (empty file, folder of videos); a cut data.mdb
        raise ConvertError(str(err)) from None
    except lmdb.Error as err:
        raise ConvertError(f"cannot open {db_path} as an LMDB: {err}") from None
    with env.begin(buffers=False) as txn:
        raw_keys = txn.get(KEYS_KEY)
    try:
        listed = unpack(raw_keys) if raw_keys is not None else None
    except Exception:  # noqa: BLE001 - msgpack raises several kinds for foreign data
        listed = None
    if not isinstance(listed, list) or len(listed) > MAX_INDEX_KEYS:
        raise ConvertError(f"{db_path} is not an LMDB of video frames (no readable {KEYS_KEY.decode()} entry)")
    keys = sorted({k.encode() if isinstance(k, str) else bytes(k) for k in listed})
    if not all(_VIDEO_KEY.match(k) for k in keys):
        raise ConvertError(f"{db_path}: {KEYS_KEY.decode()} holds keys that are not %09d video ids")
    data = db_path / "data.mdb" if db_path.is_dir() else db_path
    st = data.stat()
    fingerprint = dict(format=FORMAT_NAME, state_version=1, convert_from=str(db_path.resolve()),
                       source_bytes=st.st_size, source_mtime_ns=st.st_mtime_ns, videos=len(keys))
    return _Source(env, keys, layout_version(str(db_path)), fingerprint)


def convert_lmdb(db_path, out_path, progress: bool = True, overwrite: bool = False) -> dict:
    """Convert the database at `db_path` to version 2 at `out_path`; see the module.
    Returns {db, out, videos, converted, failed: [{key, reason}], resumed, db_bytes,
    seconds}. Raises ConvertError for problems that prevent starting."""
    started = time.monotonic()
    db, out = Path(db_path), Path(out_path)
    if out.resolve() == db.resolve():
        raise ConvertError("--out must differ from --db (the old database is kept until you delete it)")
    source = _open_source(db)
    if source.version >= FORMAT_VERSION:
        raise ConvertError(f"{db} already has layout version {source.version}; nothing to convert")
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out)
    writer, resumed = open_partial(partial, source.fingerprint, _db_bytes(db) + (64 << 20), overwrite,
                                   what="conversion", error=ConvertError, mismatch=_other_source)
    try:
        done, failed = _load_progress(writer, len(source.keys))
        if resumed:
            logger.warning("continuing the unfinished conversion in %s: %d of %d videos already done",
                           partial, done, len(source.keys))
        failed += _convert_entries(source, writer, done, progress)
        writer.write(_index_entries(source), delete_prefix=BUILD_PREFIX)
    except KeyboardInterrupt:
        saved = len(writer.records(JOB_RECORD_PREFIX))
        writer.close()
        raise ConvertInterrupted(f"interrupted; {saved} of {len(source.keys)} videos are converted and saved in "
                                 f"{partial}. Run the same command again to continue from there.") from None
    except BaseException:
        writer.close()
        raise
    writer.close()
    _move_into_place(partial, out, overwrite)
    return dict(db=str(db), out=str(out), videos=len(source.keys), converted=len(source.keys) - len(failed),
                failed=failed, resumed=done if resumed else 0, db_bytes=_db_bytes(out),
                seconds=round(time.monotonic() - started, 3))


def _other_source(then: dict, now: dict) -> str:
    return "it converts another database, or this one before it changed"


def _load_progress(writer: LmdbWriter, total: int) -> tuple[int, list]:
    done, failed = 0, []
    for key, value in writer.records(JOB_RECORD_PREFIX):
        index = int(key[len(JOB_RECORD_PREFIX):])
        if index != done or index >= total:
            raise ConvertError(f"{writer.path}: progress records are not contiguous (video {index} after {done}); "
                               "delete it (or pass --overwrite) to start over")
        record = unpack(value)
        if not record["ok"]:
            failed.append(dict(key=record["key"], reason=record["reason"]))
        done += 1
    return done, failed


def _convert_entries(source: _Source, writer: LmdbWriter, done: int, progress: bool) -> list:
    failed = []
    with source.env.begin(buffers=True) as txn, \
            tqdm(total=len(source.keys), initial=done, unit="video", desc="convert", disable=not progress,
                 dynamic_ncols=True) as bar:
        for index in range(done, len(source.keys)):
            key = source.keys[index]
            try:
                entries = video_entries(int(key), read_video_frames(txn, int(key)))
            except (KeyError, LmdbFormatError, ValueError) as err:
                reason = str(err).strip("'\"")
                writer.write([(job_record_key(index), pack(dict(ok=False, key=key.decode(), reason=reason)))])
                failed.append(dict(key=key.decode(), reason=reason))
                logger.warning("skipped entry %s: %s", key.decode(), reason)
            else:
                writer.write([*entries, (job_record_key(index), pack(dict(ok=True)))])
                hint_entry(writer.write, writer.env, str(writer.path), int(key), len(entries) - 1)
            bar.update(1)
    return failed


def _index_entries(source: _Source) -> list[tuple[bytes, bytes]]:
    """Every entry of the source that is not a video, as it is; __info__ says version 2."""
    entries, info = [], None
    with source.env.begin(buffers=False) as txn:
        for key, value in txn.cursor():
            if _VIDEO_KEY.match(key) or key.startswith(BUILD_PREFIX):
                continue
            if key == INFO_KEY:
                try:
                    info = unpack(value)
                except Exception:  # noqa: BLE001
                    info = None
                continue
            entries.append((key, value))
    info = dict(info) if isinstance(info, dict) else dict(format=FORMAT_NAME)
    info.update(version=FORMAT_VERSION, converted_from=source.version)
    entries.append((INFO_KEY, pack(info)))
    return entries

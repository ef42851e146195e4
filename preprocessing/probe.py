"""`probe`: one row of facts per video file, from ffprobe, for `validate` to judge.

Each video costs one ffprobe process (streams, container and the first
PTS_CHECK_PACKETS packets, demuxed only), plus one decoding pass with
`--count-frames`. Jobs run in threads: the work happens in the subprocesses.

Columns (TSV header / JSON keys), see PROBE_COLUMNS:
    file            path relative to --videos (as build-lmdb lists it)
    readable        1 when ffprobe could open it, else 0 and `error` says why
    codec, pix_fmt  of the first video stream (cover art is not a video stream)
    bit_depth       bits per sample (from bits_per_raw_sample, else from pix_fmt)
    chroma          4:2:0, 4:2:2, 4:4:4, 4:4:0, 4:1:1, 4:0:0 (gray), rgb, or "" when unknown
    width, height   coded size as stored (before any rotation)
    rotation        degrees from the display matrix / rotate tag, 0 when none
    avg_fps, r_fps  avg_frame_rate and r_frame_rate as numbers (0 when unknown)
    nb_frames       frame count the container header claims ("" when it does not say)
    counted_frames  frames decoded with --count-frames ("" when not counted)
    decode_errors   what the decoder complained about while counting ("" when nothing / not counted)
    duration        seconds (stream, else container)
    vfr             1 when avg_fps and r_fps differ by over 1 %, or the packet timestamps are irregular
    pts_irregular   1 when the sorted timestamps of the first packets are not evenly spaced
    ends_early      1 when the file holds fewer video packets than the header lists (seen only when
                    the whole file has under PTS_CHECK_PACKETS packets; longer files need --count-frames)
    has_audio       1 when there is an audio stream
    audio_only      1 when there is audio but no video stream
    size_bytes      file size

The JSON form is {"format": "cstp-probe", "version": 1, "meta": {videos_dir, list_file,
count_frames}, "rows": [...], "skipped": [{"file", "reason"}, ...]}: "skipped" records the
--list entries that were never probed (a path that leaves --videos), which are not rows,
so that the table still says later what was left out and why (validate reads only
"rows"). A TSV holds the rows only; its skipped entries are printed, not recorded.
"""

from __future__ import annotations

import csv
import json
import os
import re
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

from pipelines.faults import too_large

from .build_lmdb import VIDEO_EXTENSIONS, find_videos, outside_problem, read_list_file, shown
from .ffmpeg_io import summarize_stderr
from .ffmpeg_tools import executable

PROBE_COLUMNS = ["file", "readable", "error", "codec", "pix_fmt", "bit_depth", "chroma", "width", "height",
                 "rotation", "avg_fps", "r_fps", "nb_frames", "counted_frames", "decode_errors", "duration",
                 "vfr", "pts_irregular", "ends_early", "has_audio", "audio_only", "size_bytes"]
INT_COLUMNS = {"readable", "bit_depth", "width", "height", "rotation", "nb_frames", "counted_frames", "vfr",
               "pts_irregular", "ends_early", "has_audio", "audio_only", "size_bytes"}
FLOAT_COLUMNS = {"avg_fps", "r_fps", "duration"}

PTS_CHECK_PACKETS = 300        # packets read to judge timestamp regularity (demux only: cheap)
PROBE_TIMEOUT_S = 120
COUNT_TIMEOUT_S = 1800
MAX_JSON_BYTES = 64 * 1024 * 1024
# A table is read whole; a row is ~200 bytes, so 1 GiB (the video index's bound) holds
# millions of videos and still refuses a file that is no table before it fills the memory.
MAX_TABLE_BYTES = 1 << 30
RATE_TOLERANCE = 0.01           # avg vs r_frame_rate differing by more than this -> variable frame rate
PTS_TOLERANCE = 0.25            # a packet step off the median step by more than this fraction -> irregular


class ProbeError(RuntimeError):
    """The probe cannot start (bad folder or list)."""


def empty_row(file: str) -> dict:
    row = {column: "" for column in PROBE_COLUMNS}
    row.update(file=file, readable=0)
    return row


# --------------------------------------------------------------------------- one file

def probe_file(path, name: str | None = None, count_frames: bool = False) -> dict:
    """The probe row of one file. Never raises for a bad video: `readable` is 0 and
    `error` says why."""
    path = Path(path).absolute()  # absolute: a name starting with '-' is never taken for an option
    row = empty_row(name if name is not None else str(path))
    try:
        size = path.stat().st_size
    except OSError as err:
        row["error"] = f"cannot stat: {err.strerror or err}"
        return row
    row["size_bytes"] = size
    if not path.is_file():
        row["error"] = "not a regular file"
        return row
    if size == 0:
        row["error"] = "empty file (0 bytes)"
        return row
    try:
        info = _ffprobe_json([executable("ffprobe"), "-v", "error", "-show_streams", "-show_format",
                              "-show_entries", "packet=stream_index,pts,pos,size",
                              "-read_intervals", f"%+#{PTS_CHECK_PACKETS}", "-of", "json", str(path)],
                             path, PROBE_TIMEOUT_S)
    except _ProbeFailed as err:
        row["error"] = str(err)
        return row

    streams = info.get("streams") or []
    video = next((s for s in streams if s.get("codec_type") == "video"
                  and not (s.get("disposition") or {}).get("attached_pic")), None)
    row["has_audio"] = int(any(s.get("codec_type") == "audio" for s in streams))
    if video is None:
        row["readable"] = 1
        row["audio_only"] = row["has_audio"]
        row["error"] = "no video stream" + (" (audio only)" if row["has_audio"] else "")
        return row
    row["audio_only"] = 0
    row["readable"] = 1
    _describe_video(row, video, info.get("format") or {})
    all_packets = info.get("packets") or []
    packets = [p for p in all_packets if p.get("stream_index") == video.get("index")]
    row["pts_irregular"] = int(pts_irregular([p.get("pts") for p in packets]))
    row["vfr"] = int(row["pts_irregular"] or rates_differ(row["avg_fps"], row["r_fps"]))
    # The packet limit counts the packets of all streams: only when ffprobe stopped before it
    # did the file end, and then every video packet the header lists should have been there.
    listed = row["nb_frames"] if row["nb_frames"] != "" else 0
    row["ends_early"] = int(len(all_packets) < PTS_CHECK_PACKETS and len(packets) < listed)
    if count_frames:
        row["counted_frames"], row["decode_errors"] = count_frames_of(path, int(video.get("index", 0)))
    return row


def _describe_video(row: dict, stream: dict, fmt: dict) -> None:
    pix_fmt = stream.get("pix_fmt") or ""
    row.update(codec=stream.get("codec_name") or "unknown", pix_fmt=pix_fmt,
               bit_depth=_int(stream.get("bits_per_raw_sample"), 0) or bit_depth_of(pix_fmt) or "",
               chroma=chroma_of(pix_fmt), width=_int(stream.get("width"), 0), height=_int(stream.get("height"), 0),
               rotation=rotation_of(stream), avg_fps=round(rate(stream.get("avg_frame_rate")), 6),
               r_fps=round(rate(stream.get("r_frame_rate")), 6))
    nb_frames = _int(stream.get("nb_frames"), None)
    row["nb_frames"] = "" if nb_frames is None else nb_frames
    duration = _float(stream.get("duration")) or _float(fmt.get("duration"))
    row["duration"] = "" if duration is None else round(duration, 6)


class _ProbeFailed(Exception):
    pass


def _ffprobe_json(args: list[str], path: Path, timeout: float) -> dict:
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _ProbeFailed(f"ffprobe took over {timeout:.0f} s") from None
    except OSError as err:
        raise _ProbeFailed(f"cannot run ffprobe: {err}") from None
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise _ProbeFailed(f"ffprobe cannot read it ({summarize_stderr(stderr, path) or 'no message'})")
    if len(proc.stdout) > MAX_JSON_BYTES:
        raise _ProbeFailed("ffprobe output is absurdly large")
    try:
        return json.loads(proc.stdout or b"{}")
    except ValueError:
        raise _ProbeFailed("ffprobe printed unparsable output") from None


def count_frames_of(path: Path, stream_index: int) -> tuple[int, str]:
    """(frames decoded, decoder complaints or "") for one stream; (0, reason) when it fails."""
    args = [executable("ffprobe"), "-v", "error", "-select_streams", str(stream_index), "-count_frames",
            "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)]
    try:
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, timeout=COUNT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 0, f"counting frames took over {COUNT_TIMEOUT_S} s"
    stderr = summarize_stderr(proc.stderr.decode("utf-8", "replace")[-20000:], path)
    try:
        frames = int(json.loads(proc.stdout)["streams"][0]["nb_read_frames"])
    except (ValueError, KeyError, IndexError, TypeError):
        return 0, stderr or "ffprobe did not report a frame count"
    if proc.returncode != 0 and not stderr:
        stderr = f"ffprobe exit {proc.returncode}"
    return frames, stderr


# --------------------------------------------------------------------------- interpreting ffprobe's fields

def rate(text) -> float:
    try:
        value = Fraction(str(text))
    except (ValueError, ZeroDivisionError):
        return 0.0
    return float(value) if value > 0 else 0.0


def rates_differ(avg_fps, r_fps, tolerance: float = RATE_TOLERANCE) -> bool:
    avg, real = float(avg_fps or 0), float(r_fps or 0)
    if avg <= 0 or real <= 0:
        return False
    return abs(avg - real) / max(avg, real) > tolerance


def pts_irregular(pts_values, tolerance: float = PTS_TOLERANCE) -> bool:
    """Whether the (sorted) presentation timestamps are unevenly spaced. Sorting
    undoes B-frame reordering; the last packet is ignored (its step is often short)."""
    pts = sorted(int(p) for p in pts_values if isinstance(p, int) or (isinstance(p, str) and p.lstrip("-").isdigit()))
    steps = [b - a for a, b in zip(pts, pts[1:])][:-1]
    if len(steps) < 2:
        return False
    median = statistics.median(steps)
    if median <= 0:
        return True
    return any(abs(step - median) > tolerance * median for step in steps)


def rotation_of(stream: dict) -> int:
    for side_data in stream.get("side_data_list") or []:
        if "rotation" in side_data:
            return int(round(float(side_data["rotation"]))) % 360
    tag = (stream.get("tags") or {}).get("rotate")
    try:
        return int(round(float(tag))) % 360 if tag else 0
    except ValueError:
        return 0


_DEPTH = re.compile(r"p(\d{2})(le|be)?$")


def bit_depth_of(pix_fmt: str) -> int | None:
    """Bits per component from a pixel format name (yuv420p10le -> 10, yuv420p -> 8)."""
    if not pix_fmt:
        return None
    match = _DEPTH.search(pix_fmt)
    if match:
        return int(match.group(1))
    if pix_fmt in ("p010le", "p010be"):
        return 10
    if pix_fmt in ("p016le", "p016be"):
        return 16
    return 8


def chroma_of(pix_fmt: str) -> str:
    if not pix_fmt:
        return ""
    for subsampling in ("420", "422", "444", "440", "411", "410"):
        if subsampling in pix_fmt:
            return f"{subsampling[0]}:{subsampling[1]}:{subsampling[2]}"
    if pix_fmt in ("nv12", "nv21", "p010le", "p010be", "p016le", "p016be"):
        return "4:2:0"
    if pix_fmt in ("nv16", "nv20le", "yuyv422", "uyvy422"):
        return "4:2:2"
    if pix_fmt.startswith(("gray", "ya")):
        return "4:0:0"
    if pix_fmt.startswith(("rgb", "bgr", "gbr", "argb", "abgr", "rgba", "bgra", "0rgb", "rgb0", "bgr0", "0bgr")):
        return "rgb"
    return ""


def _int(text, default):
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def _float(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if value > 0 else None


# --------------------------------------------------------------------------- many files

def files_to_probe(videos_dir, list_file=None, skipped: list | None = None) -> list[str]:
    """Relative paths: every video under videos_dir, or the list file's paths in order
    (labels and extra fields ignored; a path listed twice is probed once).

    A listed path that leaves videos_dir (absolute, or '..') is never read: it raises
    ProbeError, or, when `skipped` is a list, is left out and described there as
    {"file": path, "reason": why}."""
    videos_dir = Path(videos_dir)
    if not videos_dir.is_dir():
        raise ProbeError(f"videos folder not found: {videos_dir}")
    if list_file is None:
        files = find_videos(videos_dir)
        if not files:
            raise ProbeError(f"no video files under {videos_dir} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
        return files
    if not Path(list_file).is_file():
        raise ProbeError(f"list file not found: {list_file}")
    try:
        entries = read_list_file(list_file)
    except Exception as err:  # BuildError: a bad line, with its number
        raise ProbeError(str(err)) from None
    files = []
    for source in dict.fromkeys(source.replace("\\", "/") for _, source, _ in entries):
        if problem := outside_problem(source):
            if skipped is None:
                raise ProbeError(f"{list_file}: {shown(source)}: {problem}")
            skipped.append(dict(file=source, reason=problem))
        else:
            files.append(source)
    return files


def probe_videos(videos_dir, list_file=None, workers: int = 4, count_frames: bool = False,
                 progress: bool = False, skipped: list | None = None) -> list[dict]:
    """Probe rows of every video (see files_to_probe, which fills `skipped`), in that order."""
    files = files_to_probe(videos_dir, list_file, skipped)
    root = Path(videos_dir)

    def one(name: str) -> dict:
        return probe_file(root / name, name=name, count_frames=count_frames)

    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:  # each job is an ffprobe subprocess
        iterator = pool.map(one, files)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, total=len(files), unit="video", desc="probe", dynamic_ncols=True)
        return list(iterator)


def write_table(rows: list[dict], out_path, meta: dict | None = None, skipped: list | None = None) -> None:
    """TSV (header + one row per file) or, for a .json path, {"meta": ..., "rows": [...],
    "skipped": [...]} (see the module docstring; a TSV has no room for `skipped`)."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if out.suffix.lower() == ".json":
        tmp.write_text(json.dumps({"format": "cstp-probe", "version": 1, "meta": meta or {},
                                   "rows": [{c: row.get(c, "") for c in PROBE_COLUMNS} for row in rows],
                                   "skipped": list(skipped or [])},
                                  indent=1) + "\n", encoding="utf-8")
    else:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=PROBE_COLUMNS, delimiter="\t", extrasaction="ignore",
                                    lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    os.replace(tmp, out)


def read_table(path, skipped: list | None = None) -> list[dict]:
    """Rows of a table written by write_table, with numbers as numbers ("" stays "");
    a JSON table's "skipped" entries are no rows and are not read.

    A file that is not such a table (or over MAX_TABLE_BYTES, refused from its size
    before it is read) raises ValueError. A malformed row (wrong number of
    fields, no file name, a number that is not one) raises ValueError naming its line
    (JSON: its row number), or, when `skipped` is a list, is left out and described there
    as "line N: what is wrong"."""
    path = Path(path)
    if problem := too_large(path, MAX_TABLE_BYTES, "a probe table"):
        raise ValueError(f"{problem}; pass the table that `python -m preprocessing probe` wrote")
    tsv = path.suffix.lower() != ".json"
    if not tsv:
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{path}: not a probe table (no list of rows)")
        numbered = [(f"row {n}", row) for n, row in enumerate(rows, start=1)]
    else:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            missing = {"file", "readable"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: not a probe table (no {', '.join(sorted(missing))} column)")
            numbered = [(f"line {reader.line_num}", row) for row in reader]
    typed = []
    for where, row in numbered:
        try:
            if tsv and (None in row or None in row.values()):
                # DictReader puts extra fields in a list under None and gives missing ones the value None
                header = [column for column in row if column is not None]
                found = sum(row[column] is not None for column in header) + len(row.get(None) or ())
                raise ValueError(f"{found} fields, the header has {len(header)}")
            typed.append(_typed(row))
        except ValueError as err:
            if isinstance(row, dict) and isinstance(row.get("file"), str) and row["file"]:
                where += f" ({shown(row['file'])})"
            if skipped is None:
                raise ValueError(f"{path}, {where}: {err}") from None
            skipped.append(f"{where}: {err}")
    return typed


def _typed(row) -> dict:
    """One row with numbers as numbers; ValueError saying what is wrong with a malformed one."""
    if not isinstance(row, dict):
        raise ValueError(f"not a row of named fields ({type(row).__name__})")
    if not isinstance(row.get("file"), str) or not row["file"]:
        raise ValueError("no file name")
    typed = {column: row.get(column, "") for column in PROBE_COLUMNS}
    for columns, kind in ((INT_COLUMNS, lambda value: int(float(value))), (FLOAT_COLUMNS, float)):
        for column in columns:
            value = typed[column]
            if value not in ("", None):
                try:
                    typed[column] = kind(value)
                except (TypeError, ValueError, OverflowError):
                    raise ValueError(f"{column} {value!r} is not a number") from None
    for column in ("error", "codec", "pix_fmt", "chroma", "decode_errors"):
        typed[column] = "" if typed[column] is None else str(typed[column])
    return typed


def run_probe(videos_dir, out_path, list_file=None, workers: int = 4, count_frames: bool = False,
              progress: bool = False) -> dict:
    start = time.perf_counter()
    skipped = []   # list entries outside videos_dir: never read
    rows = probe_videos(videos_dir, list_file, workers=workers, count_frames=count_frames, progress=progress,
                        skipped=skipped)
    write_table(rows, out_path, meta=dict(videos_dir=str(Path(videos_dir).absolute()),
                                          list_file=None if list_file is None else str(list_file),
                                          count_frames=count_frames), skipped=skipped)
    return dict(rows=rows, skipped=skipped, seconds=round(time.perf_counter() - start, 2))

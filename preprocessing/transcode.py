"""`transcode`: an NVDEC-friendly copy of a video dataset.

Every video becomes `OUT/<same relative path>.mp4`: H.264 (libx264), 8-bit
yuv420p, a constant frame rate, a keyframe at least every GOP frames (no scene
cut keyframes in between, so a decoder seeking to any frame decodes at most
GOP-1 frames it does not need), rotation metadata applied to the pixels and
removed, even frame sizes, no audio, index at the front (+faststart). That is
what DALI's `fn.decoders.video` (NVDEC) reads best: see docs/data.md#video-index.

One ffmpeg process per video, several in parallel (threads: the work happens in
the subprocesses). Resumable: each output is written under a temporary name,
checked with ffprobe and only then renamed, so an output that exists is
complete; a rerun skips it. The settings are kept in OUT/transcode.settings.json
so that a rerun with other settings is refused instead of mixing two encodings.
Failures never stop the run; they are listed in OUT/transcode.report.json.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .build_lmdb import (VIDEO_EXTENSIONS, find_videos, name_problem, outside_problem, parse_list_line, read_list_file,
                         shown)
from .ffmpeg_io import VideoError, probe_video, summarize_stderr
from .validate import NVDEC_MAX_SIDE
from .ffmpeg_tools import executable

logger = logging.getLogger(__name__)

REPORT_NAME = "transcode.report.json"
SETTINGS_NAME = "transcode.settings.json"
SETTINGS_FORMAT = "cstp-transcode"
GOP = 16
# Frame rates a "keep the source rate" output snaps to when the source is within 0.5 % of one.
STANDARD_RATES = (Fraction(24000, 1001), Fraction(24), Fraction(25), Fraction(30000, 1001), Fraction(30),
                  Fraction(50), Fraction(60000, 1001), Fraction(60))
MIN_FRAME_FRACTION = 0.9     # fewer output frames than this share of duration x rate: the source is cut off
_TMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


class TranscodeError(RuntimeError):
    """The transcode cannot start (bad input folder, list, output folder or settings)."""


class TranscodeInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM in the CLI) during a transcode; the message says how to continue."""


@dataclass(frozen=True)
class TranscodeSettings:
    short_side: int | None = None   # None: keep the size (made even)
    fps: float | None = None        # None: keep the source's (average) rate, made constant
    crf: int = 18
    preset: str = "fast"
    gop: int = GOP

    def record(self) -> dict:
        return dict(format=SETTINGS_FORMAT, version=1, **asdict(self))


@dataclass(frozen=True)
class TranscodeJob:
    source: str     # relative to the videos folder, as listed
    file: str       # absolute input path
    output: str     # absolute output path (.mp4)


# --------------------------------------------------------------------------- planning

def plan_jobs(videos_dir: Path, out_dir: Path, list_file=None) -> tuple[list[TranscodeJob], list[dict]]:
    """The jobs in list order (or sorted), and the sources refused while planning."""
    if list_file is None:
        sources = find_videos(videos_dir)
    else:
        sources = list(dict.fromkeys(source.replace("\\", "/") for _, source, _ in read_list_file(list_file)))
    jobs, failed, outputs = [], [], {}
    for source in sources:
        if problem := outside_problem(source) or name_problem(source):
            failed.append(dict(file=source, reason=f"{problem}; not transcoded"))
            continue
        relative = PurePosixPath(source).with_suffix(".mp4")
        if relative in outputs:
            failed.append(dict(file=source, reason=f"same output {relative} as {outputs[relative]}; not transcoded"))
            continue
        outputs[relative] = source
        jobs.append(TranscodeJob(source=source, file=str((videos_dir / source).absolute()),
                                 output=str((out_dir / relative).absolute())))
    return jobs, failed


def output_rate(source_fps: float, fps: float | None) -> Fraction:
    """The constant output rate: --fps, else the source's average rate (snapped to a
    standard rate within 0.5 %, e.g. 29.97 -> 30000/1001; else to 1/1000)."""
    if fps is not None:
        return Fraction(fps).limit_denominator(1001)
    if not source_fps or source_fps <= 0:
        raise VideoError("", "the source has no frame rate; pass --fps")
    for rate in STANDARD_RATES:
        if abs(source_fps - float(rate)) <= 0.005 * float(rate):
            return rate
    return Fraction(round(source_fps * 1000), 1000)


def scale_filter(width: int, height: int, short_side: int | None) -> str:
    """Even frame sizes (4:2:0 needs them); the short side as asked, the aspect kept."""
    if short_side is None:
        return "scale=trunc(iw/2)*2:trunc(ih/2)*2"
    return f"scale=-2:{short_side}" if width >= height else f"scale={short_side}:-2"


def ffmpeg_args(job: TranscodeJob, info: dict, settings: TranscodeSettings, rate: Fraction, tmp: str,
                threads: int) -> list[str]:
    # ffmpeg applies the rotation metadata while decoding (autorotate), before these filters,
    # so probe's width/height (already swapped for 90/270 degrees) are the ones to scale.
    filters = f"fps={rate},{scale_filter(info['width'], info['height'], settings.short_side)},format=yuv420p"
    return [executable("ffmpeg"), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-i", info["path"],
            "-map", f"0:{info['stream_index']}", "-an", "-sn", "-dn", "-map_metadata", "-1",
            "-vf", filters, "-r", str(rate),
            "-c:v", "libx264", "-preset", settings.preset, "-crf", str(settings.crf), "-pix_fmt", "yuv420p",
            "-g", str(settings.gop), "-keyint_min", str(settings.gop), "-sc_threshold", "0",
            "-threads", str(threads), "-metadata:s:v:0", "rotate=0",
            "-movflags", "+faststart", "-f", "mp4", tmp]


# --------------------------------------------------------------------------- checking an output

def output_problem(path, settings: TranscodeSettings, expected_frames: float | None = None) -> str | None:
    """Why `path` is not a finished output of these settings (None: it is)."""
    try:
        result = subprocess.run([executable("ffprobe"), "-v", "error", "-select_streams", "v:0", "-show_entries",
                                 "stream=codec_name,pix_fmt,width,height,nb_frames,avg_frame_rate,r_frame_rate"
                                 ":stream_side_data=rotation:stream_tags=rotate", "-of", "json", str(path)],
                                capture_output=True, text=True, timeout=120, check=False)
        streams = json.loads(result.stdout or "{}").get("streams", [])
    except (OSError, subprocess.TimeoutExpired, ValueError) as err:
        return f"ffprobe failed: {err}"
    if result.returncode != 0 or not streams:
        return f"unreadable ({summarize_stderr(result.stderr) or 'no video stream'})"
    stream = streams[0]
    width, height = int(stream.get("width") or 0), int(stream.get("height") or 0)
    frames = int(stream.get("nb_frames") or 0)
    problems = []
    if stream.get("codec_name") != "h264" or stream.get("pix_fmt") != "yuv420p":
        problems.append(f"{stream.get('codec_name')} {stream.get('pix_fmt')}, not h264 yuv420p")
    if width % 2 or height % 2 or not width or not height:
        problems.append(f"frame size {width}x{height} is not even")
    if max(width, height) > NVDEC_MAX_SIDE:   # e.g. a 4000x16 source at short side 32: 8000x32
        problems.append(f"frame size {width}x{height} is larger than NVDEC's {NVDEC_MAX_SIDE} on a side "
                        "(the source's aspect ratio does not fit)")
    if settings.short_side is not None and min(width, height) != settings.short_side:
        problems.append(f"short side {min(width, height)}, not {settings.short_side}")
    if stream.get("avg_frame_rate") != stream.get("r_frame_rate"):
        problems.append(f"frame rate not constant ({stream.get('avg_frame_rate')} vs {stream.get('r_frame_rate')})")
    if any("rotation" in side for side in stream.get("side_data_list", []) or []) or \
            stream.get("tags", {}).get("rotate") not in (None, "0"):
        problems.append("still carries rotation metadata")
    if frames <= 0:
        problems.append("no frames")
    elif expected_frames and frames < MIN_FRAME_FRACTION * expected_frames - 2:
        problems.append(f"only {frames} of about {expected_frames:.0f} frames (source cut off or corrupt?)")
    return "; ".join(problems) or None


# --------------------------------------------------------------------------- one video

class _Runner:
    """Runs the jobs' ffmpeg processes and can stop them all at once (Ctrl-C).

    Each ffmpeg starts in its own session: a terminal's Ctrl-C reaches only this
    (main) process, never an ffmpeg in the middle of a video, which would look
    like a failure of that video. The main process then kills them itself."""

    def __init__(self, settings: TranscodeSettings, threads: int, overwrite: bool):
        self.settings, self.threads, self.overwrite = settings, threads, overwrite
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._processes: set = set()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            processes = list(self._processes)
        for process in processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass

    def run(self, job: TranscodeJob) -> dict:
        """{status: done | ok | failed | stopped, ...}; never raises for a bad video."""
        if self.stopping.is_set():
            return dict(status="stopped")
        if not self.overwrite and os.path.exists(job.output) and output_problem(job.output, self.settings) is None:
            return dict(status="done")
        tmp = _tmp_path(job.output)
        try:
            info = probe_video(job.file)
            rate = output_rate(info["fps"], self.settings.fps)
            Path(job.output).parent.mkdir(parents=True, exist_ok=True)
            args = ffmpeg_args(job, info, self.settings, rate, tmp, self.threads)
            returncode, stderr = self._ffmpeg(args, timeout=600 + 20 * (info["duration"] or 60))
            if self.stopping.is_set():
                return dict(status="stopped")
            if returncode != 0:
                return dict(status="failed", reason=f"ffmpeg failed (exit {returncode}): "
                                                    f"{summarize_stderr(stderr, info['path']) or 'no message'}")
            expected = info["duration"] * float(rate) if info["duration"] else None
            problem = output_problem(tmp, self.settings, expected)
            if problem:
                detail = summarize_stderr(stderr, info["path"])
                return dict(status="failed", reason=problem + (f" (ffmpeg: {detail})" if detail else ""))
            os.replace(tmp, job.output)
            return dict(status="ok")
        except VideoError as err:
            return dict(status="failed", reason=err.reason)
        except Exception as err:  # noqa: BLE001 - one bad video must not stop the run
            return dict(status="failed", reason=f"{type(err).__name__}: {err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _ffmpeg(self, args: list[str], timeout: float) -> tuple[int, str]:
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        with self._lock:
            self._processes.add(process)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            stderr = (stderr or b"") + f"\ntimed out after {timeout:.0f} s".encode()
        finally:
            with self._lock:
                self._processes.discard(process)
        return process.returncode, stderr.decode("utf-8", "replace")


def _tmp_path(output: str) -> str:
    """A hidden name beside the output, unique to this process (an ffmpeg left running by
    a killed earlier run can never write into this run's file)."""
    path = Path(output)
    return str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))


def remove_stale_tmp_files(out_dir: Path) -> int:
    """Delete temporary outputs of earlier runs that were killed (their process is gone)."""
    removed = 0
    for dirpath, _, filenames in os.walk(out_dir):
        for name in filenames:
            match = _TMP_NAME.match(name)
            if match and not _process_alive(int(match.group(1))):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- the whole dataset

def check_settings_file(out_dir: Path, settings: TranscodeSettings, overwrite: bool) -> None:
    """Refuse to mix outputs of different settings in one folder (unless overwrite)."""
    path = out_dir / SETTINGS_NAME
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != settings.record() and not overwrite:
            differences = _differences(previous, settings.record())
            raise TranscodeError(f"{out_dir} holds videos transcoded with other settings ({differences}). Rerun "
                                 "with those settings to continue, pass --overwrite to transcode everything "
                                 "again with the new ones, or choose another --out")
    elif out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise TranscodeError(f"{out_dir} is not empty and holds no {SETTINGS_NAME}; choose an empty or new --out "
                             "(or pass --overwrite)")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings.record(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _differences(previous, current: dict) -> str:
    if not isinstance(previous, dict):
        return f"unreadable {SETTINGS_NAME}"
    flags = {"short_side": "--short-side", "fps": "--fps", "crf": "--crf", "preset": "--preset", "gop": "GOP"}
    parts = [f"{flag} {previous.get(key)} then, {current[key]} now" for key, flag in flags.items()
             if previous.get(key) != current[key]]
    return "; ".join(parts) or "another format version"


def transcode_dataset(videos_dir, out_dir, list_file=None, short_side=None, fps=None, crf=18, preset="fast",
                      workers=None, progress=True, overwrite=False) -> dict:
    """Transcode every video under videos_dir (or in list_file) into out_dir; see the module doc.

    Returns the report, also written to out_dir/transcode.report.json: ok (sources
    whose output exists now, new or from an earlier run), failed ({file, reason}),
    counts {found, ok, transcoded, already_done, failed}, settings, seconds.
    Raises TranscodeError for problems that prevent starting, TranscodeInterrupted
    on Ctrl-C (outputs finished so far stay; a rerun continues).
    """
    started = time.monotonic()
    videos_dir, out_dir = Path(videos_dir), Path(out_dir)
    if not videos_dir.is_dir():
        raise TranscodeError(f"videos folder not found: {videos_dir}")
    if list_file is not None and not Path(list_file).is_file():
        raise TranscodeError(f"list file not found: {list_file}")
    resolved_in, resolved_out = videos_dir.resolve(), out_dir.resolve()
    if resolved_out == resolved_in or resolved_in in resolved_out.parents:
        raise TranscodeError(f"--out {out_dir} is inside --videos {videos_dir}; a later run would take the outputs "
                             "for inputs. Choose a folder outside it")
    if short_side is not None and (int(short_side) < 2 or int(short_side) % 2):
        raise TranscodeError(f"--short-side must be an even number of pixels (4:2:0 video), got {short_side}")
    if fps is not None and not 0 < float(fps) <= 1000:
        raise TranscodeError(f"--fps must be in (0, 1000], got {fps}")
    settings = TranscodeSettings(short_side=None if short_side is None else int(short_side),
                                 fps=None if fps is None else float(fps), crf=int(crf), preset=str(preset))
    try:
        jobs, failed = plan_jobs(videos_dir, out_dir, list_file)
    except Exception as err:  # BuildError: a bad list line, with its number
        raise TranscodeError(str(err)) from None
    if not jobs and not failed:
        where = f"listed in {list_file}" if list_file else f"under {videos_dir}"
        raise TranscodeError(f"no video files {where} (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    check_settings_file(out_dir, settings, overwrite)
    stale = remove_stale_tmp_files(out_dir)
    if stale:
        logger.info("removed %d temporary files left by an interrupted run", stale)
    for failure in failed:
        logger.warning("skipped %s: %s", shown(failure["file"]), failure["reason"])

    workers = max(1, (os.cpu_count() or 1) if workers is None else int(workers))
    threads = max(1, (os.cpu_count() or 1) // workers)  # x264 threads per video: workers x threads ~ CPUs
    runner = _Runner(settings, threads, overwrite)
    results = _run_all(jobs, runner, workers, progress, out_dir)
    found = len(jobs) + len(failed)

    ok = [job.source for job in jobs if results[job.source]["status"] in ("ok", "done")]
    failed += [dict(file=job.source, reason=results[job.source]["reason"]) for job in jobs
               if results[job.source]["status"] == "failed"]
    report = {
        "videos_dir": str(videos_dir), "out": str(out_dir),
        "list_file": None if list_file is None else str(list_file),
        "settings": dict(asdict(settings), workers=workers, threads_per_video=threads),
        "counts": dict(found=found, ok=len(ok),
                       transcoded=sum(1 for r in results.values() if r["status"] == "ok"),
                       already_done=sum(1 for r in results.values() if r["status"] == "done"), failed=len(failed)),
        "ok": ok,
        "failed": failed,
        "seconds": round(time.monotonic() - started, 3),
    }
    if list_file is not None:
        report["list_out"] = str(_write_list(Path(list_file), out_dir, set(ok)))
    _atomic_write(out_dir / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


def _run_all(jobs: list[TranscodeJob], runner: _Runner, workers: int, progress: bool, out_dir: Path) -> dict:
    results: dict[str, dict] = {}
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = {pool.submit(runner.run, job): job for job in jobs}
        with tqdm(total=len(jobs), unit="video", desc="transcode", disable=not progress, dynamic_ncols=True) as bar:
            counts = dict(new=0, done=0, failed=0)
            for future in as_completed(futures):
                job = futures[future]
                result = results[job.source] = future.result()
                status = result["status"]
                counts[{"ok": "new", "done": "done", "failed": "failed"}.get(status, "failed")] += 1
                if status == "failed":
                    logger.warning("skipped %s: %s", shown(job.source), result["reason"])
                bar.update(1)
                bar.set_postfix(counts, refresh=False)
    except KeyboardInterrupt:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        finished = sum(1 for r in results.values() if r["status"] in ("ok", "done"))
        raise TranscodeInterrupted(f"interrupted; {finished} of {len(jobs)} videos are finished in {out_dir}. "
                                   "Run the same command again to continue (finished videos are skipped).") from None
    pool.shutdown(wait=True)
    return results


def _write_list(list_file: Path, out_dir: Path, ok: set) -> Path:
    """The list file with the transcoded paths (.mp4), for build-lmdb / index-videos on --out.
    Lines of videos that failed are left out."""
    lines = []
    for line in list_file.read_text(encoding="utf-8-sig").splitlines():
        if not line.strip():
            continue
        source, _ = parse_list_line(line)
        source_posix = source.replace("\\", "/")
        if source_posix in ok:
            lines.append(line.replace(source, PurePosixPath(source_posix).with_suffix(".mp4").as_posix(), 1))
    path = out_dir / list_file.name
    _atomic_write(path, "".join(line + "\n" for line in lines))
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

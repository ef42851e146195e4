"""build-lmdb survives interruptions: SIGKILL and Ctrl-C mid-run, then the same
command continues and gives exactly the database of an uninterrupted build;
a .partial from other settings is refused; the LMDB map grows from a tiny start;
--blocklist skips files with their reason.

The kill tests run the real CLI in a subprocess and stop it once some videos are
committed (polling the .partial database), so they do not depend on timing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lmdb
import msgpack
import pytest

from preprocessing.build_lmdb import (
    BUILD_PREFIX, JOB_RECORD_PREFIX, LmdbWriter, build_fingerprint, build_lmdb, find_videos, open_partial,
    partial_path, plan_build, report_path, ConvertSettings,
)
from preprocessing.ffmpeg_tools import executable, missing_tools
from preprocessing.validate import validate, write_outputs

from .terminal import sigint_at_default

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHORT_SIDE = "32"
N_GOOD = 10
BAD_NAME = "b/bad_03.mp4"

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")


def ffmpeg_run(*args: str) -> None:
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def make_clip(path: Path, frames: int, size: str = "320x240") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg_run("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25", "-frames:v", str(frames),
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Ten clips in two classes (frame counts differ per clip) and one file of garbage."""
    root = tmp_path_factory.mktemp("resume_videos")
    for i in range(N_GOOD):
        make_clip(root / ("a" if i < 5 else "b") / f"clip_{i:02d}.mp4", frames=30 + 3 * i)
    (root / BAD_NAME).write_bytes(b"\x00garbage" * 500)
    return root


def read_entries(db: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(db), readonly=True, lock=False, subdir=True)
    try:
        with env.begin(buffers=False) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def job_records(partial: Path) -> dict[int, dict]:
    """{job index: record} committed so far in an unfinished build ({} while it cannot be read)."""
    if not (partial / "data.mdb").exists():
        return {}
    try:
        entries = read_entries(partial)
    except lmdb.Error:
        return {}
    return {int(k[len(JOB_RECORD_PREFIX):]): msgpack.unpackb(v, raw=False)
            for k, v in entries.items() if k.startswith(JOB_RECORD_PREFIX)}


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory) -> tuple[dict, dict]:
    """An uninterrupted build: its entries and its report."""
    out = tmp_path_factory.mktemp("reference") / "ref.lmdb"
    report = build_lmdb(dataset, out, short_side=int(SHORT_SIDE), workers=1, progress=False)
    assert report["counts"]["ok"] == N_GOOD and [f["file"] for f in report["failed"]] == [BAD_NAME]
    return read_entries(out), report


def build_args(videos: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "preprocessing", "build-lmdb", "--videos", str(videos), "--out", str(out),
            "--short-side", SHORT_SIDE, "--quiet", *extra]


def start_and_stop_after(args: list[str], partial: Path, committed: int, sig: int, whole_group: bool):
    """Start the CLI in its own session, wait until `committed` jobs are in the .partial,
    then send `sig` (to the whole process group, like a terminal's Ctrl-C, or to the
    main process only, like the OOM killer). SIGINT starts at its default, as from a terminal."""
    process = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=sigint_at_default)
    deadline = time.monotonic() + 120
    try:
        while len(job_records(partial)) < committed:
            if process.poll() is not None:
                pytest.fail(f"the build ended before it could be stopped: {process.stderr.read()}")
            if time.monotonic() > deadline:
                pytest.fail("no progress in the .partial database within 120 s")
            time.sleep(0.01)
        if whole_group:
            os.killpg(process.pid, sig)
        else:
            os.kill(process.pid, sig)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode, stdout, stderr, process.pid


def group_is_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_sigkill_then_rerun_equals_an_uninterrupted_build(dataset, reference, tmp_path):
    videos = tmp_path / "videos"
    shutil.copytree(dataset, videos)
    out = tmp_path / "db.lmdb"
    partial = partial_path(out)

    returncode, _, _, pgid = start_and_stop_after(build_args(videos, out, "--workers", "2"), partial,
                                                  committed=3, sig=signal.SIGKILL, whole_group=False)

    assert returncode == -signal.SIGKILL
    assert group_is_gone(pgid), "worker processes outlived the killed build"
    assert partial.is_dir() and not out.exists()
    done = job_records(partial)
    assert len(done) >= 3 and sorted(done) == list(range(len(done)))  # committed in order, no gaps
    # Spoil every video already done: a rerun that decoded any of them again would fail or differ.
    sources = find_videos(videos)
    for index in done:
        (videos / sources[index]).write_bytes(b"spoiled")

    result = subprocess.run(build_args(videos, out, "--workers", "2"), cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert f"{len(done)} of {N_GOOD + 1} videos already done" in result.stderr
    ref_entries, ref_report = reference
    entries = read_entries(out)
    assert sorted(entries) == sorted(ref_entries)
    for key in ref_entries:
        assert entries[key] == ref_entries[key], key
    assert not any(key.startswith(BUILD_PREFIX) for key in entries)
    report = json.loads(report_path(out).read_text())
    assert report["ok"] == ref_report["ok"] and report["failed"] == ref_report["failed"]
    assert report["resumed"] == len(done) and not partial.exists()


@pytest.mark.parametrize("sig, whole_group", [
    (signal.SIGINT, True),     # Ctrl-C at a terminal: the whole foreground process group
    (signal.SIGTERM, False),   # `kill PID`, a job scheduler's stop: the main process only
], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_saves_progress_and_says_how_to_continue(dataset, reference, tmp_path, sig, whole_group):
    out = tmp_path / "db.lmdb"
    partial = partial_path(out)

    returncode, _, stderr, pgid = start_and_stop_after(build_args(dataset, out, "--workers", "2"), partial,
                                                       committed=2, sig=sig, whole_group=whole_group)

    assert returncode == 130, stderr
    assert "interrupted;" in stderr and "Run the same command again to continue" in stderr
    assert "Traceback" not in stderr
    assert group_is_gone(pgid)
    done = job_records(partial)
    assert len(done) >= 2 and not out.exists()
    bad_index = find_videos(dataset).index(BAD_NAME)
    # Ctrl-C reached only the main process: no good video was recorded as failed.
    assert {i for i, record in done.items() if not record["ok"]} <= {bad_index}

    result = subprocess.run(build_args(dataset, out, "--workers", "2"), cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert read_entries(out) == reference[0]


def test_a_partial_from_other_settings_is_refused_then_overwritten(dataset, reference, tmp_path):
    out = tmp_path / "db.lmdb"
    partial = partial_path(out)
    plan = plan_build(dataset)
    writer, resumed = open_partial(partial, build_fingerprint(plan, ConvertSettings(short_side=24)),
                                   map_size=1 << 20, overwrite=False)
    writer.close()
    assert not resumed

    result = subprocess.run(build_args(dataset, out, "--workers", "1"), cwd=PROJECT_ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "--short-side 24 then, 32 now" in result.stderr and "--overwrite" in result.stderr
    assert partial.exists() and not out.exists()

    result = subprocess.run(build_args(dataset, out, "--workers", "1", "--overwrite"), cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "discarding the unfinished build" in result.stderr
    assert read_entries(out) == reference[0]


def test_another_list_is_refused(dataset, tmp_path):
    out = tmp_path / "db.lmdb"
    plan = plan_build(dataset)
    writer, _ = open_partial(partial_path(out), build_fingerprint(plan, ConvertSettings(short_side=32)),
                             map_size=1 << 20, overwrite=False)
    writer.close()
    list_file = tmp_path / "list.txt"
    list_file.write_text("a/clip_00.mp4 0\n")
    result = subprocess.run(build_args(dataset, out, "--list", str(list_file)), cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "a different list of videos (11 then, 1 now" in result.stderr


def test_map_grows_from_one_mib(dataset, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("".join(f"a/clip_{i:02d}.mp4\n" for i in range(5)))
    out = tmp_path / "db.lmdb"
    result = subprocess.run([*build_args(dataset, out, "--map-size-mb", "1", "--workers", "2", "--list",
                                         str(list_file)), "--short-side", "240"],  # the last --short-side wins
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(report_path(out).read_text())["map_grew"] >= 1
    assert (out / "data.mdb").stat().st_size > 1 << 20
    entries = read_entries(out)
    assert msgpack.unpackb(entries[b"__vlen__"], raw=False) == [30, 33, 36, 39, 42]
    assert entries[b"000000004"][:8] == b"CSF2" + (42).to_bytes(4, "little") and b"000000004/000041" in entries


def test_writer_grows_for_one_value_larger_than_the_map(tmp_path):
    writer = LmdbWriter(tmp_path / "w.lmdb", map_size=64 * 1024)
    value = os.urandom(1 << 20)
    writer.write([(b"k", value), (b"small", b"x")])
    assert writer.grew >= 4 and writer.get(b"k") == value and writer.get(b"small") == b"x"
    writer.close()


def test_blocklist_from_validate_skips_files_with_their_reason(dataset, reference, tmp_path):
    blocked_good = "a/clip_01.mp4"
    report = validate([
        dict(file=blocked_good, readable=0, error="told to skip it"),
        dict(file=str(dataset / BAD_NAME), readable=0, error="ffprobe cannot read it"),  # absolute path
        dict(file="c/not_in_this_build.mp4", readable=0, error="gone"),
    ])
    blocklist = tmp_path / "blocked.txt"
    write_outputs(report, tmp_path / "validate.json", blocklist)
    out = tmp_path / "db.lmdb"

    result = subprocess.run(build_args(dataset, out, "--blocklist", str(blocklist), "--workers", "2"),
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    build = json.loads(report_path(out).read_text())
    assert build["failed"] == [
        {"file": blocked_good, "reason": "blocklisted (blocked.txt): unreadable: told to skip it"},
        {"file": BAD_NAME, "reason": "blocklisted (blocked.txt): unreadable: ffprobe cannot read it"},
    ]
    assert build["blocklisted"] == 2 and build["blocklist_unused"] == ["c/not_in_this_build.mp4"]
    expected = [name for name in reference[1]["ok"] if name != "a/clip_01"]
    assert build["ok"] == expected
    entries = read_entries(out)
    assert msgpack.unpackb(entries[b"__order__"], raw=False) == expected  # ids stay dense
    assert entries[b"000000001"] == reference[0][b"000000002"]            # clip_02 moved up to id 1


def test_missing_blocklist_is_a_usage_error(dataset, tmp_path):
    result = subprocess.run(build_args(dataset, tmp_path / "db.lmdb", "--blocklist", str(tmp_path / "nope.txt")),
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--blocklist" in result.stderr and "no such file" in result.stderr

"""`transcode`: outputs are H.264 yuv420p at a constant rate with GOP <= 16, the asked
size, rotation applied, no audio; bad files are reported with a reason; reruns skip
finished outputs; other settings are refused; Ctrl-C stops cleanly and a rerun continues.

Every video is a tiny clip generated with ffmpeg; outputs are checked with ffprobe."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import pytest

from preprocessing.ffmpeg_tools import executable, missing_tools
from preprocessing.transcode import REPORT_NAME, output_rate, scale_filter

from .terminal import sigint_at_default

PROJECT_ROOT = Path(__file__).resolve().parents[1]
ODD_NAME = "odd name (1) !.mkv"

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")


def ffmpeg_run(*args: str) -> None:
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def make_clip(path: Path, frames: int = 25, size: str = "64x48", pix_fmt: str = "yuv420p", rate: str = "25",
              extra: tuple = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg_run("-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}", "-frames:v", str(frames), "-c:v", "libx264",
               "-preset", "ultrafast", "-pix_fmt", pix_fmt, *extra, str(path))
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", "transcode", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=300)


def ffprobe_json(path: Path, *entries: str) -> dict:
    out = subprocess.run([executable("ffprobe"), "-v", "error", *entries, "-of", "json", str(path)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def describe(path: Path) -> dict:
    """What the tests check about an output: its streams, size, rates, keyframe positions, timestamps."""
    info = ffprobe_json(path, "-show_entries", "stream=codec_type,codec_name,pix_fmt,width,height,avg_frame_rate,"
                                               "r_frame_rate,nb_frames:stream_side_data=rotation")
    packets = ffprobe_json(path, "-select_streams", "v:0", "-show_entries", "packet=pts,flags")["packets"]
    video = [s for s in info["streams"] if s["codec_type"] == "video"][0]
    return dict(types=[s["codec_type"] for s in info["streams"]], codec=video["codec_name"],
                pix_fmt=video["pix_fmt"], size=(video["width"], video["height"]), avg=video["avg_frame_rate"],
                r=video["r_frame_rate"], frames=int(video["nb_frames"]),
                rotation=any("rotation" in side for side in video.get("side_data_list", [])),
                keyframes=[i for i, p in enumerate(packets) if p["flags"].startswith("K")],
                pts=sorted(int(p["pts"]) for p in packets))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("transcode_in") / "videos"
    make_clip(root / "a" / "good.mp4", frames=40)
    ffmpeg_run("-i", str(root / "a" / "good.mp4"), "-c", "copy", "-metadata:s:v:0", "rotate=90",
               str(root / "a" / "rotated.mp4"))
    # Frames 12.. are spaced three times wider: a variable frame rate (average 625/49 fps).
    make_clip(root / "a" / "vfr.mp4", frames=25, extra=("-vf", "setpts='if(lt(N,12),N,12+(N-12)*3)/25/TB'",
                                                         "-fps_mode", "passthrough"))
    make_clip(root / "b" / "ten_bit.mp4", frames=5, pix_fmt="yuv420p10le")
    make_clip(root / "b" / ODD_NAME, frames=7, size="65x49", pix_fmt="yuv444p")
    make_clip(root / "b" / "ntsc.mp4", frames=30, rate="30000/1001")
    ffmpeg_run("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-f", "lavfi", "-i", "sine=r=8000", "-t", "1",
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac",
               str(root / "b" / "with_audio.mp4"))
    (root / "c").mkdir()
    # fixed garbage, not os.urandom: random bytes were once taken by ffprobe for a container
    # without a video stream, which gave another reason than the one this file stands for
    (root / "c" / "garbage.mp4").write_bytes(b"\x00garbage" * 375)
    ffmpeg_run("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "0.5", "-c:a", "aac",
               str(root / "c" / "audio_only.mp4"))
    # Index first (+faststart), then the frame data cut off: ffprobe opens it, decoding stops early.
    full = make_clip(root.parent / "full.mp4", frames=60, extra=("-movflags", "+faststart"))
    data = full.read_bytes()
    (root / "c" / "cut.mp4").write_bytes(data[: len(data) // 3])
    return root


GOOD = {"a/good.mp4": ((42, 32), "25/1", 40), "a/rotated.mp4": ((32, 42), "25/1", 40),
        "a/vfr.mp4": ((42, 32), "2551/200", 25), "b/ten_bit.mp4": ((42, 32), "25/1", 5),
        f"b/{ODD_NAME}": ((42, 32), "25/1", 7), "b/ntsc.mp4": ((42, 32), "30000/1001", 30),
        "b/with_audio.mp4": ((42, 32), "25/1", 25)}
BAD = {"c/garbage.mp4": "ffprobe cannot read it", "c/audio_only.mp4": "no video stream",
       "c/cut.mp4": "source cut off or corrupt"}


def output_of(out: Path, source: str) -> Path:
    return out / Path(source).with_suffix(".mp4")


@pytest.fixture(scope="module")
def transcoded(zoo, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("transcode_out") / "nvdec"
    result = run_cli("--videos", str(zoo), "--out", str(out), "--short-side", "32", "--workers", "2", "--quiet",
                     "--preset", "ultrafast")
    return out, result


def test_bad_files_are_skipped_with_a_reason(transcoded):
    out, result = transcoded
    assert result.returncode == 0, result.stderr
    assert f"videos ok {len(GOOD)} ({len(GOOD)} transcoded now, 0 already done) / skipped {len(BAD)}" in result.stdout
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["ok"] == sorted(GOOD)  # list order: sorted paths
    reasons = {f["file"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == set(BAD)
    for source, reason in BAD.items():
        assert reason in reasons[source], reasons[source]
        assert f"skipped {source}: " in result.stderr
        assert not output_of(out, source).exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("source", sorted(GOOD))
def test_outputs_are_nvdec_friendly(transcoded, source):
    out, _ = transcoded
    size, rate, frames = GOOD[source]
    got = describe(output_of(out, source))
    assert got["types"] == ["video"]                                   # audio dropped
    assert (got["codec"], got["pix_fmt"]) == ("h264", "yuv420p")       # 10-bit and 4:4:4 converted
    assert got["size"] == size                                         # short side 32, even; rotation applied
    assert not got["rotation"]                                         # and its metadata removed
    assert got["avg"] == got["r"] == rate                              # constant rate (VFR: its average)
    assert got["frames"] == frames
    steps = {b - a for a, b in zip(got["pts"], got["pts"][1:])}
    assert len(steps) == 1                                             # evenly spaced timestamps
    keyframes = got["keyframes"]
    assert keyframes[0] == 0
    gaps = [b - a for a, b in zip(keyframes + [got["frames"]], keyframes[1:] + [got["frames"]])][:len(keyframes)]
    assert max(gaps) <= 16
    if frames > 16:
        assert keyframes[:2] == [0, 16]                                # exactly GOP 16, no scene-cut keyframes


def test_rerun_skips_finished_outputs_and_redoes_missing_ones(zoo, transcoded, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(transcoded[0], out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    output_of(out, "a/vfr.mp4").unlink()
    (out / "a" / ".good.mp4.999999999.tmp").write_bytes(b"left by a killed run")  # pid that cannot exist

    result = run_cli("--videos", str(zoo), "--out", str(out), "--short-side", "32", "--workers", "2", "--quiet",
                     "--preset", "ultrafast")

    assert result.returncode == 0, result.stderr
    assert f"videos ok {len(GOOD)} (1 transcoded now, {len(GOOD) - 1} already done)" in result.stdout
    for path, mtime in mtimes.items():
        if path.name != "vfr.mp4":
            assert path.stat().st_mtime_ns == mtime, path       # not rewritten
    assert describe(output_of(out, "a/vfr.mp4"))["frames"] == 25
    assert not (out / "a" / ".good.mp4.999999999.tmp").exists()


def test_other_settings_are_refused_unless_overwrite(zoo, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("a/good.mp4 0\nc/garbage.mp4 1\nb/ntsc.mp4  1  30\n")
    out = tmp_path / "out"
    args = ["--videos", str(zoo), "--out", str(out), "--list", str(list_file), "--workers", "2", "--quiet",
            "--preset", "ultrafast"]
    assert run_cli(*args, "--short-side", "32").returncode == 0

    result = run_cli(*args, "--short-side", "48")
    assert result.returncode == 2
    assert "--short-side 32 then, 48 now" in result.stderr and "--overwrite" in result.stderr

    result = run_cli(*args, "--short-side", "48", "--fps", "10", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "videos ok 2 (2 transcoded now, 0 already done) / skipped 1" in result.stdout
    good = describe(out / "a" / "good.mp4")
    assert (good["size"], good["r"], good["frames"]) == ((64, 48), "10/1", 16)  # 1.6 s at 10 fps
    # The list, rewritten for the outputs (the failed video left out).
    assert (out / "list.txt").read_text() == "a/good.mp4 0\nb/ntsc.mp4  1  30\n"


@pytest.mark.parametrize("args, message", [
    (["--short-side", "33"], "must be even"),
    (["--crf", "60"], "--crf"),
    (["--fps", "0"], "--fps"),
])
def test_bad_arguments_exit_2(zoo, tmp_path, args, message):
    result = run_cli("--videos", str(zoo), "--out", str(tmp_path / "o"), *args)
    assert result.returncode == 2 and message in result.stderr


def test_out_inside_videos_is_refused(zoo):
    result = run_cli("--videos", str(zoo), "--out", str(zoo / "nvdec"))
    assert result.returncode == 2 and "inside --videos" in result.stderr
    assert not (zoo / "nvdec").exists()


def test_ctrl_c_stops_cleanly_and_a_rerun_continues(tmp_path):
    videos = tmp_path / "videos"
    for i in range(8):
        make_clip(videos / f"clip_{i}.mp4", frames=150, size="320x240")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "preprocessing", "transcode", "--videos", str(videos), "--out", str(out),
            "--workers", "2", "--quiet", "--preset", "veryfast"]
    process = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=sigint_at_default)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("clip_*.mp4")):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode == 0:
        pytest.skip("the transcode finished before it could be interrupted")
    assert process.returncode == 130, stderr
    assert "Run the same command again to continue" in stderr and "Traceback" not in stderr
    finished = sorted(p.name for p in out.glob("clip_*.mp4"))
    assert 1 <= len(finished) < 8
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    assert not (out / REPORT_NAME).exists()

    result = subprocess.run(args, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"({8 - len(finished)} transcoded now, {len(finished)} already done) / skipped 0" in result.stdout
    assert all(describe(p)["frames"] == 150 for p in out.glob("clip_*.mp4"))


def test_output_rate_and_scale_rules():
    assert output_rate(29.97002997, None) == Fraction(30000, 1001)
    assert output_rate(25.04, None) == 25                       # within 0.5 % of a standard rate
    assert output_rate(625 / 49, None) == Fraction(2551, 200)   # otherwise kept to 1/1000
    assert output_rate(29.97, 10) == 10
    assert scale_filter(640, 480, 256) == "scale=-2:256" and scale_filter(480, 640, 256) == "scale=256:-2"
    assert scale_filter(65, 49, None) == "scale=trunc(iw/2)*2:trunc(ih/2)*2"


def test_help():
    result = run_cli("--help")
    assert result.returncode == 0 and "examples:" in result.stdout
    assert "python -m preprocessing transcode" in result.stdout and "transcode.report.json" in result.stdout


def test_names_with_a_newline_or_tab_are_not_transcoded(tmp_path):
    from preprocessing.transcode import plan_jobs

    for name in ("ok.mp4", "new\nline.mp4", "tab\tx.mp4"):
        (tmp_path / "v" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "v" / "a" / name).write_bytes(b"")
    jobs, failed = plan_jobs(tmp_path / "v", tmp_path / "out")
    assert [j.source for j in jobs] == ["a/ok.mp4"]
    assert sorted(f["file"] for f in failed) == ["a/new\nline.mp4", "a/tab\tx.mp4"]
    assert all("newline, TAB or other control character" in f["reason"] for f in failed)


def test_list_entries_outside_videos_are_not_transcoded(tmp_path):
    from preprocessing.transcode import plan_jobs

    (tmp_path / "v" / "a").mkdir(parents=True)
    (tmp_path / "v" / "a" / "ok.mp4").write_bytes(b"")
    (tmp_path / "list.txt").write_text("a/ok.mp4\n../x.mp4\n/etc/passwd\na/../../x.mp4\n")
    jobs, failed = plan_jobs(tmp_path / "v", tmp_path / "out", tmp_path / "list.txt")
    assert [j.source for j in jobs] == ["a/ok.mp4"]
    assert failed == [dict(file=f, reason="path leaves --videos (absolute or '..'); list paths are relative to "
                                          "--videos; not transcoded")
                      for f in ("../x.mp4", "/etc/passwd", "a/../../x.mp4")]


def test_an_output_wider_than_nvdec_decodes_is_refused(tmp_path):
    """A 2200x16 source at --short-side 32 becomes 4400x32: H.264 that NVDEC (4096 a side) cannot
    decode, which transcode reported as an NVDEC-friendly output."""
    make_clip(tmp_path / "v" / "a" / "wide.mp4", frames=2, size="2200x16", pix_fmt="yuv444p")
    make_clip(tmp_path / "v" / "a" / "ok.mp4", frames=2)
    out = tmp_path / "out"
    result = run_cli("--videos", str(tmp_path / "v"), "--out", str(out), "--short-side", "32", "--workers", "1",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    assert "skipped a/wide.mp4: frame size 4400x32 is larger than NVDEC's 4096 on a side" in result.stderr
    assert (out / "a" / "ok.mp4").exists() and not (out / "a" / "wide.mp4").exists()

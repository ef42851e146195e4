"""Smoke test of scripts/bench_preprocessing.py: both routes run on tiny clips (a test
pattern, and clips cut from real footage when ../shared is there), agree on frame
counts, and the JSON carries speeds, sizes and fidelity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing.ffmpeg_tools import executable, missing_tools

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_CLIPS = PROJECT_ROOT.parent / "shared" / "data" / "real-clips"

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")


def run_bench(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "scripts/bench_preprocessing.py", "--videos", "2", "--seconds", "1",
                             "--short-side", "48", "--fps", "10", "--workers", "1", "--json", str(out),
                             "--work", str(tmp_path / "work"), *extra],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio ours / reference" in result.stdout
    return json.loads(out.read_text())


def check_report(report: dict, encoder: str) -> None:
    assert report["frames_identical"] is True
    assert report["args"]["encoder"] == encoder
    for route in ("ours", "reference"):
        summary = report["summary"][route]
        assert summary["videos_per_s_per_core"] > 0 and summary["db_bytes"] > 0
        assert 25 < summary["psnr_db"] < 60  # frames resemble the source
    assert report["ratio"] == pytest.approx(report["summary"]["ours"]["videos_per_s_per_core"]
                                            / report["summary"]["reference"]["videos_per_s_per_core"])


def test_bench_on_test_patterns_with_each_encoder(tmp_path):
    check_report(run_bench(tmp_path / "turbo"), "turbo")
    check_report(run_bench(tmp_path / "ffmpeg", "--encoder", "ffmpeg"), "ffmpeg")


@pytest.mark.skipif(not REAL_CLIPS.is_dir(), reason="shared/data/real-clips not available")
def test_bench_cuts_clips_from_real_footage(tmp_path):
    """The first two real clips in name order are AVIs with packed B-frames, on which
    `-stream_loop` never ended; the loop filter must cut them to length."""
    footage = tmp_path / "footage"
    footage.mkdir()
    for avi in sorted(REAL_CLIPS.glob("*.avi"))[:2]:
        (footage / avi.name).symlink_to(avi)
    report = run_bench(tmp_path, "--footage", str(footage))
    check_report(report, "turbo")
    clips = sorted((tmp_path / "work" / "videos").rglob("*.mp4"))
    assert len(clips) == 2
    for clip in clips:
        frames = subprocess.run([executable("ffprobe"), "-v", "error", "-count_frames", "-select_streams", "v:0",
                                 "-show_entries", "stream=nb_read_frames,height", "-of", "csv=p=0", str(clip)],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert frames == "48,10"  # short side 48, 1 s at 10 fps

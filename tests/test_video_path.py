"""The video-file data path on CPU: VP9 and MJPEG files decoded by DALI's
fn.decoders.video on the sorted union of both views' frames; H.264 refused up front."""

import json
import subprocess

import numpy as np
import pytest

from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import make_pretrain_plan
from pipelines.video_source import VideoIndexError, union_and_orders
from preprocessing.__main__ import main as preprocessing_main
from tests.lmdb_fixtures import coded_frame
from tests.test_pretrain_pipeline import EXACT, HEIGHT, WIDTH, expected_view, to_pixels

CODECS = {  # near-lossless settings so the colour code survives
    "webm": ["-c:v", "libvpx-vp9", "-lossless", "1", "-pix_fmt", "yuv444p"],
    "avi": ["-c:v", "mjpeg", "-q:v", "1", "-pix_fmt", "yuvj444p"],
    "mp4": ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"],
}
TOLERANCE = 4  # grey levels; measured max 2 (VP9 lossless 4:4:4) and 3 (MJPEG q1 4:4:4)


def write_coded_video(path, num_frames, ext):
    raw = b"".join(coded_frame(i, HEIGHT, WIDTH).tobytes() for i in range(num_frames))
    subprocess.run(["ffmpeg", "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s",
                    f"{WIDTH}x{HEIGHT}", "-r", "25", "-i", "-", *CODECS[ext], str(path)], input=raw, check=True)


@pytest.fixture(scope="module")
def video_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    lengths = {}
    for i, n in enumerate([30, 64, 7, 90, 45, 120, 16, 33]):
        ext = "webm" if i % 2 == 0 else "avi"
        folder = root / ("a" if i < 4 else "b")
        folder.mkdir(exist_ok=True)
        write_coded_video(folder / f"clip{i}.{ext}", n, ext)
        lengths[f"{folder.name}/clip{i}"] = n
    (root / "a" / "broken.webm").write_bytes(b"\x1aE\xdf\xa3" + bytes(500))
    out = root / "index.json"
    assert preprocessing_main(["index-videos", "--videos", str(root), "--out", str(out), "--quiet"]) == 0
    return out, lengths


def test_index_counts_frames_and_skips_broken_files(video_index):
    path, lengths = video_index
    index = json.loads(path.read_text())
    assert {v["name"]: v["frames"] for v in index["videos"]} == lengths
    assert {v["codec"] for v in index["videos"]} == {"vp9", "mjpeg"}
    assert [f["file"] for f in index["failed"]] == ["a/broken.webm"]
    assert all((v["height"], v["width"]) == (HEIGHT, WIDTH) for v in index["videos"])


def test_dali_decodes_the_planned_frames_of_video_files(video_index):
    path, _ = video_index
    index = json.loads(path.read_text())
    loader = PretrainLoader(str(path), EXACT, LoaderSettings(batch_size=4, num_threads=1, seed=3))
    checked = 0
    for batch in loader:
        for i, video in enumerate(batch["video_index"].tolist()):
            plan = make_pretrain_plan(3, 0, video, index["videos"][video]["frames"], HEIGHT, WIDTH, EXACT)
            for name, vp in (("view1", plan.view1), ("view2", plan.view2)):
                got = to_pixels(batch[name][i])
                assert np.abs(got - expected_view(vp)).max() <= TOLERANCE + 1e-3, (name, video, vp)
            assert batch["spatial_label"][i] == plan.spatial_label
            assert batch["temporal_label"][i] == plan.temporal_label
            assert batch["rot2"][i] == plan.view2.rotation
            checked += 1
    assert checked == 8


def test_h264_on_cpu_is_refused_up_front(tmp_path):
    (tmp_path / "x").mkdir()
    write_coded_video(tmp_path / "x" / "clip.mp4", 20, "mp4")
    index = tmp_path / "h264.json"
    assert preprocessing_main(["index-videos", "--videos", str(tmp_path), "--out", str(index), "--quiet"]) == 0
    with pytest.raises(VideoIndexError, match=r"clip\.mp4: codec h264 .*GPU.*build-lmdb"):
        PretrainLoader(str(index), EXACT, LoaderSettings(batch_size=1, num_threads=1), device="cpu")


def test_a_video_file_gone_after_indexing_is_replaced(video_index, tmp_path):
    path, _ = video_index
    index = json.loads(path.read_text())
    index["videos"][1]["file"] = "a/gone.avi"
    moved = tmp_path / "index.json"
    moved.write_text(json.dumps(index))
    loader = PretrainLoader(str(moved), EXACT, LoaderSettings(batch_size=4, num_threads=1, seed=3))
    batches = list(loader)
    ids = [v for b in batches for v in b["video_index"].tolist()]
    assert 1 not in ids and len(ids) == 8
    assert sum(int((b["substituted"] > 0).sum()) for b in batches) == 1


def test_union_of_both_views_is_sorted_and_reconstructs_each_view():
    for seed in range(200):
        plan = make_pretrain_plan(seed, 0, seed, 150, 240, 320, EXACT)
        frames, order1, order2 = union_and_orders(plan)
        assert np.all(np.diff(frames) > 0)
        assert np.array_equal(frames[order1], plan.view1.frames)
        assert np.array_equal(frames[order2], plan.view2.frames)
        assert len(frames) == len(set(plan.view1.frames) | set(plan.view2.frames))

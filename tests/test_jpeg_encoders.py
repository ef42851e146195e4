"""The two JPEG encoders of build-lmdb (preprocessing/ffmpeg_io.py): "turbo"
(ffmpeg's raw YUV frames encoded here with libjpeg-turbo) and "ffmpeg" (ffmpeg's
own MJPEG encoder, the reference's frames).

What must hold: both give frames of the same size, count and colours (the turbo
path expands limited-range video to JPEG's full range exactly once, whichever of
its two ways it takes); the output size follows ffmpeg's `scale=-2:N` rule; the
default turbo quality is at least as faithful to the source as the reference's
`-q:v 2` on real footage; settings are recorded and a resume with another encoder
is refused."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from PIL import Image

from pipelines import lmdb_store
from preprocessing import ffmpeg_io
from preprocessing.build_lmdb import BuildError, ConvertSettings, build_fingerprint, build_lmdb, plan_build
from preprocessing.build_lmdb import open_partial, partial_path
from preprocessing.ffmpeg_io import (
    VideoError, expand_to_full_range, iter_jpeg_frames, output_size, probe_video, raw_frame_format,
    read_all_frames, resolve_quality,
)
from preprocessing.ffmpeg_tools import executable, missing_tools

REAL_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-clips"

pytestmark = pytest.mark.skipif(bool(missing_tools()),
                                reason="ffmpeg/ffprobe not installed")


def ffmpeg_run(*args: str) -> bytes:
    return subprocess.run([executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
                          check=True, capture_output=True).stdout


def make_clip(path: Path, size: str = "96x64", frames: int = 8, pix_fmt: str = "yuv420p",
              pattern: str = "testsrc2") -> Path:
    """A colourful H.264 clip: mid-tones and saturated bars, where a missing or doubled
    range expansion shows as a shift of 10+ grey levels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg_run("-f", "lavfi", "-i", f"{pattern}=size={size}:rate=25", "-frames:v", str(frames),
               "-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", pix_fmt, str(path))
    return path


def decoded(jpegs: list[bytes], mode: str = "RGB") -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(j)).convert(mode), dtype=np.float64) for j in jpegs])


def source_rgb(path: Path, frames: int, vf: str | None = None) -> np.ndarray:
    """The source frames as ffmpeg converts them to RGB (the truth both encoders approximate)."""
    width, height = (probe_video(path)[k] for k in ("width", "height"))
    if vf:
        width, height = (int(x) for x in vf.split("=")[1].split(":")[:2])
    raw = ffmpeg_run("-i", str(path), *(["-vf", vf] if vf else []), "-frames:v", str(frames),
                     "-pix_fmt", "rgb24", "-f", "rawvideo", "-")
    return np.frombuffer(raw, np.uint8).reshape(frames, height, width, 3).astype(np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a - b) ** 2)))


# --------------------------------------------------------------------------- sizes and settings

@pytest.mark.parametrize("width, height, short_side", [
    (640, 480, 320), (426, 240, 320), (454, 256, 320), (341, 256, 128), (1920, 1080, 256),
    (720, 1280, 320), (333, 200, 113), (200, 333, 113), (101, 99, 64), (64, 48, 96),
])
def test_output_size_is_ffmpegs_minus_2_rule(width, height, short_side):
    scale = f"-2:{short_side}" if width >= height else f"{short_side}:-2"
    png = ffmpeg_run("-f", "lavfi", "-i", f"color=c=gray:s={width}x{height}:d=0.04", "-vf", f"scale={scale}",
                     "-frames:v", "1", "-c:v", "png", "-f", "image2pipe", "-")
    assert output_size(width, height, short_side) == Image.open(io.BytesIO(png)).size
    assert output_size(width, height, None) == (width, height)


def test_quality_scales_per_encoder():
    assert resolve_quality("turbo") == 94 and resolve_quality("ffmpeg") == 2
    assert resolve_quality("turbo", 100) == 100 and resolve_quality("ffmpeg", 31) == 31
    for encoder, bad in (("turbo", 0), ("turbo", 101), ("ffmpeg", 1), ("ffmpeg", 32)):
        with pytest.raises(ValueError, match=encoder):
            resolve_quality(encoder, bad)
    with pytest.raises(ValueError, match="unknown JPEG encoder"):
        resolve_quality("pillow")


@pytest.mark.parametrize("info, size, expected", [
    (dict(width=96, height=64, pix_fmt="yuv420p", color_range="tv"), (96, 64), ({}, "yuv420p", True)),
    (dict(width=96, height=64, pix_fmt="yuv420p", color_range=None), (96, 64), ({}, "yuv420p", True)),
    (dict(width=96, height=64, pix_fmt="yuv420p", color_range="pc"), (96, 64), ({}, "yuv420p", False)),
    (dict(width=96, height=64, pix_fmt="yuvj420p", color_range="pc"), (96, 64), ({}, "yuvj420p", False)),
    (dict(width=96, height=64, pix_fmt="yuv420p", color_range="tv"), (48, 32), ({"out_range": "full"}, "yuv420p", False)),
    (dict(width=96, height=64, pix_fmt="yuv444p", color_range="tv"), (96, 64), ({"out_range": "full"}, "yuv420p", False)),
    (dict(width=96, height=64, pix_fmt="yuv420p10le", color_range="tv"), (96, 64), ({"out_range": "full"}, "yuv420p", False)),
])
def test_raw_frame_format_converts_the_range_once(info, size, expected):
    assert raw_frame_format(info, *size) == expected


def test_full_range_lookup_table_values():
    y = np.array([[0, 16, 126, 235, 255]], np.uint8)
    c = np.array([[16, 128, 240]], np.uint8)
    out = (np.empty_like(y), np.empty_like(c), np.empty_like(c))
    expand_to_full_range((y, c, c), out)
    assert out[0].tolist() == [[0, 0, 128, 255, 255]]
    assert out[1].tolist() == [[0, 128, 255]] and out[2].tolist() == [[0, 128, 255]]


# --------------------------------------------------------------------------- same frames from both encoders

@pytest.mark.parametrize("case, make, short_side", [
    ("limited range, kept size (lookup table here)", dict(), None),
    ("limited range, resized (swscale does the range)", dict(), 40),
    ("full-range H.264, kept size (nothing to expand)", dict(pix_fmt="yuvj420p"), None),
    ("4:4:4, odd size (swscale converts)", dict(size="95x63", pix_fmt="yuv444p", pattern="testsrc"), None),
])
def test_turbo_and_ffmpeg_encoders_agree(tmp_path, case, make, short_side):
    clip = make_clip(tmp_path / "c.mp4", **make)
    turbo = read_all_frames(clip, short_side=short_side, encoder="turbo", quality=100)
    reference = read_all_frames(clip, short_side=short_side, encoder="ffmpeg", quality=2)
    assert len(turbo) == len(reference) == 8
    turbo_px, reference_px = decoded(turbo), decoded(reference)
    assert turbo_px.shape == reference_px.shape
    # Range applied twice or not at all moves these frames by ~10-20 levels on average.
    assert abs(turbo_px.mean() - reference_px.mean()) < 1.0, case
    # Luma pixel by pixel (turbo always writes 4:2:0; ffmpeg keeps a 4:4:4 source's chroma).
    assert np.abs(decoded(turbo, "L") - decoded(reference, "L")).mean() < 2.0, case


def test_turbo_keeps_rotation_and_odd_sizes(tmp_path):
    plain = make_clip(tmp_path / "plain.mp4", size="95x63", pix_fmt="yuv444p", pattern="testsrc")
    clip = tmp_path / "rotated.mp4"
    ffmpeg_run("-i", str(plain), "-c", "copy", "-metadata:s:v:0", "rotate=90", str(clip))
    info = probe_video(clip)
    assert (info["width"], info["height"], info["rotation"]) == (63, 95, 90)
    frames = read_all_frames(clip, encoder="turbo")
    assert {Image.open(io.BytesIO(f)).size for f in frames} == {(63, 95)}
    assert {Image.open(io.BytesIO(f)).size for f in read_all_frames(clip, short_side=32)} == {(32, 48)}


def test_frame_pixel_limit(tmp_path, monkeypatch):
    clip = make_clip(tmp_path / "c.mp4")
    monkeypatch.setattr(ffmpeg_io, "MAX_FRAME_PIXELS", 96 * 64 - 1)
    with pytest.raises(VideoError, match="above the limit"):
        list(iter_jpeg_frames(clip))
    assert len(list(iter_jpeg_frames(clip, short_side=32))) == 8


@pytest.mark.skipif(not (REAL_CLIPS / "yoga.mp4").exists(), reason="shared/data/real-clips not available")
@pytest.mark.parametrize("name", ["yoga.mp4", "abseiling_k400.mp4", "v_Basketball_g01_c01.avi"])
def test_default_turbo_quality_is_at_least_as_faithful_as_the_reference(name):
    """Kinetics-like real footage at short side 320: the default turbo frames are as
    close to the decoded source as ffmpeg -q:v 2's, or closer (RGB PSNR)."""
    clip = REAL_CLIPS / name
    info = probe_video(clip)
    width, height = output_size(info["width"], info["height"], 320)
    frames = 20
    truth = source_rgb(clip, frames, vf=f"scale={width}:{height}")
    turbo = list(iter_jpeg_frames(clip, short_side=320, encoder="turbo", info=info))[:frames]
    reference = list(iter_jpeg_frames(clip, short_side=320, encoder="ffmpeg", info=info))[:frames]
    turbo_psnr, reference_psnr = psnr(decoded(turbo), truth), psnr(decoded(reference), truth)
    assert turbo_psnr >= reference_psnr - 0.05, (turbo_psnr, reference_psnr)
    assert turbo_psnr > 35


# --------------------------------------------------------------------------- the build records it

def test_build_records_the_encoder_and_refuses_to_resume_with_another(tmp_path):
    videos = tmp_path / "videos"
    make_clip(videos / "a" / "x.mp4")
    out = tmp_path / "db.lmdb"
    report = build_lmdb(videos, out, short_side=32, workers=1, progress=False, encoder="ffmpeg", quality=3)
    assert report["settings"]["encoder"] == "ffmpeg" and report["settings"]["quality"] == 3
    with lmdb_store.shared_env(str(out)).begin() as txn:
        info = msgpack.unpackb(bytes(txn.get(b"__info__")), raw=False)
    assert (info["encoder"], info["quality"]) == ("ffmpeg", 3)

    with pytest.raises(BuildError, match="ffmpeg encoder"):
        build_lmdb(videos, tmp_path / "bad.lmdb", encoder="ffmpeg", quality=94, progress=False)

    other = tmp_path / "other.lmdb"
    plan = plan_build(videos)
    writer, _ = open_partial(partial_path(other), build_fingerprint(plan, ConvertSettings(short_side=32,
                             quality=2, encoder="ffmpeg")), map_size=1 << 20, overwrite=False)
    writer.close()
    with pytest.raises(BuildError, match="--encoder ffmpeg then, turbo now"):
        build_lmdb(videos, other, short_side=32, quality=2, workers=1, progress=False)


def test_a_missing_simplejpeg_is_refused_before_any_video(tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    make_clip(videos / "a" / "x.mp4")
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # `import simplejpeg` now raises ImportError
    with pytest.raises(BuildError, match="simplejpeg.*--encoder ffmpeg"):
        build_lmdb(videos, tmp_path / "db.lmdb", progress=False)
    assert not (tmp_path / "db.lmdb").exists() and not (tmp_path / "db.lmdb.partial").exists()
    report = build_lmdb(videos, tmp_path / "db.lmdb", encoder="ffmpeg", workers=1, progress=False)
    assert report["counts"]["ok"] == 1

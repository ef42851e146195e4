"""Videos NVDEC cannot decode are refused before a GPU run starts (not mid-training): the
video index records each stream's pixel format, chroma, bit depth and profile, and the
loaders on device="gpu" name the file and the `transcode` command that fixes it. An
index written before these fields existed is refused on a GPU with the command that
re-indexes it (and still works on the CPU).

Loaders are only constructed here (device="gpu", nothing built: that needs CUDA)."""

import json
import subprocess

import pytest

from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
from pipelines.clip_plan import ClipPlanConfig
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from pipelines.video_source import VideoIndexError, nvdec_problem
from preprocessing.__main__ import main as preprocessing_main
from preprocessing.ffmpeg_tools import executable, missing_tools

pytestmark = pytest.mark.skipif(bool(missing_tools()), reason="needs ffmpeg and ffprobe")

PLAN = PlanConfig(frames=4, crop_size=32)


def clip(path, pix_fmt: str, codec: str = "libx264"):
    subprocess.run([executable("ffmpeg"), "-y", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=64x48:rate=25",
                    "-t", "1.2", "-c:v", codec, "-pix_fmt", pix_fmt, str(path)], check=True)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """{name: index path}: one index per stream format, each with two clips of it."""
    out = {}
    for name, pix_fmt, codec in (("h264_420", "yuv420p", "libx264"), ("h264_422", "yuv422p", "libx264"),
                                 ("h264_10bit", "yuv420p10le", "libx264"), ("hevc_10bit", "yuv420p10le", "libx265")):
        root = tmp_path_factory.mktemp(name)
        for i in range(2):
            (root / f"c{i}").mkdir()
            clip(root / f"c{i}" / f"v{i}.mp4", pix_fmt, codec)
        index = root.parent / f"{name}.json"
        assert preprocessing_main(["index-videos", "--videos", str(root), "--out", str(index), "--quiet"]) == 0
        out[name] = index
    return out


def test_the_index_records_pixel_format_chroma_bit_depth_and_profile(indexes):
    want = {"h264_420": ("yuv420p", "4:2:0", 8, "High"), "h264_422": ("yuv422p", "4:2:2", 8, "High 4:2:2"),
            "h264_10bit": ("yuv420p10le", "4:2:0", 10, "High 10"),
            "hevc_10bit": ("yuv420p10le", "4:2:0", 10, "Main 10")}
    for name, index in indexes.items():
        data = json.loads(index.read_text())
        assert data["version"] == 2
        for video in data["videos"]:
            assert (video["pix_fmt"], video["chroma"], video["bit_depth"], video["profile"]) == want[name], name


@pytest.mark.parametrize("name, reason", [("h264_422", "chroma 4:2:2"), ("h264_10bit", "10-bit")])
def test_gpu_loaders_refuse_what_nvdec_cannot_decode_naming_file_and_fix(indexes, name, reason):
    index = str(indexes[name])
    with pytest.raises(VideoIndexError) as pretrain:
        PretrainLoader(index, PLAN, LoaderSettings(batch_size=2), device="gpu")
    with pytest.raises(VideoIndexError) as clips:
        ClipLoader(index, "train", ClipPlanConfig(frames=4, crop_size=32), ClipLoaderSettings(batch_size=2),
                   device="gpu")
    for err in (pretrain, clips):
        message = str(err.value)
        assert "v0.mp4" in message and reason in message, message
        assert "python -m preprocessing transcode --videos " in message and "index-videos" in message, message


def test_gpu_loaders_accept_what_nvdec_decodes(indexes):
    for name in ("h264_420", "hevc_10bit"):
        loader = PretrainLoader(str(indexes[name]), PLAN, LoaderSettings(batch_size=2), device="gpu")
        assert len(loader.metas) == 2
        loader.close()


def test_an_index_without_stream_formats_is_refused_on_gpu_with_the_reindex_command(indexes, tmp_path):
    data = json.loads(indexes["h264_420"].read_text())
    for video in data["videos"]:
        for field in ("pix_fmt", "chroma", "bit_depth", "profile"):
            del video[field]
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**data, "version": 1}))
    with pytest.raises(VideoIndexError, match=r"re-index: python -m preprocessing index-videos --videos "):
        PretrainLoader(str(old), PLAN, LoaderSettings(batch_size=2), device="gpu")


def test_nvdec_limits_per_codec():
    ok = dict(chroma="4:2:0", bit_depth=8, pix_fmt="yuv420p", profile="")
    assert nvdec_problem({**ok, "codec": "h264"}) is None
    assert nvdec_problem({**ok, "codec": "hevc", "bit_depth": 10}) is None
    assert nvdec_problem({**ok, "codec": "av1", "bit_depth": 10}) is None
    assert "10-bit" in nvdec_problem({**ok, "codec": "h264", "bit_depth": 10})
    assert "12-bit" in nvdec_problem({**ok, "codec": "hevc", "bit_depth": 12})
    assert "4:4:4" in nvdec_problem({**ok, "codec": "hevc", "chroma": "4:4:4"})
    assert "not one DALI decodes" in nvdec_problem({**ok, "codec": "prores"})

"""The video-file data path: an index of encoded videos (JSON, written by
`python -m preprocessing index-videos`) and the external_source that hands DALI
each sample's encoded file plus the sorted union of both views' frame indices, so
`fn.decoders.video` decodes every needed frame once (NVDEC on GPU) and the two
views are cut from that one decode.

Index format: {"format": VIDEO_INDEX_FORMAT, "version": 2, "root": folder,
"classes": [...], "videos": [{name, file (relative to root), label, frames,
height, width, fps, codec, size, mtime_ns, pix_fmt, chroma, bit_depth, profile}, ...]}.
size and mtime_ns (the file's, when indexed; absent in older indexes) let readers refuse
files that changed since. Version 1 indexes lack the last four (the stream format): they
still work on the CPU; on a GPU they are refused with the command that re-indexes them,
because NVDEC's limits are checked from those fields before training.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .faults import check_video_files, stamp_problem, too_large
from .lmdb_store import VideoMeta, video_meta_from
from .plan import PlanConfig, PretrainPlan
from .sample_source import BadSampleError
from .sources import APPEARANCE_OUTPUTS, PretrainLmdbSource, appearance_arrays, view_angle

VIDEO_INDEX_FORMAT = "cstp-dali-video-index"
# What DALI 2.4 decodes on the CPU; H.264, HEVC, AV1 and MPEG-4 need NVDEC (docs/data.md#video-index).
CPU_DECODABLE_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
MAX_VIDEO_BYTES = 4 << 30  # refuse absurd files rather than read them into memory
# An index is read whole; Kinetics-400's (~300k videos) is ~100 MB, so 1 GiB leaves room for
# far larger datasets and still refuses a file that is no index before it fills the memory.
MAX_VIDEO_INDEX_BYTES = 1 << 30
# What DALI's `mixed` video decoder (NVDEC) takes, per codec: 4:2:0 chroma and at most this
# bit depth. NVDEC up to Hopper decodes H.264 and MPEG-4 in 8-bit 4:2:0 only; HEVC, VP9 and
# AV1 also in 10 bit. Anything else fails DALI's capability check ("Decoder hardware does
# not support this video codec and/or chroma format") in the middle of a run, killing it.
NVDEC_MAX_BIT_DEPTH = {"h264": 8, "mpeg4": 8, "vp8": 8, "mjpeg": 8, "hevc": 10, "vp9": 10, "av1": 10}
STREAM_FORMAT_FIELDS = ("pix_fmt", "chroma", "bit_depth", "profile")

# The non-video outputs of the video source, in order, after the encoded file.
VIDEO_PARAM_OUTPUTS = (
    "frames", "order1", "order2", "anchor1", "shape1", "anchor2", "shape2", "angle1", "angle2", "flip1", "flip2",
    "spatial_label", "temporal_label", "speed_label", "rot1", "rot2", "video_index",
    *APPEARANCE_OUTPUTS,  # the strong augmentation, as on the LMDB path (sources.appearance_arrays)
    "substituted",
)


class VideoIndexError(ValueError):
    pass


def is_video_index(path: str) -> bool:
    return str(path).endswith(".json")


class VideoFile(str):
    """A video's absolute path that also carries what its index recorded: `stream`, the
    stream format (STREAM_FORMAT_FIELDS plus codec; None for an index written before
    formats were recorded), and `root`, the indexed folder (for the commands that fix it)."""
    stream: dict | None = None
    root: str = ""


def load_video_index_json(path: str) -> dict:
    """The parsed JSON of a video index file; a missing file, one too large to be an index,
    broken JSON or another JSON document is refused with a message naming the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"video index not found: {path} (make one with "
                                "`python -m preprocessing index-videos --videos DIR --out INDEX.json`)")
    if problem := too_large(path, MAX_VIDEO_INDEX_BYTES, "a video index"):
        raise VideoIndexError(f"{problem}; pass the file that `python -m preprocessing index-videos` wrote")
    try:
        index = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise VideoIndexError(f"{path} is not a readable JSON video index ({type(err).__name__}: {err})") from None
    if not isinstance(index, dict) or index.get("format") != VIDEO_INDEX_FORMAT:
        raise VideoIndexError(f"{path} is not a video index (no format {VIDEO_INDEX_FORMAT!r})")
    return index


def read_video_index(path: str) -> tuple[list[VideoMeta], list[str], list[VideoFile]]:
    """(metas, classes, absolute file paths) of a video index."""
    p = Path(path)
    index = load_video_index_json(path)
    root = Path(index.get("root", p.parent))
    if not root.is_absolute():
        root = p.parent / root
    metas, files = [], []
    videos = index.get("videos")
    if not isinstance(videos, list):
        raise VideoIndexError(f"{path}: 'videos' must be a list")
    for i, v in enumerate(videos):
        try:
            meta = video_meta_from(v, f"{path} videos[{i}]")
            if not isinstance(v.get("file"), str) or not v["file"]:
                raise ValueError(f"{path} videos[{i}]: video {meta.name!r} has no 'file'")
        except ValueError as err:
            raise VideoIndexError(f"{err}; re-index (python -m preprocessing index-videos)") from None
        metas.append(replace(meta, source=str(v.get("codec", ""))))
        file = VideoFile(root / v["file"])
        file.root = str(root)
        if all(field in v for field in STREAM_FORMAT_FIELDS):
            file.stream = {"codec": v.get("codec", ""), **{field: v[field] for field in STREAM_FORMAT_FIELDS}}
        files.append(file)
    check_video_files(path, files, video_stamps(index))
    return metas, list(index.get("classes", [])), files


def nvdec_problem(stream: dict) -> str | None:
    """Why NVDEC (DALI's `mixed` video decoder) cannot decode a stream of this format, or
    None when it can (see NVDEC_MAX_BIT_DEPTH)."""
    codec = str(stream.get("codec", "")).lower()
    if codec not in NVDEC_MAX_BIT_DEPTH:
        return f"codec {codec or 'unknown'} is not one DALI decodes on the GPU"
    what = f"{codec} {stream.get('profile') or ''} {stream.get('pix_fmt') or ''}".replace("  ", " ").strip()
    if stream.get("chroma") != "4:2:0":
        return f"{what}: chroma {stream.get('chroma') or 'unknown'}, NVDEC decodes 4:2:0 only"
    depth = stream.get("bit_depth")
    if not isinstance(depth, int) or depth > NVDEC_MAX_BIT_DEPTH[codec]:
        return f"{what}: {depth or 'unknown'}-bit, NVDEC decodes {codec} up to {NVDEC_MAX_BIT_DEPTH[codec]}-bit"
    return None


def refuse_for_nvdec(files: list[VideoFile]):
    """On GPU: refuse, before anything starts, a file NVDEC cannot decode (it would end the
    run at its first sample), naming the file and the commands that fix it."""
    for file in files:
        stream = getattr(file, "stream", None)
        root = getattr(file, "root", "") or str(Path(file).parent)
        if stream is None:
            raise VideoIndexError(
                f"{file}: the video index does not record its pixel format, bit depth and profile (written by an "
                "older version), so whether NVDEC can decode it is unknown; re-index: python -m preprocessing "
                f"index-videos --videos {root} --out INDEX.json")
        problem = nvdec_problem(stream)
        if problem:
            raise VideoIndexError(
                f"{file}: {problem}, so it cannot be decoded on the GPU. Transcode the dataset to 8-bit 4:2:0 H.264 "
                f"and index the copy: python -m preprocessing transcode --videos {root} --out {root}_nvdec && "
                f"python -m preprocessing index-videos --videos {root}_nvdec --out INDEX.json (or train on an LMDB: "
                f"python -m preprocessing build-lmdb --videos {root} --out DB)")


def video_stamps(index: dict | str) -> list[dict | None]:
    """Per video, {size, mtime_ns} of its file when it was indexed (None: not recorded)."""
    if not isinstance(index, dict):
        index = load_video_index_json(index)
    return [{"size": int(v["size"]), "mtime_ns": int(v.get("mtime_ns", 0)) or None} if "size" in v else None
            for v in index["videos"]]


def read_video_file(file: str, stamp: dict | None) -> np.ndarray:
    """The encoded bytes of an indexed file, or BadSampleError for a missing, absurd or
    changed file (one stat per sample: a file cut after indexing must not reach the
    decoder, which would fill the missing frames)."""
    try:
        size = os.path.getsize(file)
        if size == 0 or size > MAX_VIDEO_BYTES:
            raise OSError(f"file size {size} bytes is out of range")
        changed = stamp_problem(file, stamp)
        if changed:
            raise OSError(f"the file {changed}; re-index the videos (python -m preprocessing index-videos)")
        return np.fromfile(file, dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise BadSampleError(f"{type(err).__name__}: {err}") from None


def refuse_undecodable(metas: list[VideoMeta], files: list[str], device: str):
    """On CPU, DALI cannot decode H.264/HEVC/MPEG-4/AV1; on GPU, NVDEC takes 4:2:0 of a
    limited bit depth only: say so before anything starts."""
    if device == "gpu":
        refuse_for_nvdec(files)
        return
    for meta, file in zip(metas, files):
        codec = meta.source.lower()
        if codec not in CPU_DECODABLE_CODECS:
            raise VideoIndexError(
                f"{file}: codec {codec or 'unknown'} cannot be decoded by DALI on the CPU (only VP8, VP9 and "
                "MJPEG can). Either train on a GPU (data.device=gpu, NVDEC decodes it) or convert the videos "
                "to an LMDB of JPEG frames: python -m preprocessing build-lmdb --videos DIR --out DB")


def union_and_orders(plan: PretrainPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct frames of both views and, per view, where its frames sit in
    that list. Sorted: a decoder that seeks backwards is ~5x slower (docs/data.md#video-index)."""
    both = np.concatenate([plan.view1.frames, plan.view2.frames])
    frames, inverse = np.unique(both, return_inverse=True)
    t = len(plan.view1.frames)
    return frames.astype(np.int32), inverse[:t].astype(np.int32), inverse[t:].astype(np.int32)


class PretrainVideoSource(PretrainLmdbSource):
    """Same sharding, epochs and plans as the LMDB source; different bytes."""

    def __init__(self, index_path: str, metas: list[VideoMeta], files: list[str], plan_cfg: PlanConfig, **kwargs):
        super().__init__(index_path, metas, plan_cfg, **kwargs)
        self.files = files
        self.stamps = video_stamps(index_path)

    @property
    def num_outputs(self) -> int:
        return 1 + len(VIDEO_PARAM_OUTPUTS)

    def read_sample(self, epoch: int, video: int):
        """(plan, encoded file bytes), or BadSampleError for a missing, absurd or changed
        file. A file damaged inside fails in the decoder (or delivers too few frames,
        an error with pad_mode='none'): the loader's recovery (faults.py) replaces it."""
        try:
            plan = self.plan(epoch, video)
        except (ValueError, IndexError) as err:
            raise BadSampleError(f"{type(err).__name__}: {err}") from None
        return plan, read_video_file(self.files[video], self.stamps[video])

    def outputs(self, plan: PretrainPlan, encoded: np.ndarray, substituted: int) -> tuple:
        frames, order1, order2 = union_and_orders(plan)
        a1, s1 = _yx_box(plan.view1.box)
        a2, s2 = _yx_box(plan.view2.box)
        i32 = lambda v: np.array(v, dtype=np.int32)  # noqa: E731
        # angles: k·90° fused with the strong augmentation's small rotation, as on the LMDB path
        return (encoded, frames, order1, order2, a1, s1, a2, s2, view_angle(plan.view1), view_angle(plan.view2),
                i32(plan.view1.flip), i32(plan.view2.flip), i32(plan.spatial_label), i32(plan.temporal_label),
                i32(plan.speed_label), i32(plan.view1.rotation), i32(plan.view2.rotation),
                i32(plan.video_index), *appearance_arrays(plan.view1), *appearance_arrays(plan.view2),
                i32(substituted))


def _yx_box(box) -> tuple[np.ndarray, np.ndarray]:
    """Anchor and shape in (y, x) order, for fn.slice with axis_names='HW'."""
    return np.array([box.y, box.x], np.float32), np.array([box.h, box.w], np.float32)

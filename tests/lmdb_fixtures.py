"""Small LMDBs written directly from numpy frames, for pipeline tests."""

from __future__ import annotations

import io

import lmdb
import numpy as np
from PIL import Image

from pipelines import lmdb_store as fmt


def encode_jpeg(frame: np.ndarray, quality: int = 100) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 so that colour-coded coordinates survive the round trip within a few levels.
    Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def coded_frame(index: int, height: int, width: int) -> np.ndarray:
    """A frame whose pixels say where they come from: R = 8·(frame mod 32) + 4, G = x, B = y."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = 8 * (index % 32) + 4
    frame[..., 1] = x
    frame[..., 2] = y
    return frame


def decode_coded(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(frame index mod 32, x, y) arrays back from coded pixel values (..., 3) in 0..255."""
    pixels = np.asarray(pixels, np.float64)
    return np.rint((pixels[..., 0] - 4) / 8).astype(int), np.rint(pixels[..., 1]).astype(int), \
        np.rint(pixels[..., 2]).astype(int)


def write_lmdb(path, videos: list[list[np.ndarray]], names=None, labels=None, classes=None,
               version: int = fmt.FORMAT_VERSION):
    """An LMDB in our layout (version 2 unless `version` says 1) from lists of RGB frames."""
    env = lmdb.open(str(path), map_size=1 << 30)
    names = names or [f"class{i % 2}/video{i:03d}" for i in range(len(videos))]
    labels = labels or [i % 2 for i in range(len(videos))]
    metas = []
    with env.begin(write=True) as txn:
        for vid, frames in enumerate(videos):
            jpegs = [encode_jpeg(f) for f in frames]
            for key, value in fmt.layout_entries(vid, jpegs, version):
                txn.put(key, value)
            h, w = frames[0].shape[:2]
            metas.append(fmt.VideoMeta(names[vid], labels[vid], len(frames), h, w, 25.0, "").to_dict())
        txn.put(fmt.KEYS_KEY, fmt.pack([fmt.video_key(i) for i in range(len(videos))]))
        txn.put(fmt.LEN_KEY, fmt.pack(len(videos)))
        txn.put(fmt.ORDER_KEY, fmt.pack(names))
        txn.put(fmt.VLEN_KEY, fmt.pack([len(v) for v in videos]))
        txn.put(fmt.META_KEY, fmt.pack(metas))
        txn.put(fmt.CLASSES_KEY, fmt.pack(classes or sorted({n.split("/")[0] for n in names})))
        txn.put(fmt.INFO_KEY, fmt.pack({"format": fmt.FORMAT_NAME, "version": version}))
    env.close()
    return path


def assert_hints_exact(db_path, header: bytes, frames: list[bytes]):
    """A version 2 header's read hints name exactly each frame's bytes in data.mdb;
    frames under half a page (stored inside B-tree pages) have none."""
    import os

    hints = fmt.header_hints(header, len(frames))
    if hints is None:
        assert all(len(f) < 2048 for f in frames)
        return
    with open(os.path.join(str(db_path), "data.mdb"), "rb") as data:
        for frame, offset, length in zip(frames, *hints):
            if offset:
                assert length == len(frame) and os.pread(data.fileno(), int(length), int(offset)) == frame
            else:
                assert len(frame) < 2048


def coded_video(num_frames: int, height: int, width: int) -> list[np.ndarray]:
    return [coded_frame(i, height, width) for i in range(num_frames)]

"""Decoder faults on the GPU (marker `gpu`; run with `pytest -m gpu` on a lent GPU,
CSTP_GPU_TESTS_DEVICE=cpu runs the same code on the CPU backend to check the tests).

How the errors surface (the recovery in pipelines/faults.py relies on this, and these
tests pin it):
- nvJPEG (`mixed` decoders.image / image_slice): a frame it cannot parse or decode makes
  the pipeline raise RuntimeError("Critical error in pipeline: Error in MIXED operator
  `nvidia.dali.fn.decoders.image_slice` ... encountered: ...") from the iterator's next();
  the pipeline object is invalid afterwards. The loader locates the sample by running
  the same graph, on the same device, one sample at a time, marks it, rebuilds and
  resumes at the failed batch: the run goes on with that sample replaced.
- NVDEC (`mixed` decoders.video): a frame the decoder cannot deliver is an error because
  the graphs decode with pad_mode='none' (otherwise DALI fills it, black), and a stream
  NVDEC refuses raises the same kind of RuntimeError; both are recovered the same way.
  H.264 conceals most damage inside a stream without any error: such a sample decodes to
  wrong pixels and cannot be told apart at run time (`index-videos --verify` reports it).
Until run on a GPU these statements are the design, not a measurement.
"""

import json
import logging

import numpy as np
import pytest

from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.plan import PlanConfig
from preprocessing.__main__ import main as preprocessing_main
from tests.lmdb_fixtures import coded_video, encode_jpeg, write_lmdb
from tests.test_data_faults import batches_of, ids, put, rot_in_place
from tests.test_gpu import DEVICE, SKIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

CFG = PlanConfig(frames=4, crop_size=32)
H, W = 48, 64
DAMAGED = 6


def destroy_huffman_tables(jpeg: bytes) -> bytes:
    """Every DHT segment's 16 code-length counts set to 255: no decoder can build the
    tables (the markers, the header and the size stay intact)."""
    out = bytearray(jpeg)
    start = 0
    while (at := jpeg.find(b"\xff\xc4", start)) >= 0 and at < jpeg.find(b"\xff\xda"):
        out[at + 5:at + 21] = b"\xff" * 16
        start = at + 2
    return bytes(out)


@pytest.fixture(scope="module")
def broken_tables_db(tmp_path_factory):
    path = write_lmdb(tmp_path_factory.mktemp("gpu_faults") / "dht.lmdb",
                      [coded_video(24, H, W) for _ in range(16)])
    put(path, DAMAGED, [destroy_huffman_tables(encode_jpeg(f)) for f in coded_video(24, H, W)])
    return str(path)


@pytest.mark.parametrize("decode", ["roi", "full"])
def test_an_nvjpeg_failure_costs_one_substituted_sample(broken_tables_db, decode, caplog):
    caplog.set_level(logging.WARNING)
    loader = PretrainLoader(broken_tables_db, CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0,
                                                                  decode=decode), device=DEVICE)
    batches = batches_of(loader, 2)
    assert len(batches) == 8 and DAMAGED not in ids(batches)
    assert sum(int((b["substituted"] > 0).sum()) for b in batches) == 2
    failures = [r.getMessage() for r in caplog.records if "data pipeline failed" in r.getMessage()]
    assert len(failures) == 2 and all("decoders.image" in f for f in failures), failures
    # the same replacements as on the CPU: substitution depends on the data, not the device
    cpu = batches_of(PretrainLoader(broken_tables_db, CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0,
                                                                          decode=decode)), 2)
    assert ids(cpu) == ids(batches)


@pytest.fixture()
def h264_index(tmp_path):
    from tests.test_video_path import write_coded_video

    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    ext = "mp4" if DEVICE == "gpu" else "avi"   # NVDEC: H.264; the CPU backend: MJPEG
    for i in range(4):
        write_coded_video(root / "a" / f"clip{i}.{ext}", 60, ext)
    index = tmp_path / "index.json"
    assert preprocessing_main(["index-videos", "--videos", str(root), "--out", str(index), "--quiet"]) == 0
    return index, root, ext


def test_frames_nvdec_cannot_deliver_are_substituted(h264_index, caplog):
    index, _, _ = h264_index
    data = json.loads(index.read_text())
    data["videos"][2]["frames"] = 600   # the file holds 60: a stale index
    index.write_text(json.dumps(data))
    caplog.set_level(logging.WARNING)
    batches = batches_of(PretrainLoader(str(index), CFG, LoaderSettings(batch_size=2, num_threads=1, seed=0),
                                        device=DEVICE), 2)
    assert len(batches) == 4 and 2 not in ids(batches)
    assert sum(int((b["substituted"] > 0).sum()) for b in batches) == 2
    assert any("skipping video 2 " in r.getMessage() and "decoders.video" in r.getMessage()
               for r in caplog.records)


def test_a_stream_rotten_inside_never_ends_the_run(h264_index):
    """NVDEC either refuses the damaged packets (then the sample is replaced) or conceals
    them (then it decodes): the run always completes every step."""
    index, root, ext = h264_index
    rot_in_place(root / "a" / f"clip1.{ext}")
    batches = batches_of(PretrainLoader(str(index), CFG, LoaderSettings(batch_size=2, num_threads=1, seed=0),
                                        device=DEVICE), 2)
    assert len(batches) == 4
    assert all(np.isfinite(b["view1"].float().cpu().numpy()).all() for b in batches)

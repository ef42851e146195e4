"""Every GPU graph of the project, proven on a CPU: constructed with device="gpu" and
device_id=None (LMDB roi and full, pretraining video, clip LMDB, clip video, the frames
graph roi and full), serialised, and every operator's device checked against the backends
its schema is registered for.

Construction and serialisation catch unknown arguments and GPU data fed to a CPU input
or argument; they do NOT catch an operator placed on a backend it has no
implementation for (e.g. `resize` on "mixed" with a CPU input serialises fine and
fails only when a GPU builds it): the schema check does, and the negative control
shows it.

DALI internals relied on (2.4): `Pipeline._ops` (the graph's operator instances after
`serialize()` / `_build_graph()`), `_OperatorInstance._op` (the operator object),
its `_device` and `_schema`, and `OpSchema.GetSupportedBackends()`.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def

from pipelines.clip_pipeline import clip_lmdb_pipeline, clip_video_pipeline
from pipelines.clip_plan import ClipPlanConfig
from pipelines.clip_source import ClipLmdbSource, ClipVideoSource
from pipelines.frames_graph import PretrainFramesSource, cstp_pretrain_frames_pipeline
from pipelines.lmdb_store import VideoMeta
from pipelines.plan import PlanConfig
from pipelines.pretrain_pipeline import cstp_pretrain_pipeline, cstp_pretrain_video_pipeline
from pipelines.sources import PretrainLmdbSource
from pipelines.video_source import PretrainVideoSource

T = 4
METAS = [VideoMeta(f"c/v{i}", i % 2, 40, 48, 64, 25.0, "h264") for i in range(4)]
FILES = [f"/nonexistent/v{i}.mp4" for i in range(4)]   # never read: nothing runs
PLAN = PlanConfig(frames=T, crop_size=32)
CLIP = ClipPlanConfig(frames=T, crop_size=32, test_short_side=40)
COMMON = dict(seed=1, batch_size=2)


def misplaced(pipe) -> list[str]:
    """Operators whose device is not among their schema's registered backends."""
    wrong = []
    for instance in pipe._ops:
        op = instance._op
        backends = list(op._schema.GetSupportedBackends())
        if op._device not in backends:
            wrong.append(f"{instance.name}: {op._schema.Name()} on {op._device!r}, registered for {backends}")
    return wrong


def devices(pipe) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for instance in pipe._ops:
        out.setdefault(instance._op._schema.Name(), set()).add(instance._op._device)
    return out


def gpu_graphs(index: str):
    """(name, pipeline, decoder schema, decoder operators) of every GPU graph; `index`: a
    video index file (the video sources read its stamps; nothing else is read)."""
    build = dict(device="gpu", parallel=False, batch_size=2, num_threads=1, device_id=None)
    lmdb = PretrainLmdbSource("unused.lmdb", METAS, PLAN, **COMMON)
    video = PretrainVideoSource(index, METAS, FILES, PLAN, **COMMON)
    clip_lmdb = ClipLmdbSource("unused.lmdb", METAS, CLIP, "train", **COMMON)
    clip_video = ClipVideoSource(index, METAS, FILES, CLIP, "train", **COMMON)
    return [
        ("lmdb roi", cstp_pretrain_pipeline(source=lmdb, decode="roi", **build), "decoders__ImageSlice", 2 * T),
        ("lmdb full", cstp_pretrain_pipeline(source=lmdb, decode="full", **build), "decoders__Image", 2 * T),
        ("pretraining video", cstp_pretrain_video_pipeline(source=video, **build), "decoders__Video", 1),
        ("clip lmdb", clip_lmdb_pipeline(source=clip_lmdb, **build), "decoders__ImageSlice", T),
        ("clip video", clip_video_pipeline(source=clip_video, **build), "decoders__Video", 1),
        ("lmdb frames roi", cstp_pretrain_frames_pipeline(source=PretrainFramesSource(lmdb), decode="roi",
                                                          **{**build, "batch_size": 2 * 2 * T}),
         "decoders__ImageSlice", 1),
        ("lmdb frames full", cstp_pretrain_frames_pipeline(source=PretrainFramesSource(lmdb), decode="full",
                                                           **{**build, "batch_size": 2 * 2 * T}),
         "decoders__Image", 1),
    ]


@pytest.mark.parametrize("index", range(7))
def test_every_gpu_graph_serialises_with_each_operator_on_a_registered_backend(index, tmp_path):
    stamps = tmp_path / "index.json"
    stamps.write_text(json.dumps({"format": "cstp-dali-video-index", "videos": [{} for _ in METAS]}))   # no stamps recorded
    name, pipe, decoder, decoders = gpu_graphs(str(stamps))[index]
    assert len(pipe.serialize()) > 1000, name
    assert misplaced(pipe) == [], name
    placed = devices(pipe)
    # the decoders run on "mixed" (nvJPEG / NVDEC) and nothing of the pixel path stays on the CPU
    assert placed[decoder] == {"mixed"}, (name, placed[decoder])
    assert sum(i._op._schema.Name() == decoder for i in pipe._ops) == decoders, name
    for schema in ("Resize", "CropMirrorNormalize"):
        assert placed[schema] == {"gpu"}, (name, schema, placed[schema])


def test_the_schema_check_catches_an_operator_on_a_backend_it_is_not_registered_for():
    """Negative control: `resize` on "mixed" (it has CPU and GPU kernels only) serialises
    without complaint on a CPU; the check names it. The same graph with resize on "gpu"
    passes."""
    def graph(resize_device):
        @pipeline_def(batch_size=2, num_threads=1, device_id=None)
        def pipe():
            encoded = fn.external_source(source=lambda: [np.zeros(16, np.uint8)] * 2)
            image = fn.decoders.image(encoded, device="cpu")
            return fn.resize(image if resize_device != "gpu" else image.gpu(), size=[8, 8], device=resize_device)
        return pipe()

    wrong = graph("mixed")
    assert len(wrong.serialize()) > 0
    found = misplaced(wrong)
    assert len(found) == 1 and "Resize on 'mixed'" in found[0], found
    right = graph("gpu")
    right.serialize()
    assert misplaced(right) == []

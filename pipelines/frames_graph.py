"""The "frames" graph of the LMDB pretraining path (data.graph=frames; default "views").

The views graph (pretrain_pipeline.cstp_pretrain_pipeline) has 2·T decoder operators,
each decoding the B frames of one frame position per call, with its own set-up. This
graph's batch is the B·2·T frames of B samples instead: ONE decoder over all of them,
one resize, one of each augmentation op, every parameter per frame from the plan (a
view's parameters repeated over its T frames; its grey matrices one per frame). The
loader turns the (B·2·T, 3, S, S) output back into the two views (frames_to_views).
Same plans, same ops per frame, same pixels (tests/test_frames_graph.py). Which graph is
faster is for a GPU to say (nvJPEG batching vs per-position set-up): scripts/gpu_check.sh
measures both; on a CPU they cost about the same.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from .pretrain_pipeline import JPEG_FANCY_UPSAMPLING, PRETRAIN_OUTPUTS, augment_view, check_decode, decoder_device
from .sources import APPEARANCE_PARAMS, PRETRAIN_PARAM_OUTPUTS

GRAPHS = ("views", "frames")
# per frame: its JPEG, its view's box / rotation / flip / appearance, then the sample's labels
FRAME_PARAMS = ("anchor", "shape", "angle", "flip", *APPEARANCE_PARAMS)
SAMPLE_LABELS = PRETRAIN_OUTPUTS[2:]      # spatial_label ... video_index, substituted
FRAMES_OUTPUTS = ("frames", *SAMPLE_LABELS)


def check_graph(graph: str) -> str:
    if graph not in GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPHS)}, got {graph!r}")
    return graph


class PretrainFramesSource:
    """Batch-mode source over a per-sample PretrainLmdbSource: batch i is that source's
    batch i (samples i·B .. i·B+B-1 of the epoch), each sample as its 2·T frames, view 1's
    first. Picklable like the sample source (DALI workers call it)."""

    def __init__(self, sample_source):
        self.sample_source = sample_source
        self.frames = sample_source.plan_cfg.frames
        self.batch_size = sample_source.batch_size

    @property
    def num_outputs(self) -> int:
        return 1 + len(FRAME_PARAMS) + len(SAMPLE_LABELS)

    def __call__(self, batch_info):
        from nvidia.dali.types import SampleInfo

        b, t = self.batch_size, self.frames
        columns = [[] for _ in range(self.num_outputs)]
        for k in range(b):   # StopIteration at the epoch's end comes from the first sample
            info = SampleInfo(batch_info.iteration * b + k, k, batch_info.iteration, batch_info.epoch_idx)
            outputs = self.sample_source(info)
            p = dict(zip(PRETRAIN_PARAM_OUTPUTS, outputs[2 * t:]))
            labels = [p[name] for name in SAMPLE_LABELS]
            for view in (1, 2):
                params = [p[f"{name}{view}"] for name in FRAME_PARAMS[:4]]
                look = [p[f"{name}{view}"] for name in APPEARANCE_PARAMS]
                grey = APPEARANCE_PARAMS.index("grey_matrix")
                for j in range(t):
                    look_j = list(look)
                    look_j[grey] = np.ascontiguousarray(look[grey][j])
                    row = [outputs[(view - 1) * t + j], *params, *look_j, *labels]
                    for column, value in zip(columns, row):
                        column.append(value)
        return tuple(columns)


@pipeline_def(enable_conditionals=True)  # the appearance branches, per frame
def cstp_pretrain_frames_pipeline(source: PretrainFramesSource, device: str = "cpu", parallel: bool = False,
                                  decode: str = "roi"):
    """Build with batch_size = B·2·T. One decoder (`mixed` on GPU) over all frames."""
    jpeg, *rest = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                                     parallel=parallel)
    p = dict(zip((*FRAME_PARAMS, *SAMPLE_LABELS), rest))
    if check_decode(decode) == "roi":
        frame = fn.decoders.image_slice(jpeg, p["anchor"], p["shape"], device=decoder_device(device),
                                        axis_names="WH", normalized_anchor=False, normalized_shape=False,
                                        output_type=types.RGB, **JPEG_FANCY_UPSAMPLING)
    else:
        frame = fn.slice(fn.decoders.image(jpeg, device=decoder_device(device), output_type=types.RGB,
                                           **JPEG_FANCY_UPSAMPLING),
                         p["anchor"], p["shape"], axis_names="WH", normalized_anchor=False, normalized_shape=False)
    look = {name: p[name] for name in APPEARANCE_PARAMS}
    view = augment_view(frame, p["angle"], p["flip"], source.sample_source.plan_cfg.crop_size, look, sequence=False)
    labels = [p[name] for name in SAMPLE_LABELS]
    if device == "gpu":
        labels = [label.gpu() for label in labels]
    return (view, *labels)


def frames_to_views(batch: dict, frames: int) -> dict:
    """The frames graph's batch {"frames": (B·2·T, 3, S, S), label: (B·2·T,)} as the
    views graph's {"view1", "view2": (B, 3, T, S, S), label: (B,)} (on the same device)."""
    x = batch.pop("frames")
    n, c, h, w = x.shape
    x = x.reshape(n // (2 * frames), 2, frames, c, h, w).permute(1, 0, 3, 2, 4, 5)   # (2, B, C, T, H, W)
    out = {"view1": x[0].contiguous(), "view2": x[1].contiguous()}
    out.update({name: batch[name][::2 * frames] for name in SAMPLE_LABELS})
    return out

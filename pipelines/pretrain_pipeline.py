"""The DALI graph that executes CSTP pretraining plans (LMDB of JPEG frames).

Per view, in reading order: ROI-decode the planned box of each planned frame
(nvJPEG on `gpu`), stack the frames into a clip (FHWC), bicubic resize to S×S,
rotate by k·90° (exact on a square), flip, scale to [-1, 1] as CFHW. The graph
holds no randomness: every parameter comes from the plan via external_source.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from .sources import PRETRAIN_PARAM_OUTPUTS, PretrainLmdbSource

# "substituted": how many unreadable videos were passed over to produce the sample (0 = none)
PRETRAIN_OUTPUTS = ("view1", "view2", "spatial_label", "temporal_label", "speed_label", "rot1", "rot2",
                    "video_index", "substituted")


def decoder_device(device: str) -> str:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    return "mixed" if device == "gpu" else "cpu"


def execute_view(encoded_frames, anchor, shape, angle, flip, crop_size: int, device: str):
    """One view of a plan: decode only the box of each frame, then resize, rotate, flip, normalise."""
    frames = [fn.decoders.image_slice(buf, anchor, shape, device=decoder_device(device), axis_names="WH",
                                      normalized_anchor=False, normalized_shape=False,
                                      output_type=types.RGB)
              for buf in encoded_frames]
    clip = fn.stack(*frames, axis_name="F")
    clip = fn.resize(clip, size=[crop_size, crop_size], interp_type=types.INTERP_CUBIC, antialias=True)
    # Rotation after the crop: the box was placed in the un-rotated frame, so the
    # spatial-overlap label counts shared content (DESIGN.md). 90° steps of a
    # square are exact with nearest-neighbour sampling.
    clip = fn.rotate(clip, angle=angle, keep_size=True, interp_type=types.INTERP_NN)
    return fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW",
                                    mean=[127.5] * 3, std=[127.5] * 3, mirror=flip)


@pipeline_def
def cstp_pretrain_pipeline(source: PretrainLmdbSource, device: str = "cpu", parallel: bool = False):
    outputs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                 parallel=parallel)
    t = source.plan_cfg.frames
    jpegs1, jpegs2 = outputs[:t], outputs[t:2 * t]
    p = dict(zip(PRETRAIN_PARAM_OUTPUTS, outputs[2 * t:]))
    size = source.plan_cfg.crop_size
    view1 = execute_view(jpegs1, p["anchor1"], p["shape1"], p["angle1"], p["flip1"], size, device)
    view2 = execute_view(jpegs2, p["anchor2"], p["shape2"], p["angle2"], p["flip2"], size, device)
    labels = [p[name] for name in PRETRAIN_OUTPUTS[2:]]
    if device == "gpu":
        labels = [label.gpu() for label in labels]
    return (view1, view2, *labels)

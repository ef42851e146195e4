"""The DALI graphs that execute supervised clip plans (clip_plan.py), in reading order:
decode the planned box of each planned frame (ROI decode; nvJPEG on `gpu`) or the
clip's frames of a video file (NVDEC on `gpu`), stack into a clip (FHWC), bicubic
resize to S×S, colour jitter when the plan says so, scale to [-1, 1] as CFHW.
No flip (the reference's finetuning has none). The graphs hold no randomness.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types

from .clip_source import CLIP_PARAM_OUTPUTS, LABEL_OUTPUTS, JITTER_OUTPUTS, VIDEO_CLIP_PARAM_OUTPUTS
from .pretrain_pipeline import JPEG_FANCY_UPSAMPLING, color_jitter, cut_view, decoder_device


def finish_clip(clip, params: dict, crop_size: int):
    """A cropped clip (FHWC uint8) to the model's input (3, T, S, S) float in [-1, 1]."""
    clip = fn.resize(clip, size=[crop_size, crop_size], interp_type=types.INTERP_CUBIC, antialias=True)
    # A DALI conditional (enable_conditionals): ~70% of train clips and every val/test
    # clip skip the jitter's ~90 arithmetic ops instead of running them neutrally.
    if params["jitter"] > 0:
        clip = color_jitter(clip, {name: params[name] for name in JITTER_OUTPUTS})
    return fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW",
                                    mean=[127.5] * 3, std=[127.5] * 3)


def _labels(params: dict, device: str) -> list:
    labels = [params[name] for name in LABEL_OUTPUTS]
    return [label.gpu() for label in labels] if device == "gpu" else labels


@pipeline_def(enable_conditionals=True)
def clip_lmdb_pipeline(source, device: str = "cpu", parallel: bool = False):
    """LMDB of JPEG frames: source is a clip_source.ClipLmdbSource."""
    outputs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False, parallel=parallel)
    t = source.cfg.frames
    p = dict(zip(CLIP_PARAM_OUTPUTS, outputs[t:]))
    frames = [fn.decoders.image_slice(buf, p["anchor"], p["shape"], device=decoder_device(device), axis_names="WH",
                                      normalized_anchor=False, normalized_shape=False, output_type=types.RGB,
                                      **JPEG_FANCY_UPSAMPLING)
              for buf in outputs[:t]]
    clip = finish_clip(fn.stack(*frames, axis_name="F"), p, source.cfg.crop_size)
    return (clip, *_labels(p, device))


@pipeline_def(enable_conditionals=True)
def clip_video_pipeline(source, device: str = "cpu", parallel: bool = False):
    """Video files: source is a clip_source.ClipVideoSource. The clip's distinct frames
    are decoded once, in ascending order (`mixed` = NVDEC on GPU), then put in clip order
    and cut to the box."""
    encoded, *params = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                          parallel=parallel)
    p = dict(zip(VIDEO_CLIP_PARAM_OUTPUTS, params))
    decoded = fn.decoders.video(encoded, frames=p["frames"], device=decoder_device(device),
                                pad_mode="none")  # a frame it cannot deliver is an error, never a black fill
    clip = finish_clip(cut_view(decoded, p["order"], p["anchor"], p["shape"]), p, source.cfg.crop_size)
    return (clip, *_labels(p, device))

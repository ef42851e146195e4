"""The DALI graph that executes CSTP pretraining plans (LMDB of JPEG frames).

Per view, in reading order: decode the planned box of each planned frame (nvJPEG
on `gpu`; `decode="roi"` decodes only the box, `decode="full"` decodes whole frames
and slices the box out of the stacked clip), stack the frames into a clip (FHWC),
bicubic resize to S×S,
rotate by k·90° (exact on a square) plus the strong augmentation's small angle,
colour jitter (fused ops: brightness, contrast, one saturation+hue colour matrix),
per-frame channel grey, Gaussian blur (each only where the plan's view is "strong" and
switches it on), flip, scale to [-1, 1] as CFHW. Video files take the same graph after
their decode (cstp_pretrain_video_pipeline). The graph holds no randomness:
every parameter comes from the plan via external_source.
"""

from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .sources import (APPEARANCE_PARAMS, CHROMA_PART, HUE_UNITS_TO_RADIANS, LUMA_PART, PRETRAIN_PARAM_OUTPUTS,
                      TURN_PART, PretrainLmdbSource)
from .video_source import VIDEO_PARAM_OUTPUTS

# "substituted": how many unreadable videos were passed over to produce the sample (0 = none)
PRETRAIN_OUTPUTS = ("view1", "view2", "spatial_label", "temporal_label", "speed_label", "rot1", "rot2",
                    "video_index", "substituted")


# nvJPEG (the `mixed` decoders) upsamples 4:2:0 chroma without interpolation unless told
# otherwise; libjpeg-turbo on the CPU always interpolates ("fancy" upsampling). Every LMDB
# this project builds is 4:2:0, so the GPU is told to match the CPU (the CPU ignores it).
JPEG_FANCY_UPSAMPLING = dict(jpeg_fancy_upsampling=True)


def decoder_device(device: str) -> str:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    return "mixed" if device == "gpu" else "cpu"


# How the LMDB path decodes a view's JPEG frames (LoaderSettings.decode, config data.decode):
#   roi   fn.decoders.image_slice per frame: only the planned box is decoded (nvJPEG ROI
#         decode on GPU; on a CPU, libjpeg-turbo skips the rows and columns outside it);
#   full  fn.decoders.image per frame, then one fn.slice of the box on the stacked clip:
#         whole frames, which lets a GPU use its hardware JPEG engines (they decode whole
#         images only) and batch all frames of a position in one call.
# Both give the same pixels (tests/test_pretrain_pipeline.py); which one is faster depends
# on the card and the crop: scripts/gpu_check.sh measures both.
DECODE_MODES = ("roi", "full")


def check_decode(decode: str) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
    return decode


def execute_view(encoded_frames, anchor, shape, angle, flip, crop_size: int, device: str, look=None,
                 decode: str = "roi"):
    """One view of a plan: decode the box of each frame (see DECODE_MODES), then resize,
    rotate, (appearance), flip, normalise. `anchor`/`shape` are (x, y) / (w, h)."""
    if check_decode(decode) == "roi":
        frames = [fn.decoders.image_slice(buf, anchor, shape, device=decoder_device(device), axis_names="WH",
                                          normalized_anchor=False, normalized_shape=False,
                                          output_type=types.RGB, **JPEG_FANCY_UPSAMPLING)
                  for buf in encoded_frames]
        clip = fn.stack(*frames, axis_name="F")
    else:
        frames = [fn.decoders.image(buf, device=decoder_device(device), output_type=types.RGB, **JPEG_FANCY_UPSAMPLING)
                  for buf in encoded_frames]
        # the clip is FHWC, so the box's (x, y) order becomes axis_names "WH", as for image_slice
        clip = fn.slice(fn.stack(*frames, axis_name="F"), anchor, shape, axis_names="WH",
                        normalized_anchor=False, normalized_shape=False)
    return augment_view(clip, angle, flip, crop_size, look)


def augment_view(clip, angle, flip, crop_size: int, look=None, sequence: bool = True):
    """A cropped clip (FHWC) to the model's input: resize, rotate, appearance, flip, normalise.

    `look`: the view's appearance parameters (sources.APPEARANCE_PARAMS, unnumbered
    keys), or None for no appearance ops at all. sequence=False: one frame (HWC) per
    sample, as the frames graph has them (frames_graph.py); the same ops, per frame."""
    clip = fn.resize(clip, size=[crop_size, crop_size], interp_type=types.INTERP_CUBIC, antialias=True)
    # Rotation after the crop: the box was placed in the un-rotated frame, so the
    # spatial-overlap label counts shared content (docs/method.md#spatial-overlap-label). 90° steps of a
    # square are exact with nearest-neighbour sampling; the strong augmentation's
    # small angle is included (90k+δ), corners outside the crop become black.
    clip = fn.rotate(clip, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
    if look is not None:
        clip = appearance(clip, look, sequence)
    return fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW" if sequence else "CHW",
                                    mean=[127.5] * 3, std=[127.5] * 3, mirror=flip)


def appearance(clip, look, sequence: bool = True):
    """The strong augmentation after the rotation (docs/method.md#appearance), uint8 FHWC in and out:
    colour jitter, per-frame channel grey, Gaussian blur.

    Each step runs only for the views whose plan switches it on: DALI conditionals
    (`@pipeline_def(enable_conditionals=True)`), predicates from the plan (CPU).
    Measured on 2 CPU cores, 16 frames, 112 px, default probabilities: the conditional
    steps add 7 ms of CPU per sample, the same ops run on every view with neutral
    parameters add 25 ms (the rest of the pipeline: ~39 ms). The parameters of a
    switched-off step are neutral (identity matrices, a 1-tap blur, factors 1, hue 0),
    so the ops are also correct without the conditionals."""
    if look["jitter"] > 0:
        clip = color_jitter(clip, look, sequence)
    if look["grey"] > 0:
        # sequence: one matrix per frame; a frame (frames graph): its own matrix
        matrix = fn.per_frame(look["grey_matrix"]) if sequence else look["grey_matrix"]
        clip = fn.coord_transform(clip, M=matrix, dtype=types.UINT8)
    if look["blur_window"] > 1:
        clip = fn.gaussian_blur(clip, sigma=look["blur_sigma"], window_size=look["blur_window"])
    return clip


def _luma(x):
    """PIL's RGB -> L, (R·19595 + G·38470 + B·7471 + 2^15) >> 16, as (T, H, W, 1) float
    (exact in float32: every partial sum is an integer below 2^24)."""
    weighted = fn.coord_transform(x, M=[19595.0, 38470.0, 7471.0], dtype=types.FLOAT)
    return dmath.floor((weighted + 32768.0) * (1.0 / 65536.0))


def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, x, factor): truncated towards zero, clipped to uint8."""
    return dmath.clamp(dmath.floor(degenerate + factor * (x - degenerate)), 0.0, 255.0)


# brightness_shift of fn.brightness_contrast (in units of 255) that turns its rounding
# (half away from zero) into PIL's truncation: round(y - 0.4999) = floor(y) unless
# frac(y) >= 0.9999, and it absorbs float error just below an integer (y = m when x = m).
_TRUNCATE = -0.4999 / 255.0


def _pil_contrast(x, contrast, sequence: bool = True):
    """ImageEnhance.Contrast on uint8 FHWC: blend each frame with its mean grey level,
    int(mean(L) + 0.5), truncated. On CPU one fused op with a per-frame centre; on GPU the
    centre cannot be an argument (arguments live on the CPU), so it is blended with
    arithmetic there."""
    mean = fn.reductions.mean(_luma(x), axes=[1, 2, 3] if sequence else [0, 1, 2])   # (T,) or () per frame
    mean = dmath.floor(mean + 0.5)
    if x.device == "gpu":
        centre = fn.reshape(mean, shape=[-1, 1, 1, 1] if sequence else [1, 1, 1])
        y = _blend(centre, fn.cast(x, dtype=types.FLOAT), contrast.gpu())
        return fn.reshape(fn.cast(y, dtype=types.UINT8), layout="FHWC" if sequence else "HWC")
    return fn.brightness_contrast(x, contrast=contrast, contrast_center=fn.per_frame(mean) if sequence else mean,
                                  brightness_shift=_TRUNCATE)


def saturation_hue_matrix(saturation, hue_shift):
    """In the graph, per sample: sources.saturation_hue_matrix (CPU scalars in, (3, 3) out)."""
    angle = hue_shift * HUE_UNITS_TO_RADIANS
    a, b = saturation * dmath.cos(angle), saturation * dmath.sin(angle)
    entries = [float(p) + a * float(c) + b * float(t)
               for p, c, t in zip(LUMA_PART.ravel(), CHROMA_PART.ravel(), TURN_PART.ravel())]
    return fn.reshape(fn.stack(*entries), shape=[3, 3])


def color_jitter(clip, look, sequence: bool = True):
    """The colour jitter on uint8 FHWC, fixed order brightness → contrast → saturation+hue,
    in three fused ops (CPU and GPU alike):
    - brightness and contrast are PIL's ImageEnhance (torchvision's ColorJitter on PIL
      images), truncation included, via fn.brightness_contrast; they match PIL to the
      rounding of rare float ties (tests/test_augment.py);
    - saturation and hue are one YIQ colour matrix (sources.saturation_hue_matrix), rounded:
      a documented deviation from PIL's blend-with-luma + 8-bit HSV hue shift, which cost
      ~60 elementwise ops (26 ms per 16x112x112 view on a CPU core, 5x all the rest).
      The reference executor applies the same matrix, so it stays the oracle.
    The reference draws a random jitter order per view; the order here is FIXED (a
    documented deviation). Every factor neutral (1, 1, 1, hue 0) leaves the clip unchanged,
    so `jitter` (on/off) is read only by appearance()'s conditional."""
    brightness, contrast, saturation, hue_shift = (look[k] for k in ("brightness", "contrast", "saturation",
                                                                     "hue_shift"))
    x = fn.brightness_contrast(clip, brightness=brightness, brightness_shift=_TRUNCATE)
    x = _pil_contrast(x, contrast, sequence)
    return fn.coord_transform(x, M=saturation_hue_matrix(saturation, hue_shift), dtype=types.UINT8)


def view_look(params: dict, view: int) -> dict:
    """View 1's or 2's appearance parameters out of the source's named outputs."""
    return {name: params[f"{name}{view}"] for name in APPEARANCE_PARAMS}


@pipeline_def(enable_conditionals=True)  # the colour jitter branch (appearance)
def cstp_pretrain_pipeline(source: PretrainLmdbSource, device: str = "cpu", parallel: bool = False,
                           decode: str = "roi"):
    outputs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                 parallel=parallel)
    t = source.plan_cfg.frames
    jpegs1, jpegs2 = outputs[:t], outputs[t:2 * t]
    p = dict(zip(PRETRAIN_PARAM_OUTPUTS, outputs[2 * t:]))
    size = source.plan_cfg.crop_size
    view1 = execute_view(jpegs1, p["anchor1"], p["shape1"], p["angle1"], p["flip1"], size, device,
                         view_look(p, 1), decode)
    view2 = execute_view(jpegs2, p["anchor2"], p["shape2"], p["angle2"], p["flip2"], size, device,
                         view_look(p, 2), decode)
    labels = [p[name] for name in PRETRAIN_OUTPUTS[2:]]
    if device == "gpu":
        labels = [label.gpu() for label in labels]
    return (view1, view2, *labels)


def cut_view(decoded, order, anchor, shape):
    """One view from the decoded union of both views' frames: its frames, its box."""
    clip = fn.sequence_rearrange(decoded, new_order=order)
    return fn.slice(clip, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False)


@pipeline_def(enable_conditionals=True)  # the appearance branches, as on the LMDB path
def cstp_pretrain_video_pipeline(source, device: str = "cpu", parallel: bool = False):
    """Video files: decode the sorted union of both views' frames once (`mixed` =
    NVDEC on GPU), then cut and augment each view (the same appearance as the LMDB path)."""
    encoded, *params = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                          parallel=parallel)
    p = dict(zip(VIDEO_PARAM_OUTPUTS, params))
    decoded = fn.decoders.video(encoded, frames=p["frames"], device=decoder_device(device),
                                pad_mode="none")  # a frame it cannot deliver is an error, never a black fill
    size = source.plan_cfg.crop_size
    view1 = augment_view(cut_view(decoded, p["order1"], p["anchor1"], p["shape1"]), p["angle1"], p["flip1"], size,
                         view_look(p, 1))
    view2 = augment_view(cut_view(decoded, p["order2"], p["anchor2"], p["shape2"]), p["angle2"], p["flip2"], size,
                         view_look(p, 2))
    labels = [p[name] for name in PRETRAIN_OUTPUTS[2:]]
    if device == "gpu":
        labels = [label.gpu() for label in labels]
    return (view1, view2, *labels)

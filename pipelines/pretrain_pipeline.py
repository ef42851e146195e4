"""The DALI graph that executes CSTP pretraining plans (LMDB of JPEG frames).

Per view, in reading order: ROI-decode the planned box of each planned frame
(nvJPEG on `gpu`), stack the frames into a clip (FHWC), bicubic resize to S×S,
rotate by k·90° (exact on a square) plus the strong augmentation's small angle,
colour jitter, per-frame channel grey, Gaussian blur (neutral unless the plan's
view is "strong"), flip, scale to [-1, 1] as CFHW. The graph holds no randomness:
every parameter comes from the plan via external_source.
"""

from __future__ import annotations

import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from .sources import APPEARANCE_PARAMS, PRETRAIN_PARAM_OUTPUTS, PretrainLmdbSource
from .video_source import VIDEO_PARAM_OUTPUTS

# "substituted": how many unreadable videos were passed over to produce the sample (0 = none)
PRETRAIN_OUTPUTS = ("view1", "view2", "spatial_label", "temporal_label", "speed_label", "rot1", "rot2",
                    "video_index", "substituted")


def decoder_device(device: str) -> str:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    return "mixed" if device == "gpu" else "cpu"


def execute_view(encoded_frames, anchor, shape, angle, flip, crop_size: int, device: str, look=None):
    """One view of a plan: decode only the box of each frame, then resize, rotate,
    (appearance), flip, normalise."""
    frames = [fn.decoders.image_slice(buf, anchor, shape, device=decoder_device(device), axis_names="WH",
                                      normalized_anchor=False, normalized_shape=False,
                                      output_type=types.RGB)
              for buf in encoded_frames]
    return augment_view(fn.stack(*frames, axis_name="F"), angle, flip, crop_size, look)


def augment_view(clip, angle, flip, crop_size: int, look=None):
    """A cropped clip (FHWC) to the model's input: resize, rotate, appearance, flip, normalise.

    `look`: the view's appearance parameters (sources.APPEARANCE_PARAMS, unnumbered
    keys), or None for no appearance ops at all."""
    clip = fn.resize(clip, size=[crop_size, crop_size], interp_type=types.INTERP_CUBIC, antialias=True)
    # Rotation after the crop: the box was placed in the un-rotated frame, so the
    # spatial-overlap label counts shared content (DESIGN.md). 90° steps of a
    # square are exact with nearest-neighbour sampling; the strong augmentation's
    # small angle is included (90k+δ), corners outside the crop become black.
    clip = fn.rotate(clip, angle=angle, keep_size=True, fill_value=0, interp_type=types.INTERP_NN)
    if look is not None:
        clip = appearance(clip, look)
    return fn.crop_mirror_normalize(clip, dtype=types.FLOAT, output_layout="CFHW",
                                    mean=[127.5] * 3, std=[127.5] * 3, mirror=flip)


def appearance(clip, look):
    """The strong augmentation after the rotation (spec §5.1), uint8 FHWC in and out:
    colour jitter, per-frame channel grey, Gaussian blur.

    Each step runs only for the views whose plan switches it on: DALI conditionals
    (`@pipeline_def(enable_conditionals=True)`), predicates from the plan (CPU). Run
    for every view, the jitter's ~90 arithmetic ops alone cost ~6x the rest of the
    pipeline on a CPU (16 frames, 112 px). The parameters of a switched-off step are
    neutral (identity matrices, a 1-tap blur, jitter 0), so the ops are also correct
    without the conditionals."""
    if look["jitter"] > 0:
        clip = color_jitter(clip, look)
    if look["grey"] > 0:
        clip = fn.coord_transform(clip, M=fn.per_frame(look["grey_matrix"]), dtype=types.UINT8)
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


def color_jitter(clip, look):
    """torchvision's ColorJitter on PIL images, replayed with DALI arithmetic (CPU and
    GPU alike) on float32 values that stay integers, so that it matches PIL to the
    rounding of a few ties: ImageEnhance brightness, contrast, saturation (blends that
    truncate), then adjust_hue (PIL's 8-bit HSV round trip with H shifted, wrapping).

    Jitter order is FIXED, brightness → contrast → saturation → hue; the reference
    draws a random order per view (a documented deviation). DALI's own fn.hsv hue
    rotates in YIQ space instead, measured as far from PIL's hue shift as no shift at
    all (tests/test_augment.py), hence this."""
    factors = [look[k] for k in ("brightness", "contrast", "saturation", "hue_shift", "jitter")]
    if clip.device == "gpu":  # arithmetic operands must live where the clip lives
        factors = [f.gpu() for f in factors]
    brightness, contrast, saturation, hue_shift, on = factors
    x = fn.cast(clip, dtype=types.FLOAT)
    x = _blend(0.0, x, brightness)
    # contrast: blend with the frame's mean grey level, int(mean(L) + 0.5)
    mean = fn.reductions.mean(_luma(x), axes=[1, 2, 3])                          # (T,)
    mean = fn.reshape(dmath.floor(mean + 0.5), shape=[-1, 1, 1, 1])             # (T, 1, 1, 1)
    x = _blend(mean, x, contrast)
    x = _blend(_luma(x), x, saturation)                                          # ImageEnhance.Color
    x = x + on * (_hue_shift(x, hue_shift) - x)   # jitter off: the lossy HSV round trip is skipped
    return fn.reshape(fn.cast(x, dtype=types.UINT8), layout="FHWC")


def _hue_shift(x, shift):
    """PIL's RGB -> HSV (8-bit H and S, truncated), H += shift mod 256, HSV -> RGB
    (Pillow's Convert.c); x: (T, H, W, 3) float of integers."""
    r, g, b = x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2]
    v = dmath.max(r, dmath.max(g, b))
    chroma = v - dmath.min(r, dmath.min(g, b))
    divisor = dmath.max(chroma, 1.0)             # grey pixels: every term below is then 0
    rc, gc, bc = (v - r) / divisor, (v - g) / divisor, (v - b) / divisor
    is_r = r == v
    is_g = (g == v) & (r != v)
    is_b = (b == v) & (r != v) & (g != v)
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = h * (1.0 / 6.0) + 1.0
    h = dmath.floor((h - dmath.floor(h)) * 255.0)                              # fmod(h/6 + 1, 1) in 1/255
    s = dmath.floor(chroma / dmath.max(v, 1.0) * 255.0)
    h = h + shift
    h = h - 256.0 * dmath.floor(h * (1.0 / 256.0))                             # uint8 wrap-around
    h6 = h * 6.0 / 255.0                                                         # sector + fraction
    fs = s * (1.0 / 255.0)

    def channel(offset):
        # Pillow picks v, p, q or t by sector; that is v·(1 - fs·w) with the usual
        # piecewise-linear weight w of the channel, rounded as Pillow rounds p, q, t.
        k = h6 + offset
        k = k - 6.0 * dmath.floor(k * (1.0 / 6.0))
        w = dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)
        return dmath.floor(v * (1.0 - fs * w) + 0.5)

    return fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=3)


def view_look(params: dict, view: int) -> dict:
    """View 1's or 2's appearance parameters out of the source's named outputs."""
    return {name: params[f"{name}{view}"] for name in APPEARANCE_PARAMS}


@pipeline_def(enable_conditionals=True)  # the colour jitter branch (appearance)
def cstp_pretrain_pipeline(source: PretrainLmdbSource, device: str = "cpu", parallel: bool = False):
    outputs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                 parallel=parallel)
    t = source.plan_cfg.frames
    jpegs1, jpegs2 = outputs[:t], outputs[t:2 * t]
    p = dict(zip(PRETRAIN_PARAM_OUTPUTS, outputs[2 * t:]))
    size = source.plan_cfg.crop_size
    view1 = execute_view(jpegs1, p["anchor1"], p["shape1"], p["angle1"], p["flip1"], size, device,
                         view_look(p, 1))
    view2 = execute_view(jpegs2, p["anchor2"], p["shape2"], p["angle2"], p["flip2"], size, device,
                         view_look(p, 2))
    labels = [p[name] for name in PRETRAIN_OUTPUTS[2:]]
    if device == "gpu":
        labels = [label.gpu() for label in labels]
    return (view1, view2, *labels)


def cut_view(decoded, order, anchor, shape):
    """One view from the decoded union of both views' frames: its frames, its box."""
    clip = fn.sequence_rearrange(decoded, new_order=order)
    return fn.slice(clip, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False)


@pipeline_def
def cstp_pretrain_video_pipeline(source, device: str = "cpu", parallel: bool = False):
    """Video files: decode the sorted union of both views' frames once (`mixed` =
    NVDEC on GPU), then cut and augment each view."""
    encoded, *params = fn.external_source(source=source, num_outputs=source.num_outputs, batch=False,
                                          parallel=parallel)
    p = dict(zip(VIDEO_PARAM_OUTPUTS, params))
    decoded = fn.decoders.video(encoded, frames=p["frames"], device=decoder_device(device))
    size = source.plan_cfg.crop_size
    view1 = augment_view(cut_view(decoded, p["order1"], p["anchor1"], p["shape1"]), p["angle1"], p["flip1"], size)
    view2 = augment_view(cut_view(decoded, p["order2"], p["anchor2"], p["shape2"]), p["angle2"], p["flip2"], size)
    labels = [p[name] for name in PRETRAIN_OUTPUTS[2:]]
    if device == "gpu":
        labels = [label.gpu() for label in labels]
    return (view1, view2, *labels)

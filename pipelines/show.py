"""Drawings of what the model sees: the first samples of an epoch as the training loader
makes them, next to the source frames they were cut from, with every label captioned.
show.py (in the repository root) is the command line; its doc describes the picture.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .lmdb_store import LmdbFrameReader, VideoMeta
from .plan import Box, PlanConfig, PretrainPlan

VIEW_COLOURS = ((255, 110, 0), (0, 150, 255))   # view 1 orange, view 2 blue
OVERLAP_FILL = (255, 235, 0, 200)               # hatching over the shared content of the two boxes
HATCH_SPACING = 7
MISMATCH_COLOUR = (220, 0, 0)
BACKGROUND = (255, 255, 255)
TEXT_COLOUR = (0, 0, 0)

MAX_OUTPUT_FRAMES = 8     # output frames drawn per view
SOURCE_TIME_POINTS = 3    # source frames drawn per view (first, middle, last of the window)
SOURCE_HEIGHT = 144       # display height of a source frame
FONT_SIZE = 12
LINE = 16                 # text line height
PAD = 6
GAP = 4                   # between tiles
ROW_LABEL_W = 92          # left margin holding the row labels
MAX_PICTURE_WIDTH = 2048  # whatever the videos' aspect ratio or the crop size
MAX_PICTURE_HEIGHT = 8192  # whatever --n and the crop size: 14 samples at crop 112, 10 at 224
# Wider source frames (a 6000x24 video) are scaled down, aspect kept, so that the row of
# 2 x SOURCE_TIME_POINTS of them fits MAX_PICTURE_WIDTH: 320 px, a 2.2:1 frame at full height.
MAX_SOURCE_WIDTH = (MAX_PICTURE_WIDTH - ROW_LABEL_W - GAP - PAD) // (2 * SOURCE_TIME_POINTS) - GAP
TIMELINE_H = 22
CAPTION_LINES = 7        # 6 of the plan, 1 for a label mismatch
HEADER_LINES = 2


def _font():
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


# ---------------------------------------------------------------- samples


@dataclass
class Sample:
    position: int            # index in rank 0's epoch
    plan: PretrainPlan
    meta: VideoMeta
    views: tuple[np.ndarray, np.ndarray]   # (T, S, S, 3) uint8, what the loader yielded
    labels: dict[str, int]                 # the loader's labels for this sample


def to_uint8(view) -> np.ndarray:
    """A loader view (3, T, S, S) float in [-1, 1] (torch or numpy, any device) as
    (T, S, S, 3) uint8: the inverse of the "tf" normalisation x/255·2−1."""
    if hasattr(view, "detach"):
        view = view.detach().float().cpu().numpy()
    pixels = (np.asarray(view, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 3, 0)


def make_loader(db: str, plan_cfg: PlanConfig, cfg: dict, *, n: int, epoch: int, executor: str, device: str):
    """The training loader (rank 0 of 1) with batches of `n`, starting at `epoch`."""
    d = cfg["data"]
    fields = dict(batch_size=n, num_threads=d["num_threads"], workers=d["workers"], prefetch=d["prefetch"],
                  shuffle=d["shuffle"], seed=cfg["run"]["seed"])
    if executor == "reference":
        from .reference_executor import ReferencePretrainLoader

        # LoaderSettings lives next to DALI; the reference executor only reads these fields.
        return ReferencePretrainLoader(db, plan_cfg, SimpleNamespace(start_method="fork", **fields),
                                       device=device, start_epoch=epoch)
    from .loader import LoaderSettings, PretrainLoader

    return PretrainLoader(db, plan_cfg, LoaderSettings(**fields), device=device, start_epoch=epoch)


def load_samples(db: str, plan_cfg: PlanConfig, cfg: dict, *, n: int, epoch: int, executor: str = "dali",
                 device: str = "cpu") -> list[Sample]:
    """The first `n` samples of `epoch` as the loader yields them, with their plans."""
    loader = make_loader(db, plan_cfg, cfg, n=n, epoch=epoch, executor=executor, device=device)
    # The loader's own source picks the videos and draws the plans: nothing copied.
    source = loader.source if executor == "dali" else loader.dataset.source
    try:
        batch = next(iter(loader))
        batch = {k: v.detach().cpu() for k, v in batch.items()}
    finally:
        loader.close()
    samples = []
    for i in range(n):
        labels = {k: int(v[i]) for k, v in batch.items() if k not in ("view1", "view2")}
        # The batch says which video it holds (an unreadable video is replaced by
        # another); the epoch order says which one was due.
        video = labels.get("video_index", source.video_for(epoch, i))
        samples.append(Sample(i, source.plan(epoch, video), loader.metas[video],
                              (to_uint8(batch["view1"][i]), to_uint8(batch["view2"][i])), labels))
    return samples


# ---------------------------------------------------------------- captions


def _frames_text(frames: np.ndarray) -> str:
    return f"{int(frames[0])}..{int(frames[-1])}"


def caption_lines(plan: PretrainPlan, meta: VideoMeta, plan_cfg: PlanConfig, classes=(),
                  position: int | None = None, substituted: int = 0) -> list[str]:
    """Every label of a plan and its meaning, one task per line."""
    b1, b2 = plan.view1.box, plan.view2.box
    cls = classes[meta.label] if 0 <= meta.label < len(classes) else str(meta.label)
    head = f"#{position}  " if position is not None else ""
    if substituted:
        head += f"(replaces an unreadable video, {substituted} skipped)  "
    s1, s2 = plan.starts
    k = plan.stride
    flip = lambda f: "yes" if f else "no"  # noqa: E731
    return [
        f"{head}video {plan.video_index} '{meta.name}' (class {cls}; {meta.frames} frames, "
        f"{meta.width}x{meta.height})",
        f"spatial label {plan.spatial_label}: rate {plan_cfg.spatial_rates[plan.spatial_label]:g} of box 1's "
        f"area shared, measured {plan.spatial_overlap:.2f};  box1 (x,y,w,h)=({b1.x},{b1.y},{b1.w},{b1.h})  "
        f"box2=({b2.x},{b2.y},{b2.w},{b2.h})",
        f"temporal label {plan.temporal_label}: rate {plan_cfg.temporal_rates[plan.temporal_label]:g}, "
        f"measured {plan.temporal_overlap:.2f};  view1 window start {s1} stride {k} (frames "
        f"{_frames_text(plan.view1.frames)}), view2 window start {s2} stride {k} (frames "
        f"{_frames_text(plan.view2.frames)})",
        f"speed label {plan.speed_label}: stride {k} (playback x{k}, window spans {plan.clip_range + 1} frames)",
        f"rot1 {plan.view1.rotation} = {90 * plan.view1.rotation}° CCW, rot2 {plan.view2.rotation} = "
        f"{90 * plan.view2.rotation}° CCW;  flip1 {flip(plan.view1.flip)}, flip2 {flip(plan.view2.flip)} "
        f"(horizontal, applied last)",
        f"appearance: view1 {appearance_text(plan.view1)};  view2 {appearance_text(plan.view2)}",
    ]


def appearance_text(view) -> str:
    """The strong augmentation of a view, when plans carry one (plan.Appearance)."""
    a = getattr(view, "appearance", None)
    if a is None or not getattr(a, "strong", False):
        return "none"
    parts = [f"small rotation {a.angle:+.1f}° CCW"] if a.angle else []
    if a.jitter:
        parts.append(f"jitter b{a.brightness:.2f} c{a.contrast:.2f} s{a.saturation:.2f} h{a.hue:+.3f}")
    if a.grey_channels is not None:
        parts.append("grey (channels " + "".join("RGB"[c] for c in a.grey_channels) + ")")
    if a.blur_sigma > 0:
        parts.append(f"blur sigma {a.blur_sigma:.2f}")
    return ", ".join(parts) or "strong, no change drawn"


def label_mismatches(sample: Sample) -> list[str]:
    """Where the loader's labels differ from the plan's (should never happen)."""
    p = sample.plan
    expected = dict(spatial_label=p.spatial_label, temporal_label=p.temporal_label, speed_label=p.speed_label,
                    rot1=p.view1.rotation, rot2=p.view2.rotation, video_index=p.video_index)
    return [f"{k}: loader {sample.labels[k]} != plan {v}" for k, v in expected.items()
            if k in sample.labels and sample.labels[k] != v]


# ---------------------------------------------------------------- layout


def fitting(count: int, room: int, each: int) -> int:
    """How many of `count` things `each` px long fit in `room` px, and at least one: the
    picture's bounds draw fewer output frames or samples, never smaller ones."""
    return max(1, min(count, room // each))


def shown_frames(frames: int, limit: int = MAX_OUTPUT_FRAMES) -> list[int]:
    """Which of a view's T output frames are drawn: all, or `limit` evenly spaced."""
    if frames <= limit:
        return list(range(frames))
    return [int(round(i)) for i in np.linspace(0, frames - 1, limit)]


def source_time_points(frames: int) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, frames - 1, min(SOURCE_TIME_POINTS, frames))})


class Layout:
    """Where everything goes; depends on the plan config only (and the source frames'
    widths, which only set the picture's width)."""

    def __init__(self, plan_cfg: PlanConfig):
        s = plan_cfg.crop_size
        self.zoom = min(4, max(1, 128 // s))
        self.tile = s * self.zoom
        # Fewer output frames (never smaller ones) when MAX_OUTPUT_FRAMES tiles would not fit.
        self.shown = shown_frames(plan_cfg.frames,
                                  fitting(MAX_OUTPUT_FRAMES, MAX_PICTURE_WIDTH - ROW_LABEL_W - PAD, self.tile + GAP))
        self.header_h = HEADER_LINES * LINE + PAD
        self.caption_y = PAD
        self.source_y = self.caption_y + CAPTION_LINES * LINE + LINE      # one line of frame labels
        self.timeline_y = self.source_y + SOURCE_HEIGHT + GAP
        self.output_y = (self.timeline_y + TIMELINE_H + PAD, self.timeline_y + TIMELINE_H + PAD + self.tile + GAP)
        self.block_h = self.output_y[1] + self.tile + 2 * PAD
        self.outputs_w = ROW_LABEL_W + len(self.shown) * (self.tile + GAP)

    def height(self, n: int) -> int:
        return self.header_h + n * self.block_h

    def samples_that_fit(self, n: int) -> int:
        """How many of n sample blocks fit MAX_PICTURE_HEIGHT (a block is at most 2374 px
        high, at the largest crop size, 1024: three fit)."""
        return fitting(n, MAX_PICTURE_HEIGHT - self.header_h, self.block_h)

    def block_top(self, i: int) -> int:
        return self.header_h + i * self.block_h

    def tile_box(self, i: int, view: int, j: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of output frame `self.shown[j]` of view 1 or 2 of sample i."""
        x = ROW_LABEL_W + j * (self.tile + GAP)
        y = self.block_top(i) + self.output_y[view - 1]
        return x, y, x + self.tile, y + self.tile

    def source_width(self, meta: VideoMeta) -> int:
        return max(1, min(MAX_SOURCE_WIDTH, int(round(meta.width * SOURCE_HEIGHT / meta.height))))

    def sources_w(self, meta: VideoMeta, frames: int) -> int:
        return ROW_LABEL_W + 2 * len(source_time_points(frames)) * (self.source_width(meta) + GAP) + GAP


# ---------------------------------------------------------------- drawing


def _scaled(box: Box, scale: float) -> tuple[float, float, float, float]:
    return box.x * scale, box.y * scale, (box.x + box.w) * scale - 1, (box.y + box.h) * scale - 1


def draw_source_frame(jpeg: bytes, plan: PretrainPlan, own_view: int, height: int,
                      max_width: int = MAX_SOURCE_WIDTH) -> Image.Image:
    """A source frame scaled to `height` (less when it would be wider than `max_width`),
    with both boxes and their overlap."""
    with Image.open(io.BytesIO(jpeg)) as im:
        frame = im.convert("RGB")
    scale = min(height / frame.height, max_width / frame.width)
    size = (max(1, int(round(frame.width * scale))), max(1, int(round(frame.height * scale))))
    frame = frame.resize(size, Image.BILINEAR).convert("RGBA")
    b1, b2 = plan.view1.box, plan.view2.box
    shade = Image.new("RGBA", frame.size, (0, 0, 0, 0))
    ix0, iy0 = max(b1.x, b2.x), max(b1.y, b2.y)
    ix1, iy1 = min(b1.x + b1.w, b2.x + b2.w), min(b1.y + b1.h, b2.y + b2.h)
    if ix1 > ix0 and iy1 > iy0:
        # Hatched, not filled: the content under the overlap keeps its colours.
        hatch = Image.new("RGBA", frame.size, (0, 0, 0, 0))
        hatch_draw = ImageDraw.Draw(hatch)
        for c in range(-frame.height, frame.width, HATCH_SPACING):
            hatch_draw.line((c, frame.height, c + frame.height, 0), fill=OVERLAP_FILL, width=1)
        mask = Image.new("L", frame.size, 0)
        ImageDraw.Draw(mask).rectangle(_scaled(Box(ix0, iy0, ix1 - ix0, iy1 - iy0), scale), fill=255)
        shade.paste(hatch, (0, 0), mask)
    frame = Image.alpha_composite(frame, shade).convert("RGB")
    draw = ImageDraw.Draw(frame)
    # The other view's box first and thin, the own view's on top and thick.
    for view in (3 - own_view, own_view):
        box = (b1, b2)[view - 1]
        draw.rectangle(_scaled(box, scale), outline=VIEW_COLOURS[view - 1], width=3 if view == own_view else 1)
    return frame


def draw_timeline(draw: ImageDraw.ImageDraw, plan: PretrainPlan, meta: VideoMeta, x0: int, y0: int, width: int,
                  font):
    """The video as a bar; ticks at the frames of view 1 (top half) and view 2 (bottom)."""
    label_w = 90
    draw.text((x0 - ROW_LABEL_W + PAD, y0 + 4), "timeline", fill=TEXT_COLOUR, font=font)
    end_text = f"frames 0-{meta.frames - 1}"
    # At least a readable bar: a very tall, narrow video makes the source frames (and `width`) tiny.
    bar_x0, bar_x1 = x0, x0 + max(width - label_w, 200)
    draw.rectangle((bar_x0, y0, bar_x1, y0 + TIMELINE_H - 2), fill=(225, 225, 225), outline=(150, 150, 150))
    span = max(meta.frames - 1, 1)
    half = (TIMELINE_H - 2) // 2
    for view, vp in enumerate((plan.view1, plan.view2)):
        top = y0 + 1 + view * half
        for f in vp.frames:
            x = bar_x0 + 1 + (bar_x1 - bar_x0 - 2) * int(f) / span
            draw.line((x, top, x, top + half - 1), fill=VIEW_COLOURS[view], width=2)
    draw.text((bar_x1 + PAD, y0 + 4), end_text, fill=TEXT_COLOUR, font=font)


def _view_label(plan: PretrainPlan, view: int) -> list[str]:
    vp = (plan.view1, plan.view2)[view - 1]
    return [f"view {view}", f"rot {90 * vp.rotation}° CCW", "flipped" if vp.flip else "not flipped"]


def render(samples: list[Sample], plan_cfg: PlanConfig, db: str, classes=(), title: str = "") -> Image.Image:
    layout = Layout(plan_cfg)
    font = _font()
    reader = LmdbFrameReader(db)
    width = max([layout.outputs_w] + [layout.sources_w(s.meta, plan_cfg.frames) for s in samples]) + PAD
    width = max(width, 900)
    image = Image.new("RGB", (width, layout.height(len(samples))), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((PAD, PAD // 2), title, fill=TEXT_COLOUR, font=font)
    legend_y = PAD // 2 + LINE
    x = PAD
    for text, colour in (("view 1 box", VIEW_COLOURS[0]), ("view 2 box", VIEW_COLOURS[1]),
                         ("overlap", OVERLAP_FILL[:3])):
        draw.rectangle((x, legend_y + 2, x + 18, legend_y + 12), fill=colour)
        draw.text((x + 24, legend_y), text, fill=TEXT_COLOUR, font=font)
        x += 34 + int(draw.textlength(text, font=font)) + 12
    draw.text((x, legend_y), f"outputs x{layout.zoom} (nearest); frames shown: {layout.shown}",
              fill=TEXT_COLOUR, font=font)

    points = source_time_points(plan_cfg.frames)
    for i, s in enumerate(samples):
        top = layout.block_top(i)
        draw.line((0, top, width, top), fill=(120, 120, 120), width=2)
        lines = caption_lines(s.plan, s.meta, plan_cfg, classes, s.position, s.labels.get("substituted", 0))
        problems = label_mismatches(s)
        if problems:
            lines.append("LABEL MISMATCH: " + "; ".join(problems))
        for n, text in enumerate(lines[:CAPTION_LINES]):
            colour = MISMATCH_COLOUR if text.startswith("LABEL MISMATCH") else TEXT_COLOUR
            draw.text((PAD, top + layout.caption_y + n * LINE), text, fill=colour, font=font)

        # Row 1: source frames, view 1's window then view 2's.
        wanted = [s.plan.view1.frames[t] for t in points] + [s.plan.view2.frames[t] for t in points]
        jpegs = reader.frames(s.plan.video_index, wanted)
        src_w = layout.source_width(s.meta)
        draw.text((PAD, top + layout.source_y + SOURCE_HEIGHT // 2 - LINE), "source", fill=TEXT_COLOUR, font=font)
        draw.text((PAD, top + layout.source_y + SOURCE_HEIGHT // 2), "frames", fill=TEXT_COLOUR, font=font)
        for k, jpeg in enumerate(jpegs):
            view, t = 1 + k // len(points), points[k % len(points)]
            x = ROW_LABEL_W + k * (src_w + GAP) + (GAP if view == 2 else 0)
            frame = draw_source_frame(jpeg, s.plan, view, SOURCE_HEIGHT)
            image.paste(frame, (x, top + layout.source_y))
            draw.text((x, top + layout.source_y - LINE), f"v{view} t={t}: frame {int(wanted[k])}",
                      fill=VIEW_COLOURS[view - 1], font=font)
        draw_timeline(draw, s.plan, s.meta, ROW_LABEL_W, top + layout.timeline_y,
                      2 * len(points) * (src_w + GAP), font)

        # Rows 2-3: the loader's output frames, untouched but for the integer zoom.
        for view in (1, 2):
            frames = s.views[view - 1]
            for j, t in enumerate(layout.shown):
                left, tile_top, _, _ = layout.tile_box(i, view, j)
                tile = Image.fromarray(frames[t]).resize((layout.tile, layout.tile), Image.NEAREST)
                image.paste(tile, (left, tile_top))
            y = top + layout.output_y[view - 1]
            for n, text in enumerate(_view_label(s.plan, view)):
                draw.text((PAD, y + n * LINE), text, fill=VIEW_COLOURS[view - 1] if n == 0 else TEXT_COLOUR,
                          font=font)
    return image

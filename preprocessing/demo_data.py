"""A small synthetic action dataset, for demos and end-to-end tests without downloads.

Six classes of a coloured shape (disc, square or triangle) in front of a moving
outdoor-like background: move_left, move_right, move_up, move_down, rotate, pulse.
The background has an "up" (sky with drifting clouds at the top, a textured
ground band at the bottom that pans sideways), so rotation prediction is
learnable, and it moves, so the shape's motion is not the only change.

Frames are rendered with numpy (vectorised over a chunk of frames) and piped as
raw RGB to ffmpeg, which writes real H.264 mp4 files. Everything is a pure
function of the seed: the same seed gives the same lists and the same videos.

Layout written under out_dir:
    videos/<class>/<class>_<nnn>.mp4
    classes.txt      one class per line (sorted); the line index is the label
    train.txt        `<class>/<file>.mp4 <label>` lines (about 80 % of each class)
    test.txt         the other ~20 %, disjoint from train.txt
"""

from __future__ import annotations

import contextlib
import multiprocessing
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np
from tqdm import tqdm

from .ffmpeg_tools import executable

# Labels index the sorted class names, as in UCF101 and Kinetics, so that an LMDB built
# from the folders alone and one built from train.txt agree on every label.
CLASSES = tuple(sorted(("move_left", "move_right", "move_up", "move_down", "rotate", "pulse")))
SHAPES = ("disc", "square", "triangle")
FPS = 25
MIN_SECONDS, MAX_SECONDS = 2, 4
TEST_FRACTION = 0.2
CHUNK_FRAMES = 25  # frames rendered at once: vectorised, yet small float temporaries

# (width, height): 4:3 and 16:9 landscapes, and a few portraits. All even, as yuv420p needs.
LANDSCAPE_SIZES = ((160, 120), (192, 144), (224, 168), (256, 192), (192, 108), (224, 126), (256, 144))
PORTRAIT_SIZES = ((120, 160), (144, 192), (108, 192))
PORTRAIT_PROBABILITY = 0.15


@dataclass(frozen=True)
class DemoVideo:
    """One video of the dataset: what to render and where it goes."""
    class_name: str
    label: int
    index: int          # within its class
    width: int
    height: int
    frames: int
    seed: int

    @property
    def relative_path(self) -> str:
        return f"{self.class_name}/{self.class_name}_{self.index:03d}.mp4"


# --------------------------------------------------------------------------- planning

def _video_rng(seed: int, label: int, index: int, purpose: int) -> np.random.Generator:
    # Counter-based seeding: each video's randomness is independent of the others
    # and of the order (or process) in which videos are generated.
    return np.random.default_rng([seed, label, index, purpose])


def plan_videos(videos_per_class: int, seed: int) -> list[DemoVideo]:
    videos = []
    for label, class_name in enumerate(CLASSES):
        for index in range(videos_per_class):
            rng = _video_rng(seed, label, index, 0)
            sizes = PORTRAIT_SIZES if rng.random() < PORTRAIT_PROBABILITY else LANDSCAPE_SIZES
            width, height = sizes[rng.integers(len(sizes))]
            frames = int(rng.integers(MIN_SECONDS * FPS, MAX_SECONDS * FPS + 1))
            videos.append(DemoVideo(class_name, label, index, int(width), int(height), frames, seed))
    return videos


def split_train_test(videos: list[DemoVideo], seed: int) -> tuple[list[DemoVideo], list[DemoVideo]]:
    """About TEST_FRACTION of each class goes to test (stratified), the rest to train."""
    train, test = [], []
    for label in sorted({v.label for v in videos}):
        members = [v for v in videos if v.label == label]
        n_test = max(1, round(TEST_FRACTION * len(members))) if len(members) >= 2 else 0
        chosen = set(_video_rng(seed, label, 0, 1).permutation(len(members))[:n_test].tolist())
        for position, video in enumerate(members):
            (test if position in chosen else train).append(video)
    return train, test


# --------------------------------------------------------------------------- rendering

class Scene:
    """All random choices of one video, drawn once; `render(t)` draws frames t (an int array)."""

    def __init__(self, video: DemoVideo):
        rng = _video_rng(video.seed, video.label, video.index, 2)
        self.video = video
        h, w = video.height, video.width
        self._init_background(rng, h, w)
        self._init_shape(rng, video.class_name, h, w, video.frames)

    # ---- background: sky gradient + drifting clouds above, panning textured ground below
    def _init_background(self, rng, h, w):
        self.horizon = int(h * rng.uniform(0.5, 0.75))
        top = np.array([0.10, 0.25, 0.60]) + rng.uniform(-0.08, 0.08, 3)
        near_horizon = np.array([0.70, 0.82, 0.95]) + rng.uniform(-0.08, 0.05, 3)
        ramp = np.linspace(0.0, 1.0, self.horizon, dtype=np.float32)[:, None, None]
        self.sky_u8 = _to_u8(np.clip((1 - ramp) * top + ramp * near_horizon, 0, 1))  # (hs, 1, 3)
        n_clouds = int(rng.integers(2, 5))
        self.clouds = [dict(x0=rng.uniform(0, w), y=rng.uniform(0.1, 0.7) * self.horizon,
                            rx=rng.uniform(0.10, 0.22) * w, ry=rng.uniform(0.04, 0.09) * h,
                            speed=rng.choice([-1, 1]) * rng.uniform(0.2, 0.8), strength=rng.uniform(0.6, 0.9))
                       for _ in range(n_clouds)]
        ground_h = h - self.horizon
        self.texture_width = 2 * w
        coarse = rng.random((max(2, ground_h // 6 + 1), self.texture_width // 8 + 1))
        texture = np.kron(coarse, np.ones((6, 8)))[:ground_h, :self.texture_width]
        texture = 0.6 * texture + 0.4 * rng.random((ground_h, self.texture_width))
        depth = np.linspace(0.8, 1.15, ground_h)[:, None]  # darker at the horizon, like distance haze
        base = np.array([0.25, 0.45, 0.15]) if rng.random() < 0.6 else np.array([0.45, 0.33, 0.18])
        base = np.clip(base + rng.uniform(-0.06, 0.06, 3), 0, 1)
        self.ground_u8 = _to_u8(np.clip(base * ((0.7 + 0.5 * texture) * depth)[..., None], 0, 1))
        self.pan_start = rng.uniform(0, self.texture_width)
        self.pan_speed = rng.choice([-1, 1]) * rng.uniform(0.5, 2.0)  # pixels per frame

    def _draw_background(self, frames: np.ndarray, t: np.ndarray) -> None:
        w = self.video.width
        frames[:, :self.horizon] = self.sky_u8
        self._draw_clouds(frames[:, :self.horizon], t, w)
        columns = (np.arange(w)[None, :] + self.pan_start + self.pan_speed * t[:, None]).astype(np.int64)
        frames[:, self.horizon:] = self.ground_u8[:, columns % self.texture_width].transpose(1, 0, 2, 3)

    def _draw_clouds(self, sky: np.ndarray, t: np.ndarray, w: int) -> None:
        xs = np.arange(w, dtype=np.float32)[None, None, :]
        t = t.astype(np.float32)
        for cloud in self.clouds:
            # Only the rows within 2 radii matter (exp(-8) beyond): blend just that band.
            top = max(0, int(cloud["y"] - 2 * cloud["ry"]))
            bottom = min(sky.shape[1], int(cloud["y"] + 2 * cloud["ry"]) + 1)
            if bottom <= top:
                continue
            span = w + 2 * cloud["rx"]  # wrap around: a cloud leaving one side comes back on the other
            cx = ((cloud["x0"] + cloud["speed"] * t + cloud["rx"]) % span - cloud["rx"]).astype(np.float32)
            # A Gaussian blob is separable: a row profile times a column profile is much
            # cheaper than exp() over every pixel of every frame.
            across = np.exp(-2.0 * ((xs - cx[:, None, None]) / cloud["rx"]) ** 2)
            rows = np.arange(top, bottom, dtype=np.float32)[None, :, None]
            down = np.float32(cloud["strength"]) * np.exp(-2.0 * ((rows - cloud["y"]) / cloud["ry"]) ** 2)
            _blend(sky[:, top:bottom], (across * down)[..., None], np.float32(247.0))

    # ---- the moving shape
    def _init_shape(self, rng, class_name, h, w, n_frames):
        kinds = ("square", "triangle") if class_name == "rotate" else SHAPES  # a rotating disc looks still
        self.kind = kinds[rng.integers(len(kinds))]
        self.colour = _saturated_colour(rng)
        self.radius = rng.uniform(0.11, 0.18) * min(h, w)
        t = np.arange(n_frames, dtype=np.float32)
        progress = t / max(1, n_frames - 1)
        self.angle = np.full(n_frames, rng.uniform(0, 2 * np.pi), np.float32)
        self.scale = np.ones(n_frames, np.float32)
        self.cx = np.full(n_frames, rng.uniform(0.35, 0.65) * w, np.float32)
        self.cy = np.full(n_frames, rng.uniform(0.35, 0.65) * h, np.float32)
        start, end = rng.uniform(0.15, 0.25), rng.uniform(0.75, 0.85)
        if class_name in ("move_left", "move_right"):
            a, b = (start, end) if class_name == "move_right" else (end, start)
            self.cx = ((a + (b - a) * progress) * w).astype(np.float32)
            self.cy[:] = rng.uniform(0.25, 0.75) * h
        elif class_name in ("move_up", "move_down"):
            a, b = (start, end) if class_name == "move_down" else (end, start)
            self.cy = ((a + (b - a) * progress) * h).astype(np.float32)
            self.cx[:] = rng.uniform(0.25, 0.75) * w
        elif class_name == "rotate":
            turns_per_second = rng.choice([-1, 1]) * rng.uniform(0.25, 0.6)
            self.angle += (2 * np.pi * turns_per_second / FPS * t).astype(np.float32)
        elif class_name == "pulse":
            hz, amplitude, phase = rng.uniform(0.7, 1.5), rng.uniform(0.3, 0.45), rng.uniform(0, 2 * np.pi)
            self.scale = (1 + amplitude * np.sin(2 * np.pi * hz / FPS * t + phase)).astype(np.float32)

    def _draw_shape(self, frames: np.ndarray, t: np.ndarray) -> None:
        """Blend the anti-aliased shape into the frames, computing only inside the box
        that contains it in all frames of the chunk (the shape is small)."""
        h, w = self.video.height, self.video.width
        reach = 1.15 * self.radius * float(self.scale[t].max()) + 2  # square corners reach 0.8*sqrt(2)
        x0, x1 = max(0, int(self.cx[t].min() - reach)), min(w, int(self.cx[t].max() + reach) + 1)
        y0, y1 = max(0, int(self.cy[t].min() - reach)), min(h, int(self.cy[t].max() + reach) + 1)
        if x1 <= x0 or y1 <= y0:
            return
        alpha = self._shape_alpha(t, np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
        _blend(frames[:, y0:y1, x0:x1], alpha[..., None], self.colour * np.float32(255.0))

    def _shape_alpha(self, t: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage (len(t), len(ys), len(xs)) of the shape, from a signed distance."""
        cx, cy = self.cx[t][:, None, None], self.cy[t][:, None, None]
        angle, size = self.angle[t][:, None, None], (self.radius * self.scale[t])[:, None, None]
        return shape_coverage(self.kind, xs[None, None, :] - cx, ys[None, :, None] - cy, angle, size)

    def render(self, t: np.ndarray) -> np.ndarray:
        """Frames t (int array) as (len(t), height, width, 3) uint8 RGB."""
        frames = np.empty((len(t), self.video.height, self.video.width, 3), np.uint8)
        self._draw_background(frames, t)
        self._draw_shape(frames, t)
        return frames


def shape_coverage(kind: str, dx: np.ndarray, dy: np.ndarray, angle, size) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (float32) of a "disc", "square" or "triangle" of radius
    `size` px turned by `angle` radians, at offsets (dx, dy) px from its centre, from a signed
    distance; the arguments broadcast together. Shared by the demo and the proof generators."""
    cos, sin = np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)
    u, v = (cos * dx + sin * dy) / size, (-sin * dx + cos * dy) / size
    if kind == "disc":
        distance = np.sqrt(u * u + v * v) - 1.0
    elif kind == "square":
        distance = np.maximum(np.abs(u), np.abs(v)) - 0.8
    else:  # equilateral triangle, circumradius 1: inside all three edges' half-planes
        distance = np.max([np.cos(a) * u + np.sin(a) * v for a in np.deg2rad((90, 210, 330))], axis=0) - 0.5
    return np.clip(0.5 - distance * size, 0.0, 1.0).astype(np.float32)


def _to_u8(values: np.ndarray) -> np.ndarray:
    return (values * 255.0 + 0.5).astype(np.uint8)


def _blend(region: np.ndarray, alpha: np.ndarray, colour) -> None:
    """region (uint8, in place) <- region + alpha * (colour - region)."""
    mixed = region.astype(np.float32)
    mixed += alpha * (colour - mixed)
    region[...] = mixed + np.float32(0.5)


def _saturated_colour(rng) -> np.ndarray:
    hue, saturation, value = rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.8, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0  # HSV -> RGB without colorsys, vectorised
    rgb = value - value * saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb.astype(np.float32)


def render_video(video: DemoVideo) -> np.ndarray:
    """All frames of a video, (frames, height, width, 3) uint8 RGB."""
    scene = Scene(video)
    out = np.empty((video.frames, video.height, video.width, 3), np.uint8)
    for start in range(0, video.frames, CHUNK_FRAMES):
        t = np.arange(start, min(start + CHUNK_FRAMES, video.frames))
        out[t] = scene.render(t)
    return out


# --------------------------------------------------------------------------- encoding

def encode_args(path: Path, width: int, height: int) -> list[str]:
    """ffmpeg arguments: raw RGB frames on stdin -> H.264 mp4 (bit-exact, so reproducible)."""
    source = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=FPS)
    output = source.output(str(path), vcodec="libx264", pix_fmt="yuv420p", preset="veryfast", crf=20,
                           g=FPS, threads=1, movflags="+faststart", map_metadata=-1,
                           fflags="+bitexact", flags="+bitexact")
    return [executable("ffmpeg"), "-hide_banner", "-loglevel", "error", "-y", *ffmpeg.get_args(output)]


def write_video(video: DemoVideo, videos_dir: Path, render=render_video) -> int:
    """Render (with `render`, a module-level function of the video) and encode one video;
    returns its frame count."""
    path = videos_dir / video.relative_path
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = render(video)
    result = subprocess.run(encode_args(path, video.width, video.height), input=frames.tobytes(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"ffmpeg could not encode {path}: {message[-1] if message else 'no message'} "
                           "(is ffmpeg built with libx264?)")
    return len(frames)


def _write_all(videos: list[DemoVideo], videos_dir: Path, workers: int, render=render_video,
               progress: bool = False) -> list[int]:
    with contextlib.ExitStack() as stack:
        mapper = map
        if workers > 1:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
            mapper = stack.enter_context(ProcessPoolExecutor(workers, mp_context=context)).map
        counts = mapper(write_video, videos, [videos_dir] * len(videos), [render] * len(videos))
        return list(tqdm(counts, total=len(videos), unit="video", desc="render+encode", disable=not progress))


def _remove_stale_videos(videos_dir: Path, keep: set[str], classes) -> None:
    """Delete videos of an earlier, larger run in this folder (only files named like ours),
    so that building an LMDB from the folder sees exactly this dataset."""
    for class_name in classes:
        for path in (videos_dir / class_name).glob(f"{class_name}_*.mp4"):
            if f"{class_name}/{path.name}" not in keep:
                path.unlink()


def _list_lines(videos: list[DemoVideo]) -> str:
    return "".join(f"{v.relative_path} {v.label}\n" for v in sorted(videos, key=lambda v: v.relative_path))


def generate_demo_dataset(out_dir, videos_per_class: int = 12, seed: int = 0, workers: int = 2,
                          progress: bool = False) -> dict:
    """Write the synthetic dataset under out_dir (see the module docstring) and return a summary:
    out_dir, videos_dir, classes, videos, train, test, frames, seconds."""
    if videos_per_class < 1:
        raise ValueError(f"videos_per_class must be at least 1, got {videos_per_class}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return write_dataset(out_dir, plan_videos(videos_per_class, seed), CLASSES, seed, workers, render_video,
                         progress)


def write_dataset(out_dir, videos: list[DemoVideo], classes, seed: int, workers: int, render,
                  progress: bool = False) -> dict:
    """Render `videos` into out_dir/videos/<class>/, split them, write classes.txt, train.txt
    and test.txt; returns the summary: out_dir, videos_dir, classes, videos, train, test,
    frames, seconds. Shared by the demo and the proof generators; `progress` shows a bar."""
    started = time.monotonic()
    out_dir = Path(out_dir)
    videos_dir = out_dir / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    train, test = split_train_test(videos, seed)
    _remove_stale_videos(videos_dir, {v.relative_path for v in videos}, classes)
    frame_counts = _write_all(videos, videos_dir, int(workers), render, progress)
    (out_dir / "classes.txt").write_text("".join(f"{c}\n" for c in classes), encoding="utf-8")
    (out_dir / "train.txt").write_text(_list_lines(train), encoding="utf-8")
    (out_dir / "test.txt").write_text(_list_lines(test), encoding="utf-8")
    return dict(out_dir=str(out_dir), videos_dir=str(videos_dir), classes=list(classes), videos=len(videos),
                train=len(train), test=len(test), frames=int(sum(frame_counts)),
                seconds=round(time.monotonic() - started, 2))

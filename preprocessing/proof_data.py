"""A synthetic dataset on which every CSTP pretext task is observable (`make demo`, `make proof`).

The outdoor-looking dataset of demo_data.py (the first `make demo`'s) leaves three of
the four pretext labels ambiguous by construction: the background
pans and the shapes move at random speeds (so a playback rate cannot be told from
the pixels), the sky is flat (so crops of it cannot be compared), and nothing in
a scene says what time it is. This generator removes each ambiguity on purpose:

* **Playback rate (speed)** — everything that moves has ONE fixed natural speed:
  the background texture translates at exactly BACKGROUND_SPEED px/frame (in a
  random direction per video), and the shapes move at fixed rates
  (FOREGROUND_SPEED px/frame, fixed periods). The texture is a sum of
  sinusoids of fixed wavelengths, a ruler that does not depend on the crop's
  scale: the displacement per frame in wavelengths is BACKGROUND_SPEED × stride /
  wavelength whatever the box size, so the stride classes (×1/×2/×4/×8) differ
  by a factor two in observable motion. The fastest (stride 8: 4 px/frame) stays
  below half the shortest wavelength, so it does not alias. The ripple is weak
  (TEXTURE_CONTRAST 0.1) and the shapes are many and strong, so the playback rate
  is read from the shapes' motion as much as from the ripple, and what the speed
  head teaches the backbone is how the shapes move, which is what the classes are
  about (measured in docs/proof.md: with one dark or light shape the joint
  objective needed a 0.25 ripple for the speed head to start, and its features
  did not separate the classes).
* **Rotation** — a static map lies over the whole frame: the grey level grows to
  the right (LUMA_LOW to LUMA_HIGH) and the colour saturation grows downwards
  (CHROMA_TOP to CHROMA_BOTTOM), the same in every video. It gives an "up" AND a
  handedness, so all eight (rotation, flip) combinations look different: the
  rotation label stays observable under the independent horizontal flip of each
  view. (On mirror-symmetric footage, such as the demo's, 90° and 270° become
  the same after a flip, which caps rotation accuracy at 0.75.)
* **Spatial overlap** — the same map encodes position: a crop's mean grey level
  says how far right its box is, its mean saturation how far down; the boxes of
  a pair have the same size, so how far apart they are gives how much they share.
* **Temporal overlap** — the content changes over time in a known way: the hue of
  the whole frame turns once every CLOCK_PERIOD frames (from a random start per
  video), so the hue difference between two windows, against the hue turn within
  a window, gives the share of time they have in common. The code is a circle,
  not a level: the reference head on exact per-view features of simulated windows
  learns a hue circle to ~0.6 where a rising level (the first proof data's blue
  clock) stays near the majority rate (docs/proof.md), because a level's value over the video
  swamps the small difference between two windows. Nothing else is coloured
  (the texture and the shapes change brightness only), so a crop's mean hue is
  time alone.

The codes are photometric, so the proof recipe (configs/proof.yaml) turns the
reference's colour jitter off: it shifts hue by up to a tenth of a turn and
scales brightness and saturation by up to ±40 %, which randomises the very
codes the pretext labels are read from (measured on real loader batches: the
reference head on per-view colour statistics reaches 0.57 on the temporal label
without the jitter, 0.37 with it).

Classes (evaluation labels; none is a pretext label): SHAPES_PER_VIDEO shapes (each a
disc, square or triangle, lighter or darker than what lies under it, drawn
independently) move in one of six ways, all shapes of a video the same way, each with
a fixed rate:
    blink   still, shown for half of each BLINK_PERIOD and hidden for the other half
    glide   straight line at FOREGROUND_SPEED px/frame, bouncing off the frame edges
    orbit   a circle of radius ORBIT_RADIUS at one turn per ORBIT_PERIOD frames
    pulse   still, its size swings by ±PULSE_AMPLITUDE with period PULSE_PERIOD
    spin    still, turning once per SPIN_PERIOD frames (squares and triangles)
    swing   back and forth along a line, SWING_AMPLITUDE either side, period SWING_PERIOD
Each direction (of gliding, orbiting, spinning, swinging), place, phase and polarity
is drawn at random per shape, so no two classes are mirror images or rotations of each
other: the pretraining flips and rotates each view independently, so features learnt
from it cannot tell mirror images apart, and the classes do not ask them to.
With several shapes nearly every crop holds one, so what two views of a video share
is the class's motion; and the texture is the same in every video (only its direction
differs), so the background cannot tell one video from another and BYOL cannot match
two views by it (measured in docs/proof.md: with one shape and a texture per video the
frozen features did not separate the classes). A shape changes only the brightness
under it (by SHAPE_CONTRAST, R, G and B alike), so it has no colour of its own and
leaves the hue and the saturation of the map under it as they are: with grey shapes
that covered the colour, the temporal head alone learnt more slowly.

Layout written under out_dir (as demo_data.py, so the same tools read it):
    videos/<class>/<class>_<nnn>.mp4, classes.txt, train.txt, test.txt
and, from ensure_proof_dataset (`python -m preprocessing proof-data`), STAMP: the generator
version, size and seed that made the folder, so that a stale dataset is rebuilt, not reused.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .demo_data import DemoVideo, _to_u8, _video_rng, shape_coverage, write_dataset

# Bumped whenever the rendering changes, so that scripts/proof.py rebuilds an older dataset
# instead of measuring on it (3: four shapes that change brightness only, one shared texture).
GENERATOR_VERSION = 3
STAMP = "proof_dataset.json"      # what made a dataset folder: generator version, size, seed
CLASSES = tuple(sorted(("blink", "glide", "orbit", "pulse", "spin", "swing")))
SHAPES = ("disc", "square", "triangle")
WIDTH, HEIGHT = 96, 72            # every video: speeds are in pixels of this frame
FRAMES = 144                      # long enough for every temporal-overlap class at stride 8 (T = 8)

BACKGROUND_SPEED = 0.5            # px/frame: stride 8 moves 4 px per sampled frame
WAVELENGTHS = (12.0, 24.0)        # px: the texture's two bands (the speed and scale "ruler")
WAVES_PER_BAND = 5
FOREGROUND_SPEED = 0.75           # px/frame (glide)
ORBIT_RADIUS = 14.0               # px
ORBIT_PERIOD = 96                 # frames per turn
SPIN_PERIOD = 48
PULSE_PERIOD = 48
PULSE_AMPLITUDE = 0.4
BLINK_PERIOD = 48
SWING_PERIOD = 64
SWING_AMPLITUDE = 20.0            # px
SHAPE_RADIUS = 9.0                # px
CLOCK_PERIOD = 96                 # frames per turn of the hue clock (a window at stride 8 spans 56)
LUMA_LOW, LUMA_HIGH = 0.2, 0.8    # grey level at the left and right edges (position x, "right")
CHROMA_TOP, CHROMA_BOTTOM = 0.08, 0.35   # colour saturation (distance from grey) at the top and bottom
TEXTURE_CONTRAST = 0.1            # amplitude of the grey texture ripple (0-1 scale)
SHAPES_PER_VIDEO = 4              # every shape of a video moves the class's way
SHAPE_CONTRAST = 0.35             # a shape brightens or darkens what lies under it by this (R, G, B alike)
_TEXTURE_PURPOSE = 999            # seeds the texture shared by every video of a dataset
# two unit directions spanning the colour plane orthogonal to grey (R = G = B): hue turns in it
CHROMA_U = np.array([1.0, -1.0, 0.0], np.float32) / np.sqrt(2.0)
CHROMA_V = np.array([1.0, 1.0, -2.0], np.float32) / np.sqrt(6.0)


@dataclass(frozen=True)
class MovingShape:
    """One shape of a video and how it moves: `state(t)` gives its centre, angle, scale and
    visibility at frames t, `coverage(t)` how much of each pixel it covers."""

    class_name: str
    kind: str
    polarity: float       # +1: it brightens what lies under it, -1: it darkens it
    angle0: float
    sense: float          # turning / orbiting direction
    heading: float        # glide and swing direction
    cx0: float
    cy0: float
    phase: float          # where in its cycle the motion starts
    margin: float

    @classmethod
    def draw(cls, rng, class_name: str) -> "MovingShape":
        kinds = ("square", "triangle") if class_name == "spin" else SHAPES  # a spinning disc looks still
        kind = kinds[rng.integers(len(kinds))]
        polarity = float(rng.choice([-1.0, 1.0]))
        angle0, sense = float(rng.uniform(0, 2 * np.pi)), float(rng.choice([-1.0, 1.0]))
        heading = float(rng.uniform(0, 2 * np.pi))
        margin = SHAPE_RADIUS * 1.6
        reach = {"orbit": ORBIT_RADIUS, "swing": SWING_AMPLITUDE}.get(class_name, 0.0) + margin
        reach_x, reach_y = min(reach, WIDTH / 2 - 1), min(reach, HEIGHT / 2 - 1)
        cx0, cy0 = float(rng.uniform(reach_x, WIDTH - reach_x)), float(rng.uniform(reach_y, HEIGHT - reach_y))
        return cls(class_name, kind, polarity, angle0, sense, heading, cx0, cy0, float(rng.uniform(0, 1)), margin)

    def state(self, t):
        """(cx, cy, angle, scale, visible) arrays for frames t."""
        t = np.asarray(t, np.float64)
        name = self.class_name
        cx, cy = np.full(t.shape, self.cx0), np.full(t.shape, self.cy0)
        angle, scale, visible = np.full(t.shape, self.angle0), np.ones(t.shape), np.ones(t.shape, bool)
        if name == "glide":
            cx = _bounce(self.cx0 + FOREGROUND_SPEED * t * np.cos(self.heading), self.margin, WIDTH - self.margin)
            cy = _bounce(self.cy0 + FOREGROUND_SPEED * t * np.sin(self.heading), self.margin, HEIGHT - self.margin)
        elif name == "orbit":
            a = 2 * np.pi * (self.phase + self.sense * t / ORBIT_PERIOD)
            cx, cy = self.cx0 + ORBIT_RADIUS * np.cos(a), self.cy0 + ORBIT_RADIUS * np.sin(a)
        elif name == "swing":
            s = SWING_AMPLITUDE * np.sin(2 * np.pi * (self.phase + t / SWING_PERIOD))
            cx, cy = self.cx0 + s * np.cos(self.heading), self.cy0 + s * np.sin(self.heading)
        elif name == "spin":
            angle = self.angle0 + self.sense * 2 * np.pi * t / SPIN_PERIOD
        elif name == "pulse":
            scale = 1 + PULSE_AMPLITUDE * np.sin(2 * np.pi * (self.phase + t / PULSE_PERIOD))
        elif name == "blink":
            visible = ((self.phase + t / BLINK_PERIOD) % 1.0) < 0.5
        return cx, cy, angle, scale, visible

    def coverage(self, t) -> np.ndarray:
        """(len(t), HEIGHT, WIDTH) float32 in [0, 1]: 1 inside the shape, 0 outside, antialiased edges."""
        cx, cy, angle, scale, visible = self.state(t)
        xs = np.arange(WIDTH, dtype=np.float32)[None, None, :]
        ys = np.arange(HEIGHT, dtype=np.float32)[None, :, None]
        size = (SHAPE_RADIUS * scale).astype(np.float32)[:, None, None]
        dx, dy = xs - cx.astype(np.float32)[:, None, None], ys - cy.astype(np.float32)[:, None, None]
        return shape_coverage(self.kind, dx, dy, angle[:, None, None], size) * visible[:, None, None]


class ProofScene:
    """All random choices of one video; `render(t)` draws frames t (an int array).
    `background_offset(t)` is where the texture has moved to (px, exactly
    BACKGROUND_SPEED × t along the video's direction); `shapes` are the
    SHAPES_PER_VIDEO shapes that all move the class's way."""

    def __init__(self, video: DemoVideo):
        self.video = video
        # the texture is the same in every video of a dataset (only its direction differs), so a
        # video cannot be told from another by its background: what two views of a video share
        # beyond the background is their shapes and how they move
        waves = np.random.default_rng([video.seed, _TEXTURE_PURPOSE])
        angles = waves.uniform(0, np.pi, (len(WAVELENGTHS), WAVES_PER_BAND))
        k = 2 * np.pi / np.asarray(WAVELENGTHS)[:, None]
        self.wave_kx = (k * np.cos(angles)).ravel().astype(np.float32)
        self.wave_ky = (k * np.sin(angles)).ravel().astype(np.float32)
        self.wave_phase = waves.uniform(0, 2 * np.pi, self.wave_kx.size).astype(np.float32)
        rng = _video_rng(video.seed, video.label, video.index, 2)
        self.direction = float(rng.uniform(0, 2 * np.pi))
        self.clock_start = float(rng.uniform(0.0, 2 * np.pi))              # hue at frame 0
        self.shapes = [MovingShape.draw(_video_rng(video.seed, video.label, video.index, 10 + i), video.class_name)
                       for i in range(SHAPES_PER_VIDEO)]

    # ---- what moves, and how (pure functions of t)
    def background_offset(self, t) -> tuple[np.ndarray, np.ndarray]:
        t = np.asarray(t, np.float64)
        return BACKGROUND_SPEED * t * np.cos(self.direction), BACKGROUND_SPEED * t * np.sin(self.direction)

    def clock(self, t) -> np.ndarray:
        """The hue angle (radians, unwrapped) of frames t: one turn per CLOCK_PERIOD frames."""
        return self.clock_start + 2 * np.pi * np.asarray(t, np.float64) / CLOCK_PERIOD

    # ---- drawing
    def texture(self, t: np.ndarray) -> np.ndarray:
        """The moving texture in [-1, 1], (len(t), HEIGHT, WIDTH), float32."""
        ox, oy = self.background_offset(t)
        xs = np.arange(WIDTH, dtype=np.float32)[None, None, :] - ox.astype(np.float32)[:, None, None]
        ys = np.arange(HEIGHT, dtype=np.float32)[None, :, None] - oy.astype(np.float32)[:, None, None]
        value = np.zeros((len(t), HEIGHT, WIDTH), np.float32)
        for kx, ky, phase in zip(self.wave_kx, self.wave_ky, self.wave_phase):
            value += np.cos(kx * xs + ky * ys + phase)
        return value / np.float32(np.sqrt(self.wave_kx.size / 2) * 2)  # ~unit spread, rarely beyond ±1

    def background(self, t: np.ndarray) -> np.ndarray:
        """The frames without their shapes, float32 (n, H, W, 3), before clipping to [0, 1]."""
        texture = np.clip(self.texture(t), -1, 1)[..., None]                     # (n, H, W, 1)
        grey = (LUMA_LOW + (LUMA_HIGH - LUMA_LOW) * np.linspace(0, 1, WIDTH, dtype=np.float32))[None, None, :, None]
        saturation = (CHROMA_TOP + (CHROMA_BOTTOM - CHROMA_TOP) *
                      np.linspace(0, 1, HEIGHT, dtype=np.float32))[None, :, None, None]
        hue = self.clock(t).astype(np.float32)[:, None, None, None]
        colour = saturation * (np.cos(hue) * CHROMA_U + np.sin(hue) * CHROMA_V)      # (n, H, 1, 3)
        # position in grey level and saturation, time in hue; the grey ripple averages out of a crop's mean colour
        return grey + colour + TEXTURE_CONTRAST * texture

    def render(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t)
        rgb = self.background(t)
        # a shape only brightens or darkens what lies under it (R, G and B alike): the colour
        # under it, the hue clock and the saturation map, stays as it is
        for shape in self.shapes:
            rgb = rgb + np.float32(SHAPE_CONTRAST * shape.polarity) * shape.coverage(t)[..., None]
        return _to_u8(np.clip(rgb, 0, 1))


def _bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Reflect a straight-line position into [low, high] (a ball bouncing off walls)."""
    span = high - low
    x = np.mod(position - low, 2 * span)
    return low + np.where(x > span, 2 * span - x, x)


def plan_proof_videos(videos_per_class: int, seed: int) -> list[DemoVideo]:
    return [DemoVideo(name, label, index, WIDTH, HEIGHT, FRAMES, seed)
            for label, name in enumerate(CLASSES) for index in range(videos_per_class)]


def render_proof_video(video: DemoVideo) -> np.ndarray:
    scene = ProofScene(video)
    out = np.empty((video.frames, HEIGHT, WIDTH, 3), np.uint8)
    for start in range(0, video.frames, 24):
        t = np.arange(start, min(start + 24, video.frames))
        out[t] = scene.render(t)
    return out


def generate_proof_dataset(out_dir, videos_per_class: int = 24, seed: int = 0, workers: int = 2,
                           progress: bool = False) -> dict:
    """Write the dataset under out_dir (see the module docstring); returns a summary like
    demo_data.generate_demo_dataset's."""
    if videos_per_class < 2:
        raise ValueError(f"videos_per_class must be at least 2, got {videos_per_class}")
    return write_dataset(out_dir, plan_proof_videos(videos_per_class, seed), CLASSES, seed, workers,
                         render_proof_video, progress)


class NotAProofDataset(RuntimeError):
    """The output folder holds something else: it is never deleted."""


def ensure_proof_dataset(out_dir, videos_per_class: int = 40, seed: int = 0, workers: int = 2, log=print,
                         progress: bool = False) -> dict | None:
    """Generate the dataset in out_dir unless the folder already holds this generator version's
    dataset of that size and seed (its STAMP file says so); returns generate_proof_dataset's
    summary, or None when there was nothing to do.
    A dataset from another generator version, size or seed is deleted and rebuilt (with the LMDBs
    built from it), never reused; a non-empty folder that is not a proof dataset is refused
    (NotAProofDataset), so nothing of the user's is deleted."""
    out_dir = Path(out_dir)
    stamp = out_dir / STAMP
    wanted = {"generator_version": GENERATOR_VERSION, "videos_per_class": videos_per_class, "seed": seed}
    found = _read_stamp(stamp)
    if found == wanted:
        return None
    if out_dir.exists() and any(out_dir.iterdir()):
        classes = out_dir / "classes.txt"
        if found is None and not (classes.is_file() and classes.read_text().split() == list(CLASSES)):
            raise NotAProofDataset(f"{out_dir} exists and is not a proof dataset; remove it or choose another folder")
        log(f"{out_dir} was made by another version of the generator or with another size or seed: rebuilding it")
    shutil.rmtree(out_dir, ignore_errors=True)
    log(f"generating the proof dataset in {out_dir} ({videos_per_class} videos per class)")
    summary = generate_proof_dataset(out_dir, videos_per_class=videos_per_class, seed=seed, workers=workers,
                                     progress=progress)
    stamp.write_text(json.dumps(wanted))
    return summary


def _read_stamp(stamp: Path):
    """What generated the dataset (a dict), or None when the stamp is missing or unreadable."""
    try:
        value = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None

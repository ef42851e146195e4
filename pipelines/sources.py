"""Per-sample `external_source` callables: they turn (epoch, position) into a plan
and the encoded bytes the plan needs. Everything random happens here, in numpy,
deterministically from DALI's SampleInfo, so a pipeline can be restarted at any
sample of any epoch and produce exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np

from .lmdb_store import LmdbFormatError, LmdbFrameReader, VideoMeta, jpeg_problem
from .plan import PlanConfig, PretrainPlan, ViewPlan, make_pretrain_plan
from .sample_source import BadSampleError, EpochSampleSource
from .sharding import samples_per_rank

# Per view, the parameters of its appearance augmentation (plan.Appearance), neutral
# when it is off: view 1's, then view 2's.
APPEARANCE_PARAMS = ("jitter", "brightness", "contrast", "saturation", "hue_shift", "grey", "grey_matrix",
                     "blur_sigma", "blur_window")
APPEARANCE_OUTPUTS = tuple(f"{name}{view}" for view in (1, 2) for name in APPEARANCE_PARAMS)

# The extra (non-JPEG) outputs of the pretraining source, in order.
PRETRAIN_PARAM_OUTPUTS = (
    "anchor1", "shape1", "anchor2", "shape2", "angle1", "angle2", "flip1", "flip2",
    "spatial_label", "temporal_label", "speed_label", "rot1", "rot2", "video_index",
    *APPEARANCE_OUTPUTS,  # (after the labels, so that the label outputs keep their positions)
    "substituted",
)


class PretrainLmdbSource(EpochSampleSource):
    """Sample source of the CSTP pretraining pipeline over an LMDB of JPEG frames.

    Returns, per sample: view 1's T JPEG buffers, view 2's T JPEG buffers, then the
    arrays named in PRETRAIN_PARAM_OUTPUTS (ROI anchors/shapes in (x, y) order for
    `decoders.image_slice`, rotation angles in degrees, flip flags and the labels).
    """

    def __init__(self, db_path: str, metas: list[VideoMeta], plan_cfg: PlanConfig, *, seed: int,
                 batch_size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 start_epoch: int = 0, start_sample: int = 0):
        super().__init__(db_path, metas, seed=seed, batch_size=batch_size, rank=rank, world_size=world_size,
                         shuffle=shuffle, start_epoch=start_epoch, start_sample=start_sample)
        self.plan_cfg = plan_cfg
        self.per_rank = samples_per_rank(len(metas), world_size, batch_size)

    @property
    def num_outputs(self) -> int:
        return 2 * self.plan_cfg.frames + len(PRETRAIN_PARAM_OUTPUTS)

    def video_for(self, epoch: int, position: int) -> int:
        return int(self.epoch_order(epoch, len(self.metas))[position])

    def plan(self, epoch: int, video: int) -> PretrainPlan:
        m = self.metas[video]
        return make_pretrain_plan(self.seed, epoch, video, m.frames, m.height, m.width, self.plan_cfg)

    def sample(self, epoch: int, position: int):
        """(plan, payload, attempt) at `position` of `epoch`: attempt > 0 when unreadable
        or undecodable videos were replaced (the one place both executors take samples from)."""
        (plan, payload), attempt = self.first_readable(epoch, position, (self.video_for(epoch, position),),
                                                       lambda video: self.read_sample(epoch, video))
        return plan, payload, attempt

    def outputs(self, plan: PretrainPlan, jpegs: list[bytes], substituted: int) -> tuple:
        buffers = [np.frombuffer(j, dtype=np.uint8) for j in jpegs]
        return (*buffers, *plan_to_arrays(plan), np.array(substituted, np.int32))

    def read_sample(self, epoch: int, video: int):
        """(plan, JPEG bytes of both views' frames), or BadSampleError."""
        try:
            plan = self.plan(epoch, video)
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise BadSampleError(f"{type(err).__name__}: {err}") from None
        wanted = np.concatenate([plan.view1.frames, plan.view2.frames])
        return plan, read_checked_jpegs(self.reader, video, wanted, self.metas[video])

    def replacement_video(self, epoch: int, position: int, attempt: int) -> int:
        rng = np.random.default_rng([self.seed, epoch, position, attempt, 0xBAD])
        return int(rng.integers(0, len(self.metas)))

    def replacement(self, epoch: int, position: int, attempt: int) -> tuple[int]:
        return (self.replacement_video(epoch, position, attempt),)


def read_checked_jpegs(reader: LmdbFrameReader, video: int, frames, meta: VideoMeta) -> list:
    """The JPEG bytes of `frames` of `video` (slices of the LMDB map, not copies, on
    the version 2 layout), each checked cheaply before DALI's decoder sees it (a
    decoder error ends the pipeline), or BadSampleError saying what is wrong."""
    try:
        jpegs = reader.frames(video, frames)
    except (KeyError, IndexError, ValueError, TypeError, LmdbFormatError,
            msgpack.exceptions.UnpackException) as err:
        raise BadSampleError(f"{type(err).__name__}: {err}") from None
    # Each distinct frame once, told apart by index (hashing the JPEG bytes would read them all).
    for jpeg in dict(zip(np.asarray(frames).tolist(), jpegs)).values():
        problem = jpeg_problem(jpeg, meta.height, meta.width)
        if problem:
            raise BadSampleError(problem)
    return jpegs


def plan_to_arrays(plan: PretrainPlan) -> tuple[np.ndarray, ...]:
    """The plan's parameters as the arrays the DALI graph consumes (see
    PRETRAIN_PARAM_OUTPUTS). Scalars are 0-d arrays: parallel external_source
    rejects numpy scalars (docs/architecture.md#external-source)."""
    def xy(box):
        return np.array([box.x, box.y], np.float32), np.array([box.w, box.h], np.float32)

    a1, s1 = xy(plan.view1.box)
    a2, s2 = xy(plan.view2.box)
    i32 = lambda v: np.array(v, dtype=np.int32)  # noqa: E731
    return (
        a1, s1, a2, s2,
        view_angle(plan.view1), view_angle(plan.view2),
        i32(plan.view1.flip), i32(plan.view2.flip),
        i32(plan.spatial_label), i32(plan.temporal_label), i32(plan.speed_label),
        i32(plan.view1.rotation), i32(plan.view2.rotation), i32(plan.video_index),
        *appearance_arrays(plan.view1), *appearance_arrays(plan.view2),
    )


def view_angle(view: ViewPlan) -> np.ndarray:
    """Degrees counter-clockwise, 0-d float32. The small rotation of the strong
    augmentation is fused with the k·90° one: both turn the square crop about its
    centre, so one rotation by 90k+δ equals the reference's two (to rounding of the
    nearest-neighbour sampling grid, see tests/test_augment.py)."""
    return np.array(90.0 * view.rotation + view.appearance.angle, np.float32)


# The colour jitter's saturation and hue act in YIQ space (the model of DALI's fn.hsv),
# with PIL's luma weights as the Y row so that saturation blends with the luma PIL's
# ImageEnhance.Color uses: one 3x3 matrix per view, one fused op in the DALI graph
# (fn.coord_transform), the same matrix in the reference executor. torchvision's
# adjust_hue (PIL's 8-bit HSV round trip) cost ~60 elementwise DALI ops, 26 ms per
# 16x112x112 view on a CPU core, more than all the rest of a view; the YIQ rotation is a
# documented deviation (it keeps luma where the HSV shift keeps max(R,G,B)).
YIQ_FROM_RGB = np.array([[19595 / 65536, 38470 / 65536, 7471 / 65536],
                         [0.596, -0.274, -0.322],
                         [0.211, -0.523, 0.312]])
_RGB_FROM_YIQ = np.linalg.inv(YIQ_FROM_RGB)
# M(s, θ) = LUMA_PART + s·cos θ · CHROMA_PART + s·sin θ · TURN_PART (I, Q scaled by s, turned by θ)
LUMA_PART = (_RGB_FROM_YIQ @ np.diag([1.0, 0.0, 0.0]) @ YIQ_FROM_RGB).astype(np.float32)
CHROMA_PART = (_RGB_FROM_YIQ @ np.diag([0.0, 1.0, 1.0]) @ YIQ_FROM_RGB).astype(np.float32)
TURN_PART = (_RGB_FROM_YIQ @ np.array([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
             @ YIQ_FROM_RGB).astype(np.float32)
# Hue in PIL's 8-bit units (255 = a full turn, as torchvision adds hue·255 to H) to the YIQ
# angle in radians. Negative: HSV hue runs red → yellow → green, the YIQ angle the other way.
HUE_UNITS_TO_RADIANS = -2.0 * math.pi / 255.0


def saturation_hue_matrix(saturation: float, hue_shift: float) -> np.ndarray:
    """(3, 3) float32 colour matrix of the jitter's saturation factor and hue shift (PIL
    8-bit units, int(hue·255)): out = round(M @ rgb), as the DALI graph computes it."""
    angle = np.float32(hue_shift) * np.float32(HUE_UNITS_TO_RADIANS)
    a = np.float32(saturation) * np.cos(angle, dtype=np.float32)
    b = np.float32(saturation) * np.sin(angle, dtype=np.float32)
    return (LUMA_PART + a * CHROMA_PART + b * TURN_PART).astype(np.float32)


def grey_matrices(channels, frames: int) -> np.ndarray:
    """(T, 3, 3) float32 colour matrices, one per frame, for fn.coord_transform: every
    output channel takes input channel channels[t]. Identity when there is no grey."""
    if channels is None:   # most views: one shared read-only identity stack per length, not a new one
        identity = _IDENTITY_STACKS.get(frames)
        if identity is None:
            identity = np.tile(np.eye(3, dtype=np.float32), (frames, 1, 1))
            identity.flags.writeable = False
            _IDENTITY_STACKS[frames] = identity
        return identity
    matrices = np.zeros((frames, 3, 3), np.float32)
    matrices[np.arange(frames), :, np.asarray(channels)] = 1
    return matrices


_IDENTITY_STACKS: dict[int, np.ndarray] = {}


def blur_window(sigma: float) -> int:
    """DALI's default Gaussian window for σ, 2·ceil(3σ)+1; 1 (a no-op kernel) for no blur."""
    return 2 * math.ceil(3 * sigma) + 1 if sigma > 0 else 1


def appearance_arrays(view: ViewPlan) -> tuple[np.ndarray, ...]:
    """The view's APPEARANCE_PARAMS: jitter on (1) or off (0); brightness, contrast,
    saturation factors; the hue shift in PIL's 8-bit H units, int(hue·255) as torchvision
    adds it; grey on (1) or off (0) and its matrices (T, 3, 3); blur σ and window
    (σ 1, window 1 = no blur). Off means neutral values too, so the ops may also run
    unconditionally."""
    look = view.appearance
    f32 = lambda v: np.array(v, dtype=np.float32)  # noqa: E731
    return (f32(look.jitter), f32(look.brightness), f32(look.contrast), f32(look.saturation),
            f32(int(look.hue * 255)), f32(look.grey),
            grey_matrices(look.grey_channels, len(view.frames)), f32(look.blur_sigma if look.blur else 1.0),
            np.array(blur_window(look.blur_sigma), dtype=np.int32))

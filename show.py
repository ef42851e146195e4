"""See what the model sees: draw the first samples of an epoch as the training loader
makes them, next to the source frames they were cut from.

    python show.py --data data/proof/train.lmdb --config configs/proof.yaml --n 4
    python show.py --data DB --epoch 3 --device gpu plan.frames=16 crop_size=112

One block per sample:
  caption   every label and what it means: spatial class, rate and measured overlap;
            temporal class, rate, measured overlap and both frame windows (start,
            stride); speed class and stride; rot1/rot2 in degrees CCW; flips; video
  row 1     source frames (decoded from the LMDB's JPEGs with PIL) of view 1's window,
            then of view 2's, at a few time points; view 1's box in orange, view 2's
            in blue (the own view's box thick), their overlap shaded; below, a timeline
            of the video with the frames each view reads
  rows 2-3  view 1's and view 2's output frames exactly as the loader yields them
            ([-1, 1] mapped back to 0..255; every frame, or 8 evenly spaced when T > 8),
            enlarged by an integer factor with nearest-neighbour sampling

The picture is at most 2048 px wide: source frames wider than 2.2:1 are scaled down
(aspect kept), and with a crop size over 240 fewer output frames are drawn. It is at
most 8192 px high: when --n samples would not fit (over 14 at crop size 112, over 10
at 224), the first ones that fit are drawn, and a message says so.

The samples come from the real loader (DALI on cpu or gpu, or the PIL reference
executor) for rank 0 of a single-process run: the first N samples of the epoch are
the ones training reads first, whatever the batch size (the epoch order does not
depend on it). Labels are checked against the plan; a mismatch is printed in red.
"""

from __future__ import annotations

import argparse
import sys

import lmdb

import gpu_guard  # before torch: CUDA availability through NVML (no cuInit before DALI forks)
from cstp.config import ConfigError, load_config
from pipelines.faults import BrokenDataError
from pipelines.lmdb_store import LmdbFormatError, read_metadata
from pipelines.plan import plan_config_from
from pipelines.show import MAX_PICTURE_HEIGHT, Layout, label_mismatches, load_samples, render


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="show.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, metavar="DB", help="LMDB of JPEG frames (overrides data.path)")
    parser.add_argument("--n", type=int, default=4, help="samples to draw (default 4)")
    parser.add_argument("--out", default="views.png", help="PNG to write (default views.png)")
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml) for the plan and loader settings")
    parser.add_argument("--device", choices=("cpu", "gpu"),
                        help="where the loader decodes and augments (default: data.device; auto = gpu if visible)")
    parser.add_argument("--epoch", type=int, default=0, help="epoch whose first samples are drawn (default 0)")
    parser.add_argument("--seed", type=int, help="run seed (default: run.seed of the config)")
    parser.add_argument("--executor", choices=("dali", "reference"), default="dali",
                        help="dali: the training loader (default); reference: the numpy/PIL executor")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, as for train.py (e.g. plan.frames=16 crop_size=112)")
    # Intermixed: key=value overrides may come before, between or after the flags.
    args = parser.parse_intermixed_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.epoch < 0:
        parser.error(f"--epoch must be >= 0, got {args.epoch}")
    return args


def resolve_device(requested: str) -> str:
    """Without initialising CUDA (gpu_guard): the loader's workers fork after this."""
    try:
        return gpu_guard.resolve_device(requested)
    except gpu_guard.DeviceError as err:
        raise ValueError(f"{err}; use --device cpu") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    def fail(message: str) -> int:
        print(f"show.py: {message}", file=sys.stderr)
        return 2

    try:
        seed = [f"run.seed={args.seed}"] if args.seed is not None else []   # checked like the config's
        cfg = load_config(args.config, [*args.overrides, *seed])
        plan_cfg = plan_config_from(cfg["plan"])
        device = resolve_device(args.device or cfg["data"]["device"])
    except (ConfigError, ValueError) as err:
        return fail(str(err))
    try:
        metas, classes = read_metadata(args.data)
        if not metas:
            return fail(f"{args.data} holds no videos")
        n = args.n
        if n > len(metas):
            print(f"show.py: {args.data} holds {len(metas)} videos; drawing {len(metas)}", file=sys.stderr)
            n = len(metas)
        # Bounded as the width is (pipelines/show.py): fewer sample blocks, never smaller ones;
        # decided before loading, so that the samples left out are never read.
        layout = Layout(plan_cfg)
        if (fit := layout.samples_that_fit(n)) < n:
            print(f"show.py: {n} samples would make the picture {layout.height(n)} px high (at most "
                  f"{MAX_PICTURE_HEIGHT}); drawing the first {fit}", file=sys.stderr)
            n = fit
        samples = load_samples(args.data, plan_cfg, cfg, n=n, epoch=args.epoch, executor=args.executor,
                               device=device)
    except lmdb.Error as err:
        return fail(f"cannot read the data: {err} (is {args.data} an LMDB from `python -m preprocessing build-lmdb`?)")
    except (FileNotFoundError, LmdbFormatError, ValueError, KeyError, BrokenDataError) as err:
        return fail(f"cannot read the data: {err}")
    title = (f"{args.data}  epoch {args.epoch}  seed {cfg['run']['seed']}  executor {args.executor} on "
             f"{device}  T={plan_cfg.frames} S={plan_cfg.crop_size}  first {n} samples of rank 0")
    image = render(samples, plan_cfg, args.data, classes, title)
    for s in samples:
        for problem in label_mismatches(s):
            print(f"show.py: sample {s.position}: {problem}", file=sys.stderr)
    try:
        image.save(args.out, format="PNG")
    except (OSError, ValueError) as err:
        return fail(f"cannot write {args.out}: {err}")
    print(f"wrote {args.out} ({image.width}x{image.height}, {n} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

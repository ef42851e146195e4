#!/usr/bin/env python
"""Can a pair label be read from a backbone's frozen features? (a `make proof` diagnostic)

  python scripts/pair_probe.py runs/proof/runs/cstp_s1/backbone.pt runs/proof/runs/alone_temporal/backbone.pt random

For each backbone: the pooled features y1, y2 of real PretrainLoader pairs (the pretraining
recipe's plan, read from --config), the backbone in training-mode BN as in pretraining (each view
normalised over its own batch), no gradient. A fresh reference head (Linear -> BN -> ReLU ->
Linear on concat(y1, y2)) is trained with SGD on 80 % of the pairs and tested on the other 20 %,
for the temporal and the spatial overlap label, against the held-out majority rate.

docs/proof.md uses it to show that the joint objective's backbone carries no time on the proof
data (0.21 against a majority of 0.27) while the temporal-alone backbone does (0.48). The head
sees ~2000 pairs, the pretraining heads tens of thousands: read the contrast between backbones,
not the level. "random" is a randomly initialised backbone (reference init) of --width.

--codes adds what each backbone carries of a single view: a ridge read-out (standardised
features, 80/20 split, R² on the held-out views) of the proof data's per-view codes, measured
on the view's own pixels: the grey level (the crop's x position), the colour saturation (its
y position), the hue's cosine and sine (time) and the mean frame-to-frame change (motion, the
playback rate). A pair head can only learn what the backbone carries: docs/proof.md uses it to
show that the spatial head alone reads the grey level (x) but not the saturation (y), and that
the joint backbones carry no hue.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LABELS = ("temporal_label", "spatial_label")
CODES = ("grey", "saturation", "hue_cos", "hue_sin", "motion")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbones", nargs="+", help="backbone.pt files (train.py exports) or 'random'")
    p.add_argument("--db", default="data/proof/train.lmdb", help="pretraining LMDB (default: %(default)s)")
    p.add_argument("--config", default=str(ROOT / "configs" / "proof.yaml"), help="recipe whose plan draws the "
                   "pairs (default: configs/proof.yaml)")
    p.add_argument("--pairs", type=int, default=2400, help="pairs drawn (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3000, help="SGD steps of the fresh head (default: %(default)s)")
    p.add_argument("--width", type=float, default=None, help="width of 'random' (default: the config's)")
    p.add_argument("--seed", type=int, default=7, help="loader seed (default: %(default)s)")
    p.add_argument("--codes", action="store_true", help="also read the per-view colour and motion codes "
                   "off each backbone (R² of a ridge read-out; see above)")
    return p.parse_args(argv)


def draw_pairs(db: str, plan_section: dict, pairs: int, seed: int) -> dict:
    import torch

    from pipelines.lmdb_store import read_metadata
    from pipelines.loader import LoaderSettings, PretrainLoader
    from pipelines.plan import plan_config_from

    batch = max(1, min(16, len(read_metadata(db)[0])))                 # a small LMDB still gives full batches
    loader = PretrainLoader(db, plan_config_from(plan_section), LoaderSettings(batch_size=batch, num_threads=2, seed=seed))
    batches = []
    try:
        while sum(len(b["temporal_label"]) for b in batches) < pairs:
            batches.extend(loader)
    finally:
        loader.close()
    return {k: torch.cat([b[k] for b in batches])[:pairs] for k in ("view1", "view2") + LABELS}


def pair_features(backbone, view1, view2, batch: int = 16):
    """concat(y1, y2) per pair, each view through the backbone on its own, in training-mode BN."""
    import torch

    backbone.train()
    out = []
    with torch.no_grad():
        for i in range(0, len(view1), batch):
            out.append(torch.cat([backbone(view1[i:i + batch].float()), backbone(view2[i:i + batch].float())], 1))
    return torch.cat(out)


def view_codes(views) -> dict:
    """Per-view codes of (N, 3, T, S, S) views, from their pixels: mean grey level, saturation
    (length of the mean colour's component orthogonal to grey), the hue's cosine and sine, and
    the mean absolute change between consecutive frames. The colour plane is the proof data's:
    the one orthogonal to grey (R = G = B), spanned by the directions its hue turns in."""
    import torch

    from preprocessing.proof_data import CHROMA_U, CHROMA_V

    views = views.float()
    mean = views.mean(dim=(2, 3, 4))                                   # (N, 3)
    u = mean @ torch.as_tensor(CHROMA_U, dtype=mean.dtype)
    v = mean @ torch.as_tensor(CHROMA_V, dtype=mean.dtype)
    saturation = torch.sqrt(u ** 2 + v ** 2)
    safe = torch.where(saturation > 0, saturation, torch.ones_like(saturation))
    motion = (views[:, :, 1:] - views[:, :, :-1]).abs().mean(dim=(1, 2, 3, 4))
    return {"grey": mean.mean(1), "saturation": saturation, "hue_cos": u / safe, "hue_sin": v / safe,
            "motion": motion}


def linear_readout_r2(x, target, ridge: float = 10.0) -> float:
    """Held-out R² of a ridge regression of `target` on the features x (first 80 % of the rows
    to fit, the rest to score). Columns are standardised by the fitting rows; columns that are
    numerically constant there (spread below 1e-6 of the largest: dead units) are dropped, so
    that their rounding noise is not blown up to unit scale."""
    import torch

    x, target = x.double(), target.double()
    n = len(target)
    train = int(0.8 * n)
    spread = target[train:].var(unbiased=False)
    if spread == 0:
        return 0.0                                                       # a constant code says nothing
    std = x[:train].std(0)
    keep = std > 1e-6 * std.max()
    x = (x[:, keep] - x[:train, keep].mean(0)) / std[keep]
    design = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    fit = design[:train]
    penalty = ridge * torch.eye(design.shape[1], dtype=x.dtype)
    penalty[-1, -1] = 0                                                  # the intercept is not shrunk
    weights = torch.linalg.solve(fit.T @ fit + penalty, fit.T @ target[:train])
    residual = design[train:] @ weights - target[train:]
    return float(1 - residual.pow(2).mean() / spread)


def fresh_head_accuracy(x, labels, steps: int = 3000, seed: int = 0, classes: int = 5, hidden: int | None = None,
                        lr: float = 0.02, standardise: bool = True) -> tuple[float, float]:
    """(held-out accuracy, held-out majority rate) of the reference head (hidden width: the
    input's, as the reference's pair heads, unless given) trained with SGD, batch 16, on the first
    80 % of the rows; `standardise` scales each column by the training rows' spread."""
    import torch

    from cstp.models.cstp_model import mlp

    n = len(labels)
    train = int(0.8 * n)
    if standardise:
        # the rule of proof.linear_probe: no floor on the spread, so features of ~1e-7 (a random
        # backbone's) are read as at unit scale; only constant columns are left as they are
        mean, std = x[:train].mean(0), x[:train].std(0)
        x = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    torch.manual_seed(seed)
    head = mlp(x.shape[1], hidden or x.shape[1], classes)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, train, (16,), generator=generator)
        loss = torch.nn.functional.cross_entropy(head(x[rows]), labels[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        accuracy = (head(x[train:]).argmax(1) == labels[train:]).float().mean().item()
    majority = torch.bincount(labels[train:]).max().item() / (n - train)
    return accuracy, majority


def load(source: str, width: float, seed: int = 1):
    import torch

    from cstp.backbone_io import load_backbone
    from cstp.models.cstp_model import reference_init_
    from cstp.models.r2plus1d import R2Plus1D10

    if source == "random":
        torch.manual_seed(seed)
        return reference_init_(R2Plus1D10(width))
    loaded = load_backbone(source)
    backbone = R2Plus1D10(loaded.width)
    backbone.load_state_dict(loaded.state_dict)
    return backbone


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from cstp.config import load_config

    if not Path(args.db).exists():
        print(f"pair_probe: no LMDB at {args.db} (make proof builds data/proof/train.lmdb)", file=sys.stderr)
        return 2
    cfg = load_config(args.config)
    width = args.width if args.width is not None else cfg["model"]["width"]
    torch.set_num_threads(cfg["train"].get("threads") or 2)
    data = draw_pairs(args.db, cfg["plan"], args.pairs, args.seed)
    print(f"{len(data['temporal_label'])} pairs from {args.db}; fresh head, {args.steps} steps, 80/20 split")
    codes = view_codes(data["view1"]) if args.codes else {}
    for source in args.backbones:
        x = pair_features(load(source, width), data["view1"], data["view2"])
        cells = []
        for label in LABELS:
            accuracy, majority = fresh_head_accuracy(x, data[label], args.steps)
            cells.append(f"{label.split('_')[0]} {accuracy:.3f} (majority {majority:.3f})")
        print(f"{source}: " + ", ".join(cells), flush=True)
        if codes:
            view1_features = x[:, :x.shape[1] // 2]
            print("  per-view codes, R²: " + ", ".join(
                f"{name} {linear_readout_r2(view1_features, codes[name]):.2f}" for name in CODES), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

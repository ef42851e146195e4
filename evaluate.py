#!/usr/bin/env python
r"""Evaluate a finetuned classifier or a backbone: the reference test protocol plus retrieval.

  python evaluate.py --checkpoint runs/ft/best.pt --data data/ucf101_test01.lmdb \
      --train-data data/ucf101_train01.lmdb --json runs/ft/eval.json
  python evaluate.py --checkpoint runs/ucf/backbone.pt --data TEST.lmdb --train-data TRAIN.lmdb --json r.json
  python evaluate.py --random-init 1.0 --data TEST.lmdb --train-data TRAIN.lmdb --json random.json
  python evaluate.py --checkpoint best.pt --data ucf101.lmdb --list testlist01_nframe.txt \
      --train-data ucf101.lmdb --train-list trainlist01_nframe.txt --spatial-crops 3 --json r.json

Test protocol (docs/method.md#test-protocol): every video is cut into back-to-back clips (T frames,
stride s) plus one clip aligned to its end; short side test_short_side, one centre
crop; the clips' raw logits are averaged per video. Reports top-1, top-5 and
per-class accuracy, a confusion matrix (JSON and PNG). --spatial-crops 3 reads every
clip three times, at the start, centre and end of the long side (the SlowFast /
pytorchvideo 3-crop test) and averages the logits over all clips and crops; the
retrieval features (test and gallery) are averaged the same way. The report's
`test_items` counts the (clip, crop) items read: 3x as many with 3 crops, ~3x the time.

Retrieval (the VCOP / PRP protocol): each test video's backbone feature (the mean
over its clips) queries the training videos' features by cosine similarity; R@k is
the share of test videos with a same-class video among the k nearest (k = 1, 5, 10,
20, 50), plus a kNN classifier's accuracy. Without --train-data the test set is its
own gallery (leave-one-out), and the report says so.

--checkpoint takes a finetuning checkpoint (best.pt / ckpt_*.pt: accuracy and
retrieval), or a backbone alone (backbone.pt, a pretraining ckpt_*.pt, a reference
checkpoint: retrieval only). Clip geometry follows the finetuning checkpoint;
override with key=value (frames=16 stride=4 crop_size=112 test_short_side=128).

--list / --train-list read an LMDB built by the reference project through its list
file (UCF101/HMDB51 "<class>/<video>.avi <label> <frames>", Kinetics "val/<class>/<id>.mp4
<label> <frames>"): the listed videos, in list order, with the list's labels.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import gpu_guard  # before torch: CUDA availability through NVML (no cuInit before DALI forks)
from preprocessing.cli_args import int_at_least


def first_label_named_differently(a: list, b: list) -> int | None:
    """The first label two datasets name differently, or None. Unnamed labels ('' or the
    'class<i>' a reference list gives a label none of its videos names) match any name."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x and y and f"class{i}" not in (x, y) and x != y:
            return i
    return None


def backbone_width(text: str) -> float:
    """An argparse type: an R(2+1)D width multiplier in (0, 4], as model.width."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 4:
        raise argparse.ArgumentTypeError(f"must be in (0, 4], got {value:g}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="finetuning checkpoint, backbone.pt, pretraining or reference checkpoint")
    source.add_argument("--random-init", type=backbone_width, metavar="WIDTH",
                        help="a reference-initialised backbone of this width instead of a checkpoint "
                             "(the retrieval baseline)")
    parser.add_argument("--data", required=True, help="test LMDB (or .json video index)")
    parser.add_argument("--list", dest="list_path", metavar="PATH",
                        help="reference-format list file selecting and labelling the videos of --data "
                             "(a reference-project LMDB)")
    parser.add_argument("--train-data", help="training LMDB: the retrieval / kNN gallery")
    parser.add_argument("--train-list", metavar="PATH", help="reference-format list file for --train-data")
    parser.add_argument("--blocklist", metavar="FILE",
                        help="videos not to read (path<TAB>reason lines, as `preprocessing verify --decode` writes): "
                             "each is replaced by another item flagged invalid, so it is not scored")
    parser.add_argument("--spatial-crops", type=int, choices=(1, 3),
                        help="crops per test clip: 1 = centre (the reference), 3 = start/centre/end of the "
                             "long side; default: the checkpoint's clip setting (1)")
    parser.add_argument("--json", required=True, help="where to write the report")
    parser.add_argument("--confusion-png", help="confusion-matrix image (default: next to --json)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=16, help="clips per batch and rank (default 16)")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--num-threads", type=int_at_least(1), default=2, help="DALI CPU threads")
    parser.add_argument("--workers", type=int_at_least(0), default=0,
                        help="DALI external-source worker processes per loader (default 0: in the pipeline thread)")
    parser.add_argument("--knn-k", type=int_at_least(1), default=10, help="neighbours of the kNN classifier (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of --random-init")
    parser.add_argument("--executor", choices=("dali", "reference"), default="dali")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="clip geometry overrides")
    return parser.parse_intermixed_args(argv)   # key=value before, between or after the flags


def fail(message: str, code: int = 2) -> int:
    print(f"evaluate.py: {message}", file=sys.stderr)
    return code


def load_model(args):
    """(backbone, head or None, width, classes or None, clip section, description)."""
    import torch

    from cstp.backbone_io import FINETUNE_FORMAT, load_backbone, load_classifier, read_checkpoint_file
    from cstp.models.cstp_model import reference_init_
    from cstp.models.r2plus1d import R2Plus1D10

    if args.random_init is not None:
        torch.manual_seed(args.seed)
        return reference_init_(R2Plus1D10(args.random_init)), None, args.random_init, None, {}, \
            f"random init (width {args.random_init:g}, seed {args.seed})"
    raw = read_checkpoint_file(args.checkpoint)
    if raw.get("format") == FINETUNE_FORMAT:
        model = load_classifier(raw, args.checkpoint)
        clip = raw.get("clip") if isinstance(raw.get("clip"), dict) else {}
        return model.backbone, model.head, float(raw["width"]), raw.get("classes"), clip, \
            f"finetune checkpoint {args.checkpoint}"
    loaded = load_backbone(args.checkpoint)
    backbone = R2Plus1D10(loaded.width)
    backbone.load_state_dict(loaded.state_dict)
    return backbone, None, loaded.width, None, {}, f"{loaded.kind} {args.checkpoint}"


def video_outputs(backbone, head, loader, device, progress: bool, desc: str):
    """Per-video mean logits and mean backbone features over all of a video's clips and
    spatial crops (summed over every rank), the labels, which videos were seen, and
    how many (clip, crop) items went into the means."""
    import torch

    from cstp.metrics import VideoAverager

    n = len(loader.metas)
    features = VideoAverager(n, backbone.feature_dim, device=device)
    logits = VideoAverager(n, head.fc.out_features, device=device) if head is not None else None
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, total=loader.steps_per_epoch, unit="batch", desc=desc, dynamic_ncols=True)
    autocast = device.type == "cuda"
    with torch.no_grad():
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y = backbone(batch["clip"].to(device))
                out = head(y) if head is not None else None
            features.add(batch["video_index"], y.float(), batch["valid"])
            if logits is not None:
                logits.add(batch["video_index"], out.float(), batch["valid"])
    features.all_reduce()
    if logits is not None:
        logits.all_reduce()
    seen = features.seen.cpu()
    labels = torch.tensor([m.label for m in loader.metas])
    return (features.means().cpu()[seen], logits.means().cpu()[seen] if logits is not None else None,
            labels[seen], seen, int(features.counts.sum().item()))


def plot_confusion(confusion, classes, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = max(4.0, min(24.0, 0.25 * n + 3))
    fig, ax = plt.subplots(figsize=(size, size))
    rows = confusion.sum(1, keepdims=True).clip(min=1)
    ax.imshow(confusion / rows, cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from train import distributed_env, unwritable

    for flag, value in (("--json", args.json), ("--confusion-png", args.confusion_png)):
        if value and (why := unwritable(Path(value), folder=False)):   # before the evaluation, not after it
            return fail(f"{flag}: {why}")

    rank, world_size, local_rank = distributed_env()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    import torch
    import torch.distributed as dist

    from cstp.backbone_io import BackboneLoadError
    from cstp.checkpoint import CheckpointError
    from cstp.config import ConfigError, parse_override
    from cstp.metrics import (RETRIEVAL_KS, confusion_matrix, knn_accuracy, per_class_accuracy,
                              retrieval_recall, topk_accuracy)
    from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
    from pipelines.clip_plan import ClipPlanConfig, clip_config_from
    from pipelines.faults import BrokenDataError
    from pipelines.lmdb_store import LmdbFormatError

    try:
        backbone, head, width, ckpt_classes, clip_section, description = load_model(args)
    except (CheckpointError, BackboneLoadError, KeyError, RuntimeError) as err:
        return fail(f"--checkpoint: {err}")
    try:
        overrides = dict(parse_override(o) for o in args.overrides)
    except ConfigError as err:
        return fail(str(err))
    unknown = [k for k in overrides if k not in ClipPlanConfig.__dataclass_fields__]
    if unknown:
        return fail(f"unknown clip setting(s) {', '.join(unknown)}; known: "
                    f"{', '.join(ClipPlanConfig.__dataclass_fields__)}")
    if args.spatial_crops is not None:
        overrides["spatial_crops"] = args.spatial_crops
    if args.train_list and not args.train_data:
        return fail("--train-list needs --train-data (the LMDB it selects videos of)")
    try:
        clip_cfg = clip_config_from({**clip_section, **overrides})
    except (TypeError, ValueError) as err:
        return fail(f"clip settings: {err}")
    try:
        device = gpu_guard.resolve_device(args.device)
    except gpu_guard.DeviceError as err:
        return fail(f"--device {args.device}: {err}")
    settings = ClipLoaderSettings(batch_size=args.batch_size, num_threads=args.num_threads, workers=args.workers,
                                  seed=args.seed)
    common = dict(device=device, local_rank=local_rank, rank=rank, world_size=world_size, executor=args.executor,
                  blocklist=args.blocklist)
    # Both loaders before any CUDA work: each forks its workers when constructed and builds
    # its pipeline at its first batch (pipelines/faults.py RecoverablePipeline).
    try:
        test_loader = ClipLoader(args.data, "test", clip_cfg, settings, list_path=args.list_path, **common)
        train_loader = ClipLoader(args.train_data, "test", clip_cfg, settings, list_path=args.train_list,
                                  **common) if args.train_data else None
    except (FileNotFoundError, LmdbFormatError, ValueError) as err:   # ReferenceListError is a ValueError
        return fail(f"cannot read the data: {err}")
    classes = list(test_loader.classes)
    if train_loader is not None:
        clash = first_label_named_differently(classes, list(train_loader.classes))
        if clash is not None:   # retrieval and kNN compare label numbers across the two
            return fail(f"--train-data {args.train_data} names label {clash} {train_loader.classes[clash]!r}, "
                        f"{args.data} names it {classes[clash]!r}: labels would not mean the same")
    if head is not None:
        if ckpt_classes and classes and list(ckpt_classes) != classes:
            return fail(f"{args.data} names its classes differently from the checkpoint's training data "
                        f"(e.g. {classes[:3]} vs {list(ckpt_classes)[:3]}): labels would not mean the same")
        if head.fc.out_features < test_loader.num_classes:
            return fail(f"the classifier has {head.fc.out_features} classes, {args.data} has "
                        f"{test_loader.num_classes}")
    if world_size > 1:
        dist.init_process_group("nccl" if device == "gpu" else "gloo")
    torch_device = torch.device(f"cuda:{local_rank}" if device == "gpu" else "cpu")
    backbone.to(torch_device).eval()
    if head is not None:
        head.to(torch_device).eval()
    progress = args.progress and rank == 0
    try:
        test_feats, test_logits, test_labels, seen, items_read = video_outputs(
            backbone, head, test_loader, torch_device, progress, "test clips")
        if train_loader is not None:
            gallery, _, gallery_labels, _, _ = video_outputs(backbone, None, train_loader, torch_device, progress,
                                                          "train clips")
    except BrokenDataError as err:
        return fail(f"stopped: {err}", 1)
    finally:
        test_loader.close()
        if train_loader is not None:
            train_loader.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return 0

    report = {"checkpoint": description, "data": args.data, "list": args.list_path, "videos": int(seen.sum()),
              "clip": {k: getattr(clip_cfg, k) for k in ("frames", "stride", "crop_size", "test_short_side")},
              "spatial_crops": clip_cfg.spatial_crops,
              # (clip, crop) items read with valid = True, over all ranks: what the logits average over
              "test_items": items_read, "top1": None, "top5": None, "per_class": None}
    n_classes = max(len(classes), int(test_labels.max()) + 1)
    names = classes or [str(i) for i in range(n_classes)]
    if test_logits is not None:
        report.update(topk_accuracy(test_logits, test_labels, (1, 5)))
        predictions = test_logits.argmax(1)
        confusion = confusion_matrix(predictions, test_labels, max(n_classes, test_logits.shape[1]))
        confusion = confusion[:n_classes, :n_classes] if confusion.shape[0] > n_classes else confusion
        report["per_class"] = dict(zip(names, per_class_accuracy(confusion)))
        report["confusion_matrix"] = confusion.tolist()
        png = Path(args.confusion_png) if args.confusion_png else Path(args.json).with_suffix(".confusion.png")
        png.parent.mkdir(parents=True, exist_ok=True)
        plot_confusion(confusion.numpy(), names, png, f"{description}\ntop-1 {report['top1']:.3f}")
        report["confusion_png"] = str(png)
    if train_loader is not None:
        report["retrieval_gallery"] = f"train ({args.train_data}, {len(gallery)} videos)"
        report["retrieval"] = retrieval_recall(test_feats, test_labels, gallery, gallery_labels, RETRIEVAL_KS)
        report["knn_top1"] = knn_accuracy(test_feats, test_labels, gallery, gallery_labels, args.knn_k, n_classes)
    else:
        report["retrieval_gallery"] = "test set itself, leave-one-out (no --train-data)"
        report["retrieval"] = retrieval_recall(test_feats, test_labels, test_feats, test_labels, RETRIEVAL_KS,
                                               exclude_self=True)
        report["knn_top1"] = knn_accuracy(test_feats, test_labels, test_feats, test_labels, args.knn_k,
                                          n_classes, exclude_self=True)
    report["knn_k"] = args.knn_k
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2))
    top = "" if report["top1"] is None else f"top-1 {report['top1']:.3f}  top-5 {report['top5']:.3f}  "
    r = report["retrieval"]
    print(f"{description}: {report['videos']} videos ({items_read} items = clips x {clip_cfg.spatial_crops} "
          f"crop(s))  {top}R@1 {r['r1']:.3f}  R@5 {r['r5']:.3f}  kNN {report['knn_top1']:.3f}  -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

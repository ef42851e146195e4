#!/usr/bin/env python
"""`make proof`: evidence that the implementation learns, on a 2-core CPU, in one command.

  python scripts/proof.py                      # the full experiment (~30-40 min on 2 cores)
  python scripts/proof.py --steps 60 --seeds 1 2 3 --out runs/proof_small

On the proof dataset (preprocessing/proof_data.py: every pretext label observable
by design; six motion classes that are no pretext label and no mirror pair):

  1. heads alone   each pretext task trained alone (the other loss weights 0), same
                   data and budget as the joint run; its final accuracy (mean of the
                   last steps) against its majority baseline, measured on the labels
                   the sampler actually draws;
  2. joint         the CSTP objective with the reference weights (0.1 1 1 1 1), one run
                   per seed (the runs of 3); each head's accuracy per seed and the mean;
  3. representation  CSTP and BYOL alone, one pretraining per seed; a linear probe
                   and a kNN classifier on frozen per-video features (train videos ->
                   held-out test videos), against randomly initialised backbones with
                   the same seeds;
  4. few labels    finetuning on a small labelled subset of the training videos, CSTP
                   init vs scratch, the same seeds; top-1 on the test videos; and the same
                   on every training video with `make demo`'s finetuning recipe.
  5. diagnosis     what each frozen backbone (random, each head alone, CSTP and BYOL per
                   seed) carries (scripts/pair_probe.py): a fresh reference head reading the
                   temporal and the spatial label off concat(y1, y2) of real loader pairs, and
                   a linear read-out of the per-view codes (grey level = x, saturation = y,
                   hue = time, motion); it says why a head that misses its target missed it.

Everything runs through the project's own train.py, finetune.py and evaluate.py
machinery (in this process). Writes OUT/report.json, OUT/report.md, OUT/report.png
and every run under OUT/runs/. The recipes: configs/proof.yaml (pretraining) and
configs/finetune_proof.yaml (few labels); nothing is chosen on the test videos.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "scripts"))

HEADS = ("rotation", "speed", "temporal", "spatial")
# BYOL alone: its loss at weight 1 (at the reference's 0.1 it would run at a tenth of the LR)
BYOL_ALONE = {"byol": 1.0, "spatial": 0.0, "temporal": 0.0, "speed": 0.0, "rotation": 0.0}
# Clips for the frozen-feature evaluation: the pretraining's 8 frames at a middle stride;
# the test view is the centre square of the 32-px-high frame.
EVAL_CLIP = {"frames": 8, "stride": 4, "crop_size": 32, "test_short_side": 32}
LINEAR_PROBE = {"weight_decay": 1e-3, "iterations": 200}   # fixed up front, not tuned on the test videos
KNN_K = 10
TARGETS = {"head_alone_margin": 0.15, "head_joint_margin": 0.05, "linear_probe_margin": 0.10}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/proof", help="output folder (default: %(default)s)")
    p.add_argument("--data", default="data/proof", help="the proof dataset; generated there when missing "
                   "(default: %(default)s)")
    p.add_argument("--config", default=str(ROOT / "configs" / "proof.yaml"), help="pretraining recipe")
    p.add_argument("--finetune-config", default=str(ROOT / "configs" / "finetune_proof.yaml"),
                   help="few-labels finetuning recipe")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every pretraining run, heads alone "
                   "included (default: %(default)s)")
    p.add_argument("--warmup-share", type=float, default=0.1, help="share of the steps spent in linear warm-up "
                   "(the reference: 0.5 of ~560k steps; default: %(default)s, see configs/proof.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds (default: 1 2 3)")
    p.add_argument("--videos-per-class", type=int, default=40, help="dataset size when generating it; ~80 %% "
                   "train, ~20 %% test (default: %(default)s)")
    p.add_argument("--few-per-class", type=int, default=4, help="labelled training videos per class for the "
                   "few-labels finetune; one of them is its validation video (default: %(default)s)")
    p.add_argument("--all-labels-config", default=str(ROOT / "configs" / "finetune_demo.yaml"),
                   help="finetuning recipe on every training video (make demo's)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="override both finetuning recipes' epochs")
    p.add_argument("--last", type=int, default=50, help="steps averaged for a head's final accuracy "
                   "(default: %(default)s)")
    p.add_argument("--diagnosis-pairs", type=int, default=2400, help="loader pairs of the diagnosis (step 5); "
                   "0 skips it (default: %(default)s)")
    p.add_argument("--diagnosis-steps", type=int, default=3000, help="SGD steps of each fresh diagnosis head "
                   "(default: %(default)s)")
    p.add_argument("--data-only", action="store_true", help="only generate the dataset in --data and build its "
                   "LMDBs (what `make demo` runs first), then stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def say(message: str):
    print(f"[proof {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------ data

def prepare_data(data: Path, videos_per_class: int, few_per_class: int, progress: bool = False) -> dict:
    """The dataset, its train/test LMDBs and the few-labels LMDB (built once, reused)."""
    ensure_dataset(data, videos_per_class, progress)
    few_list = data / f"few{few_per_class}.txt"
    if not few_list.is_file():
        few_list.write_text(few_lines((data / "train.txt").read_text().splitlines(), few_per_class))
    dbs = {}
    for name, listing in (("train", data / "train.txt"), ("test", data / "test.txt"), ("few", few_list)):
        db = data / f"{listing.stem}.lmdb"
        if not (db / "data.mdb").is_file():
            say(f"building {db}")
            subprocess.run([sys.executable, "-m", "preprocessing", "build-lmdb", "--videos", str(data / "videos"),
                            "--list", str(listing), "--out", str(db), "--workers", "2", "--overwrite"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        dbs[name] = db
    return dbs


def ensure_dataset(data: Path, videos_per_class: int, progress: bool = False) -> None:
    """The proof videos and lists in `data` (preprocessing/proof_data.py's ensure_proof_dataset:
    generated unless that folder already holds them from this generator version at this size;
    an older or other-sized dataset is rebuilt, a folder that is no proof dataset is refused)."""
    from preprocessing import proof_data

    try:
        proof_data.ensure_proof_dataset(data, videos_per_class, seed=0, workers=2, log=say, progress=progress)
    except proof_data.NotAProofDataset as err:
        raise SystemExit(f"proof: {err} (--data)") from None


def few_lines(train_lines: list[str], per_class: int) -> str:
    """The first `per_class` videos of each class in the (sorted) training list."""
    taken: dict[str, int] = {}
    out = []
    for line in train_lines:
        label = line.split()[-1]
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            out.append(line + "\n")
    return "".join(out)


# ------------------------------------------------------------------------ pretraining

def pretrain(name: str, out: Path, args, db: Path, seed: int, weights: dict) -> dict:
    """One train.py run; returns its summary.json. Reused when it already finished."""
    import train

    run = out / "runs" / name
    summary = run / "summary.json"
    if summary.is_file():
        say(f"{name}: done before, reusing {run}")
        return json.loads(summary.read_text())
    shutil.rmtree(run, ignore_errors=True)
    from pipelines.lmdb_store import read_metadata
    # a tiny dataset (the tests') cannot fill a batch: take all of it; the LR follows the linear rule
    videos = len(read_metadata(str(db))[0])
    batch = min(_config_value(args.config, "data.batch_size"), videos)
    steps_per_epoch = max(1, videos // batch)
    epochs = max(2, math.ceil(args.steps / steps_per_epoch))
    say(f"{name}: pretraining {args.steps} steps (seed {seed}, loss weights {weights})")
    started = time.perf_counter()
    code = train.main(["--config", args.config, "--out", str(run), f"data.path={db}", f"run.seed={seed}",
                       f"run.epochs={epochs}", f"optim.warmup_epochs={round(args.warmup_share * epochs)}", f"run.max_steps={args.steps}",
                       f"run.progress={not args.no_progress}", f"data.batch_size={batch}",
                       *[f"loss.{k}={v}" for k, v in weights.items()]])
    if code:
        raise SystemExit(f"proof: pretraining {name} failed (exit {code}); see above")
    say(f"{name}: {time.perf_counter() - started:.0f} s")
    return json.loads(summary.read_text())


def _config_value(path: str, key: str):
    from cstp.config import load_config
    cfg = load_config(path)
    section, leaf = key.split(".")
    return cfg[section][leaf]


def final_accuracy(run: Path, head: str, last: int) -> float:
    """Mean accuracy of `head` over the last `last` steps (metrics.jsonl records are
    means over log_every steps, weighted here by the steps they cover)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if f"{head}_accuracy" in r]
    total, weight = 0.0, 0
    steps = [r["step"] for r in records]
    for i in range(len(records) - 1, -1, -1):
        covers = steps[i] - (steps[i - 1] if i > 0 else 0)
        covers = min(covers, last - weight)
        total += records[i][f"{head}_accuracy"] * covers
        weight += covers
        if weight >= last:
            break
    return total / max(weight, 1)


def joint_accuracy(runs: list[Path], head: str, last: int) -> dict:
    """Every CSTP run (one per seed) is a joint run: the joint objective is judged on the mean
    over the seeds, not on one of them (which heads start within the budget depends on the seed,
    docs/proof.md); the per-seed values are kept beside it."""
    per_seed = [final_accuracy(run, head, last) for run in runs]
    return {"joint": mean(per_seed), "joint_seeds": per_seed}


# ------------------------------------------------------------------------ frozen features

def video_features(backbone_source, db: Path, seed: int, progress: bool):
    """(features, labels) of every video of `db`: the mean backbone feature over its
    test clips (evaluate.py's protocol). backbone_source: a backbone.pt path or
    ("random", width)."""
    import torch

    import evaluate
    from cstp.backbone_io import load_backbone
    from cstp.models.cstp_model import reference_init_
    from cstp.models.r2plus1d import R2Plus1D10
    from pipelines.clip_loader import ClipLoader, ClipLoaderSettings
    from pipelines.clip_plan import clip_config_from

    if isinstance(backbone_source, tuple):
        torch.manual_seed(seed)
        backbone = reference_init_(R2Plus1D10(backbone_source[1]))
    else:
        loaded = load_backbone(backbone_source)
        backbone = R2Plus1D10(loaded.width)
        backbone.load_state_dict(loaded.state_dict)
    loader = ClipLoader(str(db), "test", clip_config_from(EVAL_CLIP), ClipLoaderSettings(batch_size=16, num_threads=2,
                        seed=seed), device="cpu", local_rank=0, rank=0, world_size=1, executor="dali")
    try:
        feats, _, labels, _, _ = evaluate.video_outputs(backbone.eval(), None, loader, torch.device("cpu"),
                                                         progress, f"features {db.name}")
    finally:
        loader.close()
    return feats, labels


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    """Multinomial logistic regression on standardised frozen features (full-batch L-BFGS,
    fixed weight decay and iterations); test top-1."""
    import torch

    # Standardised per feature with no absolute floor on the spread: a randomly initialised
    # backbone (the reference init's small BN scales, eval-mode BN) outputs features of ~1e-7,
    # and a floor of 1e-6 would shrink them tenfold against the fixed weight decay (a stronger
    # regularisation for the random baseline than for the trained backbones).
    train_x, test_x = train_x.double(), test_x.double()
    mean, std = train_x.mean(0), train_x.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    a, b = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    layer = torch.nn.Linear(a.shape[1], num_classes).double()
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=LINEAR_PROBE["iterations"],
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(a), train_y) + \
            LINEAR_PROBE["weight_decay"] * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (layer(b).argmax(1) == test_y).float().mean().item()


def represent(backbone_source, dbs: dict, seed: int, progress: bool) -> tuple[float, float]:
    from cstp.metrics import knn_accuracy

    train_x, train_y = video_features(backbone_source, dbs["train"], seed, progress)
    test_x, test_y = video_features(backbone_source, dbs["test"], seed, progress)
    classes = int(max(train_y.max(), test_y.max())) + 1
    return (linear_probe(train_x, train_y, test_x, test_y, classes),
            knn_accuracy(test_x, test_y, train_x, train_y, KNN_K, classes))


# ------------------------------------------------------------------------ few labels

def finetuned_top1(name: str, out: Path, args, dbs: dict, labelled: str, config: str, init: str, seed: int) -> float:
    """Finetune with `config` on dbs[labelled] ('few': the few-labels set; 'train': every training
    video), from `init` (a backbone.pt) or from scratch (''), then the test top-1 of the final
    weights (best.pt is chosen on a handful of validation videos)."""
    import evaluate
    import finetune
    from cstp.checkpoint import list_checkpoints
    from cstp.finetune_config import load_finetune_config
    from cstp.finetune_engine import validation_split
    from pipelines.lmdb_store import read_metadata

    run = out / "runs" / name
    report = run / "test.json"
    if report.is_file():
        return json.loads(report.read_text())["top1"]
    shutil.rmtree(run, ignore_errors=True)
    db = dbs[labelled]
    say(f"{name}: finetuning on {db.name} ({'from ' + init if init else 'from scratch'}, seed {seed})")
    extra = [f"run.epochs={args.finetune_epochs}"] if args.finetune_epochs else []
    # finetune.py wants at least one full batch of the videos its validation split leaves to train on
    cfg = load_finetune_config(config)
    trainable, _ = validation_split([m.label for m in read_metadata(str(db))[0]], cfg["data"]["val_fraction"], seed)
    extra.append(f"data.batch_size={max(1, min(cfg['data']['batch_size'], len(trainable)))}")
    code = finetune.main(["--config", config, "--out", str(run), f"data.train={db}", f"model.init={init}",
                          f"run.seed={seed}", f"run.progress={not args.no_progress}", *extra])
    if code:
        raise SystemExit(f"proof: finetuning {name} failed (exit {code})")
    if evaluate.main(["--checkpoint", str(list_checkpoints(run)[-1]), "--data", str(dbs["test"]), "--json",
                      str(report), "--no-progress"]):
        raise SystemExit(f"proof: evaluating {name} failed")
    return json.loads(report.read_text())["top1"]


# ------------------------------------------------------------------------ report

def diagnose(out: Path, config: str, db: Path, width: float, seeds: list[int], pairs: int, steps: int) -> dict:
    """Step 5: for every backbone of the run (and a random one), the fresh pair heads' held-out
    accuracy and the per-view codes' R² (scripts/pair_probe.py), on the same loader pairs."""
    import pair_probe as probe                     # scripts/pair_probe.py, a sibling of this script
    from cstp.config import load_config

    data = probe.draw_pairs(str(db), load_config(config)["plan"], pairs, seed=7)
    codes = probe.view_codes(data["view1"])
    runs = out / "runs"
    sources = {"random": "random", **{f"alone_{h}": runs / f"alone_{h}" / "backbone.pt" for h in HEADS},
               **{f"{kind}_s{seed}": runs / f"{kind}_s{seed}" / "backbone.pt"
                  for kind in ("cstp", "byol") for seed in seeds}}
    backbones, majority = {}, {}
    for name, source in sources.items():
        x = probe.pair_features(probe.load(str(source), width, seed=seeds[0]), data["view1"], data["view2"])
        entry = {}
        for label in probe.LABELS:
            task = label.split("_")[0]
            entry[f"{task}_probe"], majority[task] = probe.fresh_head_accuracy(x, data[label], steps)
        view1 = x[:, :x.shape[1] // 2]
        entry["codes_r2"] = {code: probe.linear_readout_r2(view1, codes[code]) for code in probe.CODES}
        backbones[name] = entry
        say(f"diagnosis {name}: temporal {entry['temporal_probe']:.3f}, spatial {entry['spatial_probe']:.3f}; "
            + ", ".join(f"{c} {r:.2f}" for c, r in entry["codes_r2"].items()))
    return {"pairs": len(data["temporal_label"]), "head_steps": steps, "majority": majority, "backbones": backbones}


def mean(values) -> float:
    return sum(values) / len(values)


def spread(values) -> float:
    """Sample standard deviation (0 for one value)."""
    if len(values) < 2:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


# Accuracies arrive as float32 fractions of a few dozen videos, so two equal results can differ in
# the 8th digit (27/48 summed as 1/6 + 1/3 + 1/16 in float32 beats 9/48 + 8/48 + 10/48 by 1.5e-8):
# a tie must stay a tie.
TIE = 1e-6


def at_least(value: float, bound: float) -> bool:
    return value >= bound - TIE


def above(value: float, bound: float) -> bool:
    return value > bound + TIE


def check_targets(report: dict) -> dict:
    heads = report["heads"]
    lp = {k: mean(v) for k, v in report["linear_probe"].items()}
    few = {k: mean(v) for k, v in report["few_labels"].items()}
    return {
        "every_head_alone_above_majority_plus_0.15":
            all(at_least(h["alone"], h["majority"] + TARGETS["head_alone_margin"]) for h in heads.values()),
        "every_head_joint_above_majority_plus_0.05":
            all(at_least(h["joint"], h["majority"] + TARGETS["head_joint_margin"]) for h in heads.values()),
        "linear_probe_cstp_above_random_plus_0.10": at_least(lp["cstp"], lp["random"] + TARGETS["linear_probe_margin"]),
        "linear_probe_cstp_at_least_byol": at_least(lp["cstp"], lp["byol"]),
        "few_labels_cstp_above_scratch": above(few["cstp"], few["scratch"]),
    }


def write_markdown(report: dict, path: Path):
    r = report
    lines = [f"# Proof that CSTP-DALI learns ({r['machine']}, {r['date']})", "",
             f"Total time {r['seconds'] / 60:.1f} min; {r['steps']} steps per pretraining run "
             f"({r.get('warmup_share', 0.5):.0%} warm-up), seeds {r['seeds']}, "
             f"{r['train_videos']} training / {r['test_videos']} test videos, {r['classes']} classes "
             f"(chance {1 / r['classes']:.3f}).", "",
             "## Pretext heads (accuracy: mean of the last steps; majority: on the labels drawn; "
             "joint: mean over the seeds)", "",
             "| head | majority | alone | joint | alone − majority | joint − majority |", "|---|---|---|---|---|---|"]
    for head, h in r["heads"].items():
        lines.append(f"| {head} | {h['majority']:.3f} | {h['alone']:.3f} | {h['joint']:.3f} | "
                     f"{h['alone'] - h['majority']:+.3f} | {h['joint'] - h['majority']:+.3f} |")
    if all("joint_seeds" in h for h in r["heads"].values()):
        lines += ["", "Joint, per seed " + ", ".join(str(s) for s in r["seeds"]) + ": " + "; ".join(
            f"{head} {' / '.join(f'{v:.3f}' for v in h['joint_seeds'])}" for head, h in r["heads"].items()) + "."]
    lines += ["", "## Frozen features (test videos; per seed, then mean ± sample std)", "",
              "| backbone | linear probe | kNN (k=10) |", "|---|---|---|"]
    for name in ("cstp", "byol", "random"):
        lp, kn = r["linear_probe"][name], r["knn"][name]
        lines.append(f"| {name} | {_fmt(lp)} | {_fmt(kn)} |")
    lines += ["", f"## Few labels ({r['few_per_class']} labelled videos per class, one held out for validation; "
              "test top-1 of the final weights)", "", "| init | test top-1 |", "|---|---|"]
    for name in ("cstp", "scratch"):
        lines.append(f"| {name} | {_fmt(r['few_labels'][name])} |")
    if "all_labels" in r:
        lines += ["", f"## Every label ({r['train_videos']} training videos, a share of each class for validation; "
                  "make demo's finetuning recipe; test top-1 of the final weights)", "", "| init | test top-1 |",
                  "|---|---|"]
        for name in ("cstp", "scratch"):
            lines.append(f"| {name} | {_fmt(r['all_labels'][name])} |")
    lines += ["", "## Targets", ""] + [f"- {'met' if ok else 'MISSED'}: {name}" for name, ok in r["targets"].items()]
    if r.get("diagnosis"):
        d = r["diagnosis"]
        lines += ["", "## Diagnosis: what each frozen backbone carries", "",
                  f"Pair probe: a fresh reference head on concat(y1, y2) of {d['pairs']} loader pairs (80 % to train, "
                  f"{d['head_steps']} steps; 20 % held out; majority temporal {d['majority']['temporal']:.3f}, spatial "
                  f"{d['majority']['spatial']:.3f}). Codes: held-out R² of a linear read-out of view 1's grey level "
                  "(x position), saturation (y), hue (time) and motion (playback rate), measured on its pixels. A "
                  "pair head can only be as good as what its backbone carries (docs/proof.md).", "",
                  "| backbone | temporal probe | spatial probe | grey (x) | saturation (y) | hue cos / sin (time) "
                  "| motion |", "|---|---|---|---|---|---|---|"]
        for name, e in d["backbones"].items():
            c = e["codes_r2"]
            lines.append(f"| {name} | {e['temporal_probe']:.3f} | {e['spatial_probe']:.3f} | {c['grey']:.2f} | "
                         f"{c['saturation']:.2f} | {c['hue_cos']:.2f} / {c['hue_sin']:.2f} | {c['motion']:.2f} |")
    lines += ["", "![report](report.png)", ""]
    path.write_text("\n".join(lines))


def _fmt(values) -> str:
    return f"{', '.join(f'{v:.3f}' for v in values)} → {mean(values):.3f} ± {spread(values):.3f}"


def write_plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [4, 3, 2.2]})
    ax = axes[0]
    heads = list(report["heads"])
    for i, (key, colour) in enumerate((("majority", "#bbbbbb"), ("alone", "#4c72b0"), ("joint", "#dd8452"))):
        xs = [h + (i - 1) * 0.27 for h in range(len(heads))]
        ax.bar(xs, [report["heads"][h][key] for h in heads], 0.27, label=key, color=colour)
        if key == "joint":   # a mark per seed
            for x, h in zip(xs, heads):
                seeds = report["heads"][h].get("joint_seeds", [])
                ax.scatter([x] * len(seeds), seeds, color="black", s=12, zorder=3)
        if key != "majority":   # the target: majority + the margin
            margin = TARGETS["head_alone_margin" if key == "alone" else "head_joint_margin"]
            for x, h in zip(xs, heads):
                ax.hlines(report["heads"][h]["majority"] + margin, x - 0.13, x + 0.13, color="black", lw=1.5,
                          linestyles="dashed", label="target" if (key, h) == ("alone", heads[0]) else None)
    ax.set_xticks(range(len(heads)), heads)
    ax.set_ylim(0, 1)
    ax.set_title("pretext accuracy (final steps)")
    ax.legend(fontsize=8)

    def grouped(ax, groups: dict, names: list[str], title: str):
        colours = {"cstp": "#dd8452", "byol": "#55a868", "random": "#bbbbbb", "scratch": "#bbbbbb"}
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            for g, group in enumerate(groups):
                values = groups[group][name]
                x = g + (i - (len(names) - 1) / 2) * width
                ax.bar(x, mean(values), width, color=colours[name], label=name if g == 0 else None)
                ax.scatter([x] * len(values), values, color="black", s=12, zorder=3)
        ax.set_xticks(range(len(groups)), list(groups))
        ax.set_ylim(0, 1)
        ax.axhline(1 / report["classes"], color="black", lw=0.8, ls=":")
        ax.set_title(title)
        ax.legend(fontsize=8)

    grouped(axes[1], {"linear probe": report["linear_probe"], "kNN": report["knn"]}, ["cstp", "byol", "random"],
            "frozen features, test top-1 (dots: seeds)")
    finetuned = {"few labels": report["few_labels"]}
    if "all_labels" in report:
        finetuned["all labels"] = report["all_labels"]
    grouped(axes[2], finetuned, ["cstp", "scratch"], "finetuned, test top-1")
    fig.suptitle(f"CSTP-DALI proof: {report['machine']}, {report['date']}, {report['seconds'] / 60:.1f} min",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    import os
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), {platform.system()}, no GPU" \
        if not _has_cuda() else f"{platform.machine()} with CUDA GPU"


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


# ------------------------------------------------------------------------ main

def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.seeds) < 1 or args.steps < 2:
        print("proof: need at least one seed and 2 steps", file=sys.stderr)
        return 2
    if args.diagnosis_pairs < 0 or (args.diagnosis_pairs and (args.diagnosis_pairs < 10 or args.diagnosis_steps < 1)):
        print("proof: --diagnosis-pairs must be 0 (skip) or at least 10, with --diagnosis-steps at least 1",
              file=sys.stderr)
        return 2
    if not 0 <= args.warmup_share <= 1:
        print(f"proof: --warmup-share must be in [0, 1], got {args.warmup_share}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out, data = Path(args.out), Path(args.data)
    dbs = prepare_data(data, args.videos_per_class, args.few_per_class, progress=not args.no_progress)
    if args.data_only:
        say("data ready: " + ", ".join(str(db) for db in dbs.values()))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    width = _config_value(args.config, "model.width")
    all_heads = {h: 0.0 for h in HEADS} | {"byol": 0.0}

    # 1. heads alone (seed of the first CSTP run)
    seed0 = args.seeds[0]
    heads = {}
    for head in HEADS:
        summary = pretrain(f"alone_{head}", out, args, dbs["train"], seed0, {**all_heads, head: 1.0})
        heads[head] = {"alone": final_accuracy(out / "runs" / f"alone_{head}", head, args.last),
                       "majority": summary["majority_baseline"][f"{head}_accuracy"]}
    # 2-3. CSTP (the first seed's run is the joint run) and BYOL alone, per seed
    from cstp.config import DEFAULTS
    reference_weights = dict(DEFAULTS["loss"])
    linear = {"cstp": [], "byol": [], "random": []}
    knn = {"cstp": [], "byol": [], "random": []}
    for seed in args.seeds:
        pretrain(f"cstp_s{seed}", out, args, dbs["train"], seed, reference_weights)
        pretrain(f"byol_s{seed}", out, args, dbs["train"], seed, BYOL_ALONE)
        for name, source in (("cstp", str(out / "runs" / f"cstp_s{seed}" / "backbone.pt")),
                             ("byol", str(out / "runs" / f"byol_s{seed}" / "backbone.pt")),
                             ("random", ("random", width))):
            lp, kn = represent(source, dbs, seed, progress)
            linear[name].append(lp)
            knn[name].append(kn)
            say(f"{name} seed {seed}: linear probe {lp:.3f}, kNN {kn:.3f}")
    for head in HEADS:
        heads[head].update(joint_accuracy([out / "runs" / f"cstp_s{seed}" for seed in args.seeds], head, args.last))
    # 4. few labels, and every label (the recipe of `make demo`'s finetuning)
    few = {"cstp": [], "scratch": []}
    every = {"cstp": [], "scratch": []}
    for seed in args.seeds:
        backbone = str(out / "runs" / f"cstp_s{seed}" / "backbone.pt")
        for results, labelled, config, prefix in ((few, "few", args.finetune_config, "few"),
                                                  (every, "train", args.all_labels_config, "all")):
            results["cstp"].append(finetuned_top1(f"{prefix}_cstp_s{seed}", out, args, dbs, labelled, config,
                                                  backbone, seed))
            results["scratch"].append(finetuned_top1(f"{prefix}_scratch_s{seed}", out, args, dbs, labelled, config,
                                                     "", seed))
            say(f"{prefix} labels seed {seed}: cstp {results['cstp'][-1]:.3f}, scratch {results['scratch'][-1]:.3f}")

    from pipelines.lmdb_store import read_metadata
    report = {"heads": heads, "linear_probe": linear, "knn": knn, "few_labels": few, "all_labels": every,
              "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "steps": args.steps,
              "warmup_share": args.warmup_share,
              "seeds": args.seeds, "last_steps_averaged": args.last,
              "train_videos": len(read_metadata(str(dbs["train"]))[0]),
              "test_videos": len(read_metadata(str(dbs["test"]))[0]),
              "classes": len(read_metadata(str(dbs["test"]))[1]) or 6,
              "few_per_class": args.few_per_class, "eval_clip": EVAL_CLIP, "linear_probe_settings": LINEAR_PROBE,
              "knn_k": KNN_K, "config": args.config, "finetune_config": args.finetune_config,
              "all_labels_config": args.all_labels_config}
    report["targets"] = check_targets(report)
    if args.diagnosis_pairs > 0:
        report["diagnosis"] = diagnose(out, args.config, dbs["train"], width, args.seeds, args.diagnosis_pairs,
                                       args.diagnosis_steps)
        report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out / "report.md")
    write_plot(report, out / "report.png")
    say(f"wrote {out / 'report.json'}, report.md, report.png in {report['seconds'] / 60:.1f} min")
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

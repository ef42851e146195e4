"""Training curves of a run: `python -m cstp.plot RUN_DIR [--out curves.png]`.

Reads RUN_DIR/metrics.jsonl and draws the loss terms, the pretext accuracies (with
the majority-label baselines from summary.json when present), the learning rate
and the loader's share of step time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PANELS = (
    ("losses", ("loss_total", "loss_byol", "loss_spatial", "loss_temporal", "loss_speed", "loss_rotation")),
    ("pretext accuracy", ("spatial_accuracy", "temporal_accuracy", "speed_accuracy", "rotation_accuracy")),
    ("learning rate", ("lr",)),
    ("data wait (share of step time)", ("data_wait_fraction",)),
)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a training output directory?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash
    if not records:
        raise ValueError(f"{path} holds no records yet")
    return records


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, window: int = 10) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    baselines = {}
    summary = run_dir / "summary.json"
    if summary.is_file():
        baselines = json.loads(summary.read_text()).get("majority_baseline", {})
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, keys) in zip(axes.flat, PANELS):
        for key in keys:
            values = [r.get(key) for r in records]
            if any(v is None for v in values):
                continue
            line, = ax.plot(steps, smooth(values, window) if key != "lr" else values, label=key)
            if key in baselines:
                ax.axhline(baselines[key], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(title + (" (dotted: majority baseline)" if title == "pretext accuracy" and baselines else ""))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{run_dir}  ({len(records)} records, smoothed over {window})")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cstp.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a train.py output directory (holds metrics.jsonl)")
    parser.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window in records (default: 10)")
    args = parser.parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.out, max(1, args.smooth))
    except (FileNotFoundError, ValueError) as err:
        print(f"cstp.plot: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

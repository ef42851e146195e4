"""The run's log files, shared by the pretraining and finetuning loops: OUT/metrics.jsonl
(one JSON object per line) and OUT/tensorboard, both reopened consistently on resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def open_metrics(out_dir: Path, resume_step: int, keep=None):
    """OUT/metrics.jsonl for appending, without the records past the step a run resumes
    from (a run that died after logging but before its next checkpoint would otherwise
    repeat them). `keep(record)` decides for the others; by default a record is kept when
    its step is at most `resume_step`."""
    keep = keep or (lambda record: record["step"] <= resume_step)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.jsonl"
    kept = []
    if resume_step > 0 and path.exists():
        for line in path.read_text().splitlines():
            try:
                if keep(json.loads(line)):
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


def open_tensorboard(out_dir: Path, resume_step: int):
    """A SummaryWriter on OUT/tensorboard, or None (with one warning) when the tensorboard
    package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        log.warning("run.tensorboard: the tensorboard package is not installed (%s); "
                    "logging to metrics.jsonl only (pip install tensorboard)", err)
        return None
    # purge_step: on resume, TensorBoard hides what a crashed run logged past the checkpoint
    return SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

"""Checkpoints: written atomically, read without executing anything.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it
loads with `torch.load(weights_only=True)`; a file that needs more (arbitrary
pickled objects) is refused. Files are written to a temporary name and renamed,
so a crash never leaves a half-written `ckpt_*.pt`; `latest_checkpoint` also
skips files that fail to load (truncated by a full disk, say).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^ckpt_(\d{9})\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:09d}.pt"


def atomic_save(state: dict, path: str | Path) -> Path:
    """torch.save to a temporary file beside `path`, flushed to disk, then renamed over
    it: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(state: dict, out_dir: str | Path, step: int, keep: int = 3) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = atomic_save(state, checkpoint_path(out_dir, step))
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def save_from_rank0(make_state, out_dir: str | Path, step: int, keep: int = 3) -> None:
    """save_checkpoint(make_state()) on rank 0 only (the state is built there only), then
    every rank waits at a barrier until the file is written."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_checkpoint(make_state(), out_dir, step, keep=keep)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def agree_across_ranks(problem: str | None, position: dict | None = None) -> str | None:
    """Once the process group is up, before the first collective that needs every rank (DDP's
    broadcast): each rank's `problem` (why it cannot resume, or None) and the `position` it
    resumes from (None: from the start) go to every rank. Returns, on every rank, the first
    failing rank's problem prefixed with its rank, or a line naming the ranks' differing
    positions, or None. Ranks may read node-local copies of a checkpoint: one that cannot load
    its copy stops them all with its message instead of leaving them in a collective until
    its timeout. Without a process group: `problem`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return problem
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (problem, position))
    for rank, (rank_problem, _) in enumerate(reports):
        if rank_problem is not None:
            return f"rank {rank}: {rank_problem}"
    positions = [rank_position for _, rank_position in reports]
    if any(p != positions[0] for p in positions):
        where = "; ".join(f"rank {rank}: " + (f"step {p['step']}" if isinstance(p, dict) else "the start")
                          for rank, p in enumerate(positions))
        return (f"the ranks would resume from different points ({where}): their checkpoints differ; "
                "give every node the same checkpoint")
    return None


def restore_on_every_rank(restore, state: dict) -> None:
    """`restore(state)` (a trainer's), then agree_across_ranks: CheckpointError on every rank,
    with the failing rank's message, when it failed on any (before DDP's first broadcast)."""
    try:
        restore(state)
        problem = None
    except CheckpointError as err:
        problem = str(err)
    if problem := agree_across_ranks(problem):
        raise CheckpointError(problem)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load(weights_only=True) of `path`, or CheckpointError with a one-line reason.
    A file that is not torch.save output at all (empty, random bytes, a log) is said to be
    so: torch's weights-only unpickler reports such bytes like a pickled object."""
    if Path(path).is_file():
        with open(path, "rb") as f:
            head = f.read(2)
        # torch.save writes a zip archive ("PK"); files of old torch versions are raw pickles (0x80)
        is_zip = zipfile.is_zipfile(path)
        if head == b"PK" and not is_zip:
            raise CheckpointError(f"{path} is a damaged checkpoint: a zip archive without its end "
                                  "(cut short by a full disk or an interrupted copy?)")
        if not is_zip and head[:1] != b"\x80":
            raise CheckpointError(f"{path} is not a PyTorch checkpoint file (torch.save output)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as err:  # noqa: BLE001 - torch raises many kinds for bad files
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"{path} contains pickled Python objects, not only weights; refusing to load it "
                "(loading would execute code from the file)") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a checkpoint dict")
    return state


NON_FINITE = "tensors with NaN or infinite values"   # state_problems' value problem; the others are of layout
DIVERGED_HINT = "the run that wrote it had diverged: resume from an earlier checkpoint (--resume PATH)"


def state_problems(state, expected: dict) -> list[str]:
    """Why `state`, a model state dict read from a file, cannot be loaded into a model whose own
    state dict is `expected`: missing or unexpected keys, values that are not tensors, wrong
    shapes, NaN or infinite values. Empty when it fits. Short, for a one-line message."""
    if not isinstance(state, dict):
        return [f"its weights are a {type(state).__name__}, not a dict of tensors"]
    missing = [k for k in expected if k not in state]
    unexpected = [str(k) for k in state if k not in expected]
    not_tensors = [k for k in state if k in expected and not torch.is_tensor(state[k])]
    tensors = {k: v for k, v in state.items() if k in expected and torch.is_tensor(v)}
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in tensors.items() if tuple(v.shape) != tuple(expected[k].shape)]
    non_finite = [k for k, v in tensors.items() if _non_finite(v)]
    problems = []
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("values that are not tensors", not_tensors), ("wrong shapes", wrong),
                       (NON_FINITE, non_finite)):
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {'; '.join(keys[:3])})")
    return problems


def _non_finite(tensor: torch.Tensor) -> bool:
    return (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all())


def check_optimizer_state(state) -> None:
    """CheckpointError, one line, when an optimizer state dict read from a file holds NaN or
    infinite tensors (momentum buffers): loaded, its first step silently turns every weight
    to NaN. Anything malformed is left to the optimizer's own load_state_dict."""
    per_param = state.get("state") if isinstance(state, dict) else None
    if not isinstance(per_param, dict):
        return
    bad = [f"{name} of parameter {index}" for index, values in per_param.items() if isinstance(values, dict)
           for name, value in values.items() if torch.is_tensor(value) and _non_finite(value)]
    if bad:
        raise CheckpointError(f"its optimizer state has {len(bad)} {NON_FINITE} "
                              f"(e.g. {'; '.join(bad[:3])}); the first step would make every weight NaN")


def load_model_state(module: torch.nn.Module, state, hint: str = "") -> None:
    """`module.load_state_dict(state)`, or CheckpointError with a one-line reason (instead of
    torch's multi-line error, or silently loading NaN weights). `hint` (what to set) follows a
    layout problem only; NaN weights get DIVERGED_HINT, since no setting fits them."""
    problems = state_problems(state, module.state_dict())
    if problems:
        layout = [p for p in problems if NON_FINITE not in p]
        hints = ([hint] if hint and layout else []) + ([DIVERGED_HINT] if len(layout) < len(problems) else [])
        lead = "its weights do not fit this model" if layout else "its weights are not finite"
        raise CheckpointError(f"{lead}: {'; '.join(problems + hints)}")
    module.load_state_dict(state)


@contextlib.contextmanager
def restoring_training_state():
    """Around a trainer's restore of optimizer, schedule and position from a checkpoint: a
    missing or malformed entry becomes one CheckpointError line instead of a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"cannot restore the training state ({type(err).__name__}: {first})") from None


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name))


def latest_checkpoint(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads, or None."""
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as err:
            log.warning("ignoring %s: %s", path.name, err)
    return None

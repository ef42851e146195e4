"""Load an R(2+1)D backbone's weights from any file a user is likely to hand to
finetune.py / evaluate.py, and say clearly what was wrong when it does not fit.

Accepted kinds (always read with `torch.load(weights_only=True)`):

- "pretraining checkpoint": our `ckpt_*.pt` (format `cstp-dali-checkpoint`); the
  ONLINE backbone is taken (`model["online.backbone.*"]`), as the reference does
  (docs/method.md#finetuning); the EMA target is ignored.
- "exported backbone": our `backbone.pt` (format `cstp-dali-backbone`), written at
  the end of pretraining.
- "finetune checkpoint": our finetuning checkpoints (format `cstp-dali-finetune`);
  the backbone of the finetuned classifier.
- "reference checkpoint": a checkpoint of the CSTP reference project, a dict with
  `state_dict` whose keys are `module.online_net.*` (DataParallel / DDP prefix).
  Projector, predictor, target network and pretext heads are dropped, as the
  reference's `neq_load_customized` does. Its backbone keys follow VCOP's
  R2Plus1DNet naming (`conv1.*`, `bn1.*`, `convN.block1.{conv1,bn1,conv2,bn2,
  downsampleconv,downsamplebn}.*`), which is mapped onto ours.

Every kind yields a state dict that loads strictly into `R2Plus1D10(width)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint, state_problems
from .models.r2plus1d import STAGE_CHANNELS, R2Plus1D10

PRETRAIN_FORMAT = "cstp-dali-checkpoint"   # cstp.engine.CHECKPOINT_FORMAT (not imported: engine is heavy)
BACKBONE_FORMAT = "cstp-dali-backbone"
FINETUNE_FORMAT = "cstp-dali-finetune"
REFERENCE_PREFIX = "module.online_net."
KINDS_HELP = ("expected one of: our pretraining checkpoint (ckpt_*.pt, format 'cstp-dali-checkpoint', "
              "keys model['online.backbone.*']), our exported backbone.pt (format 'cstp-dali-backbone', "
              "'state_dict' + 'width'), our finetuning checkpoint (format 'cstp-dali-finetune'), or a "
              "reference-project checkpoint (a dict with 'state_dict' holding 'module.online_net.*' keys)")


class BackboneLoadError(ValueError):
    pass


@dataclass
class LoadedBackbone:
    state_dict: dict
    width: float
    kind: str
    path: str


def load_backbone(path: str | Path, expected_width: float | None = None) -> LoadedBackbone:
    """The backbone weights in `path`, checked against `R2Plus1D10(width)`.

    `expected_width` (the config's model.width) must match the file's width when given.
    """
    raw = read_checkpoint_file(path)
    kind, state, width = _extract(raw, str(path))
    width = checked_width(_infer_width(state, str(path)) if width is None else width, str(path))
    if expected_width is not None and abs(width - expected_width) > 1e-9:
        raise BackboneLoadError(
            f"{path} holds a width-{width:g} backbone but model.width={expected_width:g} was asked for; "
            f"set model.width={width:g} (or leave it at 0 to follow the checkpoint)")
    _check_against_model(state, width, str(path), kind)
    return LoadedBackbone(state, width, kind, str(path))


def load_classifier(raw: dict, path: str | Path):
    """The VideoClassifier of a finetuning checkpoint (`raw`, read by read_checkpoint_file),
    its width, number of classes and weights checked first: BackboneLoadError, one line, otherwise."""
    from .classifier import build_classifier

    width = checked_width(raw.get("width"), str(path))
    num_classes = raw.get("num_classes")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= 100_000:
        raise BackboneLoadError(f"{path}: its 'num_classes' entry is {num_classes!r}, not a class count")
    model = build_classifier(width, num_classes)
    problems = state_problems(raw.get("model"), model.state_dict())
    if problems:
        raise BackboneLoadError(f"{path} (finetune checkpoint) does not fit a width-{width:g} classifier of "
                                f"{num_classes} classes: {'; '.join(problems)}")
    model.load_state_dict(raw["model"])
    return model


def read_checkpoint_file(path: str | Path) -> dict:
    """torch.load(weights_only=True) of `path`, refusing files that are not PyTorch
    checkpoints at all (a log, an image) with a plain message instead of an unpickling error."""
    try:
        return load_checkpoint(path)
    except CheckpointError as err:
        raise BackboneLoadError(f"{err}; {KINDS_HELP}") from None


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _extract(raw: dict, path: str) -> tuple[str, dict, float | None]:
    fmt = raw.get("format")
    if fmt == PRETRAIN_FORMAT:
        model = _mapping(raw.get("model"))
        prefix = "online.backbone."
        state = {k[len(prefix):]: v for k, v in model.items() if str(k).startswith(prefix)}
        if not state:
            raise BackboneLoadError(f"{path}: a pretraining checkpoint without 'online.backbone.*' weights")
        width = _mapping(_mapping(raw.get("config")).get("model")).get("width")
        return "pretraining checkpoint", state, width
    if fmt == BACKBONE_FORMAT:
        if not isinstance(raw.get("state_dict"), dict):
            raise BackboneLoadError(f"{path}: an exported backbone without a 'state_dict'")
        return "exported backbone", dict(raw["state_dict"]), raw.get("width")
    if fmt == FINETUNE_FORMAT:
        prefix = "backbone."
        state = {k[len(prefix):]: v for k, v in _mapping(raw.get("model")).items() if str(k).startswith(prefix)}
        return "finetune checkpoint", state, raw.get("width")
    if fmt is not None:
        raise BackboneLoadError(f"{path}: unknown checkpoint format {fmt!r}; {KINDS_HELP}")
    reference = raw.get("state_dict")
    if isinstance(reference, dict) and any(str(k).startswith(REFERENCE_PREFIX) for k in reference):
        return "reference checkpoint", _from_reference(reference, path), None
    sample = ", ".join(list(map(str, (reference or raw).keys()))[:5])
    raise BackboneLoadError(f"{path}: not a backbone checkpoint I know (top-level keys / first keys: {sample}); "
                            f"{KINDS_HELP}")


# VCOP R2Plus1DNet naming -> ours (R2Plus1D10), applied to the key after the backbone prefix.
_REFERENCE_RENAMES = (
    (re.compile(r"^conv1\."), "stem.0."),
    (re.compile(r"^bn1\."), "stem.1."),
    (re.compile(r"^(conv[2-5])\.block1\.downsampleconv\."), r"\1.shortcut.0."),
    (re.compile(r"^(conv[2-5])\.block1\.downsamplebn\."), r"\1.shortcut.1."),
    (re.compile(r"^(conv[2-5])\.block1\."), r"\1."),
)
_REFERENCE_STEM_KEY = "conv1.spatial_conv.weight"
_REFERENCE_BACKBONE_NAME = re.compile(r"^(conv[1-5]|bn1)\.")


def _from_reference(state: dict, path: str) -> dict:
    online = {k[len(REFERENCE_PREFIX):]: v for k, v in state.items() if k.startswith(REFERENCE_PREFIX)}
    # The backbone may sit directly under online_net or inside a submodule of it
    # (e.g. online_net.<backbone>.conv1...); the projector is everything else.
    # A stage's own conv1 (convN.block1.conv1.spatial_conv) ends the same way: keep the
    # prefixes under which a whole network sits (a conv5 next to the stem).
    stems = [k[: -len(_REFERENCE_STEM_KEY)] for k in online if k.endswith(_REFERENCE_STEM_KEY)]
    stems = [p for p in stems if p + "conv5.block1.bn2.weight" in online]
    if len(stems) != 1:
        raise BackboneLoadError(
            f"{path}: a reference checkpoint must hold exactly one backbone under '{REFERENCE_PREFIX}' "
            f"(keys '<prefix>{_REFERENCE_STEM_KEY}' .. '<prefix>conv5.block1.bn2.weight', VCOP's R2Plus1DNet "
            f"naming); found {len(stems)}")
    prefix = stems[0]
    out = {}
    for key, value in online.items():
        if not key.startswith(prefix):
            continue   # projector (the reference's neq_load_customized drops it too)
        name = key[len(prefix):]
        if not _REFERENCE_BACKBONE_NAME.match(name):
            continue   # a projector next to the backbone modules
        if ".blocks." in name:
            raise BackboneLoadError(f"{path}: '{key}' is a second residual block per stage; R(2+1)D-10 "
                                    "has one (layer_sizes 1,1,1,1: --model_depth 1)")
        for pattern, repl in _REFERENCE_RENAMES:
            new, hits = pattern.subn(repl, name)
            if hits:
                name = new
                break
        out[name] = value
    return out


def _infer_width(state: dict, path: str) -> float:
    shape = getattr(state.get("conv5.bn2.weight"), "shape", None)
    if shape is None or len(shape) != 1 or not shape[0]:
        raise BackboneLoadError(f"{path}: no 'conv5.bn2.weight' tensor to tell the backbone's width from")
    return shape[0] / STAGE_CHANNELS[-1]


def _check_against_model(state: dict, width: float, path: str, kind: str):
    expected = R2Plus1D10(width).state_dict()
    problems = state_problems(state, expected)
    if problems:
        raise BackboneLoadError(
            f"{path} ({kind}) does not fit an R(2+1)D-10 of width {width:g}: {'; '.join(problems)}. "
            f"Expected the {len(expected)} finite tensors of R2Plus1D10({width:g}).state_dict() "
            "(stem.*, conv2.* .. conv5.*)")


def checked_width(width, path: str) -> float:
    """A width read from a file: a positive number, or BackboneLoadError."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise BackboneLoadError(f"{path}: its 'width' entry is {width!r}, not a number in (0, 4]; {KINDS_HELP}")
    return float(width)

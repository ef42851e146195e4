import math
from pathlib import Path

import re

import pytest
import torch

from cstp.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from cstp.config import ConfigError, load_config
from cstp.schedule import warmup_cosine_lr

ROOT = Path(__file__).resolve().parents[1]


def test_reference_schedule_values():
    # docs/method.md#optimisation: epoch 1 at 1e-5, linear to the peak at epoch 151, cosine to ~1e-5 at epoch 300
    lr = lambda e: warmup_cosine_lr(e - 1, 300, 150, 0.09, 1e-5)  # noqa: E731 (1-based epochs)
    assert lr(1) == pytest.approx(1e-5)
    assert lr(76) == pytest.approx(1e-5 + (0.09 - 1e-5) * 75 / 150)
    assert lr(151) == pytest.approx(0.09)
    assert lr(226) == pytest.approx(1e-5 + (0.09 - 1e-5) / 2)
    assert lr(300) == pytest.approx(1e-5 + (0.09 - 1e-5) * (1 + math.cos(math.pi * 149 / 150)) / 2)
    assert lr(300) == pytest.approx(1e-5 + 1.1e-4 * 0.09, rel=0.02)
    values = [lr(e) for e in range(1, 301)]
    assert values.index(max(values)) == 150


def test_schedule_without_warmup_and_fractional_progress():
    assert warmup_cosine_lr(0, 10, 0, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_lr(5, 10, 0, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine_lr(0.5, 10, 1, 1.0, 0.0) == pytest.approx(0.5)


def test_config_defaults_are_the_reference_recipe():
    cfg = load_config()
    assert cfg["optim"]["momentum"] == 0.9 and cfg["optim"]["weight_decay"] == 5e-4
    assert cfg["optim"]["clip_grad"] == 18.0 and cfg["model"]["ema_tau"] == 0.996
    assert cfg["loss"] == {"byol": 0.1, "spatial": 1.0, "temporal": 1.0, "speed": 1.0, "rotation": 1.0}
    assert cfg["plan"]["frames"] == 16 and cfg["plan"]["crop_size"] == 112


def test_config_file_and_overrides():
    cfg = load_config(str(ROOT / "configs" / "quick.yaml"), ["optim.lr=0.5", "max_steps=7", "batch_size=4",
                                                            "strides=[1, 2]"])
    assert cfg["optim"]["lr"] == 0.5 and cfg["run"]["max_steps"] == 7
    assert cfg["data"]["batch_size"] == 4 and cfg["plan"]["strides"] == [1, 2]
    assert cfg["plan"]["frames"] == 8  # from the file
    assert isinstance(load_config(None, ["lr=1"])["optim"]["lr"], float)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean"),
    ("nonsense=1", "unknown config key"),
    ("batch_size=abc", "must be a int"),
    ("batch_size=2.5", "must be an integer"),
    ("device=tpu", "data.device"),
    ("lr", "key=value"),
])
def test_bad_overrides_are_refused_with_a_message(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr must be a number > 0"),
    ("optim.lr=0", "optim.lr must be a number > 0"),
    ("optim.lr=.nan", "optim.lr must be a number > 0"),
    ("optim.min_lr=-1", "optim.min_lr"),
    ("optim.momentum=5", "optim.momentum"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.clip_grad=-1", "optim.clip_grad"),
    ("run.log_every=0", "run.log_every"),
    ("run.max_steps=-1", "run.max_steps"),
    ("run.checkpoint_every=-2", "run.checkpoint_every"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints"),
    ("run.max_bad_steps=0", "run.max_bad_steps"),
    ("run.data_timeout_s=-1", "run.data_timeout_s"),
    ("data.num_threads=0", "data.num_threads"),
    ("data.workers=-1", "data.workers"),
    ("data.prefetch=0", "data.prefetch"),
    ("loss.byol=-1", "loss weights"),
    ("data.batch_size=1", "data.batch_size must be >= 2"),   # BatchNorm's ValueError at the first step
    ("proj_hidden=0", "model.proj_hidden must be in [1, "),
    ("proj_dim=-1", "model.proj_dim must be in [1, "),
    ("proj_dim=1000000000", "model.proj_dim must be in [1, "),
    ("run.seed=-1", "run.seed must be in [0, "),                 # numpy: 'expected non-negative integer'
    ("run.seed=99999999999999999999", "run.seed must be in [0, "),   # torch: 'Overflow when unpacking long long'
])
def test_values_that_would_crash_or_mislead_a_run_are_refused(override, message):
    """Each of these passed validation before: a ZeroDivisionError (log_every=0), DALI or torch
    tracebacks (num_threads, prefetch, weight_decay), a run that never stops (max_steps=-1), or
    a run that trains silently the wrong way (a negative lr, momentum 5, a negative loss weight)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    if override.split("=")[0].split(".")[0] in ("run", "data") or override.startswith(("optim.lr=", "optim.mom")):
        from cstp.finetune_config import load_finetune_config
        if override.split("=")[0] in ("run.data_timeout_s", "optim.min_lr", "optim.clip_grad"):
            return   # pretraining only
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_finetune_config(None, [override])


def test_scientific_notation_is_a_float_and_unreadable_files_are_one_line(tmp_path):
    """YAML 1.1 reads `lr: 1e-3` (no dot) as a string, which was refused ('must be a float');
    a YAML syntax error or a file that is not UTF-8 was a traceback."""
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 1e-3\n  min_lr: 1E-6\n")
    cfg = load_config(str(config), ["weight_decay=5e-4"])
    assert (cfg["optim"]["lr"], cfg["optim"]["min_lr"], cfg["optim"]["weight_decay"]) == (1e-3, 1e-6, 5e-4)
    with pytest.raises(ConfigError, match="must be a float, got 'abc'"):
        load_config(None, ["lr=abc"])
    with pytest.raises(ConfigError, match="must be a int"):
        load_config(None, ["batch_size=1e3"])
    for text, message in [(b"data:\n  path: [unclosed\n", "ParserError"), (b"\xff\xfe\x00", "UnicodeDecodeError")]:
        config.write_bytes(text)
        with pytest.raises(ConfigError, match=f"cannot read {re.escape(str(config))}: {message}") as caught:
            load_config(str(config))
        assert "\n" not in str(caught.value)


def test_a_finetuning_class_count_is_bounded():
    from cstp.finetune_config import load_finetune_config

    for bad in ("model.num_classes=-1", "model.num_classes=1000000000"):
        with pytest.raises(ConfigError, match="model.num_classes must be in"):
            load_finetune_config(None, [bad])


def test_keep_checkpoints_0_keeps_them_all():
    assert load_config(None, ["run.keep_checkpoints=0"])["run"]["keep_checkpoints"] == 0


def test_checkpoints_are_atomic_pruned_and_loaded_safely(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint({"w": torch.full((3,), float(step)), "position": {"step": step}}, tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000000003.pt", "ckpt_000000004.pt"]
    assert not list(tmp_path.glob(".*tmp*"))
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "ckpt_000000004.pt" and state["w"].tolist() == [4.0, 4.0, 4.0]


def test_truncated_newest_checkpoint_is_skipped(tmp_path):
    save_checkpoint({"w": torch.ones(1000)}, tmp_path, 1)
    good = save_checkpoint({"w": torch.ones(1000) * 2}, tmp_path, 2)
    data = good.read_bytes()
    (tmp_path / "ckpt_000000003.pt").write_bytes(data[: len(data) // 2])
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "ckpt_000000002.pt" and state["w"][0] == 2


class Evil:
    def __reduce__(self):
        return (print, ("this would run",))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    torch.save({"obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_files_that_are_not_checkpoints_are_not_called_pickled_objects(tmp_path):
    """train.py/finetune.py --resume on random bytes said the file 'contains pickled Python
    objects ... loading would execute code' (torch's weights-only unpickler words every bad
    byte that way), and on a cut checkpoint quoted a miniz internal error."""
    good = save_checkpoint({"w": torch.ones(1000)}, tmp_path, 1).read_bytes()
    files = {"empty.pt": b"", "random.pt": bytes(range(7, 256)) * 40, "log.pt": b'{"step": 1}\n',
             "cut.pt": good[: len(good) // 2]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as caught:
            load_checkpoint(tmp_path / name)
        message = str(caught.value)
        assert "pickled" not in message and "miniz" not in message and "\n" not in message, message
        expected = "a damaged checkpoint: a zip archive without its end" if name == "cut.pt" else \
            "is not a PyTorch checkpoint file (torch.save output)"
        assert expected in message, message


@pytest.mark.parametrize("name, global_lr, per_gpu_batch", [("ucf101", 0.03, 10), ("k400", 0.09, 16)])
def test_reference_recipes(name, global_lr, per_gpu_batch):
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    assert cfg["optim"]["lr"] == global_lr and cfg["data"]["batch_size"] == per_gpu_batch
    assert cfg["run"]["epochs"] == 300 and cfg["optim"]["warmup_epochs"] == 150
    assert cfg["optim"]["min_lr"] == 1e-5 and cfg["optim"]["clip_grad"] == 18.0

"""On a GPU, DALI refuses to fork its external-source workers once CUDA is initialised
in the process. Every entry point, asked for device=gpu, must therefore fork the
workers of ALL its loaders before the first call that initialises CUDA.

Checked on the CPU by recording, in order, with the GPU calls stubbed:
- CUDA initialisation: torch.cuda.is_available / device_count without
  PYTORCH_NVML_BASED_CUDA_CHECK=1 (they call cuInit), torch.cuda.init, set_device,
  torch.cuda._lazy_init (the first CUDA tensor or module; the run stops there), and
  the build of a GPU DALI pipeline (b.Pipeline asserts an initialised driver);
- every DALI worker start (Pipeline._start_py_workers of a pipeline with a parallel
  external_source; here nothing is forked, only recorded).
The first batch also stops a run (nothing past it matters for the fork).
Relies on DALI 2.4 internals: Pipeline._start_py_workers, ._parallel_input_callbacks,
._py_pool_started, ._built and the base iterator calling build() in its constructor.
"""

from __future__ import annotations

import pytest
import torch
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

import benchmark
import evaluate
import finetune
import show
import train
from pipelines.loader import LoaderSettings, PretrainLoader
from pipelines.pretrain_pipeline import PRETRAIN_OUTPUTS
from tests.lmdb_fixtures import coded_video, encode_jpeg, write_lmdb

NVML = "PYTORCH_NVML_BASED_CUDA_CHECK"
FORK = "dali:fork_workers"


class Stop(Exception):
    """Raised by the stubs where the recorded part of a run ends."""


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    names = [f"c{i % 3}/v{i:02d}" for i in range(12)]
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb", [coded_video(12, 32, 40) for _ in range(12)],
                          names=names, labels=[i % 3 for i in range(12)], classes=["c0", "c1", "c2"]))


@pytest.fixture
def events(monkeypatch):
    log: list[str] = []
    # A fresh process: nobody has set the NVML variable yet (importing gpu_guard here did).
    monkeypatch.delenv(NVML, raising=False)

    def availability(name, value):
        def check(*_args, **_kwargs):
            import os
            log.append(f"nvml:{name}" if os.environ.get(NVML) == "1" else f"cuda:{name}")
            return value
        return check

    def record(name, stop=False):
        def call(*_args, **_kwargs):
            log.append(name)
            if stop:
                raise Stop(name)
        return call

    monkeypatch.setattr(torch.cuda, "is_available", availability("is_available", True))
    monkeypatch.setattr(torch.cuda, "device_count", availability("device_count", 1))
    monkeypatch.setattr(torch.cuda, "init", record("cuda:init"))
    monkeypatch.setattr(torch.cuda, "set_device", record("cuda:set_device"))
    monkeypatch.setattr(torch.cuda, "_lazy_init", record("cuda:lazy_init", stop=True))

    def start_workers(self):
        if self._parallel_input_callbacks:
            log.append(FORK)
        self._py_pool_started = True   # nothing forked: the order is what is tested

    real_build = Pipeline.build

    def build(self):
        if self.device_id is None:
            return real_build(self)
        if self._built:
            return
        self.start_py_workers()
        log.append("cuda:dali_build")
        self._built = True

    monkeypatch.setattr(Pipeline, "_start_py_workers", start_workers)
    monkeypatch.setattr(Pipeline, "build", build)
    monkeypatch.setattr(DALIGenericIterator, "__next__", record("dali:first_batch", stop=True))
    return log


def run_until_stop(entry, argv):
    with pytest.raises(Stop):
        entry(argv)


def assert_forks_first(log: list[str], forks: int):
    """`forks` worker starts, none after a CUDA-initialising call, and something GPU-side
    after them (the stubs were reached)."""
    assert log.count(FORK) == forks, log
    last_fork = max(i for i, e in enumerate(log) if e == FORK)
    assert [e for e in log[:last_fork] if e.startswith("cuda:")] == [], log
    assert log[-1] in ("cuda:lazy_init", "dali:first_batch"), log


def test_train_forks_before_cuda(tmp_path, db, events):
    run_until_stop(train.main, ["--out", str(tmp_path), f"data.path={db}", "data.device=gpu", "data.workers=2",
                                "model.width=0.0625", "plan.frames=4", "crop_size=32", "batch_size=4",
                                "train.threads=1", "num_threads=1", "tensorboard=false", "progress=false"])
    assert_forks_first(events, forks=1)
    assert events == ["nvml:is_available", FORK, "cuda:set_device", "cuda:lazy_init"]


def test_finetune_forks_both_loaders_before_cuda(tmp_path, db, events):
    run_until_stop(finetune.main, ["--out", str(tmp_path), f"data.train={db}", "data.device=gpu", "data.workers=2",
                                   "model.width=0.125", "clip.frames=4", "clip.crop_size=32",
                                   "clip.test_short_side=32", "batch_size=2", "train.threads=1", "num_threads=1",
                                   "progress=false", "val_fraction=0.34"])
    assert_forks_first(events, forks=2)
    assert events == ["nvml:is_available", FORK, FORK, "cuda:set_device", "cuda:lazy_init"]


def test_evaluate_forks_test_and_gallery_loaders_before_cuda(tmp_path, db, events):
    run_until_stop(evaluate.main, ["--random-init", "0.125", "--data", db, "--train-data", db, "--device", "gpu",
                                   "--workers", "2", "--batch-size", "2", "--num-threads", "1", "--no-progress",
                                   "--json", str(tmp_path / "r.json"), "frames=4", "crop_size=32",
                                   "test_short_side=32"])
    assert_forks_first(events, forks=2)
    assert events == ["nvml:is_available", FORK, FORK, "cuda:lazy_init"]


def test_show_forks_before_cuda(tmp_path, db, events):
    run_until_stop(show.main, ["--data", db, "--device", "gpu", "--n", "2", "--out", str(tmp_path / "v.png"),
                               "data.workers=2", "plan.frames=4", "crop_size=32", "batch_size=2", "num_threads=1"])
    assert_forks_first(events, forks=1)
    assert events == ["nvml:is_available", FORK, "cuda:dali_build", "dali:first_batch"]


def test_benchmark_loader_and_e2e_fork_before_cuda(tmp_path, db, events):
    common = ["--device", "gpu", "--data", db, "--repeat", "1", "--workers", "2", "--batch", "2", "--threads", "1",
              "--steps", "1", "--warmup", "1", "--json", str(tmp_path / "b.json"), "plan.frames=4", "crop_size=32",
              "model.width=0.0625"]
    run_until_stop(benchmark.main, ["loader", *common])
    assert events == ["nvml:is_available", FORK, "cuda:dali_build", "dali:first_batch"]
    events.clear()
    run_until_stop(benchmark.main, ["e2e", *common])
    assert_forks_first(events, forks=1)
    assert events[:2] == ["nvml:is_available", FORK]


# ---------------------------------------------------------------- a rebuild after a decoder fault


def test_a_pipeline_rebuilt_after_a_decoder_fault_spawns_its_workers_after_cuda(tmp_path, monkeypatch):
    """A decoder fault rebuilds the pipeline (pipelines/faults.py), necessarily after the
    first build, which on a GPU initialised CUDA: forking the new workers then is refused
    by DALI ("Cannot fork a process when the CUDA has been initialized") and the fault
    would end the run. Here the pipeline really runs on the CPU with a real worker; what
    is stubbed is the CUDA state: the driver counts as initialised from the first build
    of the loader's pipeline on, as on a GPU, so DALI's own check refuses a fork after it.
    The rebuilt pipeline must spawn its worker, and the epoch must read what a run
    without workers reads (the damaged sample replaced)."""
    from nvidia.dali import backend

    from tests.test_data_faults import CFG, DAMAGED, H, W, batches_of, damage_header, ids, put

    path = write_lmdb(tmp_path / "rot.lmdb", [coded_video(24, H, W) for _ in range(16)])
    put(path, DAMAGED, [damage_header(f) for f in (encode_jpeg(f) for f in coded_video(24, H, W))])
    expected = batches_of(PretrainLoader(str(path), CFG, LoaderSettings(batch_size=4, num_threads=1, seed=0)), 1)
    assert DAMAGED not in ids(expected) and sum(int((b["substituted"] > 0).sum()) for b in expected) == 1

    log: list[str] = []
    cuda = {"initialised": False}
    real_start, real_build = Pipeline._start_py_workers, Pipeline.build

    def start_workers(self):
        if self._parallel_input_callbacks:
            log.append(f"dali:{self._py_start_method}_workers")
        real_start(self)

    def build(self):
        first = not self._built
        real_build(self)
        if first and self._parallel_input_callbacks:   # the loader's pipeline (probes have no workers)
            log.append("cuda:dali_build")
            cuda["initialised"] = True

    monkeypatch.setattr(backend, "IsDriverInitialized", lambda: cuda["initialised"])
    monkeypatch.setattr(Pipeline, "_start_py_workers", start_workers)
    monkeypatch.setattr(Pipeline, "build", build)
    settings = LoaderSettings(batch_size=4, num_threads=1, seed=0, workers=1)
    loader = PretrainLoader(str(path), CFG, settings)
    assert log == ["dali:fork_workers"]          # at construction, before any build
    got = batches_of(loader, 1)
    assert log == ["dali:fork_workers", "cuda:dali_build", "dali:spawn_workers", "cuda:dali_build"]
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected, strict=True):
        for key in PRETRAIN_OUTPUTS:
            assert torch.equal(a[key], b[key]), key

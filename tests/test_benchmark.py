"""benchmark.py on a tiny LMDB: every mode runs, the JSON fields are there, positive and
consistent with each other, --all's ratios come from the mode numbers, and bad
requests (no GPU, bad flags) end with a message."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import benchmark
from tests.lmdb_fixtures import coded_video, write_lmdb

REPO = Path(__file__).resolve().parents[1]
FRAMES, CROP, BATCH, STEPS = 4, 32, 2, 3
TINY = ["model.width=0.0625", "proj_hidden=32", "proj_dim=16", f"plan.frames={FRAMES}", f"crop_size={CROP}",
        "train.threads=1", "--batch", str(BATCH), "--threads", "1", "--steps", str(STEPS), "--warmup", "1"]
FIELDS = ("mode", "device", "loader", "source", "samples_per_s", "frames_per_s", "data_wait_fraction",
          "host_rss_mb", "gpu_name", "batch", "frames", "crop_size", "steps")


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    return str(write_lmdb(tmp_path_factory.mktemp("db") / "tiny.lmdb",
                          [coded_video(20 + 5 * i, 48, 64) for i in range(12)]))


def check_result(r: dict, mode: str, loader):
    for field in FIELDS:
        assert field in r, field
    assert (r["mode"], r["device"], r["loader"], r["gpu_name"]) == (mode, "cpu", loader, None)
    assert (r["batch"], r["frames"], r["crop_size"], r["steps"]) == (BATCH, FRAMES, CROP, STEPS)
    assert r["source"] == ("synthetic tensors" if mode == "model" else "lmdb")
    assert r["samples_per_s"] > 0 and r["host_rss_mb"] > 0 and r["cpu_cores_used"] > 0
    assert r["other_cpu_cores"] is None or r["other_cpu_cores"] >= 0
    assert r["frames_per_s"] == pytest.approx(2 * FRAMES * r["samples_per_s"], rel=1e-9)
    assert r["samples_per_s"] == pytest.approx(STEPS * BATCH / r["seconds"], rel=1e-9)
    assert r["cpu_ms_per_sample"] == pytest.approx(1000 * r["cpu_cores_used"] / r["samples_per_s"], rel=1e-9)
    if mode == "e2e":
        assert 0 < r["data_wait_fraction"] < 1
        assert r["data_wait_fraction"] == pytest.approx(r["data_wait_seconds"] / r["seconds"], rel=1e-9)
    else:
        assert r["data_wait_fraction"] is None
    if mode in ("model", "e2e"):
        assert r["skipped_steps"] == 0


def test_all_runs_every_mode_and_reports_the_ratios(tmp_path, tiny_db, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--all", *TINY, "--data", tiny_db, "--workers", "0", "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    runs = summary["results"]
    assert list(runs) == ["loader_dali", "loader_reference", "model", "e2e"]
    check_result(runs["loader_dali"], "loader", "dali")
    check_result(runs["loader_reference"], "loader", "reference")
    check_result(runs["model"], "model", None)
    check_result(runs["e2e"], "e2e", "dali")
    assert summary["compute_bound_ratio"] == pytest.approx(runs["e2e"]["samples_per_s"]
                                                           / runs["model"]["samples_per_s"], rel=1e-9)
    assert summary["loader_speedup"] == pytest.approx(runs["loader_dali"]["samples_per_s"]
                                                      / runs["loader_reference"]["samples_per_s"], rel=1e-9)
    assert summary["loader_cpu_speedup"] == pytest.approx(runs["loader_reference"]["cpu_ms_per_sample"]
                                                          / runs["loader_dali"]["cpu_ms_per_sample"], rel=1e-9)
    assert summary["mode"] == "all" and summary["gpu_name"] is None
    report = out.with_suffix(".md").read_text()
    assert "compute-bound ratio" in report and f"{summary['loader_speedup']:.2f}×" in report
    printed = capsys.readouterr().out
    assert "loader speed-up" in printed and "samples/s" in printed
    try:
        import matplotlib  # noqa: F401
        assert out.with_suffix(".png").is_file()
    except ImportError:
        assert "matplotlib is not installed" in report and "no chart" in printed


def test_a_small_database_is_repeated_and_synthetic_data_needs_none(tmp_path, tiny_db):
    small = write_lmdb(tmp_path / "small.lmdb", [coded_video(24, 48, 64) for _ in range(3)])
    out = tmp_path / "loader.json"
    assert benchmark.main(["loader", "--loader", "reference", "--workers", "0", *TINY, "--data", str(small),
                           "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    check_result(r, "loader", "reference")
    needed = (1 + STEPS + 2) * BATCH
    assert r["repeat"] == -(-needed // 3) and r["videos"] == 3 * r["repeat"]
    # no --data: a synthetic LMDB is built
    assert benchmark.main(["loader", *TINY, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    check_result(r, "loader", "dali")
    assert r["data"].startswith("synthetic") and r["repeat"] == 1


def test_soak_records_memory_after_every_epoch(tmp_path, tiny_db, capsys):
    out = tmp_path / "soak.json"
    assert benchmark.main(["loader", *TINY, "--data", tiny_db, "--repeat", "1", "--workers", "0",
                           "--soak-epochs", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    check_result(r, "loader", "dali")
    assert r["soak_epochs"] == 3 and r["soak_steps_per_epoch"] == 12 // BATCH
    assert len(r["soak_host_mb"]) == 3 and all(m > 0 for m in r["soak_host_mb"])
    assert r["soak_slope_mb_per_epoch"] == pytest.approx(benchmark.memory_slope(r["soak_host_mb"]))
    if r["soak_anon_mb"] is not None:  # Linux: the total splits into anonymous and file-backed pages
        assert len(r["soak_anon_mb"]) == len(r["soak_file_mb"]) == 3
        for total, anon, mapped in zip(r["soak_host_mb"], r["soak_anon_mb"], r["soak_file_mb"]):
            assert 0 < anon < total and anon + mapped == pytest.approx(total, rel=0.05, abs=5)
    assert "slope" in capsys.readouterr().out


def test_memory_slope_is_the_least_squares_slope():
    assert benchmark.memory_slope([100.0, 102.0, 104.0]) == pytest.approx(2.0)
    assert benchmark.memory_slope([100.0, 103.0, 100.0]) == pytest.approx(0.0)
    assert benchmark.memory_slope([5.0, 1.0]) == pytest.approx(-4.0)
    assert benchmark.memory_slope([7.0]) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_gpu_without_a_gpu_is_refused(tmp_path, capsys):
    assert benchmark.main(["model", "--device", "gpu", *TINY, "--json", str(tmp_path / "x.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--all", "model"], "--all runs every mode"),
    (["warp"], "unknown mode 'warp'"),
    ([], "choose a mode"),
    (["model", "loader"], "one mode at most"),
    (["model", "--batch", "0"], "must be >= 1"),
    (["model", "--precision", "fp16"], "invalid choice"),
    (["e2e", "--loader", "pil"], "invalid choice"),
    (["loader", "--repeat", "x"], "not an integer"),
    (["model", "--soak-epochs", "2"], "--soak-epochs needs the loader mode"),
    (["loader", "--soak-epochs", "0"], "must be >= 1"),
])
def test_bad_flags_give_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["model", "no_such_key=1"], "unknown config key 'no_such_key'"),
    (["loader", "--data", "/nonexistent/db.lmdb"], "cannot read the data"),
])
def test_bad_config_or_data_give_a_message(argv, message, tmp_path, capsys):
    assert benchmark.main([*argv, "--json", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_check.sh")]).returncode == 0


def test_the_report_says_when_matplotlib_is_missing(tmp_path, monkeypatch):
    row = dict(mode="model", loader=None, samples_per_s=2.0, frames_per_s=32.0, step_ms=1.0,
               data_wait_fraction=None, cpu_cores_used=1.0, host_rss_mb=100.0, other_cpu_cores=0.1, cpu_count=2)
    summary = dict(device="cpu", gpu_name=None, batch=2, frames=8, crop_size=32, steps=3, warmup=1,
                   precision="fp32", channels_last=False, model_width=0.0625, data="test",
                   compute_bound_ratio=0.5, loader_speedup=2.0, data_wait_fraction=0.1,
                   machine=dict(platform="p", cpu_count=2, python="3", torch="t", dali=None, date="d"),
                   results={"model": row})
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` fails
    assert benchmark.write_report(summary, tmp_path / "r.md") is None
    text = (tmp_path / "r.md").read_text()
    assert "matplotlib is not installed" in text and "0.50" in text and "2.00×" in text
    assert not (tmp_path / "r.png").exists()

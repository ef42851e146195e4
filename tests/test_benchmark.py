"""benchmark.py on a tiny LMDB: every mode runs, the JSON fields are there, positive and
consistent with each other, --all's ratios come from the mode numbers, and bad
requests (no GPU, bad flags) end with a message."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

import benchmark
from bench.data import prepare_data, write_repeated_db
from bench.gpu_check import gpu_check_summary
from bench.measure import memory_slope
from bench.report import write_report
from bench.system import parse_gpu_utilisation, utilisation_between
from pipelines import lmdb_store as fmt
from tests.lmdb_fixtures import assert_hints_exact, coded_video, write_lmdb

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


@pytest.mark.parametrize("version", [1, 2])
def test_a_repeated_database_keeps_the_layout_and_every_frame(tmp_path, version):
    # frames of several KiB (overflow pages of their own): version 2 copies get exact read hints
    source = write_lmdb(tmp_path / "src.lmdb", [coded_video(n, 240, 320) for n in (5, 3)], version=version)
    write_repeated_db(str(source), tmp_path / "rep.lmdb", 3)
    metas, _ = fmt.read_metadata(str(tmp_path / "rep.lmdb"))
    assert [m.name for m in metas] == [f"class{v % 2}/video{v:03d}#{k}" for k in range(3) for v in range(2)]
    assert fmt.layout_version(str(tmp_path / "rep.lmdb")) == version
    src, rep = fmt.shared_env(str(source)), fmt.shared_env(str(tmp_path / "rep.lmdb"))
    with src.begin() as read, rep.begin() as copy:
        for entry in range(6):
            frames = fmt.read_video_frames(copy, entry)
            assert frames == fmt.read_video_frames(read, entry % 2)
            header = copy.get(fmt.video_key(entry))
            assert (fmt.header_frames(header) is None) == (version == 1)
            if version == 2:
                assert fmt.header_hints(header, len(frames)) is not None
                assert_hints_exact(tmp_path / "rep.lmdb", header, frames)


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
    assert r["soak_slope_mb_per_epoch"] == pytest.approx(memory_slope(r["soak_host_mb"]))
    if r["soak_anon_mb"] is not None:  # Linux: the total splits into anonymous and file-backed pages
        assert len(r["soak_anon_mb"]) == len(r["soak_file_mb"]) == 3
        for total, anon, mapped in zip(r["soak_host_mb"], r["soak_anon_mb"], r["soak_file_mb"]):
            assert 0 < anon < total and anon + mapped == pytest.approx(total, rel=0.05, abs=5)
    assert "slope" in capsys.readouterr().out


def test_memory_slope_is_the_least_squares_slope():
    assert memory_slope([100.0, 102.0, 104.0]) == pytest.approx(2.0)
    assert memory_slope([100.0, 103.0, 100.0]) == pytest.approx(0.0)
    assert memory_slope([5.0, 1.0]) == pytest.approx(-4.0)
    assert memory_slope([7.0]) is None


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
    (["model", "--seed", "-1"], "run.seed must be in [0, "),   # --seed skipped the config's check
    (["model", "--batch", "1"], "data.batch_size must be >= 2"),   # was torch's BatchNorm traceback
])
def test_bad_config_or_data_give_a_message(argv, message, tmp_path, capsys):
    assert benchmark.main([*argv, "--json", str(tmp_path / "x.json")]) == 2
    assert message in capsys.readouterr().err


def test_the_flags_win_over_the_overrides_and_are_checked_like_them():
    from bench.settings import load_benchmark_config

    args = benchmark.parse_args(["loader", "data.num_threads=0", "data.batch_size=1", "data.decode=x",
                                 "--threads", "3", "--batch", "4", "--decode", "full"])
    d = load_benchmark_config(args)["data"]
    assert (d["num_threads"], d["batch_size"], d["decode"]) == (3, 4, "full")


def test_the_source_commands_seed_is_checked_like_run_seed(tmp_path, capsys):
    """benchmark.py source --seed -1 was numpy's 'expected non-negative integer' traceback."""
    assert benchmark.main(["source", "--data", str(tmp_path / "none.lmdb"), "--seed", "-1"]) == 2
    assert "run.seed must be in [0, " in capsys.readouterr().out


def test_an_unwritable_json_or_a_broken_database_is_one_line(tmp_path, capsys):
    """--json naming a folder failed with IsADirectoryError after the measurement; a database of only
    unreadable videos was a BrokenDataError traceback."""
    import lmdb

    from pipelines.lmdb_store import video_key

    assert benchmark.main(["model", "--json", str(tmp_path)]) == 2
    assert f"--json: {tmp_path} is a folder" in capsys.readouterr().err
    db = write_lmdb(tmp_path / "bad.lmdb", [coded_video(8, 48, 64) for _ in range(2)])
    env = lmdb.open(str(db), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for v in range(2):
            txn.delete(video_key(v))
    env.close()
    assert benchmark.main(["loader", "--data", str(db), "--steps", "1", "--warmup", "0", "--batch", "2",
                           "plan.frames=4", "crop_size=16", "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmark.py: ") and len(err.strip().splitlines()) == 1, err


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
    assert write_report(summary, tmp_path / "r.md") is None
    text = (tmp_path / "r.md").read_text()
    assert "matplotlib is not installed" in text and "0.50" in text and "2.00×" in text
    assert not (tmp_path / "r.png").exists()


# ---------------------------------------------------------------- the video source and --decode


def test_video_source_and_decode_modes_are_recorded(tmp_path, tiny_db, capsys):
    out = tmp_path / "video.json"
    # synthetic: one ffmpeg-made MJPEG file (DALI decodes MJPEG on the CPU), listed many times
    assert benchmark.main(["loader", "--source", "video", "--workers", "0", *TINY, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["source"], r["decode"], r["loader"]) == ("video", None, "dali")
    assert r["data"].startswith("synthetic colour-coded mjpeg video") and r["samples_per_s"] > 0
    assert benchmark.main(["loader", "--decode", "full", "--workers", "0", *TINY, "--data", tiny_db,
                           "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["source"], r["decode"]) == ("lmdb", "full")
    assert "lmdb (full)" in capsys.readouterr().out


def test_a_video_index_needs_reference_data_for_the_reference_loader(tmp_path, capsys):
    index = tmp_path / "videos.json"
    index.write_text(json.dumps({"format": "cstp-dali-video-index", "version": 1, "root": ".", "classes": ["a"],
                                 "videos": [dict(name="a/x", file="x.avi", label=0, frames=40, height=48,
                                                 width=64, fps=25.0, codec="mjpeg")]}))
    assert benchmark.main(["loader", "--loader", "reference", *TINY, "--data", str(index),
                           "--json", str(tmp_path / "x.json")]) == 2
    assert "pass --reference-data DB" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["loader", "--source", "lmdb", "--data", str(index)])
    assert "does not fit --data" in capsys.readouterr().err
    # H.264 on the CPU: the loader's refusal, as one line
    (tmp_path / "x.mp4").write_bytes(b"\0" * 100)
    index.write_text(index.read_text().replace("x.avi", "x.mp4").replace('"mjpeg"', '"h264"'))
    assert benchmark.main(["loader", *TINY, "--data", str(index), "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot use the data" in err and "x.mp4: codec h264" in err and "Traceback" not in err


def test_a_short_video_index_is_listed_several_times(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    index = root / "videos.json"
    index.write_text(json.dumps({"format": "cstp-dali-video-index", "version": 1, "root": ".", "classes": ["a"],
                                 "videos": [dict(name=f"a/x{i}", file=f"x{i}.avi", label=0, frames=40, height=48,
                                                 width=64, fps=25.0, codec="mjpeg") for i in range(3)]}))
    args = benchmark.parse_args(["loader", "--data", str(index), "--steps", "3", "--warmup", "1"])
    cfg = {"data": {"batch_size": 2}}
    path, origin, videos, copies = prepare_data(args, cfg, tmp_path)
    assert copies == -(-(1 + 3 + 2) * 2 // 3) and videos == 3 * copies and "listed" in origin
    from pipelines.video_source import read_video_index
    metas, _, files = read_video_index(path)
    assert [m.name for m in metas[:4]] == ["a/x0#0", "a/x1#0", "a/x2#0", "a/x0#1"]
    assert files[3] == str(root / "x0.avi")


# ---------------------------------------------------------------- gpu_check.sh's summary


DMON = """#Date       Time        gpu    sm   mem   enc   dec   jpg   ofa
#YYYYMMDD   HH:MM:SS    Idx     %     %     %     %     %     %
 20261126   10:00:00      0    10     1     0     0     0     0
 20261126   10:00:01      0    90     5     0    40     -     0
 20261126   10:00:02      0    80     5     0    60     -     0
 20261126   10:00:03      0    50     5     0     0    70     0
"""
SMI_CSV = """timestamp, utilization.gpu [%], utilization.decoder [%]
2026/11/26 10:00:01.250, 90, 40
2026/11/26 10:00:01.750, 80, 60
"""


def _epoch(hms: str) -> float:
    from datetime import datetime
    return datetime.strptime(f"20261126 {hms}", "%Y%m%d %H:%M:%S").timestamp()


def test_gpu_utilisation_logs_are_parsed():
    samples = parse_gpu_utilisation(DMON)
    assert len(samples) == 4 and samples[1] == {"t": _epoch("10:00:01"), "sm": 90.0, "dec": 40.0, "jpg": None}
    # a run from 10:00:01.3 to 10:00:02.2 covers the samples stamped 10:00:01 and 10:00:02
    window = utilisation_between(samples, _epoch("10:00:01") + 0.3, _epoch("10:00:02") + 0.2)
    assert window["samples"] == 2 and window["dec"] == (50.0, 60.0) and window["jpg"] is None
    csv = parse_gpu_utilisation(SMI_CSV)
    assert [s["dec"] for s in csv] == [40.0, 60.0] and csv[0]["t"] == pytest.approx(_epoch("10:00:01") + 0.25)
    assert parse_gpu_utilisation("garbage\nno header here\n") == []


def _run(samples_per_s, **kw):
    return dict(samples_per_s=samples_per_s, frames_per_s=32 * samples_per_s, data_wait_fraction=None,
                host_rss_mb=100.0, batch=kw.pop("batch", 32), precision="bf16", channels_last=False,
                device="gpu", data="test data", **kw)


def test_gpu_check_summary_holds_every_headline_figure(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    for b, scale in ((32, 1.0), (64, 2.0)):
        results = {"loader_dali": _run(1000 * scale, batch=b), "loader_reference": _run(100 * scale, batch=b),
                   "model": _run(200 * scale, batch=b), "e2e": {**_run(190 * scale, batch=b),
                                                                 "data_wait_fraction": 0.02}}
        (work / f"all_lmdb_b{b}.json").write_text(json.dumps({"mode": "all", "results": results, "data": "LMDB x"}))
        (work / f"video_loader_b{b}.json").write_text(json.dumps(_run(800 * scale, batch=b)))
        (work / f"video_e2e_b{b}.json").write_text(json.dumps({**_run(150 * scale, batch=b),
                                                                "data_wait_fraction": 0.2}))
    (work / "decode_roi_b32.json").write_text(json.dumps(_run(900.0)))
    (work / "decode_full_b32.json").write_text(json.dumps(_run(1200.0)))
    (work / "model_fp32.json").write_text(json.dumps({**_run(50.0), "precision": "fp32"}))
    (work / "model_bf16_cl.json").write_text(json.dumps({**_run(260.0), "channels_last": True}))
    (work / "marks.txt").write_text(f"video_e2e_b32 {_epoch('10:00:01')} {_epoch('10:00:02')}\n"
                                    f"all_lmdb_b32 {_epoch('10:00:03')} {_epoch('10:00:03')}\n")
    (work / "pytest_gpu.txt").write_text("15 passed in 40.0s")
    (out / "dmon.log").write_text(DMON)
    (out / "gpu.csv").write_text("name\nNVIDIA H100 80GB HBM3\n")
    lines = gpu_check_summary(work, out)
    text = "\n".join(lines)
    assert "NVIDIA H100 80GB HBM3" in lines[0] and "15 passed" in text
    table = {line.split("  ")[0]: line.split() for line in lines[lines.index(next(l for l in lines
                                                                               if l.startswith("figure"))):]}
    assert table["lmdb: compute-bound ratio e2e ÷ model"][-3:-1] == ["0.950", "0.950"]
    assert table["video: compute-bound ratio e2e ÷ model"][-3:-1] == ["0.750", "0.750"]
    assert table["lmdb: loader speed-up DALI ÷ reference (PIL, same cores)"][-3:-1] == ["10.00", "10.00"]
    assert table["video: loader speed-up DALI ÷ reference (PIL, same cores)"][-3:-1] == ["8.00", "8.00"]
    assert table["video: data wait in e2e"][-2:] == ["20.0%", "20.0%"]
    assert "faster: full (1.33x)" in text and "900.0 / 1200.0" in text
    assert "model fp32, batch 32: samples/s" in text and "model bf16 channels-last, batch 32: samples/s" in text
    assert "model bf16, batch 32: samples/s" in text   # from the --all run
    assert "NVDEC utilisation % (mean / max, busiest run: video_e2e_b32)" in text and "50 / 60" in text
    assert "NVJPG utilisation % (mean / max, busiest run: all_lmdb_b32)" in text and "70 / 70" in text
    assert lines[-1].startswith("host memory MB")
    saved = json.loads((out / "results.json").read_text())
    assert saved["utilisation"]["video_e2e_b32"]["dec"] == [50.0, 60.0] and len(saved["runs"]) == 10
    assert (out / "summary.txt").read_text() == text + "\n"


def test_gpu_check_summary_survives_missing_runs(tmp_path):
    lines = gpu_check_summary(tmp_path, tmp_path)   # every run failed: still a table
    assert any(line.startswith("figure") for line in lines) and "pytest -m gpu: not run" in "\n".join(lines)
    assert benchmark.main(["gpu-check-summary", str(tmp_path)]) == 2


# ---------------------------------------------------------------- GPU memory: torch's peak and the device's use


def test_gpu_memory_reports_what_the_device_has_in_use(monkeypatch):
    """torch's max_memory_allocated misses DALI's pools: the device's own figure
    (cudaMemGetInfo) is reported beside it. The two CUDA calls are stubbed here."""
    from bench.system import gpu_memory

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * gib, 80 * gib))   # (free, total)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 12 * gib)
    assert gpu_memory("gpu") == {"gpu_memory_gb": 12.0, "gpu_device_used_gb": 50.0, "gpu_device_total_gb": 80.0}
    assert gpu_memory("cpu") == {}


def test_the_device_memory_reaches_the_report_and_the_gpu_check_summary(tmp_path):
    from bench.gpu_check import gpu_check_rows
    from bench.report import gpu_memory_line

    loader = {**_run(900.0, batch=64), "mode": "loader", "loader": "dali", "gpu_device_used_gb": 9.5}
    e2e = {**_run(190.0, batch=64), "mode": "e2e", "loader": "dali", "gpu_device_used_gb": 31.25,
           "gpu_memory_gb": 12.0}
    model = {**_run(200.0, batch=64), "mode": "model", "loader": None, "gpu_device_used_gb": 14.0,
             "gpu_memory_gb": 11.5}
    assert gpu_memory_line([loader, model, e2e]) == ("GPU memory, GiB in use on the device (torch's peak "
                                                     "allocation): loader dali 9.50 (-), model 14.00 (11.50), "
                                                     "e2e dali 31.25 (12.00)")
    assert gpu_memory_line([{**model, "gpu_device_used_gb": None}]) is None
    runs = {"all_lmdb_b64": {"mode": "all", "results": {"loader_dali": loader, "model": model, "e2e": e2e}},
            "video_e2e_b64": {**e2e, "gpu_device_used_gb": 20.0}}
    rows = {row[0]: row[1:] for row in gpu_check_rows(runs)}
    label = "GPU memory GiB in use on the device / torch peak (largest: e2e, batch 64)"
    assert rows[label] == ("31.25 / 12.00", "")


def test_running_out_of_memory_in_a_measurement_says_what_to_lower(monkeypatch, tmp_path, capsys):
    def no_memory(args, cfg, tmp):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.00 GiB")
    monkeypatch.setattr(benchmark, "run_one", no_memory)
    assert benchmark.main(["model", *TINY, "--json", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"benchmark.py: out of memory (CUDA out of memory. Tried to allocate 6.00 GiB) with "
                   f"data.batch_size={BATCH}, plan.frames={FRAMES}, plan.crop_size={CROP}: lower the batch per rank "
                   "(the first of these) or the clip size; `python benchmark.py model --config CONFIG --batch N` "
                   "measures what a batch takes"]
    monkeypatch.setattr(benchmark, "run_one", lambda *a: (_ for _ in ()).throw(RuntimeError("a real bug")))
    with pytest.raises(RuntimeError, match="a real bug"):
        benchmark.main(["model", *TINY, "--json", str(tmp_path / "y.json")])

"""scripts/gpu_check.sh's summary: the headline table of every figure its runs measured."""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.report import fmt
from bench.system import dali_version, parse_gpu_utilisation, utilisation_between

# gpu_check.sh writes one JSON per benchmark run into its work folder, named
#   all_lmdb_b<B>            --all on the LMDB (loader dali + reference, model, e2e)
#   video_loader_b<B>, video_e2e_b<B>    the video-file path (NVDEC on a GPU)
#   decode_roi_b<B>, decode_full_b<B>    loader mode, the LMDB path's two JPEG decode modes
#   model_<precision>[_cl]               model mode at the first batch
# plus marks.txt (one "name start end" line per run, Unix seconds) and the GPU's
# utilisation log (nvidia-smi dmon, or a --query-gpu CSV). The table below holds every
# headline figure of issue #6.


def read_marks(text: str) -> dict[str, tuple[float, float]]:
    marks = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                marks[parts[0]] = (float(parts[1]), float(parts[2]))
            except ValueError:
                pass
    return marks


def _get(runs: dict, name: str, *keys):
    value = runs.get(name)
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _ratio(a, b):
    return a / b if a is not None and b else None


def check_batches(runs: dict) -> list[int]:
    import re

    found = {int(m.group(1)) for name in runs
             if (m := re.fullmatch(r"(?:all_lmdb|video_loader|video_e2e)_b(\d+)", name))}
    return sorted(found)


def gpu_check_rows(runs: dict, util: dict | None = None) -> list[tuple[str, ...]]:
    """The headline table: (figure, one column per batch, target)."""
    util = util or {}
    batches = check_batches(runs)
    rows = [("figure", *([f"batch {b}" for b in batches] or ["value"]), "target")]

    def row(label, values, spec, target=""):
        rows.append((label, *[fmt(v, spec) for v in values or [None]], target))

    def single(label, text, target=""):   # one figure: in the first batch column
        rows.append((label, *([text] + [""] * len(batches))[:max(len(batches), 1)], target)
                    if batches else (label, text, target))

    model = [_get(runs, f"all_lmdb_b{b}", "results", "model", "samples_per_s") for b in batches]
    ref = [_get(runs, f"all_lmdb_b{b}", "results", "loader_reference", "samples_per_s") for b in batches]
    row("model samples/s (synthetic inputs on the device)", model, ".1f")
    for source in ("lmdb", "video"):
        if source == "lmdb":
            loader = [_get(runs, f"all_lmdb_b{b}", "results", "loader_dali", "samples_per_s") for b in batches]
            e2e = [_get(runs, f"all_lmdb_b{b}", "results", "e2e", "samples_per_s") for b in batches]
            wait = [_get(runs, f"all_lmdb_b{b}", "results", "e2e", "data_wait_fraction") for b in batches]
        else:
            loader = [_get(runs, f"video_loader_b{b}", "samples_per_s") for b in batches]
            e2e = [_get(runs, f"video_e2e_b{b}", "samples_per_s") for b in batches]
            wait = [_get(runs, f"video_e2e_b{b}", "data_wait_fraction") for b in batches]
        if not any(v is not None for v in loader + e2e):
            continue
        row(f"{source}: DALI loader samples/s", loader, ".1f")
        row(f"{source}: decoded frames/s (DALI loader)",
            [_get(runs, f"all_lmdb_b{b}", "results", "loader_dali", "frames_per_s") if source == "lmdb"
             else _get(runs, f"video_loader_b{b}", "frames_per_s") for b in batches], ".0f")
        row(f"{source}: loader speed-up DALI ÷ reference (PIL, same cores)",
            [_ratio(a, r) for a, r in zip(loader, ref)], ".2f", ">=5x")
        row(f"{source}: e2e samples/s", e2e, ".1f")
        row(f"{source}: compute-bound ratio e2e ÷ model", [_ratio(a, m) for a, m in zip(e2e, model)], ".3f",
            ">=0.95")
        row(f"{source}: data wait in e2e", wait, ".1%")
    row("reference loader samples/s (LMDB, PIL)", ref, ".1f")
    for name in sorted(n for n in runs if n.startswith("decode_roi_b")):
        roi, full = runs[name], runs.get(name.replace("roi", "full"))
        if not full:
            continue
        faster = "roi" if roi["samples_per_s"] >= full["samples_per_s"] else "full"
        gain = max(roi["samples_per_s"], full["samples_per_s"]) / min(roi["samples_per_s"], full["samples_per_s"])
        single(f"LMDB JPEG decode, loader at batch {roi['batch']}: roi / full samples/s",
               f"{roi['samples_per_s']:.1f} / {full['samples_per_s']:.1f}", f"faster: {faster} ({gain:.2f}x)")
    # model mode at the first batch: the precision / channels-last runs, and the --all run's model
    models = {}
    first = _get(runs, f"all_lmdb_b{batches[0]}", "results", "model") if batches else None
    for r in [first] + [r for name, r in sorted(runs.items()) if name.startswith("model_")]:
        if isinstance(r, dict) and "precision" in r:
            models.setdefault((r["precision"], r["channels_last"], r["batch"]), r)
    for r in (models[key] for key in sorted(models)):
        single(f"model {r['precision']}{' channels-last' if r['channels_last'] else ''}, batch {r['batch']}: "
               "samples/s", f"{r['samples_per_s']:.1f}")
    for key, engine, prefix in (("dec", "NVDEC", "video_"), ("jpg", "NVJPG", "all_lmdb_")):
        picked = [(name, u[key]) for name, u in util.items() if name.startswith(prefix) and u.get(key)]
        if picked:
            name, (mean, peak) = max(picked, key=lambda item: item[1][1])
            single(f"{engine} utilisation % (mean / max, busiest run: {name})", f"{mean:.0f} / {peak:.0f}")
    every = [r for run in runs.values() if isinstance(run, dict)
             for r in (run["results"].values() if isinstance(run.get("results"), dict) else [run])]
    used = [r for r in every if isinstance(r, dict) and r.get("gpu_device_used_gb") is not None]
    if used:
        top = max(used, key=lambda r: r["gpu_device_used_gb"])
        single(f"GPU memory GiB in use on the device / torch peak (largest: {top['mode']}, batch {top['batch']})",
               f"{top['gpu_device_used_gb']:.2f} / {fmt(top.get('gpu_memory_gb'), '.2f')}")
    rss = [r.get("host_rss_mb") for r in runs.values() if isinstance(r, dict) and r.get("host_rss_mb")]
    if rss:
        single("host memory MB (largest run)", f"{max(rss):.0f}")
    return rows


def format_rows(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]


def gpu_check_summary(work: Path, out: Path) -> list[str]:
    """Read gpu_check.sh's results, write results.json and summary.txt into `out`, return
    the summary's lines (the headline table last)."""
    runs = {}
    for path in sorted(work.glob("*.json")):
        try:
            runs[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    marks = read_marks((work / "marks.txt").read_text()) if (work / "marks.txt").is_file() else {}
    samples = []
    for log in (out / "dmon.log", out / "smi_query.csv"):
        if log.is_file() and not samples:
            samples = parse_gpu_utilisation(log.read_text())
    util = {name: utilisation_between(samples, *span) for name, span in marks.items()} if samples else {}
    gpu = (out / "gpu.csv").read_text().splitlines()[1:] if (out / "gpu.csv").is_file() else []
    tests = (work / "pytest_gpu.txt").read_text().strip() if (work / "pytest_gpu.txt").is_file() else "not run"
    (out / "results.json").write_text(json.dumps({"gpu": gpu, "gpu_tests": tests, "runs": runs,
                                                  "utilisation": util, "marks": marks}, indent=2) + "\n")
    first = next((r for r in runs.values() if isinstance(r, dict) and "device" in r), {})
    lines = [f"GPU: {', '.join(gpu) or '?'}; device {first.get('device')}; DALI: {dali_version() or '?'}; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"data: {_get(runs, 'all_lmdb_b' + str((check_batches(runs) or [0])[0]), 'data') or '-'}; "
             f"{_get(runs, 'video_loader_b' + str((check_batches(runs) or [0])[0]), 'data') or '-'}",
             f"pytest -m gpu: {tests}"]
    if util:
        lines += ["", "GPU utilisation per run, % mean/max (sm = SMs, dec = NVDEC, jpg = NVJPG; '-' not reported):"]
        cell = lambda v: "-" if v is None else f"{v[0]:.0f}/{v[1]:.0f}"  # noqa: E731
        lines += format_rows([("run", "sm", "dec", "jpg", "samples")]
                             + [(name, cell(u["sm"]), cell(u["dec"]), cell(u["jpg"]), str(u["samples"]))
                                for name, u in util.items()])
    lines += ["", *format_rows(gpu_check_rows(runs, util))]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return lines


"""What a benchmark run prints and writes: the table, the headline ratios, the Markdown
report and its chart."""

from __future__ import annotations

from pathlib import Path

from bench.settings import REPO


def busy_machine(r: dict) -> bool:
    """Did processes outside the benchmark take over a quarter of the cores while it ran?"""
    return (r.get("other_cpu_cores") or 0) > 0.25 * r["cpu_count"]


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# CPU ms/sample: CPU time of the process and its workers per sample, the cost that
# decides samples/s at equal cores and that other processes on the machine barely move.
TABLE_HEAD = ("run", "loader", "source", "samples/s", "frames/s", "ms/step", "data wait", "CPU cores", "CPU ms/sample",
              "host MB")


def _source_cell(r: dict) -> str:
    source = r.get("source") or "-"
    if source == "synthetic tensors":
        return "-"
    return f"{source} ({r['decode']})" if r.get("decode") else source


def table_rows(results: list[dict]) -> list[tuple[str, ...]]:
    return [(r["mode"], r["loader"] or "-", _source_cell(r), fmt(r["samples_per_s"], ".1f"),
             fmt(r["frames_per_s"], ".0f"),
             fmt(r["step_ms"], ".1f"), fmt(r["data_wait_fraction"], ".1%"), fmt(r["cpu_cores_used"], ".2f"),
             fmt(r.get("cpu_ms_per_sample"), ".1f"), fmt(r["host_rss_mb"], ".0f")) for r in results]


def print_table(results: list[dict]):
    rows = [TABLE_HEAD, *table_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEAD))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def headline_lines(summary: dict) -> list[str]:
    return [f"compute-bound ratio (e2e ÷ model samples/s): {summary['compute_bound_ratio']:.2f}"
            f"  (1.00 = the loader never holds training back; data wait {summary['data_wait_fraction']:.1%})",
            f"loader speed-up (DALI ÷ reference samples/s): {summary['loader_speedup']:.2f}×"] + (
        [f"loader CPU-cost ratio (reference ÷ DALI CPU ms/sample): {summary['loader_cpu_speedup']:.2f}×"]
        if summary.get("loader_cpu_speedup") else [])


def settings_line(r: dict) -> str:
    return (f"device {r['device']}{' (' + r['gpu_name'] + ')' if r.get('gpu_name') else ''}, batch {r['batch']}, "
            f"{r['frames']} frames, {r['crop_size']} px, model width {r['model_width']}, {r['precision']}"
            f"{', channels-last' if r['channels_last'] else ''}, {r['warmup']} warm-up + {r['steps']} timed steps")


def gpu_memory_line(results: list[dict]) -> str | None:
    """Per run, the GPU memory in use on the device and, in brackets, torch's own peak
    (DALI's pools count only in the first); None on the CPU."""
    cells = [f"{r['mode']}{' ' + r['loader'] if r.get('loader') else ''} {r['gpu_device_used_gb']:.2f} "
             f"({fmt(r.get('gpu_memory_gb'), '.2f')})" for r in results if r.get("gpu_device_used_gb") is not None]
    if not cells:
        return None
    return "GPU memory, GiB in use on the device (torch's peak allocation): " + ", ".join(cells)


def write_report(summary: dict, path: Path) -> Path | None:
    """Markdown report; a PNG chart beside it when matplotlib is importable."""
    results = list(summary["results"].values())
    m = summary["machine"]
    lines = ["# CSTP-DALI throughput benchmark", "",
             f"{settings_line(summary)}.  ",
             f"Data: {summary['data']}.  ",
             f"Machine: {m['platform']}, {m['cpu_count']} CPU cores, Python {m['python']}, torch {m['torch']}, "
             f"{m['dali'] or 'DALI not found'}; {m['date']}.  ",
             "CPU cores used by other processes during each run's timed steps (they slow every number): "
             + ", ".join(fmt(r.get("other_cpu_cores"), ".2f") for r in results)
             + (": the machine was busy, these numbers are low." if any(busy_machine(r) for r in results)
                else "."), "",
             "| " + " | ".join(TABLE_HEAD) + " |", "|" + "---|" * len(TABLE_HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    gpu_line = gpu_memory_line(results)
    lines += ["", *[f"- {line}" for line in headline_lines(summary) + ([gpu_line] if gpu_line else [])], "",
              "samples/s: training samples (two views each) per second; frames/s = 2·T·samples/s, the decoded "
              "frames the views need. CPU cores: CPU seconds of the process and its workers per wall second; "
              "CPU ms/sample: their CPU time per sample (the cost behind samples/s at equal cores). "
              "host MB: resident memory (PSS) of the process and its workers at the end of the timed steps. "
              "model: synthetic inputs already on the device (the compute ceiling); e2e: the same steps fed by "
              "the loader. On a CPU-only machine the loader and the model share the same cores, so e2e should "
              "come out below both the loader and the model rates; where it does not, the load on the "
              "machine changed between the runs."]
    chart = path.with_suffix(".png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        chart = None
        lines += ["", "(matplotlib is not installed: no chart. `pip install matplotlib` and rerun to get one.)"]
    if chart is not None:
        names = [f"{r['mode']}\n{r['loader']}" if r["loader"] else r["mode"] for r in results]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(names, [r["samples_per_s"] for r in results], color=["#4c72b0", "#8c8c8c", "#55a868", "#c44e52"])
        ax.set_ylabel("samples / s")
        ax.set_title(f"batch {summary['batch']}, {summary['frames']}×{summary['crop_size']}², "
                     f"{summary['device']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(chart, dpi=120)
        plt.close(fig)
        lines += ["", f"![samples per second]({chart.name})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return chart


def default_json(args) -> Path:
    return REPO / "runs" / "benchmark" / f"{'all' if args.all else args.mode}-{args.device}.json"



def print_results(results: list[dict]):
    """The settings, the table, the soak memory figures and a warning when other
    processes took the cores."""
    print(settings_line(results[-1]))
    print(f"data: {results[-1]['data'] or 'synthetic tensors on the device'}")
    print_table(results)
    for r in results:
        if r.get("soak_host_mb"):
            slope = r["soak_slope_mb_per_epoch"]
            print(f"soak: host MB after each of {r['soak_epochs']} epochs ({r['soak_steps_per_epoch']} steps each): "
                  + ", ".join(f"{m:.0f}" for m in r["soak_host_mb"])
                  + ("" if slope is None else f"; slope {slope:+.2f} MB/epoch"))
            if r.get("soak_anon_mb"):
                anon_slope = r["soak_anon_slope_mb_per_epoch"]
                print("      of which anonymous (heaps, DALI buffers): "
                      + ", ".join(f"{m:.0f}" for m in r["soak_anon_mb"])
                      + ("" if anon_slope is None else f"; slope {anon_slope:+.2f} MB/epoch")
                      + "; file-backed (LMDB map, libraries): " + ", ".join(f"{m:.0f}" for m in r["soak_file_mb"]))
    if gpu_memory_line(results):
        print(gpu_memory_line(results))
    busy = [r["other_cpu_cores"] for r in results if busy_machine(r)]
    if busy:
        print(f"warning: other processes used up to {max(busy):.2f} of the {results[0]['cpu_count']} CPU cores "
              "during the timed steps, so these numbers are low")

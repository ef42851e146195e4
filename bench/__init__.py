"""benchmark.py's parts: settings (config and data choice), data (synthetic and repeated
datasets), measure (the loader, model and e2e modes), suite (--all), system (CPU, memory
and GPU probes), report (table, Markdown, chart), gpu_check (scripts/gpu_check.sh's summary),
host_source (the `source` command: the host side of a data path alone).

One more mode with the modes' flags: its name in benchmark.py's MODES and its function
(cfg, args, db) -> measured dict (seconds, cpu_seconds, other_cpu_seconds, host_rss_mb, ...)
in measure.DATA_MODES. A command with arguments of its own: benchmark.py's COMMANDS."""

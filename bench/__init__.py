"""benchmark.py's parts: settings (config and data choice), data (synthetic and repeated
datasets), measure (the loader, model and e2e modes), suite (--all), system (CPU, memory
and GPU probes), report (table, Markdown, chart), gpu_check (scripts/gpu_check.sh's summary)."""

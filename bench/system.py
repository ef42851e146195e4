"""What the machine does while a benchmark runs: CPU seconds and memory from /proc, GPU
memory, software versions, and the GPU utilisation logs of nvidia-smi."""

from __future__ import annotations

import os
import platform
import resource
import sys
import time


def _proc_table() -> dict[int, tuple[int, float]] | None:
    """pid -> (parent pid, CPU seconds) of every process, from /proc (None elsewhere)."""
    if not os.path.isdir("/proc/self"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return table


def descendants(table: dict | None, root: int) -> dict[int, float]:
    """pid -> CPU seconds of every live descendant of `root` (workers, their helpers)."""
    if not table:
        return {}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = table[pid][1]
        todo.extend(children.get(pid, []))
    return found


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuSnapshot:
    """CPU seconds of this process, its reaped children and its live descendants
    (and of the whole machine, to tell how much other processes took)."""

    def __init__(self):
        t = os.times()
        self.own = t.user + t.system
        self.reaped = t.children_user + t.children_system
        self.live = descendants(_proc_table(), os.getpid())
        self.machine = _machine_busy_seconds()

    def seconds_since(self, start: "CpuSnapshot") -> float:
        # A child that ended inside the window counts in `reaped` with its whole
        # lifetime: subtract what it had used before the window began.
        ended = sum(cpu for pid, cpu in start.live.items() if pid not in self.live)
        still = sum(cpu - start.live.get(pid, 0.0) for pid, cpu in self.live.items())
        return (self.own - start.own) + max(self.reaped - start.reaped - ended, 0.0) + still

    def others_since(self, start: "CpuSnapshot", ours: float) -> float | None:
        """CPU seconds that processes outside this benchmark used in the window."""
        if self.machine is None or start.machine is None:
            return None
        return max(self.machine - start.machine - ours, 0.0)


def host_memory_mb() -> float:
    """Resident memory of this process and its live descendants, as PSS where Linux
    gives it (pages shared after fork count once), else RSS of this process."""
    pids = [os.getpid(), *descendants(_proc_table(), os.getpid())]
    total_kb = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            if pid == os.getpid():
                total_kb += peak_rss_mb() * 1024
    return total_kb / 1024


def host_memory_split_mb() -> dict[str, float] | None:
    """PSS of this process and its live descendants split into anonymous memory (heaps,
    DALI's buffers: where a leak shows) and file-backed pages (the LMDB's memory map,
    shared libraries: page cache that the kernel can reclaim). None without
    /proc/PID/smaps_rollup."""
    pids = [os.getpid(), *descendants(_proc_table(), os.getpid())]
    fields = {"Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}
    total = dict.fromkeys(fields.values(), 0.0)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    key, *rest = line.split()
                    if key in fields:
                        total[fields[key]] += int(rest[0]) / 1024
        except (OSError, ValueError, IndexError):
            if pid == os.getpid():
                return None
    return total


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def gpu_memory(device: str) -> dict:
    """GPU memory in GiB: gpu_memory_gb, the peak of torch's allocator (model, activations,
    optimiser); gpu_device_used_gb, what the whole device has in use now (cudaMemGetInfo:
    torch's cache, DALI's own memory pools and the CUDA contexts too, and any other
    process on the same GPU), with gpu_device_total_gb. DALI allocates outside torch, so
    only the device figure shows what the input pipeline holds."""
    if device != "gpu":
        return {}
    import torch
    free, total = torch.cuda.mem_get_info()
    return {"gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
            "gpu_device_used_gb": (total - free) / 2**30, "gpu_device_total_gb": total / 2**30}


def gpu_name(device: str) -> str | None:
    if device != "gpu":
        return None
    import torch
    return torch.cuda.get_device_name(0)


def dali_version() -> str | None:
    """The installed DALI wheel's version, read without importing DALI."""
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            return f"{name} {dist.version}"
    return None



def machine_info() -> dict:
    import torch

    return dict(platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count(),
                torch=torch.__version__, dali=dali_version(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                  time.gmtime()))


UTIL_COLUMNS = {"sm": "sm", "dec": "dec", "jpg": "jpg", "utilization.gpu": "sm", "utilization.decoder": "dec",
                "utilization.jpeg": "jpg"}


def parse_gpu_utilisation(text: str) -> list[dict]:
    """Samples {t: Unix seconds, sm, dec, jpg: percent or None} from `nvidia-smi dmon -s u -o DT`
    or from `nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.decoder[,...]
    --format=csv,nounits` output. Lines it cannot read are skipped."""
    from datetime import datetime

    samples, names, csv = [], None, False
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            tokens = line[1:].split()
            if names is None and "gpu" in [t.lower() for t in tokens]:
                names = [t.lower() for t in tokens]
            continue
        if line.startswith("timestamp"):   # the CSV header
            names = [c.strip().split(" [")[0].lower() for c in line.split(",")]
            csv = True
            continue
        if names is None:
            continue
        cells = [c.strip() for c in line.split(",")] if csv else line.split()
        if len(cells) != len(names):
            continue
        row = dict(zip(names, cells))
        try:
            if csv:
                t = datetime.strptime(row["timestamp"], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            else:
                t = datetime.strptime(f"{row['date']} {row['time']}", "%Y%m%d %H:%M:%S").timestamp()
        except (KeyError, ValueError):
            continue
        sample = {"t": t, "sm": None, "dec": None, "jpg": None}
        for name, key in UTIL_COLUMNS.items():
            if name in row:
                try:
                    sample[key] = float(row[name])
                except ValueError:   # "-": the counter is not available
                    pass
        samples.append(sample)
    return samples


def utilisation_between(samples: list[dict], start: float, end: float) -> dict:
    """Mean and max of each counter over the samples in [start, end] (None where none)."""
    inside = [s for s in samples if int(start) <= s["t"] <= end]   # dmon's times are whole seconds
    out = {"samples": len(inside)}
    for key in ("sm", "dec", "jpg"):
        values = [s[key] for s in inside if s[key] is not None]
        out[key] = (sum(values) / len(values), max(values)) if values else None
    return out


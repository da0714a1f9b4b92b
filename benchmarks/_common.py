"""Helpers shared by the benchmark scripts: exact random masks, timing, round-robin rounds, peak memory, metadata.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``; they import
``from _common import ...``.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import time
from collections.abc import Callable

import numpy as np
import torch

from probprune.heap import release_freed_heap
from probprune.mask_space import CHANNEL, HEAD, MaskSpace


def exact_mask(space: MaskSpace, keep: float, rng: np.random.Generator) -> np.ndarray:
    """A random 0/1 mask keeping exactly round(keep * n) head groups and round(keep * n) channel units."""
    m = np.zeros(space.num_units, dtype=np.float32)
    for t in (HEAD, CHANNEL):
        idx = np.flatnonzero(space.unit_type == t)
        m[rng.choice(idx, size=int(round(keep * idx.size)), replace=False)] = 1
    return m


def flop_bound(space: MaskSpace, lm_head_params: int, mask: np.ndarray | None) -> float:
    """Matmul parameters of the dense model (incl. lm_head) / those under ``mask``: the FLOP bound on the speed-up."""
    kept = space.prunable_params if mask is None else space.kept_params(mask)
    return (space.prunable_params + lm_head_params) / (kept + lm_head_params)


def sync(device: torch.device | str | None) -> None:
    """Wait for queued CUDA work (no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn``, CUDA synchronised on both sides.

    A Python ``float`` returned by ``fn`` replaces the wall time (for work that times its own inner loop, e.g.
    decoding after an untimed prompt). CPU time is far less disturbed by other processes than wall time.
    """
    sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    inner = fn()
    sync(device)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return (inner if type(inner) is float else wall), cpu


def round_robin(
    rows: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, device: torch.device | str | None = None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every row once per round, ``warmup + repeats`` rounds; return (wall, CPU) seconds of the timed rounds.

    Interleaving rows means load from other processes hits all of them alike.
    """
    wall: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for rnd in range(warmup + repeats):
        for name, fn in rows.items():
            w, c = timed(fn, device)
            if rnd >= warmup:
                wall[name].append(w)
                cpu[name].append(c)
    return wall, cpu


def machine_info(device: torch.device | str = "cpu") -> dict:
    """Versions, CPU count, load average and the CUDA device name, for the JSON of a result."""
    dev = torch.device(device)
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
    }


# --------------------------------------------------------------------------------------------------- memory
def status_kb(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def trim_heap() -> None:
    """Collect garbage and return freed heap to the OS, so RSS reflects live memory."""
    gc.collect()
    release_freed_heap()


class PeakMemory:
    """Peak memory of a block of work: CUDA allocator peak, or the process's peak RSS on CPU.

    On CPU the peak RSS (VmHWM) is reset to the current RSS through ``/proc/self/clear_refs`` before each measurement;
    where that is not allowed, a ``resource.getrusage`` delta is used (a lower bound: it only sees growth past the
    process's earlier peak).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.method = "cuda.max_memory_allocated" if self.device.type == "cuda" else self._cpu_method()

    @staticmethod
    def _cpu_method() -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return "VmHWM (clear_refs)"
        except OSError:
            return "getrusage delta (lower bound)"

    def reset(self) -> float:
        """Start a measurement; return the memory in use now (MiB): the base the peak is compared with."""
        trim_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the peak to the current RSS
            return status_kb("VmRSS") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        """Peak memory (MiB) since :meth:`reset`, including what was in use at the reset."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method.startswith("VmHWM"):
            return status_kb("VmHWM") / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def measure(self, fn: Callable[[], object]) -> float:
        """Run ``fn`` once; return the peak memory it added above what was in use before, in MiB."""
        base = self.reset()
        fn()
        return self.peak() - base


def log_plot(path, series, dense: float, xlabel: str, ylabel: str, title: str, logx: bool = False) -> bool:
    """One figure of perplexity curves on a log y axis with the dense model as a grey line; False without matplotlib.

    Args:
        path: the PNG to write.
        series: ``[(label, xs, ys, matplotlib style)]``.
        dense: the dense model's value (horizontal line).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys, style in series:
        ax.plot(xs, ys, style, label=label)
    ax.axhline(dense, color="grey", lw=0.8, label="dense")
    ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

"""Timing and peak-memory measurement shared by the kernel benchmarks (not a benchmark itself)."""

from __future__ import annotations

import datetime
import itertools
import platform
import statistics
import time

import torch

from qtulu.errors import QtuluError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise QtuluError("--device cuda: this machine has no CUDA device; use --device cpu", 2)
    return torch.device(name)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def machine_line(device: torch.device) -> str:
    """One line naming the machine, versions and date, for the results table."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    today = datetime.date.today().isoformat()
    return f"{where}; torch {torch.__version__}, triton {_triton_version()}; {today}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds after `warmup` untimed calls (autotuning, compiling)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory that `fn()` allocates above what was allocated before it (inputs excluded).

    CUDA: the caching allocator's peak statistics. CPU: every allocation and free the CPU allocator
    reports to the profiler (profile_memory=True), summed in time order: a real measurement of tensor
    memory, not a formula.
    """
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type().name == "CPU"
    )
    return max([0, *itertools.accumulate(nbytes for _, nbytes in events)])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)

"""Timing, device and report helpers shared by the kernel benchmarks (peak memory: qtulu.model.memory)."""

from __future__ import annotations

import datetime
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


def add_run_args(parser) -> None:
    """The options every kernel benchmark shares: where it runs, how often, which seed."""
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--repeats", type=int, help="timed runs per method (default 20 on GPU, 3 on CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)


def setup_run(args) -> tuple[torch.device, int]:
    """The device and the number of timed repeats for parsed `add_run_args` options."""
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    return device, args.repeats or (20 if device.type == "cuda" else 3)


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


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def failure(exc: Exception) -> str:
    """A table cell for a contender that failed (an installed Liger that errors, a torch without
    varlen GQA): reported in its row, never fatal to the table."""
    first_line = str(exc).splitlines()[0][:80] if str(exc) else ""
    return f"n/a: {type(exc).__name__}: {first_line}"

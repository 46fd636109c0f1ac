"""CPU training runs under mimalloc instead of glibc's malloc (Linux, `launch.cpu_allocator`).

PyTorch has no caching allocator on the CPU: every activation is a malloc and a free. With glibc,
each time a large mmapped chunk is freed the mmap threshold RISES (up to 32 MiB on 64-bit), so after
the first micro-batches the activations (hundreds of 1-30 MiB tensors) come from the heap, where
freed chunks stay in the process and fragment: `135m` at 4 rows of 512 tokens holds ~2.4 GB of
saved activations but peaks at ~9.7 GB resident. Fixing the threshold returns the memory but makes
every new tensor pay page faults (~0.6-0.7x the speed). mimalloc reuses freed pages at once, and is
told to keep them (no page faults from one micro-batch to the next): ~4 GB peak at glibc's speed or
better (docs/benchmarks.md, "Training").

An allocator has to be in place before the process allocates anything, so `qtulu train` started
from the command line re-executes itself once with mimalloc in LD_PRELOAD (what PyTorch's own CPU
launcher, torch.backends.xeon.run_cpu, does with jemalloc/tcmalloc). The library comes from the
`cmeel-mimalloc` wheel, a dependency on Linux; without it the run uses glibc and says so.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

PRELOAD = "LD_PRELOAD"
# set in the re-executed process: never re-execute twice, whatever happened to LD_PRELOAD
REEXEC_MARK = "QTULU_ALLOCATOR_REEXEC"
# how long (ms) mimalloc keeps freed pages before returning them to the OS; -1: never
PURGE_DELAY = "MIMALLOC_PURGE_DELAY"


def mimalloc_library() -> Path | None:
    """The shared library of the installed cmeel-mimalloc wheel, or None (not installed, not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name.startswith("libmimalloc.so"):
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
    return None


def mimalloc_loaded() -> bool:
    """Whether mimalloc is mapped into this process (it then serves every malloc)."""
    try:
        return "libmimalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def no_gpu_visible() -> bool:
    """A cheap guess, before torch is imported, that `launch.device auto` will pick the CPU."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return True
    return not Path("/dev/nvidiactl").exists()


def reexec_under_mimalloc() -> str | None:
    """Replace this process by the same command with mimalloc preloaded; returns only when it does
    not, with the reason (None when mimalloc is already there)."""
    if mimalloc_loaded():
        return None
    if os.environ.get(REEXEC_MARK):
        return "mimalloc was preloaded but did not load"
    library = mimalloc_library()
    if library is None:
        return "mimalloc is not installed (pip install cmeel-mimalloc)"
    env = dict(os.environ)
    env[PRELOAD] = ":".join(p for p in [str(library), env.get(PRELOAD, "")] if p)
    env[REEXEC_MARK] = "1"
    # mimalloc returns pages that stayed free for 10 ms to the OS, and a training step frees and
    # re-allocates its activations within seconds: every micro-batch then page-faults its ~250 MB of
    # activations back in (64k faults, ~1.4 s of kernel time per 135m micro-batch). Never purging
    # costs ~2% more peak RSS: the freed pages are the ones the next micro-batch takes again.
    env.setdefault(PURGE_DELAY, "-1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
    return "exec failed"  # not reached: execve either replaces the process or raises


def allocator_note(wanted: str) -> str:
    """For the start-up summary: which malloc this process runs with, and why when it is not `wanted`."""
    if mimalloc_loaded():
        return "mimalloc"
    if wanted == "glibc":
        return "glibc malloc (launch.cpu_allocator glibc)"
    if mimalloc_library() is None:
        return "glibc malloc (mimalloc is not installed: pip install cmeel-mimalloc for ~2.5x less peak memory)"
    return "glibc malloc (mimalloc is preloaded only when `qtulu train` starts from the command line)"

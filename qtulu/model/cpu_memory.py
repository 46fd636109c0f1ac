"""Hand freed tensor memory back to the OS when training on a CPU (glibc only).

Opt-in with `--launch.cpu_lean_memory true`. glibc serves a large allocation with mmap and returns it
with munmap, but each time a large mmapped chunk is freed it RAISES its threshold (up to 32 MiB on
64-bit), so after the first few steps the activations of a CPU training step (hundreds of 1-30 MiB
tensors) come from the heap, where freed chunks stay in the process and fragment. Fixing the
threshold with mallopt (what the MALLOC_MMAP_THRESHOLD_ environment variable does, but from inside
the process) sends every such tensor through mmap/munmap: the memory leaves the process when the
tensor dies, and every new tensor pays page faults for fresh pages. Measured on `qtulu bench train`
(135m, 4 rows of 512 tokens per micro-batch, 2 cores): peak resident memory 9.2 -> 4.4 GB, speed
164 -> 100 real tokens/s (docs/benchmarks.md), hence a choice, not the default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, kept fixed


def use_fixed_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold; True when it took effect (False off glibc, e.g. macOS or musl)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1

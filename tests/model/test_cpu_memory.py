"""CPU training runs under mimalloc (qtulu.model.cpu_memory): found, preloaded, never re-executed twice."""

import os
import subprocess
import sys

import pytest

from qtulu.model import cpu_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")

REEXEC = """
import sys
from qtulu.model.cpu_memory import mimalloc_loaded, reexec_under_mimalloc
print("loaded" if mimalloc_loaded() else "not loaded", sys.argv[1:], flush=True)
print(reexec_under_mimalloc())
"""


def run(*args: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (cpu_memory.PRELOAD, cpu_memory.REEXEC_MARK)}
    out = subprocess.run([sys.executable, "-c", REEXEC, *args], capture_output=True, text=True, timeout=60,
                         env={**clean, **env}, check=True)
    return out.stdout.splitlines()


def test_the_wheel_ships_the_library():
    library = cpu_memory.mimalloc_library()
    assert library is not None and library.is_file() and library.name.startswith("libmimalloc.so")


def test_reexecutes_once_with_mimalloc_and_the_same_arguments():
    # first process: not loaded -> execve; the second (same pid, same argv) has it and returns None
    assert run("--flag", "x y") == ["not loaded ['--flag', 'x y']", "loaded ['--flag', 'x y']", "None"]


def test_a_marked_process_without_mimalloc_does_not_loop():
    # LD_PRELOAD stripped by something between the two execs: say why, keep running on glibc
    assert run(**{cpu_memory.REEXEC_MARK: "1"}) == ["not loaded []", "mimalloc was preloaded but did not load"]


def test_without_the_wheel_the_run_says_how_to_get_it(monkeypatch):
    monkeypatch.setattr(cpu_memory, "mimalloc_library", lambda: None)
    monkeypatch.delenv(cpu_memory.REEXEC_MARK, raising=False)
    assert not cpu_memory.mimalloc_loaded()
    assert cpu_memory.reexec_under_mimalloc() == "mimalloc is not installed (pip install cmeel-mimalloc)"


FAULTS = """
import resource, sys
import torch
from qtulu.model.cpu_memory import reexec_under_mimalloc
reexec_under_mimalloc()
x = torch.randn(1024, 512)
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [x]  # like activations: each saved until the round ends, then all freed
    for _ in range(20):
        kept.append(torch.nn.functional.silu(kept[-1] @ torch.ones(512, 1536)) @ torch.ones(1536, 512) / 1536)
    del kept
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults_of_one_round() for _ in range(4)])
"""


def test_under_mimalloc_repeated_rounds_reuse_their_pages_without_faults():
    # mimalloc's default returns pages idle for 10 ms to the OS: each round then faults them back in
    clean = {k: v for k, v in os.environ.items() if k not in (cpu_memory.PRELOAD, cpu_memory.REEXEC_MARK,
                                                               cpu_memory.PURGE_DELAY)}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, timeout=120, env=clean,
                         check=True)
    rounds = [int(n) for n in out.stdout.split()]
    assert max(rounds[1:]) < 100, f"minor page faults per round: {rounds}"

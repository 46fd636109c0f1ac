"""Side-by-side benchmarks, importable as qtulu.benchmarks so `qtulu bench NAME` works anywhere.

Each module here is one benchmark: its docstring's first line is its summary, and it defines
`main(argv: list[str]) -> int`. Results are written to docs/benchmarks.md by hand, with the
machine and date, from the output of one run.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from qtulu.errors import QtuluError


def _names() -> list[str]:
    """Benchmark modules: private ones (_measure: shared helpers) are not benchmarks."""
    return sorted(info.name for info in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not info.name.startswith("_"))


def available() -> dict[str, str]:
    found = {}
    for name in _names():
        module = importlib.import_module(f"{__name__}.{name}")
        found[name] = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    return found


def run(name: str, argv: list[str]) -> int:
    names = _names()
    if name not in names:
        raise QtuluError(f"qtulu bench: no benchmark named '{name}'; choose one of: {', '.join(names)}", 2)
    module = importlib.import_module(f"{__name__}.{name}")
    return module.main(argv) or 0

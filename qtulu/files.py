"""Writing folders so that a crash or an error never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building_dir(target: Path, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; when the block succeeds, move it into place in one
    rename. A failure removes the temporary folder and leaves any existing `target` untouched.

    replace=False (caches): if `target` appeared meanwhile (another process built the same thing),
    keep it and drop ours. replace=True: swap the old `target` out, then delete it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        yield tmp
        if not target.exists():
            tmp.rename(target)
        elif replace:
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op once it has been renamed

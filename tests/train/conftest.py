"""Running the real `qtulu train` on the micro preset, as a user would, in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

QTULU = str(Path(sys.executable).parent / "qtulu")


class Trainer:
    """`qtulu train --size micro --mix sample` with a shared data cache; extra flags per call."""

    def __init__(self, cache: Path):
        self.cache = cache

    def command(self, out: Path, *flags: str) -> list[str]:
        return [QTULU, "train", "--size", "micro", "--mix", "sample", "--output", str(out),
                "--data.cache_dir", str(self.cache), *flags]

    def env(self, interpret: bool = False, **extra) -> dict:
        env = {**os.environ, **extra}
        # the reference attention path unless a test asks for the Triton kernel under the interpreter
        env["TRITON_INTERPRET"] = "1" if interpret else "0"
        if "QTULU_FAULT" not in extra:
            env.pop("QTULU_FAULT", None)
        return env

    def run(self, out: Path, *flags: str, interpret: bool = False, timeout: int = 600, **env):
        return subprocess.run(self.command(out, *flags), capture_output=True, text=True, timeout=timeout,
                              env=self.env(interpret, **env))

    def start(self, out: Path, *flags: str, **env) -> subprocess.Popen:
        return subprocess.Popen(self.command(out, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=self.env(False, **env))


@pytest.fixture(scope="session")
def trainer(tmp_path_factory) -> Trainer:
    return Trainer(tmp_path_factory.mktemp("train-data"))


@pytest.fixture(scope="session")
def baseline(trainer, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run, checkpoint every 2 steps: the trajectory others must equal."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    result = trainer.run(out, "--max-steps", "6", "--checkpoint.save_every_steps", "2")
    assert result.returncode == 0, result.stderr
    return out

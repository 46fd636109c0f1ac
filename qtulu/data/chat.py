"""The TÜLU chat format, assistant-only labels from character offsets, and the saved chat template.

A conversation renders as `<|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>\\n...` (an optional
`<|system|>\\n{system}\\n` first, contents stripped, BOS first). Labels are -100 everywhere except
on assistant content and its EOS. We tokenize the whole text ONCE and mark a token trainable when
its character span overlaps an assistant span: linear in the conversation, and right for tokenizers
whose tokenization of a prefix differs from the same text inside the full conversation (the
reference re-tokenized every prefix; LLaMA's `<|user|>` starts with `▁<` at the start of a text but
`<` after a newline).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtulu.errors import QtuluError
from qtulu.files import building_dir

SYSTEM_HEADER = "<|system|>\n"
USER_HEADER = "<|user|>\n"
ASSISTANT_HEADER = "<|assistant|>\n"
HEADERS = {"system": SYSTEM_HEADER, "user": USER_HEADER, "assistant": ASSISTANT_HEADER}
IGNORE_INDEX = -100
DROP_NO_TRAINABLE = "no trainable token left after truncation"

# The same format as a Jinja chat template. {% generation %} marks what is trained, so
# apply_chat_template(..., return_assistant_tokens_mask=True) reproduces our labels.
TULU_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] | trim + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] | trim + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}"
    "{% generation %}{{ message['content'] | trim + eos_token }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def render(messages: list[dict], eos_token: str) -> tuple[str, list[tuple[int, int]]]:
    """The chat text (without BOS) and the character spans that are trained: each assistant
    content with its EOS string."""
    parts, spans, pos = [], [], 0
    for m in messages:
        content = m["content"].strip()
        header = HEADERS[m["role"]]
        if m["role"] == "assistant":
            start = pos + len(header)
            spans.append((start, start + len(content) + len(eos_token)))
            piece = header + content + eos_token + "\n"
        else:
            piece = header + content + "\n"
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans


def labels_from_offsets(ids: np.ndarray, offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """labels[i] = ids[i] if token i's character span overlaps a trained span, else -100."""
    span_starts = np.fromiter((s for s, _ in spans), np.int64, len(spans))
    span_ends = np.fromiter((e for _, e in spans), np.int64, len(spans))
    tok_starts, tok_ends = offsets[:, 0], offsets[:, 1]
    # The first span that ends after the token starts; the token overlaps it if it starts before
    # the token ends (spans are sorted and disjoint).
    k = np.searchsorted(span_ends, tok_starts, side="right")
    inside = k < len(spans)
    inside[inside] = span_starts[k[inside]] < np.maximum(tok_ends[inside], tok_starts[inside] + 1)
    return np.where(inside, ids, IGNORE_INDEX).astype(np.int32)


def encoding_labels(enc, ids: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """labels_from_offsets for a tokenizers.Encoding, asking only for the tokens at the span ends.

    Offsets are monotone, so the tokens overlapping [s, e) run from the token holding character s
    to the one holding e - 1. Building the full offsets list costs more than the tokenization's
    tail; when a span end is not covered by a token (a character the normalizer removed), fall
    back to the full offsets."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int32)
    for s, e in spans:
        first, last = enc.char_to_token(s), enc.char_to_token(e - 1)
        if first is None or last is None:
            return labels_from_offsets(ids, np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2), spans)
        labels[first : last + 1] = ids[first : last + 1]
    return labels


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, -100 where masked, aligned with input_ids (unshifted)
    truncated: bool


class ChatTokenizer:
    """Renders and tokenizes conversations in batches with a fast (Rust) tokenizer."""

    def __init__(self, tokenizer, max_seq_len: int):
        if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
            raise QtuluError(
                f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: needs a fast tokenizer "
                "(tokenizer.json or a convertible tokenizer.model); labels come from its offsets"
            )
        if tokenizer.eos_token is None:
            raise QtuluError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; the chat format needs one")
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.eos_token = tokenizer.eos_token
        self.bos_id = tokenizer.bos_token_id
        self.max_seq_len = max_seq_len

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def __call__(self, conversations: list[list[dict]]) -> list[Tokenized | str]:
        """One Tokenized per conversation, or the reason it was dropped."""
        rendered = [render(msgs, self.eos_token) for msgs in conversations]
        encodings = self.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        out: list[Tokenized | str] = []
        for (_, spans), enc in zip(rendered, encodings, strict=True):
            ids = np.asarray(enc.ids, dtype=np.int32)
            labels = encoding_labels(enc, ids, spans)
            if self.bos_id is not None:
                ids = np.concatenate([np.int32([self.bos_id]), ids])
                labels = np.concatenate([np.int32([IGNORE_INDEX]), labels])
            truncated = len(ids) > self.max_seq_len
            ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
            if not (labels != IGNORE_INDEX).any():
                out.append(DROP_NO_TRAINABLE)
            else:
                out.append(Tokenized(ids, labels, truncated))
        return out


def save_chat_tokenizer(tokenizer, folder: Path) -> Path:
    """Save the tokenizer with the TÜLU chat template and its special tokens, so inference uses
    exactly the training format. No token is added (no embedding resize): a missing pad token
    becomes the unknown token, else EOS (padding is masked out anyway). Written atomically."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TULU_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    with building_dir(Path(folder), replace=True) as tmp:
        tok.save_pretrained(tmp)
    return Path(folder)

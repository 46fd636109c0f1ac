"""The TÜLU chat format, assistant-only labels from character offsets, and the saved chat template.

A conversation renders as `<|user|>\\n{user}\\n<|assistant|>\\n{assistant}</s>\\n<|user|>\\n...{assistant}</s>`
(an optional `<|system|>\\n{system}\\n` first, contents stripped, no newline after the last turn: the
reference stripped the whole text). BOS goes first as the model family expects it (`bos`):

- `auto`: what the tokenizer adds by itself, and `<s>` for the SentencePiece LLaMA family (the 2023
  LlamaTokenizer added it; today's converted tokenizer does not), but never a BOS that is a chat
  marker (SmolLM2 declares `<|im_start|>`, which the TÜLU format has no place for);
- `always`: the tokenizer's BOS token; `never`: none.

Labels (`labels`) are -100 everywhere except on the trained text:

- `tulu` (default): assistant content and its EOS, the TÜLU definition;
- `reference`: also the newline after every non-final EOS, as open-instruct's
  `encode_with_messages_format` (2023) trained it: its mask of the next user turn starts after `</s>\\n`.

We tokenize the whole text ONCE and mark a token trainable when its character span overlaps a
trained span: linear in the conversation, and right for tokenizers whose tokenization of a prefix
differs from the same text inside the full conversation (the reference re-tokenized every prefix).

Long conversations (ShareGPT) are split into chunks of whole turn pairs that fit the max length, with
the boundaries read from that same tokenization: text between two special tokens is tokenized on its
own, so a chunk's tokens are the full conversation's from its first pair's EOS on, after the first
pair's own tokens (the only text tokenized a second time, and not even that for byte-level BPEs).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
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
LABELS = ("tulu", "reference")
BOS_MODES = ("auto", "always", "never")
# BOS tokens that are really turn markers of another chat format: never added by `auto`.
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<start_of_turn>", "<|start_header_id|>")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def chat_template(bos: bool, labels: str = "tulu") -> str:
    """The format as a Jinja chat template that renders exactly our training text. {% generation %}
    marks what is trained, so apply_chat_template(..., return_assistant_tokens_mask=True) gives our
    labels; with add_generation_prompt the last turn's newline and `<|assistant|>\\n` follow."""
    after_eos = "{% if not loop.last %}{{ '\\n' }}{% endif %}" if labels == "reference" else ""
    newline = "{% if not loop.last or add_generation_prompt %}{{ '\\n' }}{% endif %}"
    tail = (
        "{% if loop.last and add_generation_prompt %}{{ '\\n' }}{% endif %}" if labels == "reference" else newline
    )
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] | trim }}" + newline
        + "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] | trim }}" + newline
        + "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' }}"
        "{% generation %}{{ message['content'] | trim + eos_token }}" + after_eos + "{% endgeneration %}" + tail
        + "{% else %}{{ raise_exception('unknown role ' + message['role']) }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    )


# The default template (LLaMA: BOS, TÜLU labels).
TULU_CHAT_TEMPLATE = chat_template(bos=True)


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise QtuluError(f"{flag}: unknown value {value!r}; choose one of {', '.join(choices)}", 2)
    return value


def render_turns(
    messages: list[dict], eos_token: str, labels: str = "tulu"
) -> tuple[str, list[tuple[int, int]], list[int]]:
    """(text without BOS, trained character spans, where each message starts). A span is an
    assistant content with its EOS string, and with `labels="reference"` the newline after a
    non-final EOS too. No newline after the last message."""
    parts, spans, starts, pos = [], [], [], 0
    last = len(messages) - 1
    for i, m in enumerate(messages):
        content = m["content"].strip()
        header = HEADERS[m["role"]]
        newline = "\n" if i < last else ""
        starts.append(pos)
        if m["role"] == "assistant":
            start = pos + len(header)
            trained = len(content) + len(eos_token) + (len(newline) if labels == "reference" else 0)
            spans.append((start, start + trained))
            piece = header + content + eos_token + newline
        else:
            piece = header + content + newline
        parts.append(piece)
        pos += len(piece)
    text = "".join(parts)
    stripped = text.rstrip()  # the reference stripped the whole text (contents are non-empty)
    if len(stripped) < len(text):
        text, spans = stripped, [(s, min(e, len(stripped))) for s, e in spans]
    return text, spans, starts


def render(messages: list[dict], eos_token: str, labels: str = "tulu") -> tuple[str, list[tuple[int, int]]]:
    """The chat text (without BOS) and the character spans that are trained."""
    text, spans, _ = render_turns(messages, eos_token, labels)
    return text, spans


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
        # several tokens can hold the same character (LLaMA: `▁` and `<0x0A>` both span a newline
        # after `</s>`); char_to_token names the first
        while last + 1 < len(ids) and (nxt := enc.token_to_chars(last + 1)) is not None and nxt[0] < e:
            last += 1
        labels[first : last + 1] = ids[first : last + 1]
    return labels


def adds_bos_by_itself(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS first when asked for special tokens (its own convention)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return False
    if getattr(tokenizer, "add_bos_token", None) is True:
        return True
    ids = tokenizer.backend_tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def is_chat_marker(token: str, template: str | None) -> bool:
    """A BOS that another chat format uses to open every turn (`<|im_start|>user`), not a
    sequence start: a known marker, or one the tokenizer's own chat template puts before a role."""
    if token in CHAT_MARKERS:
        return True
    if not template or token not in template:
        return False
    role = r"\s*(?:'\s*\+\s*)?(?:message|system|user|assistant)"
    return re.search(re.escape(token) + role, template) is not None


def resolve_bos(tokenizer, mode: str = "auto") -> int | None:
    """The BOS id to put first, or None (see the module docstring)."""
    check_choice("data.bos", mode, BOS_MODES)
    bos_id = tokenizer.bos_token_id
    if mode == "never":
        return None
    if mode == "always":
        if bos_id is None:
            raise QtuluError(
                f"{tokenizer.name_or_path}: --bos always, but the tokenizer declares no BOS token; use auto or never", 2
            )
        return bos_id
    if bos_id is None or is_chat_marker(tokenizer.bos_token, getattr(tokenizer, "chat_template", None)):
        return None
    return bos_id if adds_bos_by_itself(tokenizer) or tokenizer.bos_token == "<s>" else None


def _splits_at(tokenizer, token: str) -> bool:
    """Whether `token` is an added special token: the text on each side of it is tokenized apart."""
    backend = tokenizer.backend_tokenizer
    added = backend.get_added_tokens_decoder()
    token_id = backend.token_to_id(token)
    return token_id in added and added[token_id].content == token and added[token_id].special


def _fresh_after_newline(tokenizer) -> bool:
    """Whether text that follows a newline is tokenized the same with or without the text before it:
    no normalizer, and a byte-level pre-tokenizer (GPT-2 regex, no prefix space; digits split
    alone at most), whose pieces start anew at `<` after whitespace. Then a chunk's first pair needs
    no second tokenization (SmolLM2); LLaMA's Metaspace (`▁<` at the start of a text) does."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec.get("normalizer") is not None:
        return False
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def fresh(p: dict) -> bool:
        if p.get("type") == "Digits":
            return True
        return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", True)

    return bool(parts) and any(p.get("type") == "ByteLevel" for p in parts) and all(fresh(p) for p in parts)


@dataclass
class Tokenized:
    input_ids: np.ndarray  # int32
    labels: np.ndarray  # int32, -100 where masked, aligned with input_ids (unshifted)
    truncated: bool


class ChatTokenizer:
    """Renders and tokenizes conversations in batches with a fast (Rust) tokenizer: a transformers
    fast tokenizer or qtulu's TextTokenizer (tokenizer.json read directly, no torch)."""

    def __init__(self, tokenizer, max_seq_len: int, labels: str = "tulu", bos: str = "auto"):
        if not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
            raise QtuluError(
                f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: needs a fast tokenizer "
                "(tokenizer.json or a convertible tokenizer.model); labels come from its offsets"
            )
        if tokenizer.eos_token is None:
            raise QtuluError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token; the chat format needs one")
        self.labels = check_choice("data.labels", labels, LABELS)
        self.bos = bos
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.eos_token = tokenizer.eos_token
        self.bos_id = resolve_bos(tokenizer, bos)
        self.max_seq_len = max_seq_len
        self.eos_splits = _splits_at(tokenizer, self.eos_token)
        self.reuse_heads = _fresh_after_newline(tokenizer)

    @property
    def template(self) -> str:
        return chat_template(self.bos_id is not None, self.labels)

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(e.ids) for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        return render(messages, self.eos_token, self.labels)

    def _finish(self, ids: np.ndarray, labels: np.ndarray) -> Tokenized | str:
        """BOS first, truncation from the right, and the drop of what has nothing left to train."""
        if self.bos_id is not None:
            ids = np.concatenate([np.int32([self.bos_id]), ids])
            labels = np.concatenate([np.int32([IGNORE_INDEX]), labels])
        truncated = len(ids) > self.max_seq_len
        ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
        if not (labels != IGNORE_INDEX).any():
            return DROP_NO_TRAINABLE
        return Tokenized(ids, labels, truncated)

    def __call__(self, conversations: list[list[dict]]) -> list[Tokenized | str]:
        """One Tokenized per conversation, or the reason it was dropped."""
        rendered = [self.render(msgs) for msgs in conversations]
        encodings = self.backend.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        out: list[Tokenized | str] = []
        for (_, spans), enc in zip(rendered, encodings, strict=True):
            ids = np.asarray(enc.ids, dtype=np.int32)
            out.append(self._finish(ids, encoding_labels(enc, ids, spans)))
        return out

    def split(self, conversations: list[list[dict]]) -> list[list[tuple[list[dict], Tokenized | str]]]:
        """Each conversation (user/assistant pairs) cut into chunks of whole pairs whose tokens, BOS
        included, fit max_seq_len, with each chunk's tokens and labels: exactly what rendering and
        tokenizing the chunk on its own gives. A pair longer than that is a chunk by itself
        (truncated, or dropped when nothing trainable is left). One tokenization of each
        conversation; a chunk that starts later re-tokenizes only its first pair."""
        rendered = [render_turns(msgs, self.eos_token, self.labels) for msgs in conversations]
        encodings = self.backend.encode_batch([text for text, _, _ in rendered], add_special_tokens=False)
        out = []
        for msgs, (text, spans, starts), enc in zip(conversations, rendered, encodings, strict=True):
            if len(msgs) % 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(msgs)):
                raise QtuluError("split: expects user/assistant turn pairs (a converter bug)")
            out.append(self._split_one(msgs, text, spans, starts, enc))
        return out

    def _split_one(self, msgs, text, spans, starts, enc) -> list[tuple[list[dict], Tokenized | str]]:
        ids = np.asarray(enc.ids, dtype=np.int32)
        labels = encoding_labels(enc, ids, spans)
        bos = int(self.bos_id is not None)
        if bos + len(ids) <= self.max_seq_len or len(msgs) == 2:
            return [(msgs, self._finish(ids, labels))]
        pairs = len(msgs) // 2
        eos_len = len(self.eos_token)
        # Pair p is text[first_char[p]:end_char[p]]: from its <|user|> to its EOS.
        first_char = [starts[2 * p] for p in range(pairs)]
        end_char = [starts[2 * p + 1] + len(ASSISTANT_HEADER) + len(msgs[2 * p + 1]["content"].strip()) + eos_len
                    for p in range(pairs)]  # fmt: skip
        first_tok = [enc.char_to_token(c) for c in first_char]
        last_tok = [enc.char_to_token(c - 1) for c in end_char]
        if not self.eos_splits or None in first_tok or None in last_tok:
            return self._split_retokenize(msgs)
        end_tok = [t + 1 for t in last_tok]
        chunks, i = [], 0
        while i < pairs:
            if i == 0 or self.reuse_heads:
                head_ids, head_labels = ids[first_tok[i] : end_tok[i]], labels[first_tok[i] : end_tok[i]]
            else:  # the first pair on its own: the only text tokenized twice
                a, b = first_char[i], end_char[i]
                head = self.backend.encode(text[a:b], add_special_tokens=False)
                head_ids = np.asarray(head.ids, dtype=np.int32)
                a_span = a + len(USER_HEADER) + len(msgs[2 * i]["content"].strip()) + 1 + len(ASSISTANT_HEADER)
                head_labels = encoding_labels(head, head_ids, [(a_span - a, b - a)])
            j, size = i, bos + len(head_ids)
            while j + 1 < pairs and size + end_tok[j + 1] - end_tok[j] <= self.max_seq_len:
                size += end_tok[j + 1] - end_tok[j]
                j += 1
            tail = slice(end_tok[i], end_tok[j])
            chunk_ids = np.concatenate([head_ids, ids[tail]])
            chunk_labels = np.concatenate([head_labels, labels[tail]])
            chunks.append((msgs[2 * i : 2 * j + 2], self._finish(chunk_ids, chunk_labels)))
            i = j + 1
        return chunks

    def _split_retokenize(self, msgs) -> list[tuple[list[dict], Tokenized | str]]:
        """For a tokenizer whose EOS does not split the text (or offsets that miss a boundary): pair
        sizes counted on their own, then every chunk tokenized on its own."""
        sizes = self.count_tokens([self.render(msgs[k : k + 2])[0] for k in range(0, len(msgs), 2)])
        groups, current, used = [], [], int(self.bos_id is not None)
        for p, size in enumerate(sizes):
            if current and used + size > self.max_seq_len:
                groups.append(current)
                current, used = [], int(self.bos_id is not None)
            current.append(p)
            used += size
        groups.append(current)
        chunks = [msgs[2 * g[0] : 2 * g[-1] + 2] for g in groups]
        return list(zip(chunks, self(chunks), strict=True))


def save_chat_tokenizer(tokenizer, folder: Path, template: str = TULU_CHAT_TEMPLATE) -> Path:
    """Save the tokenizer with the TÜLU chat template (the one that renders exactly the training
    text: ChatTokenizer.template) and its special tokens, so inference uses the training format.
    No token is added (no embedding resize): a missing pad token becomes the unknown token, else
    EOS (padding is masked out anyway). Written atomically. A TextTokenizer's files are copied
    and its tokenizer_config.json rewritten, so saving does not import transformers."""
    folder = Path(folder)
    source = getattr(tokenizer, "folder", None)
    with building_dir(folder, replace=True) as tmp:
        if source is not None and (Path(source) / "tokenizer.json").is_file():
            for name in TOKENIZER_FILES:
                if (Path(source) / name).is_file():
                    shutil.copyfile(Path(source) / name, tmp / name)
            config_path = tmp / "tokenizer_config.json"
            config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
            config["chat_template"] = template
            if tokenizer.pad_token is None:
                config["pad_token"] = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
            for name in ("bos_token", "eos_token", "unk_token"):
                if getattr(tokenizer, name) is not None:
                    config.setdefault(name, getattr(tokenizer, name))
            config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            tok = copy.deepcopy(tokenizer)
            tok.chat_template = template
            if tok.pad_token is None:
                tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
            tok.save_pretrained(tmp)
    return folder

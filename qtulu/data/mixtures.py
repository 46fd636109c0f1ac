"""Mixtures: which sources, how many examples of each, sampled and shuffled with a seed.

Each source is converted once into a messages JSONL in a work folder while we remember every
line's byte offset; sampling and shuffling then work on (source, offset) pairs, so a 490k-example
mix needs a few MB of memory, not the mix itself. Tokens a converter made anyway (ShareGPT, whose
chunk boundaries come from the tokenization the labels use) go to flat binary files beside the
JSONL, and come back with their records, so nothing is tokenized twice.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from qtulu.config import BUNDLED_SAMPLE, MixConfig, parse_mix
from qtulu.data.chat import DROP_NO_TRAINABLE, IGNORE_INDEX, Tokenized
from qtulu.data.records import Report
from qtulu.data.sources import (
    TOKENS_KEY,
    Context,
    convert,
    default_hub_id,
    hub_folder,
    make_context,
    source_folder,
)
from qtulu.errors import ConfigError, QtuluError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"


def load_mix(spec: str) -> MixConfig:
    """A MixConfig from a preset (human, human+gpt, sample, a source), a YAML file or `dolly:500,sharegpt`."""
    tree, origin = parse_mix(spec)
    try:
        return MixConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(
            [
                f"--mix {spec}: {'.'.join(map(str, err['loc'])) or 'mix'}: "
                f"{err['msg'].removeprefix('Value error, ')} (from {origin})"
                for err in e.errors()
            ]
        ) from None


def resolve_sources_root(mix: MixConfig, sources_dir: str | Path | None) -> Path | None:
    """The folder holding one sub-folder per source; None means: fetch each source from the hub."""
    chosen = sources_dir if sources_dir is not None else mix.sources_dir
    if chosen is None:
        return None
    if str(chosen) == BUNDLED_SAMPLE:
        return SAMPLE_DIR
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise QtuluError(
            f"{root}: sources folder does not exist; give a folder with one sub-folder per source "
            f"(or {BUNDLED_SAMPLE} for the bundled sample)"
        )
    return root


def source_inputs(source: str, root: Path | None) -> list[Path]:
    return [source_folder(root, source)] if root is not None else [hub_folder(default_hub_id(source))]


@dataclass
class Converted:
    """One source converted: its JSONL's line offsets, and the tokens its converter made (if any):
    per line the start in the flat files and the length (-1: no tokens; -2: dropped, nothing
    trainable), and whether it was truncated."""

    path: Path
    offsets: np.ndarray  # int64 byte offset of every line
    token_start: np.ndarray | None = None  # int64
    token_len: np.ndarray | None = None  # int64
    truncated: np.ndarray | None = None  # bool

    @property
    def ids_path(self) -> Path:
        return self.path.with_suffix(".ids.bin")

    @property
    def mask_path(self) -> Path:
        return self.path.with_suffix(".mask.bin")


@dataclass
class Mixture:
    sources: list[str]
    files: list[Path]  # converted messages JSONL per source
    pick_source: np.ndarray  # the mixture's examples in shuffled order: source index...
    pick_offset: np.ndarray  # ...and byte offset of the example in that source's file
    counts: dict[str, dict] = field(default_factory=dict)  # source -> requested / available / used
    warnings: list[str] = field(default_factory=list)
    pick_line: np.ndarray | None = None  # ...and its line number there
    converted: list[Converted] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pick_source)

    def __iter__(self) -> Iterator[dict]:
        """The records in mixture order; one whose converter made its tokens has them under
        TOKENS_KEY (a Tokenized, or the reason it was dropped)."""
        lines = self.pick_line if self.pick_line is not None else np.full(len(self), -1)
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(open(path, "rb")) for path in self.files]
            tokens = [_token_files(c) for c in self.converted] if self.converted else [None] * len(self.files)
            for s, off, line in zip(self.pick_source.tolist(), self.pick_offset.tolist(), lines.tolist(), strict=True):
                f = handles[s]
                f.seek(off)
                rec = json.loads(f.readline())
                if tokens[s] is not None and line >= 0:
                    got = _stored_tokens(self.converted[s], tokens[s], line)
                    if got is not None:
                        rec[TOKENS_KEY] = got
                yield rec


def _token_files(c: Converted):
    if c.token_start is None:
        return None
    size = c.ids_path.stat().st_size
    if size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.uint8)
    return np.memmap(c.ids_path, dtype=np.int32, mode="r"), np.memmap(c.mask_path, dtype=np.uint8, mode="r")


def _stored_tokens(c: Converted, files, line: int) -> Tokenized | str | None:
    n = int(c.token_len[line])
    if n == -1:
        return None
    if n == -2:
        return DROP_NO_TRAINABLE
    a = int(c.token_start[line])
    ids = np.array(files[0][a : a + n], dtype=np.int32)
    labels = np.where(files[1][a : a + n].astype(bool), ids, IGNORE_INDEX).astype(np.int32)
    return Tokenized(ids, labels, bool(c.truncated[line]))


def build_mixture(
    mix: MixConfig,
    root: Path | None,
    workdir: Path,
    seed: int,
    report: Report,
    max_seq_len: int | None = None,
    count_tokens=None,
    log=None,
    chat_tokenizer=None,
) -> Mixture:
    """Convert every source of the mix, sample its count (all if it has fewer, with a warning) and
    shuffle the union, all seeded."""
    workdir.mkdir(parents=True, exist_ok=True)
    sources, files, picks_s, picks_o, picks_l, counts, warnings, done = [], [], [], [], [], {}, [], []
    for index, (source, wanted) in enumerate(mix.sources.items()):
        inputs = source_inputs(source, root)
        ctx = make_context(
            source, seed, report, max_seq_len=max_seq_len, count_tokens=count_tokens, chat_tokenizer=chat_tokenizer
        )
        path = workdir / f"{source}.jsonl"
        converted = _write_converted(source, inputs, ctx, path)
        offsets = converted.offsets
        available = len(offsets)
        if wanted is not None and wanted > available:
            warnings.append(f"{source}: the mix asks for {wanted} examples but {available} are available; using all")
        rng = np.random.default_rng([seed, index])
        lines = (
            np.arange(available)
            if wanted is None or wanted >= available
            else np.sort(rng.choice(available, size=wanted, replace=False))
        )
        chosen = offsets[lines]
        counts[source] = {"requested": wanted, "available": available, "used": len(chosen)}
        if log:
            log(f"{source}: {available} examples converted, {len(chosen)} used")
        sources.append(source)
        files.append(path)
        picks_s.append(np.full(len(chosen), index, dtype=np.int32))
        picks_o.append(chosen)
        picks_l.append(lines.astype(np.int64))
        done.append(converted)
    pick_source = np.concatenate(picks_s) if picks_s else np.zeros(0, np.int32)
    pick_offset = np.concatenate(picks_o) if picks_o else np.zeros(0, np.int64)
    pick_line = np.concatenate(picks_l) if picks_l else np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(len(pick_source))
    return Mixture(
        sources, files, pick_source[order], pick_offset[order], counts, warnings, pick_line[order], done
    )


def _write_converted(source: str, inputs: list[Path], ctx: Context, path: Path) -> Converted:
    """The messages JSONL of one source, and the tokens its converter made, in flat files beside it."""
    out = Converted(path, np.zeros(0, np.int64))
    offsets, starts, lengths, truncated, pos, tok_pos = [], [], [], [], 0, 0
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(open(path, "wb"))
        ids_f = mask_f = None
        for rec in convert(source, inputs, ctx):
            tokens = rec.pop(TOKENS_KEY, None)
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            offsets.append(pos)
            f.write(line)
            pos += len(line)
            if tokens is not None and ids_f is None:
                ids_f = stack.enter_context(open(out.ids_path, "wb"))
                mask_f = stack.enter_context(open(out.mask_path, "wb"))
                before = len(offsets) - 1  # records before the first with tokens have none
                starts, lengths, truncated = [0] * before, [-1] * before, [False] * before
            if ids_f is None:
                continue
            starts.append(tok_pos)
            truncated.append(bool(getattr(tokens, "truncated", False)))
            if tokens is None or isinstance(tokens, str):
                lengths.append(-1 if tokens is None else -2)
                continue
            ids_f.write(tokens.input_ids.astype(np.int32).tobytes())
            mask_f.write((tokens.labels != IGNORE_INDEX).astype(np.uint8).tobytes())
            lengths.append(len(tokens.input_ids))
            tok_pos += len(tokens.input_ids)
    out.offsets = np.asarray(offsets, dtype=np.int64)
    if lengths:
        out.token_start = np.asarray(starts, dtype=np.int64)
        out.token_len = np.asarray(lengths, dtype=np.int64)
        out.truncated = np.asarray(truncated, dtype=bool)
    return out

"""Mixtures: which sources, how many examples of each, sampled and shuffled with a seed.

Each source is converted once into a messages JSONL in a work folder while we remember every
line's byte offset; sampling and shuffling then work on (source, offset) pairs, so a 490k-example
mix needs a few MB of memory, not the mix itself.
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
from qtulu.data.records import Report
from qtulu.data.sources import Context, convert, default_hub_id, hub_folder, make_context, source_folder
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
class Mixture:
    sources: list[str]
    files: list[Path]  # converted messages JSONL per source
    pick_source: np.ndarray  # the mixture's examples in shuffled order: source index...
    pick_offset: np.ndarray  # ...and byte offset of the example in that source's file
    counts: dict[str, dict] = field(default_factory=dict)  # source -> requested / available / used
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pick_source)

    def __iter__(self) -> Iterator[dict]:
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(open(path, "rb")) for path in self.files]
            for s, off in zip(self.pick_source.tolist(), self.pick_offset.tolist(), strict=True):
                f = handles[s]
                f.seek(off)
                yield json.loads(f.readline())


def build_mixture(
    mix: MixConfig,
    root: Path | None,
    workdir: Path,
    seed: int,
    report: Report,
    max_seq_len: int | None = None,
    count_tokens=None,
    log=None,
) -> Mixture:
    """Convert every source of the mix, sample its count (all if it has fewer, with a warning) and
    shuffle the union, all seeded."""
    workdir.mkdir(parents=True, exist_ok=True)
    sources, files, picks_s, picks_o, counts, warnings = [], [], [], [], {}, []
    for index, (source, wanted) in enumerate(mix.sources.items()):
        inputs = source_inputs(source, root)
        ctx = make_context(source, seed, report, max_seq_len=max_seq_len, count_tokens=count_tokens)
        path = workdir / f"{source}.jsonl"
        offsets = _write_converted(source, inputs, ctx, path)
        available = len(offsets)
        if wanted is not None and wanted > available:
            warnings.append(f"{source}: the mix asks for {wanted} examples but {available} are available; using all")
        rng = np.random.default_rng([seed, index])
        chosen = (
            offsets
            if wanted is None or wanted >= available
            else offsets[np.sort(rng.choice(available, size=wanted, replace=False))]
        )
        counts[source] = {"requested": wanted, "available": available, "used": len(chosen)}
        if log:
            log(f"{source}: {available} examples converted, {len(chosen)} used")
        sources.append(source)
        files.append(path)
        picks_s.append(np.full(len(chosen), index, dtype=np.int32))
        picks_o.append(chosen)
    pick_source = np.concatenate(picks_s) if picks_s else np.zeros(0, np.int32)
    pick_offset = np.concatenate(picks_o) if picks_o else np.zeros(0, np.int64)
    order = np.random.default_rng(seed).permutation(len(pick_source))
    return Mixture(sources, files, pick_source[order], pick_offset[order], counts, warnings)


def _write_converted(source: str, inputs: list[Path], ctx: Context, path: Path) -> np.ndarray:
    offsets, pos = [], 0
    with open(path, "wb") as f:
        for rec in convert(source, inputs, ctx):
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    return np.asarray(offsets, dtype=np.int64)

"""Prepared datasets: tokenized, labelled, packed rows in parquet shards, cached by a fingerprint.

A dataset folder holds `shard-NNNNN.parquet` files (columns `input_ids`, `labels` as int32 lists,
labels unshifted and -100 where masked, and `seq_lens`, the document lengths of the row), the
tokenizer saved with the TÜLU chat template (`tokenizer/`), and `manifest.json` with the
fingerprint of everything that shaped it and the statistics. It is built in a hidden sibling folder
and renamed into place, so a failed or interrupted prepare leaves nothing behind.

Memory: converted examples live in JSONL files (offsets in memory), tokens in flat binary files
read through np.memmap; only document lengths are held for packing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtulu.config import MixConfig
from qtulu.data.chat import BOS_MODES, IGNORE_INDEX, LABELS, ChatTokenizer, check_choice, save_chat_tokenizer
from qtulu.data.mixtures import build_mixture, resolve_sources_root, source_inputs
from qtulu.data.packing import best_fit_decreasing, packing_efficiency, padded_fraction, split_into_rows
from qtulu.data.records import ON_ERROR, Report, data_files
from qtulu.data.sources import TOKENS_KEY
from qtulu.errors import QtuluError
from qtulu.files import building_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZE_BATCH = 256
SHARD_TOKENS = 1 << 22  # ~4M tokens per shard (~32 MB of int32 before compression)
PAD_BATCH = 8  # batch size for the padding-to-longest comparison in the stats
PACKINGS = ("bfd", "split", "padded")


# ---------------------------------------------------------------------------------------------
# Fingerprint: everything that shaped a prepared dataset


def _hash_file(path: Path, h) -> None:
    st = path.stat()
    h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the tokens: the tokenizer's pipeline and vocabulary and its special tokens. The
    same files give the same fingerprint whether transformers or qtulu's TextTokenizer loaded them
    (padding/truncation settings and the post-processor are left out: we never let the tokenizer
    add special tokens; the BOS we add is fingerprinted as data.bos's result)."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for key in ("truncation", "padding", "post_processor"):
            spec.pop(key, None)
        h.update(json.dumps(spec).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.bos_token, tokenizer.eos_token, tokenizer.bos_token_id, tokenizer.eos_token_id)).encode())
    return h.hexdigest()


def code_fingerprint() -> str:
    """The data code's own version: any change to how data is converted, labelled or packed."""
    h = hashlib.sha256(str(FORMAT_VERSION).encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name != "cli.py":
            h.update(path.read_bytes())
    return h.hexdigest()


def dataset_fingerprint(
    mix: MixConfig,
    root: Path | None,
    tokenizer,
    max_seq_len: int,
    seed: int,
    packing: str,
    on_error: str,
    labels: str = "tulu",
    bos: str = "auto",
    bos_id: int | None = None,
) -> tuple[str, dict]:
    """(hash, what went into it). Source files count by name, size, mtime and contents."""
    h = hashlib.blake2b(digest_size=16)
    inputs = {}
    for source in mix.sources:
        fh = hashlib.blake2b(digest_size=16)
        for folder in source_inputs(source, root):
            files = data_files(folder) if folder.is_dir() else [folder]
            split = folder / "splits" / "xlingual" / "train_tasks.txt"
            for path in files + ([split] if split.is_file() else []):
                fh.update(str(path.relative_to(folder) if folder.is_dir() else path.name).encode())
                _hash_file(path, fh)
        inputs[source] = fh.hexdigest()
    parts = {
        "format_version": FORMAT_VERSION,
        "mix": dict(sorted(mix.sources.items())),
        "source_files": inputs,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_seq_len": max_seq_len,
        "seed": seed,
        "packing": packing,
        "on_error": on_error,
        "labels": labels,
        "bos": bos,
        "bos_id": bos_id,
        "code": code_fingerprint(),
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    return h.hexdigest(), parts


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(folder: Path, manifest: dict | None) -> bool:
    return bool(manifest) and all((Path(folder) / s["file"]).is_file() for s in manifest.get("shards", []))


# ---------------------------------------------------------------------------------------------
# prepare


def prepare_dataset(
    mix: MixConfig,
    sources_dir: str | Path | None,
    tokenizer,
    max_seq_len: int,
    seed: int,
    output_dir: str | Path,
    packing: bool | str = True,
    on_error: str = "raise",
    log=None,
    force: bool = False,
    labels: str = "tulu",
    bos: str = "auto",
) -> Path:
    """Build (or reuse) the prepared dataset for this mix at `output_dir`; returns the folder.

    packing: True/"bfd" (best-fit decreasing, documents whole), "split" (documents cut across rows),
    False/"padded" (one document per row; the loader pads to the longest in a batch).
    labels: "tulu" (assistant content + EOS) or "reference" (also the newline after each non-final
    EOS, open-instruct's 2023 tokens); bos: "auto", "always" or "never" (qtulu.data.chat).
    tokenizer: a transformers fast tokenizer or a qtulu TextTokenizer.
    A folder whose manifest has the same fingerprint is reused unless `force`.
    """
    packing = {True: "bfd", False: "padded"}.get(packing, packing)
    if packing not in PACKINGS:
        raise QtuluError(f"packing: unknown mode {packing!r}; choose one of {', '.join(PACKINGS)}", 2)
    if on_error not in ON_ERROR:
        raise QtuluError(f"--on-error: unknown value {on_error!r}; choose raise or skip", 2)
    check_choice("--labels", labels, LABELS)
    check_choice("--bos", bos, BOS_MODES)
    output_dir = Path(output_dir).expanduser()
    log = log or (lambda msg: None)
    existing = read_manifest(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or (existing is None and any(output_dir.iterdir()))):
        raise QtuluError(f"{output_dir}: exists and is not a qtulu prepared dataset; choose a new or empty folder")
    root = resolve_sources_root(mix, sources_dir)
    chat_tok = ChatTokenizer(tokenizer, max_seq_len, labels=labels, bos=bos)
    fingerprint, parts = dataset_fingerprint(
        mix, root, tokenizer, max_seq_len, seed, packing, on_error, labels, bos, chat_tok.bos_id
    )
    reusable = existing and existing.get("fingerprint") == fingerprint and is_complete(output_dir, existing)
    if reusable and not force:
        log(f"reusing {output_dir} (same sources, mix, tokenizer, length, labels, BOS, seed and code)")
        return output_dir

    with building_dir(output_dir, replace=True) as tmp:
        manifest = _build(mix, root, chat_tok, max_seq_len, seed, packing, on_error, tmp, log)
        manifest.update(
            fingerprint=fingerprint,
            inputs=parts,
            mix_name=mix.name,
            sources_dir=str(root) if root else "hub",
            tokenizer_name=str(tokenizer.name_or_path),
            labels=labels,
            bos=bos,
            bos_token_id=chat_tok.bos_id,
        )
        save_chat_tokenizer(tokenizer, tmp / TOKENIZER_DIR, chat_tok.template)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return output_dir


def _build(mix, root, chat_tok: ChatTokenizer, max_seq_len, seed, packing, on_error, out: Path, log) -> dict:
    started = time.time()
    work = out / "work"
    report = Report(on_error=on_error)
    mixture = build_mixture(
        mix, root, work, seed, report, max_seq_len=max_seq_len, count_tokens=chat_tok.count_tokens, log=log,
        chat_tokenizer=chat_tok,
    )  # fmt: skip
    for w in mixture.warnings:
        log(f"warning: {w}")
    if len(mixture) == 0:
        raise QtuluError(f"mix {mix.name}: no examples left after conversion; check the source files")

    # Pass 1: render, tokenize, label; append to flat binary files; keep only lengths.
    lengths, doc_source, drops, truncated, trainable = [], [], Counter(), 0, 0
    with open(work / "ids.bin", "wb") as ids_f, open(work / "mask.bin", "wb") as mask_f:
        batch: list[dict] = []

        def flush():
            nonlocal truncated, trainable
            todo = [r["messages"] for r in batch if TOKENS_KEY not in r]  # tokens the converter made are kept
            fresh = iter(chat_tok(todo) if todo else [])
            for rec in batch:
                tok = rec[TOKENS_KEY] if TOKENS_KEY in rec else next(fresh)
                if isinstance(tok, str):
                    drops[f"{rec['dataset']}: {tok}"] += 1
                    continue
                ids_f.write(tok.input_ids.tobytes())
                mask = tok.labels != IGNORE_INDEX
                mask_f.write(mask.astype(np.uint8).tobytes())
                trainable += int(mask.sum())
                lengths.append(len(tok.input_ids))
                doc_source.append(rec["dataset"])
                truncated += tok.truncated
            batch.clear()

        for n, rec in enumerate(mixture, 1):
            batch.append(rec)
            if len(batch) == TOKENIZE_BATCH:
                flush()
            if n % 20000 == 0:
                log(f"tokenized {n}/{len(mixture)} examples")
        flush()
    if not lengths:
        raise QtuluError(
            f"mix {mix.name}: every example was dropped (no trainable token within "
            f"{max_seq_len} tokens); raise --max-seq-len"
        )
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths_arr)[:-1]])
    ids_mm = np.memmap(work / "ids.bin", dtype=np.int32, mode="r")
    mask_mm = np.memmap(work / "mask.bin", dtype=np.uint8, mode="r")

    # Pass 2: pack, shuffle rows, write shards.
    if packing == "bfd":
        rows = [[(d, 0, int(lengths_arr[d])) for d in row] for row in best_fit_decreasing(lengths_arr, max_seq_len)]
    elif packing == "split":
        rows = split_into_rows(lengths_arr, max_seq_len)
    else:
        rows = [[(d, 0, int(n))] for d, n in enumerate(lengths_arr.tolist())]
    order = np.random.default_rng(seed).permutation(len(rows))
    log(f"packed {len(lengths)} documents into {len(rows)} rows ({packing})")
    shards, rows_per_shard = [], max(1, SHARD_TOKENS // max_seq_len)
    for k, first in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = [rows[i] for i in order[first : first + rows_per_shard]]
        name = f"shard-{k:05d}.parquet"
        _write_shard(out / name, chunk, starts, ids_mm, mask_mm)
        shards.append({"file": name, "rows": len(chunk)})
    del ids_mm, mask_mm
    shutil.rmtree(work)

    total = int(lengths_arr.sum())
    source_docs = Counter(doc_source)
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "max_seq_len": max_seq_len,
        "seed": seed,
        "packing": packing,
        "shards": shards,
        "stats": {
            "rows": len(rows),
            "documents": len(lengths),
            "tokens": total,
            "trainable_tokens": trainable,
            "packing_efficiency": packing_efficiency(total, len(rows), max_seq_len),
            "padded_fraction_batch8": padded_fraction(lengths_arr, PAD_BATCH),
            "truncated_documents": truncated,
            "dropped": dict(sorted((report.dropped + drops).items())),
            "skipped": dict(sorted(report.skipped.items())),
            "notes": report.notes,
            "warnings": mixture.warnings,
            "sources": {s: {**mixture.counts[s], "documents": source_docs.get(s, 0)} for s in mixture.sources},
            "seconds": round(time.time() - started, 1),
        },
    }


def _write_shard(path: Path, rows: list, starts: np.ndarray, ids_mm: np.memmap, mask_mm: np.memmap) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pieces_ids, pieces_mask, seq_lens, row_offsets, seq_offsets = [], [], [], [0], [0]
    for row in rows:
        for doc, a, b in row:
            s = int(starts[doc])
            pieces_ids.append(ids_mm[s + a : s + b])
            pieces_mask.append(mask_mm[s + a : s + b])
            seq_lens.append(b - a)
        row_offsets.append(row_offsets[-1] + sum(b - a for _, a, b in row))
        seq_offsets.append(len(seq_lens))
    ids = np.concatenate(pieces_ids).astype(np.int32)
    labels = np.where(np.concatenate(pieces_mask).astype(bool), ids, IGNORE_INDEX).astype(np.int32)

    def int32s(values) -> pa.Array:  # from the buffer: pa.array(ndarray) imports pandas (~0.4 s)
        values = np.ascontiguousarray(values, dtype=np.int32)
        return pa.Array.from_buffers(pa.int32(), len(values), [None, pa.py_buffer(values)])

    offsets = int32s(row_offsets)
    table = pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(offsets, int32s(ids)),
            pa.ListArray.from_arrays(offsets, int32s(labels)),
            pa.ListArray.from_arrays(int32s(seq_offsets), int32s(seq_lens)),
        ],
        names=["input_ids", "labels", "seq_lens"],
    )
    pq.write_table(table, path, row_group_size=256, compression="zstd")


# ---------------------------------------------------------------------------------------------
# Reading prepared datasets (what the trainer uses)


@dataclass
class Row:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n], -100 where masked, unshifted
    seq_lens: np.ndarray  # int32 [docs], sums to n

    @property
    def cu_seqlens(self) -> np.ndarray:
        """Document boundaries [0, l0, l0+l1, ..., n] (int32), as varlen attention wants them."""
        return np.concatenate([[0], np.cumsum(self.seq_lens)]).astype(np.int32)

    @property
    def position_ids(self) -> np.ndarray:
        """Positions restarting at 0 in every document (int32)."""
        starts = self.cu_seqlens[:-1]
        return (np.arange(len(self.input_ids)) - np.repeat(starts, self.seq_lens)).astype(np.int32)


class PreparedDataset:
    """Random access to the rows of a prepared dataset; keeps one decoded shard in memory.

    Read rows shard by shard (qtulu.train.batches.epoch_order does): each shard is then decoded
    once per pass, not once per row."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest:
            raise QtuluError(
                f"{self.folder}: not a prepared dataset (no readable {MANIFEST}); run `qtulu data prepare` first"
            )
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise QtuluError(
                f"{self.folder}: prepared with format {self.manifest.get('format_version')}, this "
                f"qtulu reads format {FORMAT_VERSION}; prepare it again"
            )
        if not is_complete(self.folder, self.manifest):
            raise QtuluError(f"{self.folder}: shard files are missing; prepare it again")
        self.shards = self.manifest["shards"]
        self.bounds = np.cumsum([0] + [s["rows"] for s in self.shards])
        self.max_seq_len = self.manifest["max_seq_len"]
        self._cached: tuple[int, dict] | None = None
        self.shard_reads = 0  # how many times a shard was decoded (tests hold the loader to one per pass)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    @property
    def shard_rows(self) -> list[int]:
        return [s["rows"] for s in self.shards]

    def _shard(self, k: int) -> dict:
        if self._cached is None or self._cached[0] != k:
            import pyarrow.parquet as pq

            table = pq.read_table(self.folder / self.shards[k]["file"])
            cols = {}
            for name in ("input_ids", "labels", "seq_lens"):
                arr = table.column(name).combine_chunks()
                cols[name] = (arr.offsets.to_numpy(), arr.values.to_numpy())
            self._cached = (k, cols)
            self.shard_reads += 1
        return self._cached[1]

    def __getitem__(self, i: int) -> Row:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range (the dataset has {len(self)} rows)")
        i %= len(self)
        k = int(np.searchsorted(self.bounds, i, side="right") - 1)
        cols, j = self._shard(k), i - int(self.bounds[k])
        get = {name: values[offsets[j] : offsets[j + 1]] for name, (offsets, values) in cols.items()}
        return Row(get["input_ids"], get["labels"], get["seq_lens"])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def tokenizer_dir(self) -> Path:
        return self.folder / TOKENIZER_DIR


def _shift_labels(labels: np.ndarray, cu_seqlens: np.ndarray) -> np.ndarray:
    """Next-token targets: shift_labels[t] = labels[t + 1] within a document, -100 on each
    document's last token (it must not learn to predict the next document's first token)."""
    shifted = np.full_like(labels, IGNORE_INDEX)
    shifted[:-1] = labels[1:]
    shifted[cu_seqlens[1:] - 1] = IGNORE_INDEX
    return shifted


def collate_packed(rows: list[Row]) -> dict:
    """Rows flattened into one sequence (batch dimension 1), the padding-free layout for varlen
    attention. The boundaries go under the names transformers hands to attention functions
    (cu_seq_lens_q/k, max_length_q/k), built here once per batch, so no layer has to find them
    again from position_ids. `labels` stay unshifted (HF convention); `shift_labels` are the
    targets with document ends masked."""
    import torch

    ids = np.concatenate([r.input_ids for r in rows])
    seq_lens = np.concatenate([r.seq_lens for r in rows]).astype(np.int64)
    if len(seq_lens) == 0 or (seq_lens <= 0).any() or seq_lens.sum() != len(ids):
        raise QtuluError(f"packed batch: document lengths {seq_lens.tolist()} do not cover its {len(ids)} tokens; "
                         "prepare the dataset again")
    flat = Row(ids, np.concatenate([r.labels for r in rows]), seq_lens)
    cu_seqlens = flat.cu_seqlens
    cu = torch.from_numpy(cu_seqlens)
    max_len = int(seq_lens.max())
    return {
        "input_ids": torch.from_numpy(ids.astype(np.int64))[None],
        "labels": torch.from_numpy(flat.labels.astype(np.int64))[None],
        "shift_labels": torch.from_numpy(_shift_labels(flat.labels.astype(np.int64), cu_seqlens))[None],
        "position_ids": torch.from_numpy(flat.position_ids.astype(np.int64))[None],
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


def collate_padded(rows: list[Row], pad_id: int) -> dict:
    """Rows padded on the right to the longest, with an attention mask (the reference's layout)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    shift = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    positions = np.zeros((len(rows), width), dtype=np.int64)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n], labels[b, :n], mask[b, :n], positions[b, :n] = r.input_ids, r.labels, 1, r.position_ids
        shift[b, :n] = _shift_labels(r.labels.astype(np.int64), r.cu_seqlens)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "shift_labels": torch.from_numpy(shift),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(positions),
    }


# ---------------------------------------------------------------------------------------------
# Statistics, computed from the shards themselves


def dataset_stats(folder: str | Path) -> dict:
    ds = PreparedDataset(folder)
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    max_len = ds.max_seq_len
    edges = [0] + [2**k for k in range(4, max(5, int(np.ceil(np.log2(max_len))) + 1))]
    edges = sorted({e for e in edges if e < max_len} | {max_len})
    hist = np.zeros(len(edges) - 1, dtype=np.int64)
    rows = docs = tokens = trainable = 0
    for shard in ds.shards:
        table = pq.read_table(ds.folder / shard["file"])
        rows += table.num_rows
        lens = pc.list_flatten(table.column("seq_lens")).to_numpy()
        docs += len(lens)
        tokens += int(lens.sum())
        trainable += int(pc.sum(pc.not_equal(pc.list_flatten(table.column("labels")), IGNORE_INDEX)).as_py() or 0)
        hist += np.histogram(lens, bins=np.asarray(edges) + 0.5)[0] if len(lens) else 0
    info = ds.manifest["stats"]
    return {
        "folder": str(ds.folder),
        "mix": ds.manifest.get("mix_name"),
        "packing": ds.manifest["packing"],
        "max_seq_len": max_len,
        "rows": rows,
        "documents": docs,
        "tokens": tokens,
        "trainable_tokens": trainable,
        "packing_efficiency": packing_efficiency(tokens, rows, max_len),
        "padded_fraction_batch8": info.get("padded_fraction_batch8"),
        "length_histogram": [
            {"from": lo + 1, "to": hi, "documents": int(n)}
            for lo, hi, n in zip(edges[:-1], edges[1:], hist, strict=True)
        ],
        "truncated_documents": info.get("truncated_documents", 0),
        "dropped": info.get("dropped", {}),
        "skipped": info.get("skipped", {}),
        "warnings": info.get("warnings", []),
        "sources": info.get("sources", {}),
    }

"""Prepared datasets: shard layout, nothing lost by packing, the cache, the loader, failures that
leave nothing behind."""

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from qtulu.config import SOURCE_NAMES, MixConfig
from qtulu.data.chat import IGNORE_INDEX, ChatTokenizer
from qtulu.data.mixtures import SAMPLE_DIR, load_mix
from qtulu.data.prepare import (
    PreparedDataset,
    Row,
    collate_packed,
    collate_padded,
    dataset_fingerprint,
    dataset_stats,
    prepare_dataset,
    read_manifest,
)
from qtulu.data.records import Report
from qtulu.data.sources import convert, make_context, source_folder
from qtulu.errors import QtuluError

MAX_LEN = 256


@pytest.fixture(scope="module")
def micro_tokenizer():
    from qtulu.model.tokenizer import load_tokenizer

    return load_tokenizer("qtulu/micro-bpe")


@pytest.fixture(scope="module")
def sample_dataset(tmp_path_factory, micro_tokenizer):
    out = tmp_path_factory.mktemp("prepared") / "sample"
    return prepare_dataset(load_mix("sample"), None, micro_tokenizer, MAX_LEN, 7, out)


def documents(folder: Path) -> list[tuple]:
    ds = PreparedDataset(folder)
    docs = []
    for row in ds:
        for a, b in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:], strict=True):
            docs.append((tuple(row.input_ids[a:b].tolist()), tuple(row.labels[a:b].tolist())))
    return docs


def test_shards_have_the_trainer_schema(sample_dataset):
    manifest = read_manifest(sample_dataset)
    for shard in manifest["shards"]:
        schema = pq.read_schema(sample_dataset / shard["file"])
        for name in ("input_ids", "labels", "seq_lens"):
            assert schema.field(name).type == pa.list_(pa.int32())
    assert (sample_dataset / "tokenizer" / "tokenizer.json").is_file()


def test_rows_are_consistent(sample_dataset, micro_tokenizer):
    ds = PreparedDataset(sample_dataset)
    bos = micro_tokenizer.bos_token_id
    for row in ds:
        assert len(row.input_ids) == len(row.labels) == row.seq_lens.sum() <= MAX_LEN
        trained = row.labels != IGNORE_INDEX
        assert np.array_equal(row.labels[trained], row.input_ids[trained])  # unshifted
        for a, b in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:], strict=True):
            assert row.input_ids[a] == bos and row.labels[a] == IGNORE_INDEX
            assert trained[a:b].any(), "every document has a trainable token"
        assert np.array_equal(row.position_ids, np.concatenate([np.arange(n) for n in row.seq_lens]))


def test_packing_loses_and_duplicates_nothing(sample_dataset, micro_tokenizer):
    """The documents in the shards are exactly the mix's conversations, tokenized on their own."""
    chat_tok = ChatTokenizer(micro_tokenizer, MAX_LEN)
    expected = Counter()
    for source in SOURCE_NAMES:
        ctx = make_context(source, 7, Report(), max_seq_len=MAX_LEN, count_tokens=chat_tok.count_tokens)
        records = list(convert(source, [source_folder(SAMPLE_DIR, source)], ctx))
        for tok in chat_tok([r["messages"] for r in records]):
            if not isinstance(tok, str):
                expected[tuple(tok.input_ids.tolist()), tuple(tok.labels.tolist())] += 1
    assert Counter(documents(sample_dataset)) == expected


def test_manifest_stats_match_the_shards(sample_dataset):
    stats = dataset_stats(sample_dataset)
    recorded = read_manifest(sample_dataset)["stats"]
    for key in ("rows", "documents", "tokens", "trainable_tokens"):
        assert stats[key] == recorded[key]
    assert sum(b["documents"] for b in stats["length_histogram"]) == stats["documents"]
    assert stats["packing_efficiency"] == pytest.approx(stats["tokens"] / (stats["rows"] * MAX_LEN))
    assert stats["packing_efficiency"] > 0.9 and stats["padded_fraction_batch8"] < 0.8
    assert stats["dropped"]["sharegpt: system turn"] == 1


def test_cache_is_reused_and_invalidated(sample_dataset, micro_tokenizer, tmp_path):
    before = read_manifest(sample_dataset)
    again = prepare_dataset(load_mix("sample"), None, micro_tokenizer, MAX_LEN, 7, sample_dataset)
    assert again == sample_dataset and read_manifest(sample_dataset)["created"] == before["created"]
    mix = load_mix("sample")
    base, _ = dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN, 7, "bfd", "raise")
    assert dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN, 8, "bfd", "raise")[0] != base
    assert dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN + 1, 7, "bfd", "raise")[0] != base
    assert dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN, 7, "padded", "raise")[0] != base
    copy = tmp_path / "sources"
    shutil.copytree(SAMPLE_DIR, copy)
    # A copy with the same names, sizes, mtimes and contents is the same input; a touched file or
    # a changed byte is not.
    assert dataset_fingerprint(mix, copy, micro_tokenizer, MAX_LEN, 7, "bfd", "raise")[0] == base
    dolly = copy / "dolly" / "databricks-dolly-15k.jsonl"
    os.utime(dolly, ns=(dolly.stat().st_atime_ns, dolly.stat().st_mtime_ns + 10**9))
    touched, _ = dataset_fingerprint(mix, copy, micro_tokenizer, MAX_LEN, 7, "bfd", "raise")
    assert touched != base
    stat = dolly.stat()
    dolly.write_text(dolly.read_text().replace("eight legs", "8 legs"[:10].ljust(10)))  # same size
    os.utime(dolly, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dolly.stat().st_size == stat.st_size
    assert dataset_fingerprint(mix, copy, micro_tokenizer, MAX_LEN, 7, "bfd", "raise")[0] not in (
        base,
        touched,
    )


def test_same_inputs_give_the_same_dataset(sample_dataset, micro_tokenizer, tmp_path):
    other = prepare_dataset(load_mix("sample"), None, micro_tokenizer, MAX_LEN, 7, tmp_path / "again")
    for shard in read_manifest(sample_dataset)["shards"]:
        assert pq.read_table(other / shard["file"]).equals(pq.read_table(sample_dataset / shard["file"]))


@pytest.mark.parametrize("packing", ["padded", "split"])
def test_other_packings(sample_dataset, micro_tokenizer, tmp_path, packing):
    out = prepare_dataset(load_mix("sample"), None, micro_tokenizer, MAX_LEN, 7, tmp_path / packing, packing=packing)
    ds, packed = PreparedDataset(out), dataset_stats(sample_dataset)
    stats = dataset_stats(out)
    assert stats["tokens"] == packed["tokens"] and stats["trainable_tokens"] == packed["trainable_tokens"]
    lengths = [len(r.input_ids) for r in ds]
    if packing == "padded":
        assert all(len(r.seq_lens) == 1 for r in ds) and stats["rows"] == packed["documents"]
    else:
        assert sorted(lengths)[1:] == [MAX_LEN] * (len(lengths) - 1)  # full rows, one shorter remainder
        assert stats["rows"] == -(-stats["tokens"] // MAX_LEN)


def test_collate(sample_dataset):
    ds = PreparedDataset(sample_dataset)
    rows = [ds[0], ds[1], ds[-1]]
    packed = collate_packed(rows)
    total = sum(len(r.input_ids) for r in rows)
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, total)
    assert packed["cu_seq_lens_q"].tolist() == [
        0,
        *np.cumsum(np.concatenate([r.seq_lens for r in rows])).tolist(),
    ]
    assert packed["cu_seq_lens_k"] is packed["cu_seq_lens_q"]
    assert packed["max_length_q"] == packed["max_length_k"] == max(int(r.seq_lens.max()) for r in rows)
    # targets: the next label inside a document, never across a boundary
    shift, labels, ends = packed["shift_labels"][0], packed["labels"][0], packed["cu_seq_lens_q"][1:] - 1
    inside = torch.ones(total, dtype=torch.bool)
    inside[ends.long()] = False
    assert shift[inside].tolist() == labels[1:][inside[:-1]].tolist()
    assert shift[ends.long()].eq(IGNORE_INDEX).all()
    short = Row(np.int32([5, 6, 7]), np.int32([-100, 6, 7]), np.int32([1, 2]))
    padded = collate_padded([rows[0], short], pad_id=0)
    width = len(rows[0].input_ids)
    assert padded["input_ids"].shape == (2, width)
    assert padded["attention_mask"][1].tolist() == [1, 1, 1] + [0] * (width - 3)
    assert padded["labels"][1, 3:].eq(IGNORE_INDEX).all() and padded["position_ids"][1, :3].tolist() == [
        0,
        0,
        1,
    ]


def test_saved_tokenizer_renders_the_documents(sample_dataset):
    """The chat template saved with the dataset gives exactly the training tokens of each document."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(sample_dataset / "tokenizer")
    docs = {ids for ids, _ in documents(sample_dataset)}
    records = list(convert("alpaca", [SAMPLE_DIR / "alpaca"], make_context("alpaca", 7, Report())))
    for rec in records:
        ids = tok.apply_chat_template(rec["messages"], tokenize=True, return_dict=True)["input_ids"]
        assert tuple(ids[:MAX_LEN]) in docs  # right-truncated at the max length


def test_mix_counts_and_warnings(micro_tokenizer, tmp_path):
    mix = MixConfig(name="small", sources={"alpaca": 10, "dolly": 1000}, sources_dir="qtulu:sample")
    out = prepare_dataset(mix, None, micro_tokenizer, MAX_LEN, 3, tmp_path / "small")
    stats = read_manifest(out)["stats"]
    assert stats["sources"]["alpaca"]["used"] == 10
    assert stats["sources"]["dolly"]["used"] == stats["sources"]["dolly"]["available"] < 1000
    assert any("dolly" in w and "using all" in w for w in stats["warnings"])
    assert dataset_stats(out)["documents"] == 10 + stats["sources"]["dolly"]["used"]


def broken_sources(tmp_path: Path) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(SAMPLE_DIR, root)
    dolly = root / "dolly" / "databricks-dolly-15k.jsonl"
    lines = dolly.read_text().splitlines()
    lines[3] = json.dumps({"instruction": "Say hi.", "context": ""})  # no response
    dolly.write_text("\n".join(lines) + "\n")
    return root


def test_failed_prepare_leaves_nothing(micro_tokenizer, tmp_path):
    root = broken_sources(tmp_path)
    out = tmp_path / "out" / "ds"
    with pytest.raises(QtuluError, match=r"databricks-dolly-15k.jsonl:4: response: missing"):
        prepare_dataset(load_mix("sample"), root, micro_tokenizer, MAX_LEN, 7, out)
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_failed_rebuild_keeps_the_old_dataset(sample_dataset, micro_tokenizer, tmp_path):
    target = tmp_path / "ds"
    shutil.copytree(sample_dataset, target)
    before = read_manifest(target)
    with pytest.raises(QtuluError):
        prepare_dataset(load_mix("sample"), broken_sources(tmp_path), micro_tokenizer, MAX_LEN, 7, target)
    assert read_manifest(target) == before and len(PreparedDataset(target)) == before["stats"]["rows"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "ds"]


def test_skip_bad_records(micro_tokenizer, tmp_path):
    out = prepare_dataset(
        load_mix("dolly"),
        broken_sources(tmp_path),
        micro_tokenizer,
        MAX_LEN,
        7,
        tmp_path / "skip",
        on_error="skip",
    )
    assert read_manifest(out)["stats"]["skipped"] == {"dolly: response: missing": 1}


def test_refuses_to_overwrite_a_foreign_folder(micro_tokenizer, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(QtuluError, match="not a qtulu prepared dataset"):
        prepare_dataset(load_mix("dolly"), SAMPLE_DIR, micro_tokenizer, MAX_LEN, 7, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_reader_rejects_a_non_dataset(tmp_path):
    with pytest.raises(QtuluError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)


def test_labels_and_bos_shape_the_dataset(micro_tokenizer, tmp_path):
    """data.labels and data.bos are in the fingerprint (a change rebuilds, it is not reused) and the
    manifest; reference labels train the newline after each non-final EOS; bos=never puts none first."""
    mix = MixConfig(name="chat", sources={"sharegpt": None, "oasst1": None}, sources_dir="qtulu:sample")
    base, parts = dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN, 7, "padded", "raise")
    assert (parts["labels"], parts["bos"]) == ("tulu", "auto")
    assert dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN, 7, "padded", "raise", "reference")[0] != base
    assert dataset_fingerprint(mix, SAMPLE_DIR, micro_tokenizer, MAX_LEN, 7, "padded", "raise", bos="never")[0] != base

    out = tmp_path / "chat"
    trained, fingerprints = {}, set()
    for labels, bos in (("tulu", "auto"), ("reference", "auto"), ("tulu", "never")):
        prepare_dataset(mix, None, micro_tokenizer, MAX_LEN, 7, out, packing="padded", labels=labels, bos=bos)
        manifest = read_manifest(out)
        assert (manifest["labels"], manifest["bos"]) == (labels, bos)
        fingerprints.add(manifest["fingerprint"])
        docs = documents(out)
        first = {ids[0] for ids, _ in docs}
        assert first == ({micro_tokenizer.bos_token_id} if bos == "auto" else first - {micro_tokenizer.bos_token_id})
        trained[labels, bos] = sum(sum(t != IGNORE_INDEX for t in labels_) for _, labels_ in docs)
    assert len(fingerprints) == 3
    multi_turn = sum(1 for ids, _ in documents(out) if ids.count(micro_tokenizer.eos_token_id) > 1)
    assert multi_turn and trained["reference", "auto"] > trained["tulu", "auto"]
    with pytest.raises(QtuluError, match="--labels: unknown value 'all'"):
        prepare_dataset(mix, None, micro_tokenizer, MAX_LEN, 7, tmp_path / "x", labels="all")

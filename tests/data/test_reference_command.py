"""The issue's contract, as a user types it: `qtulu data prepare --mix oasst1|sharegpt --sources ...
--tokenizer <LLaMA> --max-seq-len 2048 --packing padded --labels reference` gives, document for
document, the input_ids and labels of the oracle of open-instruct's 2023 encode_with_messages_format
(benchmarks/data.py) on the conversations `qtulu data convert ... --tokenizer ... --max-seq-len 2048`
writes; with the default labels the only differences are the newlines after non-final EOS."""

import json
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from qtulu.benchmarks.data import newline_after_eos, reference_bos_id, reference_encode

from qtulu.cli import main

IGNORE_INDEX = -100


def qtulu(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["qtulu", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def documents(folder):
    docs = []
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        table = pq.read_table(folder / shard["file"]).to_pydict()
        for ids, labels, lens in zip(table["input_ids"], table["labels"], table["seq_lens"], strict=True):
            assert lens == [len(ids)]  # --packing padded: one document per row
            docs.append((tuple(ids), np.asarray(labels)))
    return docs


@pytest.fixture(scope="module")
def sources(shared_data, tmp_path_factory):
    """The real OASST sample, and the first 150 real ShareGPT conversations (enough for long ones that
    are cut into chunks; the benchmark runs the whole sample), in a temporary sources folder."""
    root = tmp_path_factory.mktemp("sources")
    (root / "oasst1").symlink_to(shared_data / "sources" / "oasst1")
    raw = json.loads((shared_data / "sources" / "sharegpt" / "sharegpt_v3.sample.json").read_text())
    (root / "sharegpt").mkdir()
    (root / "sharegpt" / "first150.json").write_text(json.dumps(raw[:150]))
    return root


@pytest.mark.parametrize("mix", ["oasst1", "sharegpt"])
def test_prepare_reference_labels_are_the_reference_tokens(
    monkeypatch, capsys, tmp_path, shared_data, sources, llama_tokenizer, mix
):
    llama = shared_data / "tokenizers" / "llama"
    converted = tmp_path / "converted.jsonl"
    qtulu(monkeypatch, capsys, "data", "convert", mix, sources / mix, "-o", converted,
          "--tokenizer", llama, "--max-seq-len", 2048)  # fmt: skip
    with open(converted, encoding="utf-8") as f:
        conversations = [json.loads(line)["messages"] for line in f]
    bos_id = reference_bos_id(llama_tokenizer)
    assert bos_id == llama_tokenizer.convert_tokens_to_ids("<s>")
    oracle = {}
    for messages in conversations:
        ids, labels = reference_encode(llama_tokenizer, messages, 2048, bos_id)
        if (labels != IGNORE_INDEX).any():  # the reference filtered out examples with nothing to train
            oracle.setdefault(tuple(ids.tolist()), []).append(labels)
    if mix == "sharegpt":
        assert sum(len(m) > 2 for m in conversations) > 50 and len(conversations) > 150  # chunks, multi-turn

    for labels_mode in ("reference", "tulu"):
        out = tmp_path / labels_mode
        qtulu(monkeypatch, capsys, "data", "prepare", "--mix", mix, "--sources", sources, "--tokenizer", llama,
              "--max-seq-len", 2048, "--packing", "padded", "--labels", labels_mode, "-o", out)  # fmt: skip
        docs = documents(out)
        assert Counter(ids for ids, _ in docs) == Counter({ids: len(v) for ids, v in oracle.items()})
        newline = 0
        for ids, labels in docs:
            expected = oracle[ids][0]
            if labels_mode == "reference":
                assert np.array_equal(labels, expected)
            else:
                differ = labels != expected
                assert (differ <= newline_after_eos(llama_tokenizer, np.asarray(ids))).all()
                assert (labels[differ] == IGNORE_INDEX).all()
                newline += int(differ.sum())
        if labels_mode == "tulu":
            assert newline > 0

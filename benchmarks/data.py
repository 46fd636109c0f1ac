"""Data: labels from offsets vs prefix re-tokenization (speed, agreement); packing efficiency vs padding.

(a) Render + tokenize + label the real ShareGPT sample three ways with the same tokenizer: ours
    (one tokenization per conversation, labels from character offsets, conversations batched
    into the Rust tokenizer), ours one conversation at a time, and the reference's way (tokenize
    every prefix again to find where each assistant turn starts and ends, as open-instruct did).
    Labels must be identical wherever the tokenizer is prefix-consistent on that conversation.
(b) Build the TÜLU human+gpt mix from the raw samples and pack it at max length 2048 with
    best-fit decreasing; compare the real-token fraction with padding to the longest in batches
    of 8 documents in shuffled order (the reference's collator).

    qtulu bench data --sources ../shared/data/sources --tokenizer ../shared/data/tokenizers/llama
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from qtulu.data.chat import ASSISTANT_HEADER, HEADERS, IGNORE_INDEX, ChatTokenizer, render

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def prefix_labels(tokenizer, messages: list[dict], max_seq_len: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """The reference labeller: find each assistant turn's token range by tokenizing the text up to
    its start and up to its end (EOS included) on their own. Returns (ids, labels, prefix_consistent):
    consistent when every prefix tokenization is a prefix of the full tokenization, i.e. when the
    token counts it measures mean the same positions in the full text."""

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = tokenizer.eos_token
    full = "".join(
        HEADERS[m["role"]] + m["content"].strip() + (eos if m["role"] == "assistant" else "") + "\n" for m in messages
    )
    ids = bos + encode(full)
    labels = [IGNORE_INDEX] * len(ids)
    consistent, prefix = True, ""
    for m in messages:
        content = m["content"].strip()
        if m["role"] != "assistant":
            prefix += HEADERS[m["role"]] + content + "\n"
            continue
        head = encode(prefix + ASSISTANT_HEADER)
        prefix += ASSISTANT_HEADER + content + eos
        upto = encode(prefix)
        consistent &= ids[len(bos) : len(bos) + len(upto)] == upto and upto[: len(head)] == head
        start, end = len(bos) + len(head), len(bos) + len(upto)
        labels[start:end] = ids[start:end]
        prefix += "\n"
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32), consistent


def sharegpt_conversations(sources: Path, chat_tok: ChatTokenizer) -> list[list[dict]]:
    from qtulu.data.records import Report
    from qtulu.data.sources import convert, make_context, source_folder

    ctx = make_context("sharegpt", 0, Report(), max_seq_len=chat_tok.max_seq_len, count_tokens=chat_tok.count_tokens)
    return [r["messages"] for r in convert("sharegpt", [source_folder(sources, "sharegpt")], ctx)]


def bench_labels(tokenizer, name: str, sources: Path, max_seq_len: int, repeats: int) -> dict:
    chat_tok = ChatTokenizer(tokenizer, max_seq_len)
    convs = sharegpt_conversations(sources, chat_tok)

    def ours_batched():
        out = []
        for i in range(0, len(convs), 256):
            out += chat_tok(convs[i : i + 256])
        return out

    def ours_single():
        return [chat_tok([c])[0] for c in convs]

    def reference():
        return [prefix_labels(tokenizer, c, max_seq_len) for c in convs]

    timings = {}  # method -> (best wall seconds, best CPU seconds of this process, result)
    for label, fn in (
        ("ours (batched)", ours_batched),
        ("ours (one at a time)", ours_single),
        ("prefix re-tokenization", reference),
    ):
        wall = cpu = float("inf")
        for _ in range(repeats):
            t, c = time.perf_counter(), time.process_time()
            result = fn()
            wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
        timings[label] = (wall, cpu, result)
    ours, ref = timings["ours (batched)"][2], timings["prefix re-tokenization"][2]
    tokens = sum(len(r.input_ids) for r in ours if not isinstance(r, str))
    consistent = identical = 0
    for mine, (ids, labels, ok) in zip(ours, ref, strict=True):
        if not ok:
            continue
        consistent += 1
        if isinstance(mine, str):  # dropped by us: the reference's labels are then all masked too
            identical += bool((labels == IGNORE_INDEX).all())
        else:
            identical += bool(np.array_equal(mine.input_ids, ids) and np.array_equal(mine.labels, labels))
    own_chars, ref_chars = 0, 0  # characters each method hands the tokenizer
    for messages in convs:
        text, spans = render(messages, tokenizer.eos_token)
        own_chars += len(text)
        ref_chars += len(text) + sum(start + end for start, end in spans)
    return {
        "chars_ratio": ref_chars / own_chars,
        "tokenizer": name,
        "conversations": len(convs),
        "tokens": tokens,
        "consistent": consistent,
        "identical": identical,
        "timings": {k: v[:2] for k, v in timings.items()},
    }


def bench_packing(tokenizer, sources: Path, max_seq_len: int, seed: int) -> dict:
    from qtulu.data.mixtures import load_mix
    from qtulu.data.prepare import dataset_stats, prepare_dataset
    from qtulu.data.sources import source_folder
    from qtulu.errors import QtuluError

    mix = load_mix("human+gpt")
    missing = []
    for source in list(mix.sources):
        try:
            source_folder(sources, source)
        except QtuluError:
            missing.append(source)
            del mix.sources[source]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        folder = prepare_dataset(mix, sources, tokenizer, max_seq_len, seed, Path(tmp) / "hg")
        seconds = time.perf_counter() - t
        stats = dataset_stats(folder)
    return {"missing": missing, "seconds": seconds, **stats}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qtulu bench data", description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, default=SHARED / "sources", help="raw samples, a folder per source")
    parser.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "llama"))
    parser.add_argument(
        "--also-tokenizer",
        default="HuggingFaceTB/SmolLM2-135M-Instruct",
        help="a second tokenizer for (a); '' to skip",
    )
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)

    from qtulu.model.tokenizer import load_tokenizer

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load} at start"
    print(f"# qtulu bench data  ({machine}, {time.strftime('%Y-%m-%d %H:%M')})")
    tokenizer = load_tokenizer(args.tokenizer)
    names = [args.tokenizer] + ([args.also_tokenizer] if args.also_tokenizer else [])
    print(
        "\n(a) render + tokenize + label, real ShareGPT sample "
        f"(split into chunks of <= {args.max_seq_len} tokens), best of {args.repeats}"
    )
    print(
        "| tokenizer | conversations | tokens | method | wall s | tokens/s | speed-up (wall) | CPU s | "
        "speed-up (CPU) | identical labels where prefix-consistent |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name in names:
        tok = tokenizer if name == args.tokenizer else load_tokenizer(name)
        r = bench_labels(tok, Path(name).name or name, args.sources, args.max_seq_len, args.repeats)
        ref_wall, ref_cpu = r["timings"]["prefix re-tokenization"]
        notes.append(f"{r['tokenizer']}: the reference tokenizes {r['chars_ratio']:.2f}x the characters we do")
        for method, (wall, cpu) in r["timings"].items():
            agree = f"{r['identical']}/{r['consistent']} (of {r['conversations']})"
            print(
                f"| {r['tokenizer']} | {r['conversations']} | {r['tokens']:,} | {method} | {wall:.2f} | "
                f"{r['tokens'] / wall:,.0f} | {ref_wall / wall:.1f}x | {cpu:.2f} | {ref_cpu / cpu:.1f}x | "
                f"{agree if 'batched' in method else ''} |"
            )

    print("\n".join(notes))
    print(f"load average after (a): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    p = bench_packing(tokenizer, args.sources, args.max_seq_len, args.seed)
    print(
        f"\n(b) human+gpt from {args.sources} at max length {args.max_seq_len} "
        f"(no raw sample for: {', '.join(p['missing']) or 'none'}); prepare took {p['seconds']:.1f} s"
    )
    print(
        "| documents | tokens | trainable | packed rows | packing efficiency (BFD) | "
        "real-token fraction, padding to longest, batch 8 |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| {p['documents']:,} | {p['tokens']:,} | {p['trainable_tokens']:,} | {p['rows']:,} | "
        f"{p['packing_efficiency']:.4f} | {p['padded_fraction_batch8']:.4f} |"
    )
    for source, c in p["sources"].items():
        print(f"  {source}: {c['used']} of {c['requested']} requested ({c['documents']} documents)")
    return 0

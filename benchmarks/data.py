"""Data: tokens against the reference's, speed of the whole `qtulu data prepare`, packing efficiency.

(a) Agreement with the reference. `reference_encode` below is an oracle of open-instruct's 2023
    `encode_with_messages_format` (the code TÜLU was trained with), written from its documented
    behaviour: the chat text concatenated and then stripped as a whole; BOS by the tokenizer's 2023
    convention; labels = input ids, with every non-assistant message masked over the token range
    found by tokenizing the text before it and the text through it (plus `<|assistant|>\\n` when an
    assistant turn follows) on their own, each tokenization with BOS and truncated at the max length.
    The oracle runs `qtulu data prepare --packing padded` as a command, with `--labels reference`
    and with the defaults, and compares every document with the oracle's tokens for the conversations
    `qtulu data convert ... --tokenizer ... --max-seq-len` writes (OASST paths, ShareGPT chunks).
(b) Speed of the whole command, start-up included: `qtulu data prepare --mix sharegpt --sources S`
    (optionally also the code of another checkout, `--before DIR`, e.g. the previous commit), against
    the reference's prefix re-tokenization of the same conversations in this process, same tokenizer.
(c) Build the TÜLU human+gpt mix from the raw samples and pack it with best-fit decreasing; compare the
    real-token fraction with padding to the longest in batches of 8 shuffled documents.

    qtulu bench data --sources ../shared/data/sources --tokenizer ../shared/data/tokenizers/llama
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
IGNORE_INDEX = -100
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


# ---------------------------------------------------------------------------------------------
# The oracle: the reference's documented behaviour, written from its description


def reference_bos_id(tokenizer) -> int | None:
    """The BOS that `tokenizer(text)` gave in 2023: what the tokenizer adds with special tokens on,
    and `<s>` for the SentencePiece LLaMA tokenizer, whose 2023 LlamaTokenizer had add_bos_token=True
    (transformers 5's conversion of the same tokenizer.model no longer adds it). SmolLM2's adds none."""
    if tokenizer.bos_token_id is None:
        return None
    ids = tokenizer("a")["input_ids"]
    if ids and ids[0] == tokenizer.bos_token_id:
        return tokenizer.bos_token_id
    return tokenizer.bos_token_id if tokenizer.bos_token == "<s>" else None


def reference_encode(
    tokenizer, messages: list[dict], max_seq_len: int, bos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels) as open-instruct's encode_with_messages_format (2023) made them, with a
    transformers tokenizer; an example whose labels are all -100 was filtered out by the reference."""
    eos = tokenizer.eos_token

    def concat(msgs: list[dict]) -> str:
        text = ""
        for m in msgs:
            if m["role"] == "system":
                text += "<|system|>\n" + m["content"].strip() + "\n"
            elif m["role"] == "user":
                text += "<|user|>\n" + m["content"].strip() + "\n"
            elif m["role"] == "assistant":
                text += "<|assistant|>\n" + m["content"].strip() + eos + "\n"
            else:
                raise ValueError(f"invalid role: {m['role']}")
        return text

    def tokenize(text: str) -> list[int]:  # tokenizer(text, max_length=..., truncation=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return (([bos_id] if bos_id is not None else []) + list(ids))[:max_seq_len]

    ids = tokenize(concat(messages).strip())
    labels = list(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if i == 0 else len(tokenize(concat(messages[:i])))
        so_far = concat(messages[: i + 1])
        if i < len(messages) - 1 and messages[i + 1]["role"] == "assistant":
            so_far += "<|assistant|>\n"
        end = len(tokenize(so_far))
        labels[start:end] = [IGNORE_INDEX] * (end - start)
        if end >= max_seq_len:
            break
    return np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)


def newline_after_eos(tokenizer, ids: np.ndarray) -> np.ndarray:
    """Tokens of a newline right after an EOS (LLaMA: `</s> ▁ <0x0A>`; byte-level BPE: `Ċ`)."""
    eos, out = tokenizer.eos_token_id, np.zeros(len(ids), dtype=bool)
    for k in np.flatnonzero(ids == eos):
        j = k + 1
        while j < len(ids) and tokenizer.decode([int(ids[j])]).strip() == "" and j - k <= 2:
            out[j] = True
            j += 1
    return out


# ---------------------------------------------------------------------------------------------
# Running the command as a user would


def qtulu_command(args: list[str], code: Path | None = None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run `qtulu ARGS` in a fresh interpreter; (wall s, CPU s of the child, result). With `code`,
    the qtulu package of that checkout is imported instead of this one."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code) + os.pathsep + env.get("PYTHONPATH", "")
    before = os.times()
    t = time.perf_counter()
    # from a neutral folder: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    with tempfile.TemporaryDirectory() as empty:
        done = subprocess.run([sys.executable, "-m", "qtulu.cli", *args], capture_output=True, text=True, env=env,
                              cwd=empty)  # fmt: skip
    wall = time.perf_counter() - t
    after = os.times()
    if done.returncode:
        raise SystemExit(f"qtulu {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system), done


def prepared_documents(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    import pyarrow.parquet as pq

    manifest = json.loads((folder / "manifest.json").read_text())
    docs = []
    for shard in manifest["shards"]:
        table = pq.read_table(folder / shard["file"]).to_pydict()
        for ids, labels, lens in zip(table["input_ids"], table["labels"], table["seq_lens"], strict=True):
            bounds = np.cumsum([0, *lens])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                docs.append((np.asarray(ids[a:b], np.int32), np.asarray(labels[a:b], np.int32)))
    return docs


def converted_conversations(source: str, sources: Path, tokenizer: str, max_seq_len: int, tmp: Path) -> list:
    out = tmp / f"{source}.jsonl"
    qtulu_command(
        ["data", "convert", source, str(sources / source), "-o", str(out), "--tokenizer", tokenizer,
         "--max-seq-len", str(max_seq_len)]
    )  # fmt: skip
    with open(out, encoding="utf-8") as f:  # not splitlines(): contents hold U+2028 and friends
        return [json.loads(line)["messages"] for line in f]


def agreement(hf_tokenizer, tokenizer: str, source: str, sources: Path, max_seq_len: int, tmp: Path) -> dict:
    """`qtulu data prepare --packing padded` (reference and default labels) against the oracle."""
    convs = converted_conversations(source, sources, tokenizer, max_seq_len, tmp)
    bos_id = reference_bos_id(hf_tokenizer)
    t = time.perf_counter()
    oracle = [reference_encode(hf_tokenizer, c, max_seq_len, bos_id) for c in convs]
    oracle_s = time.perf_counter() - t
    kept = {}
    for ids, labels in oracle:
        if (labels != IGNORE_INDEX).any():
            kept.setdefault(ids.tobytes(), []).append(labels)
    result = {"conversations": len(convs), "oracle_kept": sum(map(len, kept.values())), "oracle_s": oracle_s}
    for mode in ("reference", "tulu"):
        folder = tmp / f"{source}-{mode}"
        qtulu_command(
            ["data", "prepare", "--mix", source, "--sources", str(sources), "--tokenizer", tokenizer,
             "--max-seq-len", str(max_seq_len), "--packing", "padded", "--labels", mode, "-o", str(folder)]
        )  # fmt: skip
        docs = prepared_documents(folder)
        ids_match = labels_match = newline_only = diff_tokens = trained = 0
        unmatched = Counter()
        for ids, labels in docs:
            options = kept.get(ids.tobytes())
            if not options:
                unmatched["ids"] += 1
                continue
            ids_match += 1
            ref = options[0]
            trained += int((ref != IGNORE_INDEX).sum())
            if np.array_equal(labels, ref):
                labels_match += 1
                continue
            differ = labels != ref
            diff_tokens += int(differ.sum())
            nl = newline_after_eos(hf_tokenizer, ids)
            # the reference trains the newline after a non-final EOS; TÜLU labels mask it
            newline_only += bool((differ <= nl).all() and (labels[differ] == IGNORE_INDEX).all())
        result[mode] = {
            "documents": len(docs),
            "ids_identical": ids_match,
            "labels_identical": labels_match,
            "differ_only_newline": newline_only,
            "differing_tokens": diff_tokens,
            "oracle_trained_tokens": trained,
            "unmatched": dict(unmatched),
        }
    return result


def speed(hf_tokenizer, tokenizer: str | None, sources: Path, before: Path | None, tmp: Path) -> dict:
    """Whole `qtulu data prepare --mix sharegpt --sources S` (default tokenizer when None) vs the
    reference's encoding of the same conversations in this process."""
    args = ["data", "prepare", "--mix", "sharegpt", "--sources", str(sources)]
    if tokenizer:
        args += ["--tokenizer", tokenizer]
    out = {}
    # untimed: fills the OS file cache and qtulu's tokenizer cache (a first run may convert it)
    qtulu_command([*args, "-o", str(tmp / "warm")])
    out["after"] = qtulu_command([*args, "-o", str(tmp / "after")])[:2]
    if before is not None:
        old = [*args, "-o", str(tmp / "before")]
        if not tokenizer:
            old += ["--tokenizer", SMOLLM2]  # the old command had no default tokenizer
        out["before"] = qtulu_command(old, code=before)[:2]
    convs = converted_conversations("sharegpt", sources, tokenizer or SMOLLM2, 2048, tmp)
    bos_id = reference_bos_id(hf_tokenizer)
    t, c = time.perf_counter(), time.process_time()
    for conv in convs:
        reference_encode(hf_tokenizer, conv, 2048, bos_id)
    out["reference"] = (time.perf_counter() - t, time.process_time() - c)
    out["conversations"] = len(convs)
    manifest = json.loads((tmp / "after" / "manifest.json").read_text())
    out["documents"], out["tokens"] = manifest["stats"]["documents"], manifest["stats"]["tokens"]
    return out


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
    parser.add_argument("--also-tokenizer", default=SMOLLM2, help="a second tokenizer for (a) and (b); '' to skip")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--before", type=Path, help="a checkout (folder holding qtulu/) to time as 'before' in (b)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a, b, c")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    args.sources = args.sources.resolve()  # the commands run from another folder
    if Path(args.tokenizer).exists():
        args.tokenizer = str(Path(args.tokenizer).resolve())
    if args.before is not None:
        args.before = args.before.resolve()
        if not (args.before / "qtulu" / "data" / "prepare.py").is_file():
            raise SystemExit(f"--before {args.before}: not a checkout (no qtulu/data/prepare.py in it)")

    from qtulu.model.tokenizer import load_text_tokenizer, load_tokenizer

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), platform.machine())
    print(f"# qtulu bench data  ({cpu}, {os.cpu_count()} CPUs, load average {load} at start, "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')})")  # fmt: skip
    names = [args.tokenizer] + ([args.also_tokenizer] if args.also_tokenizer else [])
    hf = {name: load_tokenizer(name) for name in names}
    with tempfile.TemporaryDirectory() as tmp_root:
        tmp = Path(tmp_root)
        if "a" not in skip:
            print(f"\n(a) `qtulu data prepare --mix M --packing padded --max-seq-len {args.max_seq_len}` vs the oracle")
            print("| tokenizer | mix | conversations (oracle keeps) | --labels | documents | input_ids identical | "
                  "labels identical | differ only in the newline after a non-final EOS | differing tokens "
                  "(of the oracle's trained) |")  # fmt: skip
            print("|---|---|---|---|---|---|---|---|---|")
            for name in names:
                for source in ("oasst1", "sharegpt"):
                    r = agreement(hf[name], name, source, args.sources, args.max_seq_len, tmp / f"a-{len(name)}")
                    for mode in ("reference", "tulu"):
                        m = r[mode]
                        share = m["differing_tokens"] / max(m["oracle_trained_tokens"], 1)
                        print(f"| {Path(name).name} | {source} | {r['conversations']} ({r['oracle_kept']}) | {mode} | "
                              f"{m['documents']} | {m['ids_identical']} | {m['labels_identical']} | "
                              f"{m['differ_only_newline']} | {m['differing_tokens']:,} ({share:.2%}) |"
                              + (f" unmatched: {m['unmatched']}" if m["unmatched"] else ""))  # fmt: skip
        if "b" not in skip:
            print("\n(b) whole command `qtulu data prepare --mix sharegpt --sources S [--tokenizer T]`, start-up "
                  "included (one run each, after one untimed warm-up run), vs the reference's encoding of the "
                  "same conversations in-process")  # fmt: skip
            print("| tokenizer | conversations -> documents, tokens | method | wall s | CPU s | speed-up vs "
                  "reference (wall) | (CPU) |")  # fmt: skip
            print("|---|---|---|---|---|---|---|")
            for name, flag in ((SMOLLM2, None), (args.tokenizer, args.tokenizer)):
                if name not in hf:
                    continue
                r = speed(hf[name], flag, args.sources, args.before, tmp / f"b-{len(name)}")
                ref_wall, ref_cpu = r["reference"]
                label = f"{Path(name).name}{' (default)' if flag is None else ''}"
                for method in ("after", "before", "reference"):
                    if method not in r:
                        continue
                    wall, cpu_s = r[method]
                    what = {"after": "qtulu data prepare (this code)", "before": f"qtulu data prepare ({args.before})",
                            "reference": "reference prefix re-tokenization, in-process"}[method]  # fmt: skip
                    print(f"| {label} | {r['conversations']} -> {r['documents']}, {r['tokens']:,} | {what} | "
                          f"{wall:.2f} | {cpu_s:.2f} | {ref_wall / wall:.1f}x | {ref_cpu / cpu_s:.1f}x |")  # fmt: skip
            print(f"load average after (b): {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if "c" not in skip:
        p = bench_packing(load_text_tokenizer(args.tokenizer), args.sources, args.max_seq_len, args.seed)
        print(
            f"\n(c) human+gpt from {args.sources} at max length {args.max_seq_len} "
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

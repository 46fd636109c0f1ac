"""Training: real tokens/s and peak memory of `qtulu train` vs HF+peft+bnb padded and TRL packing.

Three contenders train the same base model (4-bit NF4, LoRA on the same modules with the same r,
alpha and dropout) on the same tokenized conversations, with the same rows per optimizer step,
micro-batch size, optimizer and learning rate, each in a process of its own:

  qtulu      the real command, `qtulu train ... --max-steps N` (packed rows, varlen attention,
             loss from the labelled positions only through the fused cross-entropy)
  qtulu-glibc the same with `--launch.cpu_allocator glibc` (the default preloads mimalloc on a CPU)
  reference  the reference way: HF model + peft + bitsandbytes, each batch padded to its longest
             document, SDPA, the model's own loss over the full logits (mean per micro-batch)
  trl        TRL's SFTTrainer with packing (best-fit decreasing) and padding-free batches

The conversations are the documents of `qtulu data prepare --packing padded` for the mix (one per
row); the reference trains on them in a seeded order, TRL packs them itself. Throughput counts
real tokens only (padding is not counted) over the steps after the first (warm-up: Triton
compiles and tunes, allocators grow). Peak memory is the whole process's peak resident set (from
the kernel, when the process ends) and, on a GPU, the peak allocated by torch.

    qtulu bench train        # the CPU comparison: 135m, sharegpt:48 at 512, r64 a16 d0, 8 rows/step, 6 steps
    qtulu bench train --only qtulu,reference --rounds 2   # twice each, in alternating order (a drifting VM)
    qtulu bench train --size 7b --mix human+gpt:2000 --max-seq-len 2048 --steps 10 --model.init random
        # on a GPU: random-init LLaMA-7B; arguments qtulu does not know here are config overrides
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = REPO.parent / "shared" / "data" / "sources"
CONTENDERS = ("qtulu", "qtulu-glibc", "reference", "trl")
CHILDREN = ("reference", "trl")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="qtulu bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="135m")
    parser.add_argument("--mix", default="sharegpt:48")
    parser.add_argument("--sources-dir", default=str(SOURCES) if SOURCES.is_dir() else None,
                        help="raw source files (default: ../shared/data/sources beside the checkout)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders to run")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every contender this many times, in reversed order every other round (on a "
                             "shared machine whose speed drifts, so that no contender always runs in one slot)")
    parser.add_argument("--workdir", help="where runs and data go (default: a temporary folder)")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def run_config(args, extra: list[str]):
    """The run config every contender trains with (the qtulu command builds the same from its flags)."""
    from qtulu.config import load_config

    return load_config(args.size, args.mix, overrides=[*config_flags(args), "--optim.max_steps", str(args.steps),
                                                       *extra])


def config_flags(args) -> list[str]:
    """The flags of the issue's comparison command (`--max-steps` is the qtulu command's own)."""
    flags = ["--data.max_seq_len", str(args.max_seq_len), "--lora.r", str(args.lora_r),
             "--lora.alpha", str(args.lora_alpha), "--lora.dropout", str(args.lora_dropout),
             "--optim.batch_size", str(args.batch_size)]
    if args.sources_dir:
        flags += ["--data.sources_dir", args.sources_dir]
    return flags


# ---------------------------------------------------------------------------------------------
# The parent: run each contender in its own process, then one table


def main(argv: list[str]) -> int:
    args, extra = parse_args(argv)
    if args.child:
        return run_child(args, extra)
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(chosen) - set(CONTENDERS))
    if unknown:
        print(f"qtulu bench train: --only {','.join(unknown)}: choose from {', '.join(CONTENDERS)}", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print(f"qtulu bench train: --rounds {args.rounds}: at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qtulu-bench-train-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rounds = []
        for k in range(args.rounds):
            where = work if args.rounds == 1 else work / f"round{k + 1}"
            where.mkdir(parents=True, exist_ok=True)
            order = chosen if k % 2 == 0 else chosen[::-1]
            rounds.append({name: run_contender(name, args, extra, where) for name in order})
        results = {name: combine_rounds([r[name] for r in rounds]) for name in chosen}
    print()
    print(report(args, extra, results))
    return 0 if all(r.get("error") is None for r in results.values()) else 1


def contender_command(name: str, args, extra: list[str], work: Path) -> list[str]:
    qtulu = str(Path(sys.executable).parent / "qtulu")
    if name.startswith("qtulu"):
        glibc = ["--launch.cpu_allocator", "glibc"] if name == "qtulu-glibc" else []
        return [qtulu, "train", "--size", args.size, "--mix", args.mix, *config_flags(args),
                "--max-steps", str(args.steps), "--output", str(work / name),
                "--data.cache_dir", str(work / "data"), "--no-resume", *glibc, *extra]
    child = [qtulu, "bench", "train", "--child", name, "--workdir", str(work)]
    passed = ["--size", args.size, "--mix", args.mix, "--max-seq-len", str(args.max_seq_len),
              "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
              "--lora-dropout", str(args.lora_dropout), "--batch-size", str(args.batch_size),
              "--steps", str(args.steps),
              "--sources-dir", args.sources_dir or ""]
    return [*child, *passed, *extra]


def run_contender(name: str, args, extra: list[str], work: Path) -> dict:
    """Run one contender to its end; its per-step log, exit status, wall time and peak RSS."""
    command = contender_command(name, args, extra, work)
    print(f"[{name}] {' '.join(command)}", flush=True)
    log_path = work / f"{name}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    result = {"wall_s": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024,
              "error": None}
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        result["error"] = f"exit {proc.returncode}: {tail[0][:100]}"
        print(f"[{name}] failed: {result['error']} (log: {log_path})", flush=True)
        return result
    steps_file = work / name / ("metrics.jsonl" if name.startswith("qtulu") else "steps.jsonl")
    result["steps"] = [json.loads(line) for line in steps_file.read_text().splitlines() if line.strip()]
    if len(result["steps"]) != args.steps:
        result["error"] = f"{len(result['steps'])} steps logged, {args.steps} asked for"
    print(f"[{name}] done in {result['wall_s']:.0f} s", flush=True)
    return result


def combine_rounds(runs: list[dict]) -> dict:
    """One contender's rounds as one result: the steady-state steps of every round (the first step of
    each is its warm-up), the highest peak RSS, and each round's tokens/s to show the spread."""
    failed = [r for r in runs if r.get("error")]
    if failed:
        return failed[0]
    if len(runs) == 1:
        return runs[0]
    steps = [runs[0]["steps"][0]] + [s for r in runs for s in r["steps"][1:]]
    return {"steps": steps, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs), "error": None,
            "per_round": [summarize(r["steps"])["tokens_per_s"] for r in runs]}


def summarize(steps: list[dict]) -> dict:
    """Steady state: every step after the first. qtulu's metrics call the step time step_s; the
    children write the same fields."""
    timed = steps[1:] or steps
    tokens = sum(s["tokens"] for s in timed)
    seconds = sum(s["step_s"] for s in timed)
    data_s = sum(s.get("data_s", 0.0) for s in timed)
    import torch

    # on a CPU qtulu's peak_memory_bytes is the process's RSS, already in its own column
    peak_device = max((s.get("peak_memory_bytes") or 0) for s in steps) if torch.cuda.is_available() else 0
    return {"tokens_per_s": tokens / seconds, "data_fraction": data_s / seconds, "peak_device": peak_device,
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "tokens_per_step": sum(s["tokens"] for s in steps) / len(steps)}


def report(args, extra: list[str], results: dict) -> str:
    from qtulu.benchmarks._measure import markdown_table

    gb = 1e9
    reference = results.get("reference")
    ref = summarize(reference["steps"]) if reference and reference.get("error") is None else None
    rows = []
    for name, result in results.items():
        if result.get("error"):
            rows.append([name, f"n/a: {result['error']}", "", "", "", "", "", ""])
            continue
        s = summarize(result["steps"])
        vs = ""
        if ref:
            speed = s["tokens_per_s"] / ref["tokens_per_s"]
            vs = f"{speed:.2f}x / {result['peak_rss_bytes'] / reference['peak_rss_bytes']:.2f}x"
        device = f"{s['peak_device'] / gb:.2f}" if s["peak_device"] else "-"
        data = f"{s['data_fraction'] * 100:.2f}%" if name.startswith("qtulu") else "-"
        speed = f"{s['tokens_per_s']:.1f}"
        if result.get("per_round"):
            speed += f" ({', '.join(f'{v:.0f}' for v in result['per_round'])})"
        rows.append([name, speed, f"{result['peak_rss_bytes'] / gb:.2f}", device, vs,
                     f"{s['tokens_per_step']:.0f}", data,
                     f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}"])
    header = ["contender", "real tokens/s", "peak RSS GB", "peak device GB", "vs reference (speed / RSS)",
              "tokens/step", "data loading", "loss first -> last"]
    import torch

    where = (torch.cuda.get_device_name() if torch.cuda.is_available()
             else f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    setup = (f"{args.size}, mix {args.mix} at {args.max_seq_len} tokens, LoRA r{args.lora_r} alpha {args.lora_alpha:g} "
             f"dropout {args.lora_dropout:g}, {args.batch_size} rows per step, {args.steps} steps "
             f"(tokens/s over steps 2-{args.steps}"
             + (f" of each of {args.rounds} rounds, alternating the order; per round in brackets"
                if args.rounds > 1 else "")
             + f"){' ' + ' '.join(extra) if extra else ''}")
    return (f"{where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n{setup}\n\n"
            + markdown_table(header, rows))


# ---------------------------------------------------------------------------------------------
# The children: the reference way and TRL, on the documents qtulu prepares


def prepared_documents(cfg, work: Path):
    """The mix's documents, one per row, tokenized and labelled exactly as qtulu trains on them."""
    from qtulu.data.prepare import PreparedDataset, prepare_dataset
    from qtulu.model.load import base_model_dir
    from qtulu.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer or str(base_model_dir(cfg)))
    folder = prepare_dataset(cfg.data.mix, cfg.data.sources_dir, tokenizer, cfg.data.max_seq_len, cfg.data.seed,
                             work / "data" / "documents-padded", packing="padded", labels=cfg.data.labels,
                             bos=cfg.data.bos)
    return PreparedDataset(folder), tokenizer


def base_and_lora(cfg):
    from peft import LoraConfig

    from qtulu.model.load import load_base_model, pick_device

    device = pick_device(cfg)
    model = load_base_model(cfg, device)
    model.set_attn_implementation("sdpa")
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return model, lora, device


def peak_device_bytes(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_child(args, extra: list[str]) -> int:
    import torch

    cfg = run_config(args, extra)
    work = Path(args.workdir)
    out = work / args.child
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.optim.seed)
    docs, tokenizer = prepared_documents(cfg, work)
    steps = (train_reference if args.child == "reference" else train_trl)(cfg, docs, tokenizer)
    (out / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    return 0


def train_reference(cfg, docs, tokenizer) -> list[dict]:
    """HF + peft + bnb, each micro-batch padded to its longest, SDPA, the model's loss on full logits."""
    import numpy as np
    import torch
    from peft import get_peft_model

    model, lora, device = base_and_lora(cfg)
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    accumulation = cfg.optim.batch_size // cfg.optim.micro_batch_size
    order = np.random.default_rng(cfg.optim.seed).permutation(len(docs))
    steps, cursor = [], 0
    for step in range(cfg.optim.max_steps):
        start = time.perf_counter()
        tokens, loss_sum = 0, 0.0
        for _ in range(accumulation):
            if cursor + cfg.optim.micro_batch_size > len(order):  # a new epoch, reshuffled
                order, cursor = np.random.default_rng([cfg.optim.seed, step]).permutation(len(docs)), 0
            rows = [docs[int(i)] for i in order[cursor : cursor + cfg.optim.micro_batch_size]]
            cursor += cfg.optim.micro_batch_size
            batch = pad_to_longest(rows, tokenizer.pad_token_id, device)
            tokens += int(batch["attention_mask"].sum())
            loss = model(**batch).loss / accumulation  # HF: mean over this micro-batch's labelled tokens
            loss.backward()
            loss_sum += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        steps.append({"step": step + 1, "loss": loss_sum, "tokens": tokens, "step_s": time.perf_counter() - start,
                      "peak_memory_bytes": peak_device_bytes(device)})
        print(json.dumps(steps[-1]), flush=True)
    return steps


def pad_to_longest(rows, pad_id: int, device) -> dict:
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.input_ids)
        ids[b, :n] = torch.from_numpy(r.input_ids.astype("int64"))
        labels[b, :n] = torch.from_numpy(r.labels.astype("int64"))
        mask[b, :n] = 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}


def train_trl(cfg, docs, tokenizer) -> list[dict]:
    """TRL SFTTrainer: its own best-fit-decreasing packing of the same documents, padding-free batches."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, lora, device = base_and_lora(cfg)
    data = Dataset.from_dict({"input_ids": [r.input_ids.tolist() for r in docs],
                              "labels": [r.labels.tolist() for r in docs]})
    cuda = device.type == "cuda"
    sft = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="qtulu-bench-trl-"), max_length=cfg.data.max_seq_len, packing=True,
        packing_strategy="bfd", padding_free=True, per_device_train_batch_size=cfg.optim.micro_batch_size,
        gradient_accumulation_steps=cfg.optim.batch_size // cfg.optim.micro_batch_size,
        max_steps=cfg.optim.max_steps, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.max_grad_norm, lr_scheduler_type="linear", warmup_steps=0,
        gradient_checkpointing=cfg.model.gradient_checkpointing, bf16=cuda and cfg.quant.compute_dtype == "bf16",
        fp16=False, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
        dataloader_num_workers=0, seed=cfg.optim.seed, shuffle_dataset=True,
    )
    trainer = SFTTrainer(model=model, args=sft, train_dataset=data, processing_class=tokenizer, peft_config=lora)

    counted = {"tokens": 0}
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        mask = batch.get("attention_mask")
        counted["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        return batch

    trainer.data_collator = counting_collator
    steps = []

    class StepTimes(TrainerCallback):
        # End to end, from one step's end to the next: the Trainer fetches (and collates) a step's
        # micro-batches before on_step_begin, and qtulu's step time includes its data loading too.
        def on_train_begin(self, *_, **__):
            self.last = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            steps.append({"step": len(steps) + 1, "tokens": counted["tokens"], "step_s": now - self.last,
                          "peak_memory_bytes": peak_device_bytes(device)})
            counted["tokens"], self.last = 0, now

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = logs["loss"]

    trainer.add_callback(StepTimes())
    trainer.train()
    return steps

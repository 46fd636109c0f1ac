"""Fused linear cross-entropy vs lm_head + F.cross_entropy (and Liger when installed): time, peak memory.

One batch of `--tokens` final hidden states, a fraction `--prompt-fraction` of them unlabelled
(prompt tokens, label -100), an lm_head of `--vocab` x `--hidden`; each method runs forward and
backward (gradient for the hidden states; for the lm_head too with --weight-grad). Peak memory is
what the loss allocates above its inputs (CUDA: allocator peak; CPU: allocations reported to the
profiler), so a ratio of peaks is the ratio of the loss's own memory.

    qtulu bench loss                                   # GPU: 8192 x 32000 x 4096, bf16
    qtulu bench loss --device cpu                      # CPU-sized: 2048 x 8000 x 1024 (same V/H)

The CPU default keeps the ratio argument of the GPU shape: unfused memory grows with tokens x vocab,
fused memory with tokens x hidden (one chunk of logits is sized like the hidden states), so the
ratio depends on vocab/hidden (7.8 for both shapes), the prompt fraction and the dtype, not on size.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from qtulu.benchmarks._measure import (
    add_run_args,
    failure,
    machine_line,
    markdown_table,
    median_ms,
    setup_run,
)
from qtulu.kernels import fused_linear_cross_entropy

from qtulu.model.memory import peak_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IGNORE = -100


def unfused(hidden, weight, labels):
    """What a plain training loop does: logits for every token, then cross-entropy in float32."""
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=IGNORE, reduction="sum")


def unfused_labelled_rows(hidden, weight, labels):
    """Unfused, but only the labelled rows get logits: how much of the saving is the row gather."""
    keep = labels != IGNORE
    return F.cross_entropy(F.linear(hidden[keep], weight).float(), labels[keep], reduction="sum")


def fused(hidden, weight, labels):
    return fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="sum")


def liger():
    """Liger-Kernel's fused loss when installed (its module takes the lm_head weight first)."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    return lambda hidden, weight, labels: loss_fn(weight, hidden, labels)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="qtulu bench loss", description=__doc__.splitlines()[0])
    add_run_args(parser)
    parser.add_argument("--tokens", type=int, help="tokens in the batch (default 8192 on GPU, 2048 on CPU)")
    parser.add_argument("--vocab", type=int, help="vocabulary size (default 32000 on GPU, 8000 on CPU)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 4096 on GPU, 1024 on CPU)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--prompt-fraction", type=float, default=0.5, help="share of tokens labelled -100")
    parser.add_argument("--weight-grad", action="store_true", help="also train the lm_head (full finetuning)")
    parser.add_argument("--memory-only", action="store_true", help="skip the timing (big shapes on CPU)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device, repeats = setup_run(args)
    gpu = device.type == "cuda"
    tokens = args.tokens or (8192 if gpu else 2048)
    vocab = args.vocab or (32000 if gpu else 8000)
    hidden_size = args.hidden or (4096 if gpu else 1024)
    dtype = DTYPES[args.dtype]

    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5).to(device, dtype)
    weight.requires_grad_(args.weight_grad)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < args.prompt_fraction] = IGNORE
    labels = labels.to(device)

    methods = {"lm_head + F.cross_entropy": unfused, "same, labelled rows only": unfused_labelled_rows,
               "qtulu fused": fused}
    try:
        liger_loss = liger() if gpu else None
    except Exception as exc:  # noqa: BLE001 - an installed Liger that fails is reported in its row
        liger_loss = failure(exc)
    if liger_loss is not None:
        methods["Liger fused"] = liger_loss

    def step(fn):
        def run():
            hidden.grad = weight.grad = None
            fn(hidden, weight, labels).backward()
        return run

    reference = None
    rows, peaks = [], {}
    for name, fn in methods.items():
        try:
            if isinstance(fn, str):  # could not even be set up
                raise RuntimeError(fn)
            loss = fn(hidden, weight, labels).item()
            reference = loss if reference is None else reference
            ms = "-" if args.memory_only else f"{median_ms(step(fn), device, repeats, warmup=2):.2f}"
            hidden.grad = weight.grad = None  # freed before measuring: the CPU profiler cannot see that free
            peaks[name] = peak_bytes(step(fn), device)
        except Exception as exc:  # noqa: BLE001 - a contender failing at run time is reported in its row
            if name == "lm_head + F.cross_entropy":
                raise  # the baseline every ratio needs
            hidden.grad = weight.grad = None
            rows.append([name, fn if isinstance(fn, str) else failure(exc), "", "", ""])
            continue
        rows.append([name, ms, f"{peaks[name] / 2**20:.0f}", "", f"{abs(loss - reference) / reference:.1e}"])
    base = peaks["lm_head + F.cross_entropy"]
    for row in rows:
        if row[0] in peaks:
            row[3] = f"{peaks[row[0]] / base:.3f}"

    labelled = int((labels != IGNORE).sum())
    print(f"{machine_line(device)}")
    print(f"{tokens} tokens ({labelled} labelled) x vocab {vocab} x hidden {hidden_size}, {args.dtype}, "
          f"grad for hidden{' and lm_head' if args.weight_grad else ' only (frozen lm_head)'}; "
          f"{'no timing' if args.memory_only else f'median of {repeats}'}; "
          f"fused path: {'Triton' if gpu else 'torch (CPU)'}")
    header = ["method", "fwd+bwd ms", "peak MiB above inputs", "peak / unfused", "loss rel. diff"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Varlen causal attention on a packed row: qtulu Triton vs SDPA, FlexAttention, torch varlen, flash-attn.

One packed row of `--tokens` tokens made of documents drawn like the TÜLU mix: two thirds short
single-turn examples (FLAN, CoT, Dolly, Alpaca-style: median ~120 LLaMA tokens) and one third
ShareGPT-style conversations (median ~1200 tokens, cut at `--max-doc`), the shapes measured on the
samples in ../shared/data with the LLaMA tokenizer. Every method gets the same q, k, v; forward (no
autograd graph) and forward+backward times are medians; TFLOP/s counts only the causal in-document
work (4 * head_dim * heads * sum len*(len+1)/2 for the forward, 2.5x that for the backward), so a
method doing more work (dense causal over the whole row) is not credited for it ("own work"
column). Peak memory is what one forward+backward allocates above its inputs.

    qtulu bench attention                        # GPU: 16k-token row, bf16, 32 heads x 128
    qtulu bench attention --kv-heads 8           # grouped-query attention
    qtulu bench attention --device cpu           # CPU smoke run: 4k tokens, fp32 (no Triton)
"""

from __future__ import annotations

import argparse
import inspect
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
from qtulu.kernels import varlen_attention, varlen_attention_reference

from qtulu.model.memory import peak_bytes

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tulu_like_lengths(gen: torch.Generator, total: int, max_doc: int) -> list[int]:
    """Document lengths filling exactly `total` tokens: lognormal short examples (median 120, sigma
    0.6) two times in three, lognormal conversations (median 1200, sigma 0.7) otherwise."""
    lengths = []
    while sum(lengths) < total:
        long = torch.rand(1, generator=gen).item() < 1 / 3
        median, sigma = (1200, 0.7) if long else (120, 0.6)
        length = int(median * torch.exp(sigma * torch.randn(1, generator=gen)).item())
        lengths.append(max(1, min(length, max_doc, total - sum(lengths))))
    return lengths


def causal_pairs(lengths) -> int:
    return sum(n * (n + 1) // 2 for n in lengths)


def sdpa_per_document(q, k, v, cu_seqlens, max_len):
    return varlen_attention_reference(q, k, v, cu_seqlens)


def sdpa_dense(q, k, v, cu_seqlens, max_len):
    """Causal over the whole row, documents leaking into each other: a speed ceiling, not correct."""
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                         v.transpose(0, 1)[None], is_causal=True,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out[0].transpose(0, 1)


def flex_document_mask(cu_seqlens, tokens, device):
    """FlexAttention with a document mask (block mask built once per row, outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    lengths = cu_seqlens.diff()
    document = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths.to(device))

    def mask(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(mask, None, None, tokens, tokens, device=str(device))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, cu_seqlens, max_len):
        out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
        return out[0].transpose(0, 1)

    return run


def torch_varlen():
    """torch.nn.attention.varlen (PyTorch's flash varlen path), adapting to its signature's version.
    Returns (run, gqa): without native GQA the caller expands the kv heads once, outside the timing."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params

    def run(q, k, v, cu_seqlens, max_len):
        extra = {"enable_gqa": True} if gqa and k.shape[1] != q.shape[1] else {}
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options, **extra)

    return run, gqa


def flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return lambda q, k, v, cu, max_len: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="qtulu bench attention", description=__doc__.splitlines()[0])
    add_run_args(parser)
    parser.add_argument("--tokens", type=int, help="tokens in the packed row (default 16384 GPU, 4096 CPU)")
    parser.add_argument("--heads", type=int, help="query heads (default 32 GPU, 8 CPU)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads; LLaMA-1 has no GQA)")
    parser.add_argument("--head-dim", type=int, help="head dim (default 128 GPU, 64 CPU)")
    parser.add_argument("--dtype", choices=DTYPES, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--max-doc", type=int, default=2048, help="longest document (TÜLU 7B/13B: 2048)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device, repeats = setup_run(args)
    gpu = device.type == "cuda"
    tokens = args.tokens or (16384 if gpu else 4096)
    heads = args.heads or (32 if gpu else 8)
    kv_heads = args.kv_heads or heads
    head_dim = args.head_dim or (128 if gpu else 64)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]

    gen = torch.Generator().manual_seed(args.seed)
    lengths = tulu_like_lengths(gen, tokens, args.max_doc)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    max_len = max(lengths)

    def draw(n):
        return torch.randn(tokens, n, head_dim, generator=gen).to(device, dtype).requires_grad_()

    q, k, v = draw(heads), draw(kv_heads), draw(kv_heads)
    grad_out = torch.randn(tokens, heads, head_dim, generator=gen).to(device, dtype)

    # name -> attention function, or the reason it cannot run here (reported in its row).
    # On CPU qtulu's varlen_attention is SDPA per document itself: one row for both.
    methods = {"qtulu varlen (Triton)": varlen_attention} if gpu else {}
    methods["SDPA per document" if gpu else "SDPA per document (= qtulu's CPU path)"] = sdpa_per_document
    methods["SDPA dense causal, whole row (leaks)"] = sdpa_dense
    try:
        methods["FlexAttention, document mask"] = flex_document_mask(cu_seqlens, tokens, device)
    except Exception as exc:  # noqa: BLE001 - an unavailable baseline is reported, not fatal
        methods["FlexAttention, document mask"] = failure(exc)
    expanded = set()  # methods given kv heads repeated to the query heads (done once, not timed)
    if gpu:
        for name, make in (("torch.nn.attention.varlen", torch_varlen), ("flash-attn varlen", flash_attn_varlen)):
            try:
                made = make()
            except Exception as exc:  # noqa: BLE001 - e.g. an installed flash-attn built for another torch
                methods[name] = failure(exc)
                continue
            if isinstance(made, tuple):  # torch varlen: (run, native GQA)
                made, gqa = made
                if not gqa and kv_heads != heads:
                    name += " (kv heads expanded before timing)"
                    expanded.add(name)
            if made is not None:
                methods[name] = made
    group = heads // kv_heads
    k_exp, v_exp = (t.detach().repeat_interleave(group, dim=1).requires_grad_() for t in (k, v))

    useful = 4 * head_dim * heads * causal_pairs(lengths)  # forward FLOPs of the in-document work
    with torch.no_grad():
        want = sdpa_per_document(q, k, v, cu_seqlens, max_len).double()

    rows = []
    for name, fn in methods.items():
        if isinstance(fn, str):  # could not even be set up
            rows.append([name, fn] + [""] * 6)
            continue
        own = 4 * head_dim * heads * causal_pairs([tokens]) if "dense" in name else useful
        row = [name]
        kq, kk, kv = (q, k_exp, v_exp) if name in expanded else (q, k, v)
        q_, k_, v_ = (t.detach() for t in (kq, kk, kv))
        try:
            with torch.no_grad():  # forward alone: no graph (FlexAttention on CPU refuses one)
                got = fn(q_, k_, v_, cu_seqlens, max_len)
                rel_error = ((got.double() - want).norm() / want.norm()).item()
                fwd = median_ms(lambda fn=fn, q_=q_, k_=k_, v_=v_: fn(q_, k_, v_, cu_seqlens, max_len), device,
                                repeats, warmup=3)
            row += [f"{fwd:.2f}", f"{useful / fwd / 1e9:.3g}"]
        except Exception as exc:  # noqa: BLE001 - a contender failing at run time is reported in its row
            rows.append(row + [failure(exc)] + [""] * 6)
            continue

        def step(fn=fn, kq=kq, kk=kk, kv=kv):
            kq.grad = kk.grad = kv.grad = None
            fn(kq, kk, kv, cu_seqlens, max_len).backward(grad_out)

        try:
            both = median_ms(step, device, repeats, warmup=3)
            kq.grad = kk.grad = kv.grad = None  # freed before measuring: the CPU profiler cannot see that free
            peak = peak_bytes(step, device)
            row += [f"{both:.2f}", f"{3.5 * useful / both / 1e9:.3g}", f"{3.5 * own / both / 1e9:.3g}",
                    f"{peak / 2**20:.0f}"]
        except Exception as exc:  # noqa: BLE001 - e.g. FlexAttention has no backward on CPU
            row += [failure(exc), "", "", ""]
        rows.append(row + [f"{rel_error:.1e}"])

    print(machine_line(device))
    print(f"{tokens} tokens in {len(lengths)} documents (median {sorted(lengths)[len(lengths) // 2]}, "
          f"longest {max_len}); {heads} heads / {kv_heads} kv heads x {head_dim}, {str(dtype)[6:]}; "
          f"in-document work is {causal_pairs(lengths) / causal_pairs([tokens]):.1%} of dense causal; "
          f"median of {repeats}")
    header = ["method", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s",
              "fwd+bwd TFLOP/s (own work)", "peak MiB fwd+bwd", "rel. err vs SDPA per doc"]
    print(markdown_table(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

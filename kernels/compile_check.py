"""Compile every Triton kernel here for a GPU target without a GPU (ptxas ships with triton).

The interpreter runs kernels on CPU but never compiles them, so a kernel can pass every CPU test
and still fail to compile on a GPU; this catches that on machines without one:

    python -m qtulu.kernels.compile_check            # H100 (sm_90), all tuning configs
    python -m qtulu.kernels.compile_check --arch 80 --first-config-only

Must run without TRITON_INTERPRET=1 (under the interpreter kernels are not compiled at all).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import torch

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                torch.int64: "i64"}


def _signature_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, int):
        return "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no triton type for {value!r}")


def compile_kernel(fn, args, constexprs, arch, num_warps=4, num_stages=3):
    """Compile the @triton.jit `fn` for `args` (example values, never read) and return its metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    runtime_names = fn.arg_names[: len(args)]  # constexpr parameters come last
    signature = {name: _signature_type(arg) for name, arg in zip(runtime_names, args, strict=True)}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn, signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.metadata


def _attention_cases(dtype, head_dim):
    attn = importlib.import_module(f"{__package__}.attention")
    tokens, heads, kv_heads = 256, 8, 2
    q = torch.empty(tokens, heads, head_dim, dtype=dtype)
    kv = torch.empty(tokens, kv_heads, head_dim, dtype=dtype)
    lse = torch.empty(heads, tokens)
    cu = torch.zeros(4, dtype=torch.int32)
    search = (cu, 3, 2, tokens)
    strides = (7,) * 8
    consts = attn._constants(q, kv)
    yield attn._fwd_kernel, attn._fwd_kernel_tuned.configs, consts, (
        q, kv, kv, q, lse, *search, *strides, 0.5)
    yield attn._bwd_dkdv_kernel, attn._bwd_dkdv_kernel_tuned.configs, consts, (
        q, kv, kv, q, lse, lse, kv, kv, *search, *strides, 7, 7, 7, 7, 0.5, 0.5)
    yield attn._bwd_dq_kernel, attn._bwd_dq_kernel_tuned.configs, consts, (
        q, kv, kv, q, lse, lse, q, *search, *strides, 7, 7, 0.5, 0.5)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def check(arch=90, dtypes=("bf16", "fp16", "fp32"), head_dims=(128, 80), first_config_only=False, log=print):
    """Compile the kernels for sm_`arch` with every config autotuning would try; returns the count."""
    import triton

    attn = importlib.import_module(f"{__package__}.attention")
    compiled = 0
    for dtype in (DTYPES[name] for name in dtypes):
        for head_dim in head_dims:
            for fn, configs, consts, args in _attention_cases(dtype, head_dim):
                configs = attn.prune_configs(configs, {"Q": args[0]})
                for config in configs[:1] if first_config_only else configs:
                    start = time.perf_counter()
                    meta = compile_kernel(fn, args, {**consts, **config.kwargs}, arch, config.num_warps,
                                          config.num_stages)
                    log(f"{fn.__name__} {str(dtype)[6:]} d{head_dim} {config.kwargs} w{config.num_warps} "
                        f"s{config.num_stages}: {meta.shared} B shared, {time.perf_counter() - start:.1f} s")
                    compiled += 1
        loss = importlib.import_module(f"{__package__}.cross_entropy")
        logits = torch.empty(4, 32000, dtype=dtype)
        labels = torch.empty(4, dtype=torch.int64)
        args = (logits, 32000, labels, torch.empty(4), 32000)
        block = min(8192, triton.next_power_of_2(logits.shape[1]))
        meta = compile_kernel(loss._cross_entropy_grad_kernel, args, {"BLOCK_V": block}, arch, num_warps=8)
        log(f"_cross_entropy_grad_kernel {str(dtype)[6:]}: {meta.shared} B shared")
        compiled += 1
    return compiled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability without the dot (90 = H100)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma-separated: bf16, fp16, fp32")
    parser.add_argument("--head-dims", default="128,80", help="comma-separated head dims")
    parser.add_argument("--first-config-only", action="store_true", help="one tuning config per kernel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    dtypes = args.dtypes.split(",")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    count = check(args.arch, dtypes, head_dims, args.first_config_only)
    print(f"compiled {count} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

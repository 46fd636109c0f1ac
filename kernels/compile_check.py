"""Compile every Triton kernel here for a GPU target without a GPU (ptxas ships with triton).

The interpreter runs kernels on CPU but never compiles them, so a kernel can pass every CPU test
and still fail to compile, spill registers or overflow shared memory on a GPU; this catches that on
machines without one. Each variant is compiled as a launch would compile it: Triton's own
specialisation of real arguments (16-byte aligned pointers, strides divisible by 16, the
`do_not_specialize` list), every tuning config the autotuner would try. It fails on a ptxas register
spill or on shared memory above the target's limit.

    python -m qtulu.kernels.compile_check            # H100/H200 (sm_90), all tuning configs
    python -m qtulu.kernels.compile_check --arch 80 --first-config-only

Must run without TRITON_INTERPRET=1 (under the interpreter kernels are not compiled at all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
import sys
import tempfile
import time

import torch

# Largest shared memory one block may use (opt-in maximum), bytes, by compute capability.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


class CheckFailed(Exception):
    pass


def compile_kernel(fn, args, constexprs, arch, num_warps=4, num_stages=3):
    """Compile the @triton.jit `fn` for `args` as a launch on sm_`arch` would (args are example
    values: tensors give dtype and alignment, ints their divisibility; nothing is read).
    Returns (shared memory bytes, spilled bytes per thread, registers per thread)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = {**constexprs, "num_warps": num_warps, "num_stages": num_stages}
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with _ptxas_log(), contextlib.redirect_stdout(log):  # triton prints ptxas -v's report when asked
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target,
                                  options=options.__dict__)
    report = log.getvalue()
    spills = [int(a) + int(b) for a, b in SPILL.findall(report)]
    registers = [int(r) for r in REGISTERS.findall(report)]
    if not spills or not registers:
        raise CheckFailed(f"{fn.__name__}: no ptxas report (a cached compile?): {report[-300:]!r}")
    return compiled.metadata.shared, max(spills), max(registers)


@contextlib.contextmanager
def _ptxas_log():
    import triton

    knobs = triton.knobs
    saved = knobs.nvidia.dump_ptxas_log, knobs.cache.dir
    knobs.nvidia.dump_ptxas_log = True
    # a cached kernel is not recompiled and ptxas does not report: compile into a fresh cache
    with tempfile.TemporaryDirectory() as cache:
        knobs.cache.dir = cache
        try:
            yield
        finally:
            knobs.nvidia.dump_ptxas_log, knobs.cache.dir = saved


def _attention_cases(dtype, head_dim):
    """Each attention kernel with arguments laid out as in training: contiguous (tokens, heads,
    head_dim) tensors with 8 kv heads for 32 query heads, boundaries as a packed row has them."""
    attn = importlib.import_module(f"{__package__}.attention")
    tokens, heads, kv_heads = 4096, 32, 8
    q = torch.empty(tokens, heads, head_dim, dtype=dtype)
    kv = torch.empty(tokens, kv_heads, head_dim, dtype=dtype)
    lse = torch.empty(heads, tokens)
    cu = torch.tensor([0, 1000, 2500, 4096], dtype=torch.int32)
    search = (cu, 3, 2, tokens)
    strides = (*q.stride()[:2], *kv.stride()[:2], *kv.stride()[:2], *q.stride()[:2])
    consts = attn._constants(q, kv)
    yield attn._fwd_kernel, "fwd", consts, (
        q, kv, kv, q, lse, *search, *strides[:6], *q.stride()[:2], 0.5)
    split = 2  # dk/dv parts: their own heads in the dk/dv buffers
    parts = torch.empty(tokens, kv_heads * split, head_dim, dtype=dtype)
    yield attn._bwd_dkdv_kernel, "dkdv", {**consts, "SPLIT": split}, (
        q, kv, kv, q, lse, lse, parts, parts, *search, *strides, *parts.stride()[:2], *parts.stride()[:2],
        0.5, 0.5)
    yield attn._bwd_dq_kernel, "dq", consts, (
        q, kv, kv, q, lse, lse, q, *search, *strides, *q.stride()[:2], 0.5, 0.5)


def check(arch=90, dtypes=("bf16", "fp16", "fp32"), head_dims=(128, 80), first_config_only=False, log=print):
    """Compile the kernels for sm_`arch` with every config autotuning would try; returns the count.
    Raises CheckFailed at the end, naming every variant that spills or needs too much shared memory."""
    attn = importlib.import_module(f"{__package__}.attention")
    loss = importlib.import_module(f"{__package__}.cross_entropy")
    limit = SHARED_LIMIT.get(arch, 99 * 1024)
    compiled, failures = 0, []

    def record(name, shared, spills, registers, seconds):
        nonlocal compiled
        compiled += 1
        bad = [f"{spills} B spilled"] * bool(spills) + [f"shared {shared} B > {limit} B"] * (shared > limit)
        log(f"{name}: {shared} B shared, {registers} registers, {spills} B spilled, {seconds:.1f} s"
            + (f"  <-- {', '.join(bad)}" if bad else ""))
        if bad:
            failures.append(f"{name} ({', '.join(bad)})")

    for dtype in (DTYPES[name] for name in dtypes):
        for head_dim in head_dims:
            for fn, name, consts, args in _attention_cases(dtype, head_dim):
                configs = attn.space(name, dtype)
                for config in configs[:1] if first_config_only else configs:
                    start = time.perf_counter()
                    result = compile_kernel(fn, args, {**consts, **config.kwargs}, arch, config.num_warps,
                                            config.num_stages)
                    record(f"{fn.__name__} {str(dtype)[6:]} d{head_dim} {config.kwargs} w{config.num_warps} "
                           f"s{config.num_stages}", *result, time.perf_counter() - start)
        logits = torch.empty(4, 32000, dtype=dtype)
        labels = torch.empty(4, dtype=torch.int64)
        args = (logits, 32000, labels, torch.empty(4), 32000)
        start = time.perf_counter()
        result = compile_kernel(loss._cross_entropy_grad_kernel, args, loss.kernel_constants(32000, True), arch,
                                num_warps=loss.NUM_WARPS)
        record(f"_cross_entropy_grad_kernel {str(dtype)[6:]}", *result, time.perf_counter() - start)
    if failures:
        raise CheckFailed(f"{len(failures)} of {compiled} variants fail on sm_{arch}: " + "; ".join(failures))
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
    try:
        count = check(args.arch, dtypes, head_dims, args.first_config_only)
    except CheckFailed as exc:
        print(f"compile_check: {exc}", file=sys.stderr)
        return 1
    print(f"compiled {count} kernel variants for sm_{args.arch}: no register spills, shared memory within "
          f"{SHARED_LIMIT.get(args.arch, 99 * 1024)} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())

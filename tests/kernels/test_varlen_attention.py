"""Varlen causal attention: Triton kernel (interpreter on CPU) vs the float64 reference.

Relative error ||out - ref|| / ||ref|| against the reference run in float64 on the same inputs:
float32 <= 1e-5, float16 <= 5e-3, bfloat16 <= 3e-2 (CUDA only: the interpreter's bf16 dot is wrong).
The reference itself is checked against a naive per-document softmax loop in float64 (<= 1e-12).
"""

import os
import subprocess
import sys
import zlib

import pytest
import torch
from qtulu.kernels import varlen_attention, varlen_attention_reference
from qtulu.kernels.attention import VarlenAttentionFunction, triton_enabled

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

needs_kernel = pytest.mark.skipif(
    not triton_enabled(torch.empty(0, device=DEVICE)), reason="needs triton on a GPU or TRITON_INTERPRET=1"
)


def generator(request) -> torch.Generator:
    """A seed of its own for every parametrisation."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def random_lengths(gen, total, max_len=120):
    """Random document lengths summing to `total`: length-1 documents, short ones, some longer than a
    tile, none a multiple of anything in particular."""
    lengths = [1]
    while sum(lengths) < total:
        short = torch.rand(1, generator=gen) < 0.2
        length = 1 if short else int(torch.randint(2, max_len, (1,), generator=gen))
        lengths.append(min(length, total - sum(lengths)))
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    return [lengths[i] for i in perm]


def cu_seqlens_of(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def make_inputs(gen, tokens, heads, kv_heads, head_dim, dtype):
    def draw(n):
        return torch.randn(tokens, n, head_dim, generator=gen).to(DEVICE, dtype).requires_grad_()

    return draw(heads), draw(kv_heads), draw(kv_heads), torch.randn(tokens, heads, head_dim, generator=gen)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def float64_reference(q, k, v, cu_seqlens, grad_out):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = varlen_attention_reference(q64, k64, v64, cu_seqlens)
    out.backward(grad_out.to(out))
    return out.detach(), q64.grad, k64.grad, v64.grad


# (dtype, head_dim, heads, kv_heads, layout): layouts are random boundaries (with length-1 documents),
# one document spanning the whole row, boundaries that leave empty documents in cu_seqlens, and
# many short documents (a deeper search for each program's document).
CASES = [
    (torch.float32, 64, 4, 4, "random"),
    (torch.float32, 80, 4, 2, "random"),
    (torch.float32, 96, 6, 2, "one_document"),
    (torch.float32, 128, 2, 1, "random"),
    (torch.float16, 64, 4, 1, "one_document"),
    (torch.float16, 80, 4, 4, "random"),
    (torch.float16, 96, 4, 2, "random"),
    (torch.float16, 128, 4, 2, "random"),
    (torch.float32, 32, 4, 2, "empty_documents"),
    (torch.float16, 64, 4, 2, "many_short"),
    (torch.bfloat16, 128, 8, 2, "random"),
]


@needs_kernel
@pytest.mark.parametrize("dtype,head_dim,heads,kv_heads,layout", CASES,
                         ids=lambda p: str(p).replace("torch.", ""))
def test_kernel_matches_float64_reference(request, dtype, head_dim, heads, kv_heads, layout):
    if dtype == torch.bfloat16 and DEVICE != "cuda":
        pytest.skip("bf16 tl.dot is silently wrong in the Triton interpreter: CUDA only")
    gen = generator(request)
    tokens = 150 if layout == "one_document" else 200
    lengths = {"one_document": [tokens], "random": random_lengths(gen, tokens),
               "empty_documents": [0, 70, 0, 0, 1, 129, 0],
               "many_short": random_lengths(gen, tokens, max_len=9)}[layout]  # ~50 documents
    tokens = sum(lengths)
    cu_seqlens = cu_seqlens_of(lengths)
    q, k, v, grad_out = make_inputs(gen, tokens, heads, kv_heads, head_dim, dtype)

    out = varlen_attention(q, k, v, cu_seqlens, max(lengths))
    out.backward(grad_out.to(out))
    want = float64_reference(q, k, v, cu_seqlens, grad_out)

    assert out.dtype == dtype and out.shape == q.shape
    got = (out, q.grad, k.grad, v.grad)
    errors = {name: rel_err(g, w) for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


@needs_kernel
@pytest.mark.parametrize("blocks", [
    {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)},  # diagonal split into sub-blocks
    {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16)},  # many off-diagonal blocks per document
])
def test_kernel_tile_shapes(request, blocks):
    """Small tiles: documents span many key blocks, and the diagonal spans several sub-blocks."""
    gen = generator(request)
    lengths = random_lengths(gen, 180, max_len=90)
    cu_seqlens = cu_seqlens_of(lengths)
    q, k, v, grad_out = make_inputs(gen, sum(lengths), 4, 2, 48, torch.float32)
    out = VarlenAttentionFunction.apply(q, k, v, cu_seqlens, 48**-0.5, blocks)
    out.backward(grad_out.to(out))
    want = float64_reference(q, k, v, cu_seqlens, grad_out)
    for got, ref in zip((out, q.grad, k.grad, v.grad), want, strict=True):
        assert rel_err(got, ref) <= TOLERANCE[torch.float32]


def naive_attention(q, k, v, lengths, scale):
    """Explicit softmax(q k^T + causal mask) v, one document at a time, GQA by repeating heads."""
    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for length in lengths:
        qd = q[start:start + length].transpose(0, 1)
        kd = k[start:start + length].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:start + length].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = qd @ kd.transpose(1, 2) * scale
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        outs.append((scores.masked_fill(future, float("-inf")).softmax(-1) @ vd).transpose(0, 1))
        start += length
    return torch.cat(outs)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (6, 2, 80), (4, 1, 96)])
def test_reference_matches_naive_loop_in_float64(request, heads, kv_heads, head_dim):
    gen = generator(request)
    lengths = random_lengths(gen, 300)
    tokens = sum(lengths)
    q, k, v, grad_out = (torch.randn(tokens, n, head_dim, generator=gen, dtype=torch.float64)
                         for n in (heads, kv_heads, kv_heads, heads))
    scale = 0.7 / head_dim**0.5  # a non-default scale, passed explicitly
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    ref = varlen_attention_reference(q, k, v, cu_seqlens_of(lengths).cpu(), scale)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    naive = naive_attention(q, k, v, lengths, scale)
    naive_grads = torch.autograd.grad(naive, (q, k, v), grad_out)
    assert rel_err(ref, naive) <= 1e-12
    for got, want in zip(ref_grads, naive_grads, strict=True):
        assert rel_err(got, want) <= 1e-12


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_cross_document_leakage(request, dtype):
    """Perturbing one document's q, k, v and upstream gradient changes nothing of any other document."""
    gen = generator(request)
    lengths = [37, 1, 64, 90, 8]
    cu = cu_seqlens_of(lengths)
    q, k, v, grad_out = make_inputs(gen, sum(lengths), 4, 2, 64, dtype)

    def run(q, k, v, grad_out):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        out = varlen_attention(q, k, v, cu, max(lengths))
        out.backward(grad_out.to(out))
        return out.detach(), q.grad, k.grad, v.grad

    before = run(q, k, v, grad_out)
    doc = slice(38, 102)  # the third document
    noise = [torch.randn(t[doc].shape, generator=gen).to(t) for t in (q, k, v, grad_out)]
    perturbed = [t.detach().clone() for t in (q, k, v, grad_out)]
    for t, n in zip(perturbed, noise, strict=True):
        t[doc] += n
    after = run(*perturbed)

    others = torch.ones(sum(lengths), dtype=torch.bool)
    others[doc] = False
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[others], a[others])  # bit-identical: no other document is read
        assert rel_err(a[doc], b[doc].double()) > 1e-2  # the perturbation did reach its own document


def test_bad_inputs_are_refused():
    q = torch.randn(10, 4, 16)
    kv = torch.randn(10, 3, 16)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="must divide"):
        varlen_attention(q, kv, kv, cu, 10)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(q, q, q, cu.long(), 10)
    with pytest.raises(ValueError, match="dtypes differ"):
        varlen_attention(q, q.half(), q, cu, 10)
    with pytest.raises(ValueError, match="tokens, heads, dim"):
        varlen_attention(q, q[:5], q[:5], cu, 10)
    with pytest.raises(ValueError, match="cu_seqlens must rise"):
        varlen_attention_reference(q, q, q, torch.tensor([0, 7], dtype=torch.int32))


def test_works_without_triton():
    """Where triton cannot be installed (macOS), the package imports and serves the torch paths."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from qtulu.kernels import varlen_attention, varlen_attention_reference, fused_linear_cross_entropy\n"
        "q = torch.randn(9, 2, 8); cu = torch.tensor([0, 4, 9], dtype=torch.int32)\n"
        "assert torch.equal(varlen_attention(q, q, q, cu, 5), varlen_attention_reference(q, q, q, cu))\n"
        "h = torch.randn(9, 8, requires_grad=True); w = torch.randn(11, 8)\n"
        "fused_linear_cross_entropy(h, w, torch.randint(0, 11, (9,))).backward()\n"
        "assert h.grad.abs().sum() > 0\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_kernels_compile_for_h100():
    """The interpreter never compiles: compile the kernels for sm_90 with ptxas (no GPU needed)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "qtulu.kernels.compile_check", "--arch", "90", "--dtypes", "bf16",
               "--head-dims", "128", "--first-config-only"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled 4 kernel variants for sm_90" in done.stdout

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
from qtulu.kernels import attention, varlen_attention, varlen_attention_reference
from qtulu.kernels.attention import VarlenAttentionFunction, check_cu_seqlens, triton_enabled

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
    # diagonal split into sub-blocks; a GQA group of 4 split in 2 parts for dk/dv
    {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16), "split": 2},
    # many off-diagonal blocks per document; one dk/dv program per kv head (no split)
    {"fwd": (16, 16), "dkdv": (16, 16), "dq": (16, 16), "split": 1},
])
def test_kernel_tile_shapes(request, blocks):
    """Small tiles: documents span many key blocks, and the diagonal spans several sub-blocks."""
    gen = generator(request)
    lengths = random_lengths(gen, 180, max_len=90)
    cu_seqlens = cu_seqlens_of(lengths)
    q, k, v, grad_out = make_inputs(gen, sum(lengths), 4, 1, 48, torch.float32)
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


BAD_BOUNDARIES = {
    "last below the token count": ([0, 4, 7], "rise from 0 to total_tokens=10"),
    "past the token count": ([0, 4, 12], "rise from 0 to total_tokens=10"),
    "falling": ([0, 6, 4, 10], "rise from 0 to total_tokens=10"),
    "not starting at 0": ([2, 6, 10], "rise from 0 to total_tokens=10"),
    "int64": (torch.tensor([0, 4, 10]), "1-D int32"),
    "2-D": (torch.tensor([[0, 4, 10]], dtype=torch.int32), "1-D int32"),
}


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("case", BAD_BOUNDARIES)
def test_bad_boundaries_are_refused(monkeypatch, path, case):
    """Both paths run the same host check (check_cu_seqlens) and give the same one-line error.
    Before it, the kernel path trusted the boundaries: under the interpreter bad ones corrupted
    memory (`realloc(): invalid old size`), on a GPU they read out of bounds or left garbage."""
    if path == "kernel" and not triton_enabled(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 for the kernel path on CPU tensors")
    if path == "reference":
        monkeypatch.setattr(attention, "triton_enabled", lambda t: False)
    bounds, message = BAD_BOUNDARIES[case]
    cu = bounds if isinstance(bounds, torch.Tensor) else torch.tensor(bounds, dtype=torch.int32)
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=message) as raised:
        varlen_attention(q, q, q, cu)
    assert "\n" not in str(raised.value)
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(cu, 10)


def test_check_cu_seqlens_accepts_empty_documents():
    check_cu_seqlens(torch.tensor([0, 0, 3, 3, 10], dtype=torch.int32), 10)


@needs_kernel
@pytest.mark.parametrize("kernel,blocks", [
    ("forward", {"fwd": (16, 32), "dkdv": (32, 64), "dq": (64, 32)}),
    ("dq", {"fwd": (64, 32), "dkdv": (32, 64), "dq": (16, 32)}),
    ("dk/dv", {"fwd": (64, 32), "dkdv": (64, 32), "dq": (64, 32)}),
])
def test_tile_rules_are_enforced(kernel, blocks):
    """A tuning config breaking the tile rules (a key block reaching past the query block's diagonal,
    or the reverse for dk/dv) is refused when the kernel is compiled (tl.static_assert)."""
    q = torch.randn(40, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 25, 40], dtype=torch.int32)
    with pytest.raises(Exception, match=f"{kernel} tiles need"):
        VarlenAttentionFunction.apply(q, q, q, cu, 0.25, blocks).sum().backward()


# Token offsets past 2**31 elements, as in a flattened batch of 32 rows x 16k tokens x 64 heads x 128:
# tensors with a token stride of 2**22 elements put the last of 600 tokens past 2**31 while the memory
# touched stays small (on CPU, pages of the 5 GB fp16 storage that are never written are never backed).
# With int32 address arithmetic the offsets wrap and the kernels read elsewhere: a segfault under the
# interpreter, hence a subprocess.
INT64_SCRIPT = """
import sys
import torch
from qtulu.kernels.attention import VarlenAttentionFunction, varlen_attention_reference

device = "cuda" if torch.cuda.is_available() else "cpu"
tokens, heads, kv_heads, dim, stride = 600, 2, 1, 16, 2**22
storage = torch.empty(tokens * stride, dtype=torch.float16, device=device)
gen = torch.Generator().manual_seed(0)
views = []
for n in (heads, kv_heads, kv_heads, heads):  # q, k, v, grad_out side by side in each token's stride
    offset = sum(t.shape[1] for t in views) * dim
    views.append(storage.as_strided((tokens, n, dim), (stride, dim, 1), offset))
    views[-1].copy_(torch.randn(tokens, n, dim, generator=gen))
q, k, v, grad_out = views
cu = torch.tensor([0, 40, tokens], dtype=torch.int32, device=device)
blocks = {"fwd": (64, 64), "dkdv": (64, 64), "dq": (64, 64)} if device == "cpu" else None
q, k, v = (t.requires_grad_() for t in (q, k, v))
out = VarlenAttentionFunction.apply(q, k, v, cu, dim**-0.5, blocks)
out.backward(grad_out)
ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
ref = varlen_attention_reference(*ref_inputs, cu)
ref.backward(grad_out.double())
wants = (ref, *(t.grad for t in ref_inputs))
errors = [((g.double() - w).norm() / w.norm()).item() for g, w in zip((out, q.grad, k.grad, v.grad), wants)]
print("relative errors out, dq, dk, dv:", errors)
sys.exit(0 if max(errors) <= 5e-3 else 1)
"""


@needs_kernel
def test_offsets_past_2_31_elements():
    env = {**os.environ, "TRITON_INTERPRET": "1"} if DEVICE == "cpu" else os.environ
    done = subprocess.run([sys.executable, "-c", INT64_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stdout[-500:]} {done.stderr[-2000:]}"


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


needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="GPU only: compiled kernels")


def compiled_kernels():
    """Every compiled variant of the attention kernels on the current device (Triton's JIT caches)."""
    kernels = (attention._fwd_kernel, attention._bwd_dkdv_kernel, attention._bwd_dq_kernel,
               attention._bwd_delta_kernel)
    device = torch.cuda.current_device()
    return [k for fn in kernels for k in fn.device_caches[device][0].values()]


@needs_cuda
def test_no_recompilation_for_new_boundaries_and_no_spills():
    """New document counts and token counts (divisible by 16 or not, one document or many) reuse
    the compiled kernels (do_not_specialize), and the variants the autotuner compiled spill no
    registers on this GPU (compile_check asserts it for sm_90 without one)."""
    gen = torch.Generator().manual_seed(0)

    def step(lengths):
        q, k, v, grad_out = make_inputs(gen, sum(lengths), 4, 4, 128, torch.bfloat16)  # MHA: dk/dv never split
        varlen_attention(q, k, v, cu_seqlens_of(lengths)).backward(grad_out.to(q))

    step([256])  # autotunes and compiles
    compiled = len(compiled_kernels())
    for lengths in ([300], [1, 37, 262], [64] * 16, random_lengths(gen, 999)):
        step(lengths)
    assert len(compiled_kernels()) == compiled
    spills = {k.name: k.n_spills for k in compiled_kernels() if k.n_spills}
    assert not spills, spills


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu():
    """Launches go to the tensors' device, not the current one (cuda:0)."""
    lengths = [5, 60, 35]
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad_out = (t.detach().to("cuda:1").requires_grad_() for t in
                         make_inputs(gen, sum(lengths), 4, 2, 64, torch.float16))
    cu = cu_seqlens_of(lengths).to("cuda:1")
    out = varlen_attention(q, k, v, cu)
    out.backward(grad_out)
    want = float64_reference(q, k, v, cu.cpu(), grad_out)
    for got, ref in zip((out, q.grad, k.grad, v.grad), want, strict=True):
        assert rel_err(got.cpu(), ref.cpu()) <= TOLERANCE[torch.float16]


def test_dkdv_split_fills_the_gpu(monkeypatch):
    """8 kv heads of a 32-head model on a 2,048-token row (~170 dk/dv programs) on 132 SMs: the group
    of 4 query heads is split in 4 (680 programs); a 16k-token row needs no split; MHA never splits."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(multi_processor_count=132))
    gpu = torch.device("cuda")
    assert attention.dkdv_split(4, 170, gpu) == 4
    assert attention.dkdv_split(4, 300, gpu) == 2
    assert attention.dkdv_split(4, 8 * 530, gpu) == 1
    assert attention.dkdv_split(1, 10, gpu) == 1

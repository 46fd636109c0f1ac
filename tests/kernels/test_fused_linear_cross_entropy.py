"""Fused linear cross-entropy: Triton kernel (interpreter on CPU) and the torch path vs the reference.

Relative error against the unfused reference run in float64 on the same inputs: loss, dhidden and
dweight within float32 <= 1e-5, float16 <= 5e-3, bfloat16 <= 3e-2 (CUDA only); the torch path in
float64 <= 1e-10. The reference itself is checked against a naive per-token loop in float64.
"""

import zlib

import pytest
import torch
from qtulu.kernels import cross_entropy, fused_linear_cross_entropy, linear_cross_entropy_reference
from qtulu.kernels.cross_entropy import default_chunk_rows, triton_enabled

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100


def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def make_inputs(gen, rows, hidden_size, vocab, dtype, prompt_fraction=0.5, weight_grad=True, ignore=IGNORE,
                weight_dtype=None):
    hidden = torch.randn(rows, hidden_size, generator=gen).to(DEVICE, dtype).requires_grad_()
    # scaled so that logits have a spread like a trained model's (softmax neither flat nor one-hot)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 2 / hidden_size**0.5).to(DEVICE, weight_dtype or dtype)
    weight.requires_grad_(weight_grad)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < prompt_fraction] = ignore  # prompt tokens
    return hidden, weight, labels.to(DEVICE)


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def float64_reference(hidden, weight, labels, reduction, upstream, ignore=IGNORE):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = linear_cross_entropy_reference(h64, w64, labels, ignore, reduction)
    (loss * upstream).backward()
    return loss.detach(), h64.grad, w64.grad


def check_against_reference(hidden, weight, labels, reduction, chunk_rows=None, upstream=1.7, ignore=IGNORE):
    loss = fused_linear_cross_entropy(hidden, weight, labels, ignore, reduction, chunk_rows)
    (loss * upstream).backward()
    ref_loss, ref_dh, ref_dw = float64_reference(hidden, weight, labels, reduction, upstream, ignore)
    tol = TOLERANCE[hidden.dtype]
    assert loss.dtype == (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    assert abs(loss.item() - ref_loss.item()) <= tol * abs(ref_loss.item())
    assert rel_err(hidden.grad, ref_dh) <= tol
    if weight.requires_grad:
        assert rel_err(weight.grad, ref_dw) <= tol
    else:
        assert weight.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_kernel_matches_float64_reference(request, dtype, reduction, weight_grad):
    if not triton_enabled(torch.empty(0, device=DEVICE, dtype=dtype)):
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    if dtype == torch.bfloat16 and DEVICE != "cuda":
        pytest.skip("bf16 only on CUDA (the kernel path is tested on CPU in float32 and float16)")
    gen = generator(request)
    # vocab not a power of two and larger than the kernel's vocab tile (8192): two passes of two tiles
    hidden, weight, labels = make_inputs(gen, 96, 48, 9000, dtype, weight_grad=weight_grad)
    check_against_reference(hidden, weight, labels, reduction, chunk_rows=16)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("chunk_rows", [None, 7, 1000])
def test_torch_path_matches_reference_in_float64(request, monkeypatch, reduction, chunk_rows):
    """The CPU path without triton: same chunked algorithm with the torch twin of the kernel."""
    monkeypatch.setattr(cross_entropy, "triton_enabled", lambda t: False)
    hidden, weight, labels = make_inputs(generator(request), 150, 32, 300, torch.float64)
    check_against_reference(hidden, weight, labels, reduction, chunk_rows)


@pytest.mark.parametrize("ignore", [0, -1])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_other_ignore_index(request, monkeypatch, ignore, use_kernel):
    """ignore_index 0 (a real token id: rows labelled 0 are dropped) and -1, with -100 nowhere."""
    if use_kernel and not triton_enabled(torch.empty(0, device=DEVICE)):
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    if not use_kernel:
        monkeypatch.setattr(cross_entropy, "triton_enabled", lambda t: False)
    hidden, weight, labels = make_inputs(generator(request), 64, 32, 200, torch.float32, ignore=ignore)
    assert 0 < (labels == ignore).sum() < 64 and not (labels == IGNORE).any()
    for reduction in ("sum", "mean"):
        hidden.grad = weight.grad = None
        check_against_reference(hidden, weight, labels, reduction, chunk_rows=16, ignore=ignore)


@pytest.mark.parametrize("hidden_dtype,weight_dtype", [(torch.float32, torch.float16),
                                                        (torch.float16, torch.float32)])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_autocast_with_mixed_dtypes(request, monkeypatch, hidden_dtype, weight_dtype, use_kernel):
    """Under autocast the matmuls run in autocast's dtype whatever the inputs' (hidden states in
    float32 with a half-precision lm_head, or the reverse), as F.linear does; each gradient comes
    back in its input's dtype."""
    if use_kernel and not triton_enabled(torch.empty(0, device=DEVICE)):
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    if not use_kernel:
        monkeypatch.setattr(cross_entropy, "triton_enabled", lambda t: False)
    hidden, weight, labels = make_inputs(generator(request), 64, 48, 300, hidden_dtype, weight_dtype=weight_dtype)
    with torch.autocast(DEVICE, dtype=torch.float16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=16)
        same_autocast = linear_cross_entropy_reference(hidden, weight, labels)
    (loss * 1.7).backward()
    ref_loss, ref_dh, ref_dw = float64_reference(hidden, weight, labels, "sum", 1.7)
    tol = TOLERANCE[torch.float16]
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref_loss.item()) <= tol * ref_loss.item()
    assert abs(loss.item() - same_autocast.item()) <= 1e-5 * ref_loss.item()
    assert hidden.grad.dtype == hidden_dtype and weight.grad.dtype == weight_dtype
    assert rel_err(hidden.grad, ref_dh) <= tol and rel_err(weight.grad, ref_dw) <= tol
    with pytest.raises(ValueError, match="cast one, or run under torch.autocast"):
        fused_linear_cross_entropy(hidden, weight, labels)  # mixed dtypes without autocast


@pytest.mark.parametrize("use_kernel", [True, False])
def test_no_gradient_work_without_grad(request, monkeypatch, use_kernel):
    """Under torch.no_grad (evaluation), or with nothing requiring grad, the per-chunk pass computes
    the loss only: no gradient is written into the logits, none allocated."""
    if use_kernel and not triton_enabled(torch.empty(0, device=DEVICE)):
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    if not use_kernel:
        monkeypatch.setattr(cross_entropy, "triton_enabled", lambda t: False)
    name = "_cross_entropy_grad_triton" if use_kernel else "_cross_entropy_grad_torch"
    chunk_pass, grads_written = getattr(cross_entropy, name), []

    def spy(logits, labels, grad):
        loss = chunk_pass(logits, labels, grad)
        # softmax - onehot sums to 0 in every row; logits (or their exponentials) do not
        grads_written.append(bool((logits.double().sum(1).abs() < 1e-4).all()))
        return loss

    monkeypatch.setattr(cross_entropy, name, spy)
    hidden, weight, labels = make_inputs(generator(request), 40, 32, 120, torch.float32)
    ref_loss = float64_reference(hidden, weight, labels, "sum", 1.0)[0].item()
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=8)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5) and loss.grad_fn is None
    frozen = fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels, chunk_rows=8)
    assert frozen.item() == pytest.approx(ref_loss, rel=1e-5)
    assert grads_written and not any(grads_written)
    fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=8).backward()  # the control: grads written
    assert all(grads_written[-3:]) and hidden.grad is not None


def test_reference_matches_naive_loop_in_float64(request):
    gen = generator(request)
    hidden, weight, labels = make_inputs(gen, 40, 16, 50, torch.float64)
    hidden, weight = hidden.detach().cpu(), weight.detach().cpu()
    labels = labels.cpu()
    naive = []
    for h, y in zip(hidden, labels, strict=True):
        if y != IGNORE:
            logits = weight @ h
            naive.append(logits.exp().sum().log() - logits[y])
    naive = torch.stack(naive).sum()
    total = linear_cross_entropy_reference(hidden, weight, labels).item()
    assert abs(total - naive.item()) <= 1e-12 * naive.item()
    mean = linear_cross_entropy_reference(hidden, weight, labels, reduction="mean").item()
    assert abs(mean - naive.item() / (labels != IGNORE).sum().item()) <= 1e-12 * mean


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_all_ignored_gives_zero_loss_and_zero_grads(request, monkeypatch, reduction, use_kernel):
    if use_kernel and not triton_enabled(torch.empty(0, device=DEVICE)):
        pytest.skip("needs triton on a GPU or TRITON_INTERPRET=1")
    if not use_kernel:
        monkeypatch.setattr(cross_entropy, "triton_enabled", lambda t: False)
    hidden, weight, labels = make_inputs(generator(request), 12, 16, 64, torch.float32, prompt_fraction=1.0)
    assert (labels == IGNORE).all()
    loss = fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction)
    loss.backward()
    assert loss.item() == 0.0
    for grad in (hidden.grad, weight.grad):
        assert torch.isfinite(grad).all() and not grad.any()


def test_mean_is_sum_over_labelled_count(request):
    hidden, weight, labels = make_inputs(generator(request), 64, 32, 200, torch.float32)
    total = fused_linear_cross_entropy(hidden, weight, labels, reduction="sum")
    mean = fused_linear_cross_entropy(hidden, weight, labels, reduction="mean")
    count = (labels != IGNORE).sum().item()
    assert 0 < count < 64
    assert mean.item() == pytest.approx(total.item() / count, rel=1e-6)


def test_batched_shapes_and_no_grad(request):
    """(batch, tokens, hidden) input as from a model; under no_grad nothing is computed for backward."""
    hidden, weight, labels = make_inputs(generator(request), 2 * 33, 32, 120, torch.float32)
    hidden3d, labels2d = hidden.detach().view(2, 33, 32).requires_grad_(), labels.view(2, 33)
    loss = fused_linear_cross_entropy(hidden3d, weight, labels2d)
    loss.backward()
    assert hidden3d.grad.shape == (2, 33, 32)
    ref_loss, ref_dh, _ = float64_reference(hidden, weight, labels, "sum", 1.0)
    assert rel_err(hidden3d.grad.view(66, 32), ref_dh) <= TOLERANCE[torch.float32]
    with torch.no_grad():
        again = fused_linear_cross_entropy(hidden3d, weight, labels2d)
    assert again.grad_fn is None and again.item() == pytest.approx(ref_loss.item(), rel=1e-5)


def test_bad_inputs_are_refused():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 10, IGNORE]))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4]), reduction="none")
    with pytest.raises(ValueError, match="do not fit"):
        fused_linear_cross_entropy(hidden, weight[:, :4], torch.tensor([1, 2, 3, 4]))


def test_default_chunk_is_about_the_size_of_the_hidden_states_and_not_tiny():
    # LLaMA: 8192 labelled rows, hidden 4096, vocab 32000 -> 8 chunks of 1024 rows
    assert default_chunk_rows(8192, 4096, 32000) == 1024
    assert default_chunk_rows(0, 4096, 32000) == 1
    # but never so few rows that the matmuls crawl: 135m (hidden 576, vocab 49152) would get 32
    assert default_chunk_rows(1742, 576, 49152) == 512
    assert default_chunk_rows(5, 64, 1000) == 8  # fewer rows than that: all in one chunk

"""Linear layer (lm_head) + cross-entropy, fused in chunks so the (tokens x vocab) logits never exist.

Rows whose label is ignore_index are dropped before any matmul (in chat training about half of
the tokens are prompt). The labelled rows go through in chunks: logits = hidden @ weight.T for the
chunk (cuBLAS), then one kernel pass per row computes log-sum-exp and the row's loss and
overwrites the logits with the gradient softmax - onehot, then grad_hidden = grad @ weight and
grad_weight += grad.T @ hidden. The gradients are thus computed in the forward pass (the loss is
a scalar, so backward only scales them), and the largest buffer is one chunk of logits, sized like
the hidden states of all tokens (vocab/hidden chunks, as Liger-Kernel does), but of at least 512
rows: a small model's large vocabulary would otherwise give chunks too thin for fast matmuls. Without gradients
(torch.no_grad, or nothing requiring grad) the kernel computes the loss only and writes nothing.
One host sync per call (the labelled-row count, with the label range check). Under autocast the
matmuls run in autocast's dtype whatever the inputs' dtypes, as F.linear would; each gradient is
returned in its input's dtype.

Pieces: `linear_cross_entropy_reference` (pure torch, unfused: F.linear + F.cross_entropy), the
Triton kernel for the per-chunk softmax/gradient and its torch twin, `FusedLinearCrossEntropyFunction`
(autograd), and `fused_linear_cross_entropy` (the dispatcher: CUDA tensors -> Triton; CPU tensors
-> the same chunked algorithm with the torch twin, or the Triton kernel under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

try:  # triton is missing on macOS and Windows: the torch path serves there
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def linear_cross_entropy_reference(hidden, weight, labels, ignore_index=-100, reduction="sum"):
    """Unfused reference: full logits in the input dtype, cross-entropy in float32 or better (as HF)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight)
    labels = labels.reshape(-1)
    logits = logits.to(_loss_dtype(logits.dtype))
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if reduction == "mean":
        loss = loss / (labels != ignore_index).sum().clamp(min=1)
    return loss


def _loss_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


NUM_WARPS = 8  # one row per program, up to 8192 logits per tile


def kernel_constants(vocab: int, grad: bool) -> dict:
    """The kernel's compile-time constants for a vocabulary size (also compile_check's)."""
    return {"BLOCK_V": min(8192, triton.next_power_of_2(vocab)), "GRAD": grad}


if triton is not None:

    @triton.jit
    def _cross_entropy_grad_kernel(LOGITS, stride_row, LABELS, LOSS, vocab, BLOCK_V: tl.constexpr,
                                   GRAD: tl.constexpr):
        """One row: loss = logsumexp(x) - x[label]; with GRAD x is overwritten with softmax(x) - onehot(label)."""
        row = tl.program_id(0)
        row_ptr = LOGITS + row.to(tl.int64) * stride_row
        label = tl.load(LABELS + row)
        offs = tl.arange(0, BLOCK_V)
        # pass 1: online max and sum of exponentials
        m = float("-inf")
        s = 0.0
        for start in range(0, vocab, BLOCK_V):
            x = tl.load(row_ptr + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        target = tl.load(row_ptr + label).to(tl.float32)  # read before pass 2 overwrites it
        tl.store(LOSS + row, lse - target)
        if GRAD:  # pass 2: gradient of the row's loss with respect to its logits, in place
            for start in range(0, vocab, BLOCK_V):
                mask = start + offs < vocab
                x = tl.load(row_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
                grad = tl.exp(x - lse) - tl.where(start + offs == label, 1.0, 0.0)
                tl.store(row_ptr + start + offs, grad.to(LOGITS.dtype.element_ty), mask=mask)


def _cross_entropy_grad_triton(logits, labels, grad):
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    _cross_entropy_grad_kernel[(logits.shape[0],)](
        logits, logits.stride(0), labels, loss, logits.shape[1], **kernel_constants(logits.shape[1], grad),
        num_warps=NUM_WARPS,
    )
    return loss.sum()


def _cross_entropy_grad_torch(logits, labels, grad):
    """Torch twin of the kernel: returns the summed loss; with `grad`, leaves softmax - onehot in
    `logits`. Works in place (no logsumexp temporary): the largest extra buffer is a float32 copy
    of a low-precision chunk."""
    x = logits.to(_loss_dtype(logits.dtype))  # no copy for float32 and float64
    target = x.gather(1, labels[:, None]).squeeze(1)
    row_max = x.amax(1)
    x.sub_(row_max[:, None]).exp_()
    total = x.sum(1)
    if grad:
        x.div_(total[:, None])
        x[torch.arange(x.shape[0], device=x.device), labels] -= 1
        if x is not logits:
            logits.copy_(x)
    return (row_max + total.log() - target).sum()


# Fewer rows than this make the chunk's matmuls slow: on a CPU (hidden 576, vocab 49152, fp32) 32-row
# chunks ran at 62 GFLOP/s and 512-row ones at 136. One such chunk of logits is small (512 x 128k
# vocab in fp32: 256 MB) next to what a model that size holds anyway.
MIN_CHUNK_ROWS = 512


def default_chunk_rows(n_rows: int, hidden_size: int, vocab: int) -> int:
    """Rows per chunk (a power of two): one chunk of logits about as large as the hidden states of
    all rows, but at least MIN_CHUNK_ROWS rows (or all of them, when there are fewer)."""
    n_chunks = -(-vocab // hidden_size)
    by_memory = 1 << (max(1, -(-n_rows // n_chunks)) - 1).bit_length()
    all_rows = 1 << (max(1, n_rows) - 1).bit_length()
    return max(by_memory, min(MIN_CHUNK_ROWS, all_rows))


def _labelled_rows(labels, ignore_index, vocab):
    """Indices of the labelled rows, after one host sync (their count, and the labels' range check)."""
    labelled = labels != ignore_index
    out_of_range = labelled & ((labels < 0) | (labels >= vocab))
    n_labelled, n_bad = torch.stack([labelled.sum(), out_of_range.sum()]).tolist()
    if n_bad:
        raise ValueError(f"fused_linear_cross_entropy: labels must be in [0, {vocab}) or {ignore_index}; "
                         f"{n_bad} are not")
    # with the count known, nonzero_static needs no second sync
    return torch.nonzero_static(labelled, size=n_labelled).squeeze(1)


def _device_guard(tensor):
    """Launches go to the current CUDA device: make it the tensors' own (cuda:1 included)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_rows, use_triton, compute_dtype,
                grad_hidden_on, grad_weight_on):
        ce_grad = _cross_entropy_grad_triton if use_triton else _cross_entropy_grad_torch
        grad_on = grad_hidden_on or grad_weight_on  # evaluation: no gradient is written at all
        keep = _labelled_rows(labels, ignore_index, weight.shape[0])
        n_labelled = keep.numel()
        # mean: scale after the matmuls, not the per-logit gradients (small ones would underflow in fp16)
        scale = 1.0 / n_labelled if reduction == "mean" and n_labelled else 1.0
        grad_hidden = torch.zeros_like(hidden) if grad_hidden_on else None
        grad_weight = torch.zeros_like(weight) if grad_weight_on else None
        loss = torch.zeros((), device=hidden.device, dtype=_loss_dtype(compute_dtype))
        chunk_rows = chunk_rows or default_chunk_rows(n_labelled, hidden.shape[1], weight.shape[0])
        w = weight.to(compute_dtype)  # under autocast: the lm_head cast once per call, as autocast would
        with _device_guard(hidden):
            for rows in keep.split(chunk_rows):
                h = hidden[rows].to(compute_dtype)
                logits = h @ w.T
                loss += ce_grad(logits, labels[rows].contiguous(), grad_on)
                if grad_hidden_on:
                    grad_hidden.index_copy_(0, rows, torch.mm(logits, w).mul_(scale).to(hidden.dtype))
                if grad_weight_on and grad_weight.dtype == compute_dtype:
                    grad_weight.addmm_(logits.T, h, alpha=scale)
                elif grad_weight_on:  # a float32 lm_head under bf16 autocast keeps a float32 gradient
                    grad_weight.add_(torch.mm(logits.T, h), alpha=scale)
                del h, logits  # free this chunk before the next one's matmul allocates
        # kept on ctx, not saved for backward: they are results, and backward scales them in place
        ctx.grads = (grad_hidden, grad_weight)
        return loss * scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("fused_linear_cross_entropy: backward can run only once per forward")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # in place: no second (tokens x hidden) buffer
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss.to(grad_hidden.dtype))
        if grad_weight is not None:
            grad_weight.mul_(grad_loss.to(grad_weight.dtype))
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _compute_dtype(hidden, weight):
    """The matmuls' dtype: autocast's where it is on for these tensors (hidden states in float32
    with a bf16 lm_head, or the reverse, as F.linear would run them), else their common dtype."""
    device_type = hidden.device.type
    low_precision = torch.float64 not in (hidden.dtype, weight.dtype)  # autocast leaves float64 alone
    if low_precision and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"fused_linear_cross_entropy: hidden is {hidden.dtype} and weight {weight.dtype}; "
                         "cast one, or run under torch.autocast")
    return hidden.dtype


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernel serves `tensor`: on a GPU, or on CPU under TRITON_INTERPRET=1."""
    if triton is None or tensor.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def fused_linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="sum", chunk_rows=None):
    """Cross-entropy of `hidden @ weight.T` against `labels` without materialising all the logits.

    hidden (..., hidden_size), weight (vocab, hidden_size), labels (...) already aligned with hidden
    (shift them before calling). Returns a float32 scalar (float64 for float64 inputs): the sum over
    labelled tokens, or with reduction="mean" the sum divided by the number of labelled tokens,
    `(labels != ignore_index).sum()`; a batch with no labelled token gives 0 and zero gradients.
    The gradient for `weight` is computed only when it requires grad (a frozen lm_head skips it).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"fused_linear_cross_entropy: reduction must be 'sum' or 'mean', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"fused_linear_cross_entropy: hidden (..., H) {tuple(hidden.shape)}, weight (V, H) "
            f"{tuple(weight.shape)} and labels (...) {tuple(labels.shape)} do not fit together"
        )
    if not hidden.device == weight.device == labels.device:
        raise ValueError(f"fused_linear_cross_entropy: hidden, weight and labels are on different devices "
                         f"({hidden.device}, {weight.device}, {labels.device})")
    compute_dtype = _compute_dtype(hidden, weight)
    grad_on = torch.is_grad_enabled()
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen above, once
        return FusedLinearCrossEntropyFunction.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            weight,
            labels.reshape(-1),
            ignore_index,
            reduction,
            chunk_rows,
            triton_enabled(hidden),
            compute_dtype,
            grad_on and hidden.requires_grad,
            grad_on and weight.requires_grad,
        )

"""Causal attention over packed documents (varlen), FlashAttention-2 style, in Triton.

Calling convention of flash-attn's varlen function with one `cu_seqlens` for queries and keys:
q (total_tokens, n_heads, head_dim), k/v (total_tokens, n_kv_heads, head_dim), cu_seqlens int32
(n_docs + 1,) with cu_seqlens[0] == 0 and cu_seqlens[-1] == total_tokens. A token attends to the
tokens of its own document up to itself, never across documents. n_kv_heads must divide n_heads
(grouped-query attention: query head h reads key/value head h // (n_heads // n_kv_heads)).

Work is proportional to the sum of len^2 over documents, not (sum of len)^2: every program owns one
block of one document and visits only that document's key blocks up to the diagonal. Programs find
their (document, block) from cu_seqlens on the GPU: document b owns the virtual block numbers
starting at cu_seqlens[b] // BLOCK + b, which is increasing in b and leaves each document at least
cdiv(len, BLOCK) numbers, so the grid is cdiv(total_tokens, BLOCK) + n_docs with no host sync and a
binary search over cu_seqlens in each program.

Pieces: `varlen_attention_reference` (pure torch, SDPA per document), the Triton kernels and their
launchers, `VarlenAttentionFunction` (autograd), and `varlen_attention` (the dispatcher: CUDA
tensors -> Triton; CPU tensors -> the reference, or the Triton kernels under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:  # triton is missing on macOS and Windows: the reference serves there
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LOG2_E = math.log2(math.e)  # the kernels work in base 2: exp2/log2 are the fast instructions


def varlen_attention_reference(q, k, v, cu_seqlens, softmax_scale=None):
    """Pure-torch reference: SDPA once per document (never a dense mask over the whole row)."""
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or min(lengths, default=-1) < 0:
        raise ValueError(
            f"cu_seqlens must rise from 0 to total_tokens={q.shape[0]}; got {bounds[:4]}...{bounds[-2:]}"
        )
    outs = []
    # split, not slicing: its backward is one concatenation, where each slice's backward would
    # write its gradient into a zero tensor of the whole row (memory and time x documents)
    for qd, kd, vd in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
        if qd.shape[0] == 0:
            continue
        # (tokens, heads, dim) -> (1, heads, tokens, dim): SDPA's fused CPU kernel wants 4-D input
        # (3-D input falls back to the math path, materialising len x len scores)
        qd, kd, vd = (t.transpose(0, 1)[None] for t in (qd, kd, vd))
        od = F.scaled_dot_product_attention(
            qd, kd, vd, is_causal=True, scale=softmax_scale, enable_gqa=kd.shape[1] != qd.shape[1]
        )
        outs.append(od[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK: tl.constexpr):
        """This program's document (start, length) and block index inside it (see module docstring)."""
        # Launch the last virtual blocks first: the last blocks of a document have the most work.
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        lo = 0
        hi = n_docs
        for _ in range(n_search_steps):
            mid = (lo + hi) // 2
            go_right = tl.load(cu_seqlens + mid) // BLOCK + mid <= pid
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        doc_start = tl.load(cu_seqlens + lo)
        doc_len = tl.load(cu_seqlens + lo + 1) - doc_start
        block = pid - (doc_start // BLOCK + lo)
        return doc_start.to(tl.int64), doc_len, block

    @triton.jit
    def _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, offs_m, offs_n, MASKED: tl.constexpr,
                  PRECISION: tl.constexpr):
        qk = tl.dot(q, k, input_precision=PRECISION) * qk_scale  # log2 units: exp2 below
        if MASKED:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return acc, m_new, l_i

    @triton.jit
    def _fwd_kernel(
        Q, K, V, Out, LSE, cu_seqlens, n_docs, n_search_steps, total_tokens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        doc_start, doc_len, m_block = _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK_M)
        if m_block * BLOCK_M >= doc_len:
            return
        head = tl.program_id(1)
        kv_head = head // GROUP
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # head dims that are not a power of two are padded to BLOCK_D
        m_ok = offs_m < doc_len

        q = tl.load(Q + (doc_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_ptrs = K + (doc_start + offs_n)[None, :] * stride_kt + kv_head * stride_kh + offs_d[:, None]
        v_ptrs = V + (doc_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        diag_start = m_block * BLOCK_M
        # Key blocks wholly below the diagonal: every key is in the document and visible.
        for start_n in range(0, diag_start, BLOCK_N):
            k = tl.load(k_ptrs + start_n * stride_kt, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=d_ok[None, :], other=0.0)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, offs_m, start_n + offs_n,
                                      False, PRECISION)
        # Key blocks on the diagonal: causal mask; keys past the document's end are masked by it too.
        for start_n in range(diag_start, tl.minimum(diag_start + BLOCK_M, doc_len), BLOCK_N):
            n_ok = start_n + offs_n < doc_len
            k = tl.load(k_ptrs + start_n * stride_kt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, offs_m, start_n + offs_n,
                                      True, PRECISION)

        out = acc / l_i[:, None]
        tl.store(Out + (doc_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        # log-sum-exp in log2 units, for the backward pass
        tl.store(LSE + head * total_tokens + doc_start + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)

    @triton.jit
    def _bwd_delta_kernel(Out, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        """delta = rowsum(O * dO), the softmax-gradient correction, per token and head."""
        head = tl.program_id(1)
        offs_t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_t < total_tokens)[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(Out + offs_t[:, None] * stride_ot + head * stride_oh + offs_d[None, :], mask=mask,
                    other=0.0)
        do = tl.load(DO + offs_t[:, None] * stride_dot + head * stride_doh + offs_d[None, :], mask=mask,
                     other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + head * total_tokens + offs_t, delta, mask=offs_t < total_tokens)

    @triton.jit
    def _bwd_kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, row0, lse_row0, start_m, doc_len, offs_n,
                     stride_qt, stride_dot, qk_scale, d_ok,
                     BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, d_ok.shape[0])
        m_ok = offs_m < doc_len
        q = tl.load(Q + (row0 + offs_m)[:, None] * stride_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + (row0 + offs_m)[:, None] * stride_dot + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        # lse = +inf past the document's end makes those rows' probabilities exactly 0
        lse = tl.load(LSE + lse_row0 + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + lse_row0 + offs_m, mask=m_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens, n_docs, n_search_steps, total_tokens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        qk_scale, softmax_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One key block of one document and one kv head: sums over the query heads of its group."""
        doc_start, doc_len, n_block = _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK_N)
        if n_block * BLOCK_N >= doc_len:
            return
        kv_head = tl.program_id(1)
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        kv_mask = (offs_n < doc_len)[:, None] & d_ok[None, :]
        k = tl.load(K + (doc_start + offs_n)[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (doc_start + offs_n)[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        diag_start = n_block * BLOCK_N
        for g in range(GROUP):
            head = kv_head * GROUP + g
            q_head = Q + head * stride_qh
            do_head = DO + head * stride_doh
            lse_row0 = head * total_tokens + doc_start
            # Query blocks on the diagonal need the causal mask; those after it see the whole key block.
            for start_m in range(diag_start, tl.minimum(diag_start + BLOCK_N, doc_len), BLOCK_M):
                dk, dv = _bwd_kv_step(dk, dv, k, v, q_head, do_head, LSE, DELTA, doc_start, lse_row0,
                                      start_m, doc_len, offs_n, stride_qt, stride_dot, qk_scale, d_ok,
                                      BLOCK_M, True, PRECISION)
            for start_m in range(diag_start + BLOCK_N, doc_len, BLOCK_M):
                dk, dv = _bwd_kv_step(dk, dv, k, v, q_head, do_head, LSE, DELTA, doc_start, lse_row0,
                                      start_m, doc_len, offs_n, stride_qt, stride_dot, qk_scale, d_ok,
                                      BLOCK_M, False, PRECISION)
        tl.store(DK + (doc_start + offs_n)[:, None] * stride_dkt + kv_head * stride_dkh + offs_d[None, :],
                 (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (doc_start + offs_n)[:, None] * stride_dvt + kv_head * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_step(dq, q, do, lse, delta, K, V, start_n, doc_len, offs_m, stride_kt, stride_vt, qk_scale,
                     d_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, d_ok.shape[0])
        kv_mask = (offs_n < doc_len)[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, n_docs, n_search_steps, total_tokens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        qk_scale, softmax_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        doc_start, doc_len, m_block = _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK_M)
        if m_block * BLOCK_M >= doc_len:
            return
        head = tl.program_id(1)
        kv_head = head // GROUP
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        m_ok = offs_m < doc_len
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + (doc_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + (doc_start + offs_m)[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + head * total_tokens + doc_start + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + head * total_tokens + doc_start + offs_m, mask=m_ok, other=0.0)
        k_doc = K + doc_start * stride_kt + kv_head * stride_kh
        v_doc = V + doc_start * stride_vt + kv_head * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        diag_start = m_block * BLOCK_M
        for start_n in range(0, diag_start, BLOCK_N):
            dq = _bwd_dq_step(dq, q, do, lse, delta, k_doc, v_doc, start_n, doc_len, offs_m, stride_kt,
                              stride_vt, qk_scale, d_ok, BLOCK_N, False, PRECISION)
        for start_n in range(diag_start, tl.minimum(diag_start + BLOCK_M, doc_len), BLOCK_N):
            dq = _bwd_dq_step(dq, q, do, lse, delta, k_doc, v_doc, start_n, doc_len, offs_m, stride_kt,
                              stride_vt, qk_scale, d_ok, BLOCK_N, True, PRECISION)
        tl.store(DQ + (doc_start + offs_m)[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)

    def _cuda_configs(pairs, warps_stages):
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in pairs
            for w, s in warps_stages
        ]

    def prune_configs(configs, named_args, **kwargs):
        """float32 tiles are twice as large and compile ~15x slower: try only the smallest one."""
        if named_args["Q"].dtype == torch.float32:
            return [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
        return configs

    def _tuned(kernel, pairs, warps_stages):
        return triton.autotune(_cuda_configs(pairs, warps_stages), key=["HEAD_DIM"],
                               prune_configs_by={"early_config_prune": prune_configs})(kernel)

    # On a GPU the block sizes are tuned once per head dim and dtype; the interpreter runs fixed ones.
    _fwd_kernel_tuned = _tuned(_fwd_kernel, [(128, 64), (128, 32), (64, 64), (64, 32)],
                               [(4, 3), (8, 3), (4, 4)])
    _bwd_dkdv_kernel_tuned = _tuned(_bwd_dkdv_kernel, [(32, 128), (64, 128), (32, 64), (64, 64)],
                                    [(4, 3), (8, 3), (4, 5)])
    _bwd_dq_kernel_tuned = _tuned(_bwd_dq_kernel, [(128, 32), (128, 64), (64, 64), (64, 32)],
                                  [(4, 3), (8, 3), (4, 5)])


# Fixed tiles for the interpreter: large tiles mean fewer (slow, Python-level) program instances.
# (BLOCK_M, BLOCK_N) per kernel; the forward and dq need BLOCK_M % BLOCK_N == 0, dkdv the reverse.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}


def _launch(kernel, tuned, blocks, grid_block, n_docs, total_tokens, heads, args, consts):
    """Run `kernel` with fixed `blocks` (BLOCK_M, BLOCK_N) or, on a GPU, its autotuned twin.

    The grid's first axis has one program per virtual block of size `grid_block` ("BLOCK_M" or
    "BLOCK_N"), plus one spare per document (see the module docstring).
    """
    if blocks is None:
        tuned[lambda meta: (triton.cdiv(total_tokens, meta[grid_block]) + n_docs, heads)](*args, **consts)
        return
    block_m, block_n = blocks
    block = block_m if grid_block == "BLOCK_M" else block_n
    grid = (triton.cdiv(total_tokens, block) + n_docs, heads)
    kernel[grid](*args, **consts, BLOCK_M=block_m, BLOCK_N=block_n)


def _blocks(blocks, name):
    if blocks is not None:
        return blocks[name]
    return INTERPRETER_BLOCKS[name] if os.environ.get("TRITON_INTERPRET") == "1" else None


def _constants(q, k):
    head_dim = q.shape[2]
    return dict(
        GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # fp32 inputs get full-precision dots (tf32 would cost ~1e-3 relative error on a GPU)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _forward(q, k, v, cu_seqlens, softmax_scale, blocks=None):
    total_tokens, n_heads, _ = q.shape
    n_docs = cu_seqlens.numel() - 1
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((n_heads, total_tokens), device=q.device, dtype=torch.float32)
    args = (q, k, v, out, lse, cu_seqlens, n_docs, n_docs.bit_length(), total_tokens,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), softmax_scale * LOG2_E)
    _launch(_fwd_kernel, _fwd_kernel_tuned, _blocks(blocks, "fwd"), "BLOCK_M", n_docs, total_tokens,
            n_heads, args, _constants(q, k))
    return out, lse


def _backward(q, k, v, out, lse, dout, cu_seqlens, softmax_scale, blocks=None):
    total_tokens, n_heads, _ = q.shape
    n_docs = cu_seqlens.numel() - 1
    consts = _constants(q, k)
    delta = torch.empty_like(lse)
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(total_tokens, delta_block), n_heads)](
        out, dout, delta, total_tokens, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], BLOCK=delta_block,
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    head = (q, k, v, dout, lse, delta)
    search = (cu_seqlens, n_docs, n_docs.bit_length(), total_tokens)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    scales = (softmax_scale * LOG2_E, softmax_scale)
    args = (*head, dk, dv, *search, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scales)
    _launch(_bwd_dkdv_kernel, _bwd_dkdv_kernel_tuned, _blocks(blocks, "dkdv"), "BLOCK_N", n_docs,
            total_tokens, k.shape[1], args, consts)
    args = (*head, dq, *search, *strides, dq.stride(0), dq.stride(1), *scales)
    _launch(_bwd_dq_kernel, _bwd_dq_kernel_tuned, _blocks(blocks, "dq"), "BLOCK_M", n_docs, total_tokens,
            n_heads, args, consts)
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; `blocks` pins tile sizes (tests), None tunes them."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, softmax_scale, blocks=None):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        out, lse = _forward(q, k, v, cu_seqlens, softmax_scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.softmax_scale = softmax_scale
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        dq, dk, dv = _backward(q, k, v, out, lse, dout, cu_seqlens, ctx.softmax_scale, ctx.blocks)
        return dq, dk, dv, None, None, None


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve `tensor`: on a GPU, or on CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None):
    """Causal attention within each packed document: (total_tokens, n_heads, head_dim) in and out.

    `cu_seqlens` (int32, n_docs + 1) holds document boundaries for queries and keys alike;
    `max_seqlen` is accepted for flash-attn compatibility and not needed (programs find their
    document on the GPU). `softmax_scale` defaults to 1/sqrt(head_dim). CUDA tensors run the
    Triton kernels; CPU tensors run SDPA per document, or the kernels under TRITON_INTERPRET=1.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[::2] != k.shape[::2]:
        raise ValueError(
            "varlen_attention: q must be (tokens, heads, dim) and k, v (tokens, kv_heads, dim); got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"varlen_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError("varlen_attention: cu_seqlens must be a 1-D int32 tensor of n_docs + 1 boundaries")
    if softmax_scale is None:
        softmax_scale = q.shape[2] ** -0.5
    if triton_enabled(q):
        return VarlenAttentionFunction.apply(q, k, v, cu_seqlens.to(q.device), float(softmax_scale))
    return varlen_attention_reference(q, k, v, cu_seqlens, softmax_scale)

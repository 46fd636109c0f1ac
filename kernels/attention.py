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

Boundaries are checked on the host (`check_cu_seqlens`), where they are built: a CPU `cu_seqlens`
is checked on every call (no device sync), a GPU one is trusted (checking it would wait for the
GPU on every layer). Addresses: every offset that grows with the token count (document and block
starts, head offsets) is computed in int64; only offsets inside one tile stay int32.

Pieces: `varlen_attention_reference` (pure torch, SDPA per document), the Triton kernels and their
launchers, `VarlenAttentionFunction` (autograd), and `varlen_attention` (the dispatcher: CUDA
tensors -> Triton; CPU tensors -> the reference, or the Triton kernels under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import contextlib
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


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int) -> None:
    """Raise ValueError unless `cu_seqlens` is a 1-D int32 tensor of boundaries rising from 0 to
    `total_tokens` (non-decreasing: empty documents are allowed).

    It reads the values: call it on the host, where the boundaries are built (on a GPU tensor it
    would wait for the GPU). The Triton path trusts GPU boundaries; wrong ones read out of bounds.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            "cu_seqlens must be a 1-D int32 tensor of n_docs + 1 boundaries; got "
            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    bounds = cu_seqlens.tolist()
    rising = all(a <= b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    if bounds[0] != 0 or bounds[-1] != total_tokens or not rising:
        shown = bounds if len(bounds) <= 8 else [*bounds[:4], "...", *bounds[-3:]]
        raise ValueError(f"cu_seqlens must rise from 0 to total_tokens={total_tokens}; got {shown}")


def varlen_attention_reference(q, k, v, cu_seqlens, softmax_scale=None):
    """Pure-torch reference: SDPA once per document (never a dense mask over the whole row)."""
    check_cu_seqlens(cu_seqlens, q.shape[0])
    bounds = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
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

# Boundaries and token counts change with every batch: no recompilation for their values
# (Triton would otherwise specialise on ==1 and on divisibility by 16).
_VARYING = ["n_docs", "n_search_steps", "total_tokens"]


# Per kernel: (rows of a program's own tile per warp, most columns, largest BLOCK_M x BLOCK_N), measured
# for sm_90 at head dim 128 with kernels/compile_check.py (aligned bf16 variants; head dim 80 pads to
# the same tiles). A program's own rows are BLOCK_M (forward, dq) or BLOCK_N (dk/dv, which hold two
# float32 accumulators besides k and v, hence half the rows per warp); the columns are the other block.
# Fewer warps spill registers (forward 128 x 64 on 4 warps: 3 KB per thread; dk/dv with 64 key rows on
# 4 warps: 0.9-2.3 KB); more leave warps without work; wider or larger tiles spill whatever the warps
# (dq 64 x 64: 40 B, 128 x 64: 88 B on 8 warps; dk/dv 32 x 64: 160 B on 8 warps, 128 key rows: 0.3-10 KB).
_TILE_RULES = {"fwd": (16, 64, 128 * 64), "dq": (16, 32, 128 * 32), "dkdv": (8, 32, 32 * 32)}


def keep(config, kernel: str) -> bool:
    """Whether a tuning config stays in `kernel`'s space ("fwd", "dkdv" or "dq"): see _TILE_RULES."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    rows_per_warp, most_cols, largest = _TILE_RULES[kernel]
    rows, cols = (block_n, block_m) if kernel == "dkdv" else (block_m, block_n)
    return config.num_warps * rows_per_warp == rows and cols <= most_cols and rows * cols <= largest


if triton is not None:

    @triton.jit
    def _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK: tl.constexpr, LAST_FIRST: tl.constexpr):
        """This program's document (start, length) and block index inside it (see module docstring).

        LAST_FIRST launches the last virtual blocks first: in the forward and dq a document's last
        blocks have the most work, in dk/dv its first blocks do (LAST_FIRST=False)."""
        pid = tl.program_id(0)
        if LAST_FIRST:
            pid = tl.num_programs(0) - 1 - pid
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

    @triton.jit(do_not_specialize=_VARYING)
    def _fwd_kernel(
        Q, K, V, Out, LSE, cu_seqlens, n_docs, n_search_steps, total_tokens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        qk_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # the diagonal loop covers a query block with whole key blocks: none may reach past it
        tl.static_assert(BLOCK_M % BLOCK_N == 0, "forward tiles need BLOCK_M % BLOCK_N == 0")
        doc_start, doc_len, m_block = _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK_M, True)
        if m_block * BLOCK_M >= doc_len:
            return
        head = tl.program_id(1).to(tl.int64)
        kv_head = head // GROUP
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM  # head dims that are not a power of two are padded to BLOCK_D
        diag_start = m_block * BLOCK_M
        offs_m = diag_start + rows  # in-document token indices (int32), for masks only
        m_ok = offs_m < doc_len
        row0 = doc_start + diag_start  # int64: addresses grow with the token count

        q = tl.load(Q + row0 * stride_qt + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        # key/value tiles at the document's start; each block adds its own int64 start below
        k_tile = K + doc_start * stride_kt + kv_head * stride_kh + cols[None, :] * stride_kt + offs_d[:, None]
        v_tile = V + doc_start * stride_vt + kv_head * stride_vh + cols[:, None] * stride_vt + offs_d[None, :]

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # Key blocks wholly below the diagonal: every key is in the document and visible.
        for start_n in range(0, diag_start, BLOCK_N):
            n64 = tl.cast(start_n, tl.int64)
            k = tl.load(k_tile + n64 * stride_kt, mask=d_ok[:, None], other=0.0)
            v = tl.load(v_tile + n64 * stride_vt, mask=d_ok[None, :], other=0.0)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, offs_m, start_n + cols,
                                      False, PRECISION)
        # Key blocks on the diagonal: causal mask; keys past the document's end are masked by it too.
        for start_n in range(diag_start, tl.minimum(diag_start + BLOCK_M, doc_len), BLOCK_N):
            n64 = tl.cast(start_n, tl.int64)
            n_ok = start_n + cols < doc_len
            k = tl.load(k_tile + n64 * stride_kt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            v = tl.load(v_tile + n64 * stride_vt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, k, v, qk_scale, offs_m, start_n + cols,
                                      True, PRECISION)

        out = acc / l_i[:, None]
        tl.store(Out + row0 * stride_ot + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        # log-sum-exp in log2 units, for the backward pass
        tl.store(LSE + head * total_tokens + row0 + rows, m_i + tl.math.log2(l_i), mask=m_ok)

    @triton.jit(do_not_specialize=["total_tokens"])
    def _bwd_delta_kernel(Out, DO, DELTA, total_tokens, stride_ot, stride_oh, stride_dot, stride_doh,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
        """delta = rowsum(O * dO), the softmax-gradient correction, per token and head."""
        head = tl.program_id(1).to(tl.int64)
        row0 = tl.program_id(0).to(tl.int64) * BLOCK
        rows = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        t_ok = row0 + rows < total_tokens
        mask = t_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = tl.load(Out + row0 * stride_ot + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :],
                    mask=mask, other=0.0)
        do = tl.load(DO + row0 * stride_dot + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                     mask=mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + head * total_tokens + row0 + rows, delta, mask=t_ok)

    @triton.jit
    def _bwd_kv_step(dk, dv, k, v, Q, DO, LSE, DELTA, start_m, doc_len, offs_n,
                     stride_qt, stride_dot, qk_scale, d_ok,
                     BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """Q, DO, LSE, DELTA point at this head's first token of the document."""
        rows = tl.arange(0, BLOCK_M)
        offs_m = start_m + rows
        offs_d = tl.arange(0, d_ok.shape[0])
        m_ok = offs_m < doc_len
        m64 = tl.cast(start_m, tl.int64)
        q = tl.load(Q + m64 * stride_qt + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(DO + m64 * stride_dot + rows[:, None] * stride_dot + offs_d[None, :],
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        # lse = +inf past the document's end makes those rows' probabilities exactly 0
        lse = tl.load(LSE + m64 + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + m64 + rows, mask=m_ok, other=0.0)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit(do_not_specialize=_VARYING)
    def _bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, cu_seqlens, n_docs, n_search_steps, total_tokens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        qk_scale, softmax_scale,
        GROUP: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One key block of one document and one kv head, summed over GROUP // SPLIT of the query
        heads of its group: program_id(1) = kv_head * SPLIT + part, which is also the head index of
        DK and DV (n_kv_heads * SPLIT heads: with SPLIT > 1 the caller sums the parts)."""
        # the diagonal loop covers a key block with whole query blocks: none may reach past it
        tl.static_assert(BLOCK_N % BLOCK_M == 0, "dk/dv tiles need BLOCK_N % BLOCK_M == 0")
        tl.static_assert(GROUP % SPLIT == 0, "SPLIT must divide GROUP")
        doc_start, doc_len, n_block = _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK_N, False)
        if n_block * BLOCK_N >= doc_len:
            return
        out_head = tl.program_id(1).to(tl.int64)
        kv_head = out_head // SPLIT
        first_head = kv_head * GROUP + (out_head % SPLIT) * (GROUP // SPLIT)
        cols = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        diag_start = n_block * BLOCK_N
        offs_n = diag_start + cols
        kv_mask = (offs_n < doc_len)[:, None] & d_ok[None, :]
        row0 = doc_start + diag_start
        k = tl.load(K + row0 * stride_kt + kv_head * stride_kh + cols[:, None] * stride_kt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + row0 * stride_vt + kv_head * stride_vh + cols[:, None] * stride_vt + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(GROUP // SPLIT):
            head = first_head + g
            q_doc = Q + doc_start * stride_qt + head * stride_qh
            do_doc = DO + doc_start * stride_dot + head * stride_doh
            lse_doc = LSE + head * total_tokens + doc_start
            delta_doc = DELTA + head * total_tokens + doc_start
            # Query blocks on the diagonal need the causal mask; those after it see the whole key block.
            for start_m in range(diag_start, tl.minimum(diag_start + BLOCK_N, doc_len), BLOCK_M):
                dk, dv = _bwd_kv_step(dk, dv, k, v, q_doc, do_doc, lse_doc, delta_doc, start_m, doc_len,
                                      offs_n, stride_qt, stride_dot, qk_scale, d_ok, BLOCK_M, True, PRECISION)
            for start_m in range(diag_start + BLOCK_N, doc_len, BLOCK_M):
                dk, dv = _bwd_kv_step(dk, dv, k, v, q_doc, do_doc, lse_doc, delta_doc, start_m, doc_len,
                                      offs_n, stride_qt, stride_dot, qk_scale, d_ok, BLOCK_M, False, PRECISION)
        tl.store(DK + row0 * stride_dkt + out_head * stride_dkh + cols[:, None] * stride_dkt + offs_d[None, :],
                 (dk * softmax_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + row0 * stride_dvt + out_head * stride_dvh + cols[:, None] * stride_dvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_step(dq, q, do, lse, delta, K, V, start_n, doc_len, offs_m, stride_kt, stride_vt, qk_scale,
                     d_ok, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
        """K and V point at this kv head's first token of the document."""
        cols = tl.arange(0, BLOCK_N)
        offs_n = start_n + cols
        offs_d = tl.arange(0, d_ok.shape[0])
        kv_mask = (offs_n < doc_len)[:, None] & d_ok[None, :]
        n64 = tl.cast(start_n, tl.int64)
        k = tl.load(K + n64 * stride_kt + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + n64 * stride_vt + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit(do_not_specialize=_VARYING)
    def _bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, n_docs, n_search_steps, total_tokens,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dqt, stride_dqh,
        qk_scale, softmax_scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    ):
        tl.static_assert(BLOCK_M % BLOCK_N == 0, "dq tiles need BLOCK_M % BLOCK_N == 0")
        doc_start, doc_len, m_block = _locate_block(cu_seqlens, n_docs, n_search_steps, BLOCK_M, True)
        if m_block * BLOCK_M >= doc_len:
            return
        head = tl.program_id(1).to(tl.int64)
        kv_head = head // GROUP
        rows = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        diag_start = m_block * BLOCK_M
        offs_m = diag_start + rows
        m_ok = offs_m < doc_len
        q_mask = m_ok[:, None] & d_ok[None, :]
        row0 = doc_start + diag_start
        q = tl.load(Q + row0 * stride_qt + head * stride_qh + rows[:, None] * stride_qt + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + row0 * stride_dot + head * stride_doh + rows[:, None] * stride_dot + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + head * total_tokens + row0 + rows, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + head * total_tokens + row0 + rows, mask=m_ok, other=0.0)
        k_doc = K + doc_start * stride_kt + kv_head * stride_kh
        v_doc = V + doc_start * stride_vt + kv_head * stride_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, diag_start, BLOCK_N):
            dq = _bwd_dq_step(dq, q, do, lse, delta, k_doc, v_doc, start_n, doc_len, offs_m, stride_kt,
                              stride_vt, qk_scale, d_ok, BLOCK_N, False, PRECISION)
        for start_n in range(diag_start, tl.minimum(diag_start + BLOCK_M, doc_len), BLOCK_N):
            dq = _bwd_dq_step(dq, q, do, lse, delta, k_doc, v_doc, start_n, doc_len, offs_m, stride_kt,
                              stride_vt, qk_scale, d_ok, BLOCK_N, True, PRECISION)
        tl.store(DQ + row0 * stride_dqt + head * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :],
                 (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_mask)

    def _cuda_configs(pairs, warps_stages):
        return [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in pairs
            for w, s in warps_stages
        ]

    # On a GPU the block sizes are tuned once per head dim and dtype; the interpreter runs fixed ones.
    # The spaces hold only configs that compile without register spills for sm_90 (`keep`;
    # kernels/compile_check.py asserts it for every variant). More stages raise dk/dv's spills.
    SPACES = {
        "fwd": [c for c in _cuda_configs([(128, 64), (128, 32), (64, 64), (64, 32)], [(4, 3), (8, 3), (4, 4)])
                if keep(c, "fwd")],
        "dkdv": [c for c in _cuda_configs([(16, 64), (32, 64), (32, 32), (16, 32), (32, 128)], [(4, 3), (8, 3)])
                 if keep(c, "dkdv")],
        "dq": [c for c in _cuda_configs([(128, 32), (128, 64), (64, 64), (64, 32)], [(4, 3), (8, 3), (4, 5)])
               if keep(c, "dq")],
    }
    # float32 (full-precision dots, no tensor cores) spills even on the smallest tiles above
    # (64 x 32: 75-100 KB per thread): one small config each, spill-free, and no tuning
    FP32_CONFIGS = {"fwd": _cuda_configs([(16, 16)], [(4, 2)]), "dkdv": _cuda_configs([(16, 16)], [(4, 2)]),
                    "dq": _cuda_configs([(32, 16)], [(4, 2)])}

    def space(kernel: str, dtype: torch.dtype) -> list:
        """The configs autotuning tries for `kernel` ("fwd", "dkdv", "dq") on `dtype` inputs."""
        return FP32_CONFIGS[kernel] if dtype == torch.float32 else SPACES[kernel]

    def _tuned(kernel, name):
        def prune(configs, named_args, **kwargs):
            return space(name, named_args["Q"].dtype)

        configs = SPACES[name] + FP32_CONFIGS[name]  # the autotuner's full list; `prune` picks per dtype
        return triton.autotune(configs, key=["HEAD_DIM"], prune_configs_by={"early_config_prune": prune})(kernel)

    _fwd_kernel_tuned = _tuned(_fwd_kernel, "fwd")
    _bwd_dkdv_kernel_tuned = _tuned(_bwd_dkdv_kernel, "dkdv")
    _bwd_dq_kernel_tuned = _tuned(_bwd_dq_kernel, "dq")


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


def dkdv_split(group: int, n_programs: int, device: torch.device) -> int:
    """Into how many parts the dk/dv programs split a GQA group's query heads.

    One program per kv head leaves a GPU idle on short rows (8 kv heads x 2,048 tokens: ~170
    programs for 132 SMs): the smallest divisor of the group that gives ~4 programs per SM, the
    parts' dk/dv summed after (flash-attn sums expanded heads the same way). The interpreter splits
    whole groups, so CPU tests cover the summing path."""
    if group == 1:
        return 1
    if device.type != "cuda":
        return group
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return next((s for s in range(1, group + 1) if group % s == 0 and n_programs * s >= target), group)


def _device_guard(tensor):
    """Launches go to the current CUDA device: make it the tensors' own (cuda:1 included)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


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
    total_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    n_docs = cu_seqlens.numel() - 1
    consts = _constants(q, k)
    delta = torch.empty_like(lse)
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(total_tokens, delta_block), n_heads)](
        out, dout, delta, total_tokens, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=consts["HEAD_DIM"], BLOCK_D=consts["BLOCK_D"], BLOCK=delta_block,
    )
    head = (q, k, v, dout, lse, delta)
    search = (cu_seqlens, n_docs, n_docs.bit_length(), total_tokens)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    scales = (softmax_scale * LOG2_E, softmax_scale)

    dkdv_blocks = _blocks(blocks, "dkdv")
    split = (blocks or {}).get("split")
    if split is None:  # programs per kv head, counted with the smallest key block of the space
        key_block = dkdv_blocks[1] if dkdv_blocks else min(c.kwargs["BLOCK_N"] for c in space("dkdv", q.dtype))
        n_programs = n_kv_heads * (triton.cdiv(total_tokens, key_block) + n_docs)
        split = dkdv_split(consts["GROUP"], n_programs, q.device)
    # with split > 1 every part writes its own dk/dv heads (in the input dtype, as flash-attn's
    # expanded heads), summed below
    parts = (total_tokens, n_kv_heads * split, head_dim)
    dk = torch.empty(parts, device=k.device, dtype=k.dtype)
    dv = torch.empty(parts, device=v.device, dtype=v.dtype)
    args = (*head, dk, dv, *search, *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scales)
    _launch(_bwd_dkdv_kernel, _bwd_dkdv_kernel_tuned, dkdv_blocks, "BLOCK_N", n_docs, total_tokens,
            n_kv_heads * split, args, {**consts, "SPLIT": split})
    if split > 1:
        dk, dv = (t.unflatten(1, (n_kv_heads, split)).sum(2) for t in (dk, dv))

    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    args = (*head, dq, *search, *strides, dq.stride(0), dq.stride(1), *scales)
    _launch(_bwd_dq_kernel, _bwd_dq_kernel_tuned, _blocks(blocks, "dq"), "BLOCK_M", n_docs, total_tokens,
            n_heads, args, consts)
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels; `blocks` pins tile sizes (tests), None tunes them.

    `blocks`: {"fwd": (BLOCK_M, BLOCK_N), "dkdv": ..., "dq": ...} and optionally "split" (see
    `dkdv_split`). `cu_seqlens` must be on q's device and valid (see `check_cu_seqlens`)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, softmax_scale, blocks=None):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        with _device_guard(q):
            out, lse = _forward(q, k, v, cu_seqlens, softmax_scale, blocks)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.softmax_scale = softmax_scale
        ctx.blocks = blocks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        with _device_guard(q):
            dq, dk, dv = _backward(q, k, v, out, lse, dout, cu_seqlens, ctx.softmax_scale, ctx.blocks)
        return dq, dk, dv, None, None, None


def triton_enabled(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels serve `tensor`: on a GPU, or on CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def varlen_attention(q, k, v, cu_seqlens, max_seqlen=None, softmax_scale=None):
    """Causal attention within each packed document: (total_tokens, n_heads, head_dim) in and out.

    `cu_seqlens` (int32, n_docs + 1) holds document boundaries for queries and keys alike; on the
    CPU it is checked here (`check_cu_seqlens`), on a GPU it is trusted: check it where it is built.
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
    if not q.device == k.device == v.device:
        raise ValueError(f"varlen_attention: q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"varlen_attention: kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if cu_seqlens.device.type == "cpu":  # on the host: checking costs no device sync
        check_cu_seqlens(cu_seqlens, q.shape[0])
    elif cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of n_docs + 1 boundaries")
    if softmax_scale is None:
        softmax_scale = q.shape[2] ** -0.5
    if triton_enabled(q):
        return VarlenAttentionFunction.apply(q, k, v, cu_seqlens.to(q.device), float(softmax_scale))
    return varlen_attention_reference(q, k, v, cu_seqlens, softmax_scale)

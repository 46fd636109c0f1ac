"""Packed-row attention for transformers models: qtulu's varlen kernel as an attention function.

`use_varlen_attention(model)` registers `qtulu_varlen` with transformers' AttentionInterface and
switches the model to it. Then give the model's forward the keyword arguments of a packed row
(`packed_row_kwargs(seq_lens)`: cu_seq_lens_q/k, max_length_q/k, position_ids restarting at every
document); transformers hands them to every attention call. Without cu_seq_lens the document
boundaries are read from position_ids (a position that does not follow its predecessor starts a
document); without either, each batch row is one document.

CUDA tensors run the Triton kernel; CPU tensors run SDPA once per document (the reference path,
never one dense (sum of len)^2 mask over the row), or the kernel under TRITON_INTERPRET=1.
Training only: a padded batch or a KV cache from earlier steps is refused with a clear error
(generate with "sdpa").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtulu.errors import QtuluError
from qtulu.kernels import varlen_attention
from qtulu.kernels.attention import check_cu_seqlens

ATTENTION_NAME = "qtulu_varlen"


def packed_row_kwargs(seq_lens, device=None) -> dict:
    """Forward keyword arguments for one packed row made of documents of `seq_lens` tokens each."""
    lens = torch.as_tensor(seq_lens, dtype=torch.int32).reshape(-1)
    if lens.numel() == 0 or bool((lens <= 0).any()):
        raise QtuluError(f"packed row: document lengths must be positive, got {lens.tolist()}")
    cu_seqlens = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
    check_cu_seqlens(cu_seqlens, int(cu_seqlens[-1]))  # built here, on the host: checked once, here
    starts = torch.repeat_interleave(cu_seqlens[:-1], lens)
    position_ids = torch.arange(int(cu_seqlens[-1]), dtype=torch.long) - starts
    max_len = int(lens.max())
    cu_seqlens = cu_seqlens.to(device)
    return {
        "cu_seq_lens_q": cu_seqlens,
        "cu_seq_lens_k": cu_seqlens,
        "max_length_q": max_len,
        "max_length_k": max_len,
        "position_ids": position_ids[None].to(device),
    }


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document boundaries of the flattened (batch * tokens) row: a document starts at every batch
    row's first token and wherever a position does not follow its predecessor."""
    batch, tokens = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([batch * tokens], device=first.device, dtype=first.dtype)
    return torch.cat([first, end]).to(torch.int32)


def qtulu_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query (batch, heads, tokens, dim), key/value (batch, kv_heads,
    tokens, dim); returns ((batch, tokens, heads, dim), None) as transformers' own functions do."""
    batch, n_heads, tokens, head_dim = query.shape
    if attention_mask is not None:
        raise QtuluError(
            f"{ATTENTION_NAME} attention got a padding mask: it runs on packed rows only; pack the batch "
            "(cu_seq_lens_q or position_ids, no padding) or use attn_implementation='sdpa'"
        )
    if key.shape[2] != tokens:
        raise QtuluError(
            f"{ATTENTION_NAME} attention is for training (queries and keys are the same tokens); it got "
            f"{tokens} queries and {key.shape[2]} keys from a KV cache: generate with "
            "attn_implementation='sdpa'"
        )
    if dropout:
        raise QtuluError(f"{ATTENTION_NAME} attention has no attention dropout; set attention_dropout to 0")
    if not getattr(module, "is_causal", True):
        raise QtuluError(f"{ATTENTION_NAME} attention is causal only; {type(module).__name__} is not causal")
    _refuse_unsupported(module, tokens, kwargs)

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None and kwargs.get("position_ids") is not None:
        cu_seqlens = cu_seqlens_from_position_ids(kwargs["position_ids"].expand(batch, -1))
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, batch * tokens + 1, tokens, dtype=torch.int32)
    cu_seqlens = cu_seqlens.to(device=query.device, dtype=torch.int32)

    # (batch, heads, tokens, dim) -> (batch * tokens, heads, dim); a view for a single packed row
    def flat(x):
        return x.transpose(1, 2).reshape(batch * tokens, x.shape[1], head_dim)

    out = varlen_attention(flat(query), flat(key), flat(value), cu_seqlens, kwargs.get("max_length_q"),
                           softmax_scale=scaling)
    return out.view(batch, tokens, n_heads, head_dim), None


def _refuse_unsupported(module, tokens, kwargs) -> None:
    """Refuse what the kernel does not compute rather than silently computing something else:
    sliding windows (Mistral, Gemma-2, GPT-OSS), logit soft-capping (Gemma-2), attention sinks
    (GPT-OSS). A window at least as long as every document changes nothing and is let through."""
    model_type = getattr(getattr(module, "config", None), "model_type", None) or type(module).__name__
    window = kwargs.get("sliding_window")
    longest = kwargs.get("max_length_q") or tokens
    if window is not None and window < longest:
        raise QtuluError(
            f"{ATTENTION_NAME} attention has no sliding window ({model_type} attends to the last {window} tokens, "
            f"documents here reach {longest}); use attn_implementation='sdpa'"
        )
    if kwargs.get("softcap"):
        raise QtuluError(f"{ATTENTION_NAME} attention has no logit soft-capping ({model_type} caps at "
                         f"{kwargs['softcap']}); use attn_implementation='sdpa'")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise QtuluError(f"{ATTENTION_NAME} attention has no attention sinks ({model_type} uses them); "
                         "use attn_implementation='sdpa'")


def register_varlen_attention() -> str:
    """Register `qtulu_varlen` with transformers (idempotent) and return the name.

    The mask side reuses transformers' flash-attention mask function: it yields None for unpadded
    input (no dense mask is ever built) and the 2D padding mask otherwise, which we refuse.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION_NAME, qtulu_varlen_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, flash_attention_mask)
    return ATTENTION_NAME


def use_varlen_attention(model):
    """Route every attention call of a transformers model through qtulu's varlen attention."""
    model.set_attn_implementation(register_varlen_attention())
    return model

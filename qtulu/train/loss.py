"""The summed next-token loss of one micro-batch, from the final hidden states.

We call the decoder (LlamaModel) ourselves instead of the CausalLM head's forward: the head would
compute logits for every token, while about half of a chat mixture's tokens are prompt and never
trained. With `model.fused_loss` the labelled rows go through lm_head + cross-entropy in chunks
(qtulu.kernels.fused_linear_cross_entropy) and the (tokens x vocab) logits never exist.

The loss is a SUM over the micro-batch's targets; the loop divides by the labelled-token count of
the whole optimizer step, so every token weighs the same however the step is split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qtulu.data.chat import IGNORE_INDEX
from qtulu.kernels import fused_linear_cross_entropy

# what transformers hands on to the attention function for a packed row
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def decoder_and_head(model):
    """(decoder, lm_head) of a PEFT-wrapped or plain HF causal LM. LoRA layers live inside the
    decoder's modules, so calling the decoder directly still trains them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()


def micro_batch_loss(model, batch: dict, fused: bool) -> torch.Tensor:
    """Sum of token cross-entropies over the batch's `shift_labels` (float32 scalar)."""
    decoder, head = decoder_and_head(model)
    extra = {k: batch[k] for k in PACKED_KEYS if k in batch}
    hidden = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch["position_ids"],
        use_cache=False,
        **extra,
    ).last_hidden_state
    targets = batch["shift_labels"]
    if fused:
        return fused_linear_cross_entropy(hidden, head.weight, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    logits = head(hidden).float()  # the reference way: every token's logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")

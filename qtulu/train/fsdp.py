"""FSDP-QLoRA: the decoder's layers sharded over the processes, 4-bit weights included.

FSDP (version 1, `use_orig_params`) flattens each decoder layer's parameters, 4-bit base weights
and LoRA adapters alike, and keeps 1/N of each flat tensor per process; a layer is all-gathered
just before its forward (and again for its backward) and freed after. bitsandbytes keeps a 4-bit
weight as packed bytes in a tensor of dtype `quant.quant_storage`; FSDP only shards floating-point
tensors of one dtype, so quant_storage must equal the compute dtype (under FSDP the config makes it
follow the compute dtype unless given, and refuses another).
The quantisation constants (absmax, the code) stay on every process: bitsandbytes finds them on
the module again when FSDP hands the layer a re-gathered tensor without them.

Only the decoder (LlamaModel) is wrapped, not the PEFT model: the loss calls the decoder and the
head itself (qtulu.train.loss), so the root of what FSDP manages must be what is called. The input
embedding stays whole on every process (`ignored_modules`): with tied embeddings it is also the
head, which the fused loss reads outside any FSDP forward.

Gradients: FSDP reduce-scatters each layer's gradient during the backward of the step's last
micro-batch (earlier ones accumulate under no_sync) and divides it by the number of processes;
the loop multiplies its loss by that number, so the result is the SUM the global token count
expects (qtulu.train.recipe). Clipping needs the norm of the whole gradient: FSDP's
clip_grad_norm_ all-reduces it. Checkpoints: the adapter is gathered whole (summon_full_params)
and written by the main process; each process writes its optimizer shard.
"""

from __future__ import annotations

import contextlib
import functools

import torch

FSDP_PREFIX = "_fsdp_wrapped_module."


def decoder_layer_classes(decoder) -> set[type]:
    """The classes of the decoder's repeated blocks (LlamaDecoderLayer for LLaMA): one FSDP unit each."""
    names = set(getattr(decoder, "_no_split_modules", None) or []) or {"LlamaDecoderLayer"}
    return {type(m) for m in decoder.modules() if type(m).__name__ in names}


def shard_decoder(model, device: torch.device):
    """Wrap the decoder of a PEFT (or plain HF) causal LM in FSDP, in place; return the FSDP root."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.model
    policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=decoder_layer_classes(decoder))
    base.model = FSDP(decoder, auto_wrap_policy=policy, sharding_strategy=ShardingStrategy.FULL_SHARD,
                      use_orig_params=True, ignored_modules=[decoder.get_input_embeddings()],
                      device_id=device, limit_all_gathers=True)
    return base.model


def param_bytes(module) -> int:
    """Bytes of a module's parameters as this process holds them (after sharding: its shards)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def accumulating(root, last: bool):
    """No gradient reduce-scatter before the step's last micro-batch."""
    return contextlib.nullcontext() if root is None or last else root.no_sync()


def full_adapter_state(model, root) -> dict[str, torch.Tensor] | None:
    """The whole trainable state (LoRA), gathered from the shards, as the PEFT model names it: CPU
    copies in process 0 (the main one, which writes it), None in the others. Every process must call
    it (all-gathers); only process 0 keeps the gathered parameters and copies them (rank0_only: at
    65B with r64 the others would each hold ~0.8 GB of host memory for nothing)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(root, writeback=False, rank0_only=True):
        if dist.get_rank() != 0:
            return None
        return {name.replace(FSDP_PREFIX, ""): p.detach().to("cpu", copy=True)
                for name, p in model.named_parameters() if p.requires_grad}

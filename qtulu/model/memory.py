"""Measuring the memory of a real training step, to hold `qtulu plan` to account.

On CUDA this is torch.cuda.max_memory_allocated. On CPU, where PyTorch keeps no allocator
statistics, `LiveTensorBytes` counts tensor storages: every storage an op creates is added when it
appears and removed when it is freed (a weak reference tells), so its running maximum is the peak
of tensor memory, the same quantity the CUDA counter reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qtulu.config import RunConfig


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while the mode is active (CPU and CUDA tensors).

    `existing` are tensors allocated before (weights, the batch): views of them cost nothing new.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {t.untyped_storage()._cdata for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _drop_freed(self) -> None:
        freed = [key for key, (ref, _) in self.live.items() if ref.expired()]
        for key in freed:
            self.current -= self.live.pop(key)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._drop_freed()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage._cdata not in self.live and storage._cdata not in self.existing:
                    self.live[storage._cdata] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _storages(tensors) -> dict[int, int]:
    found = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return found


def model_tensors(model) -> list[torch.Tensor]:
    """Every tensor the model object holds: parameters, buffers and 4-bit quantization states."""
    tensors = [*model.parameters(), *model.buffers()]
    for param in model.parameters():
        tensors += _quant_state_tensors(param)
    return tensors


def _quant_state_tensors(param) -> list[torch.Tensor]:
    state = getattr(param, "quant_state", None)
    if state is None:
        return []
    tensors = [state.absmax, state.code, getattr(state, "offset", None)]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def model_bytes(model) -> dict[str, int]:
    """Bytes held by the model object: 4-bit weights with their constants, other weights, LoRA."""
    quantized, other, lora = {}, {}, {}
    for name, param in model.named_parameters():
        if "lora_" in name:
            lora.update(_storages([param]))
        elif getattr(param, "quant_state", None) is not None:
            quantized.update(_storages([param, *_quant_state_tensors(param)]))
        else:
            other.update(_storages([param]))
    other.update({k: v for k, v in _storages(model.buffers()).items() if k not in quantized})
    return {"weights_4bit": sum(quantized.values()), "weights_other": sum(other.values()),
            "lora_params": sum(lora.values())}


@dataclass
class StepMemory:
    weights_4bit: int
    weights_other: int
    lora_params: int
    peak: int  # whole step: everything above plus what the step allocated, at its maximum

    @property
    def static(self) -> int:
        return self.weights_4bit + self.weights_other + self.lora_params


def measure_training_step(cfg: RunConfig, device: torch.device | None = None, seed: int = 0) -> StepMemory:
    """Build the run's model, run two optimizer steps on one full micro-batch, return the memory
    of the second (steady state: the optimizer state exists from the first).

    The batch is micro_batch_size rows of max_seq_len random tokens, every token labelled, through
    the model's own forward and loss (the path `model.fused_loss: false` describes).
    """
    from qtulu.model.load import build_model, pick_device

    device = device or pick_device(cfg)
    model = build_model(cfg, device)
    model.train()
    static = model_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.optim.lr)
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.optim.micro_batch_size, cfg.data.max_seq_len)
    ids = torch.randint(0, cfg.model.arch.vocab_size, shape, generator=generator).to(device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        with LiveTensorBytes(existing=[*model_tensors(model), ids, *state]) as tracker:
            step()
        peak = sum(static.values()) + sum(_storages(state).values()) + tracker.peak
    return StepMemory(static["weights_4bit"], static["weights_other"], static["lora_params"], peak)

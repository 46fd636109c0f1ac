"""Measuring the memory of a real training step, to hold `qtulu plan` to account.

`peak_bytes(fn, device)` is the one measurement both the planner's tests and the benchmarks use.
On CUDA it reads the caching allocator's peak statistics. On CPU, where PyTorch keeps no allocator
statistics, it sums every allocation and free that the CPU allocator reports to the profiler
(`profile_memory=True`) in time order: the running maximum is the peak of tensor memory, the same
quantity the CUDA counter reports.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from qtulu.config import RunConfig


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory that `fn()` allocates above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type().name == "CPU"
    )
    return max([0, *itertools.accumulate(nbytes for _, nbytes in events)])


def _storages(tensors) -> dict[int, int]:
    found = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return found


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


def measure_training_step(cfg: RunConfig, device: torch.device | None = None, seed: int = 0) -> StepMemory:
    """Build the run's model, run two optimizer steps on one full micro-batch, return the memory
    of the second (steady state: the optimizer state exists from the first).

    The batch is micro_batch_size rows of max_seq_len random tokens, every token labelled, through
    the model's own forward and loss (the path `model.fused_loss: false` describes).
    """
    from qtulu.model.load import build_model, pick_device
    from qtulu.model.lora import folds_kept

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
        with folds_kept():  # as the training loop runs a step
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        baseline = torch.cuda.memory_allocated(device)
    else:  # the model and the optimizer state from the first step
        state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        baseline = sum(static.values()) + sum(_storages(state).values()) + ids.untyped_storage().nbytes()
    peak = baseline + peak_bytes(step, device)
    return StepMemory(static["weights_4bit"], static["weights_other"], static["lora_params"], peak)

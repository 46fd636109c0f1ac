"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch

from qtulu.config import OptimConfig

PAGED = {"paged_adamw_32bit": "PagedAdamW32bit", "paged_adamw_8bit": "PagedAdamW8bit", "adamw_8bit": "AdamW8bit"}


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, device: torch.device):
    """(optimizer, note). bitsandbytes' paged and 8-bit AdamW on a GPU; torch's AdamW on a CPU,
    where paging has nothing to page to (the note says so)."""
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs), None
    if device.type != "cuda":
        return torch.optim.AdamW(params, **kwargs), f"optim.optimizer {cfg.optimizer} is a GPU optimizer; using AdamW"
    import bitsandbytes as bnb

    return getattr(bnb.optim, PAGED[cfg.optimizer])(params, **kwargs), None


def total_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """`optim.max_steps` if set, else `optim.epochs` (may be fractional) worth of steps."""
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr for the update of step `step` (0-based): linear warmup over
    `warmup` steps, then linear or cosine decay to 0 at `total`, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, cfg: OptimConfig, total: int):
    warmup = math.ceil(cfg.warmup_ratio * total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.schedule)
    )

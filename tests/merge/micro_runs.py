"""Building training run folders for merge tests without the training loop.

A run folder is what `qtulu train` writes: config.yaml, adapter/ (PEFT save_pretrained of the LoRA
model) and tokenizer/ (the chat tokenizer). Here the LoRA model is built exactly as training builds
it (qtulu.model.load.build_model: 4-bit base + LoRA) and its LoRA weights are set to random non-zero
values: a fresh LoRA B is zero, which would make every merge equal the base and every test pass.
The trained model's own logits (base + adapter as training computes them) are kept as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from qtulu.config import RunConfig, dump_config, load_config
from qtulu.data.chat import ChatTokenizer, save_chat_tokenizer
from qtulu.model.load import build_model
from qtulu.model.tokenizer import load_tokenizer

CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Name three primary colours."},
     {"role": "assistant", "content": "Red, yellow and blue."},
     {"role": "user", "content": "And the secondary ones?"},
     {"role": "assistant", "content": "Orange, green and purple."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Grey waves fold and break\nsalt wind carries gull voices\nthe tide keeps time"}],
]


@dataclass
class MicroRun:
    dir: Path
    cfg: RunConfig
    input_ids: list[torch.Tensor]  # the conversations as training tokenizes them (ChatTokenizer)
    logits: list[torch.Tensor]  # the trained model's (4-bit base + LoRA) logits on them
    base_logits: list[torch.Tensor]  # the same with the adapter disabled


def micro_config(*overrides: str) -> RunConfig:
    return load_config(size="micro", mix="sample", overrides=["--launch.device", "cpu", *overrides])


def chat_tokenizer(cfg: RunConfig) -> ChatTokenizer:
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    return ChatTokenizer(tokenizer, cfg.data.max_seq_len, cfg.data.labels, cfg.data.bos)


@torch.no_grad()
def make_run(folder: Path, cfg: RunConfig, seed: int = 0, scale: float = 0.05) -> MicroRun:
    """Write a run folder whose adapter has random non-zero LoRA A and B; keep the trained model's logits."""
    model = build_model(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder / "adapter"))
    chat = chat_tokenizer(cfg)
    save_chat_tokenizer(chat.tokenizer, folder / "tokenizer", chat.template)
    (folder / "config.yaml").write_text(dump_config(cfg))
    ids = [torch.from_numpy(t.input_ids).long()[None] for t in chat(CONVERSATIONS)]
    model.train()  # the training forward (dropout is 0 in the micro preset)
    logits = [model(input_ids=i).logits[0].float() for i in ids]
    with model.disable_adapter():
        base_logits = [model(input_ids=i).logits[0].float() for i in ids]
    return MicroRun(folder, cfg, ids, logits, base_logits)

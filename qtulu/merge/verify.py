"""Checking a merged model against what was trained: the same chat prompts through the base + adapter
(loaded exactly as in training: 4-bit base, PEFT adapter, compute dtype) and through the merged
folder as users will load it; the largest absolute logit difference and the top-1 agreement.

Tolerances, per output dtype, relative to the largest |logit| of the reference (at least 1):
  fp32  1e-4 and >= 99% top-1 agreement: only float rounding separates the two (measured ~1e-6).
  bf16  6e-2 and >= 90%: the merged weights are rounded to 8 mantissa bits and run in bf16.
  fp16  1e-2 and >= 95%: 11 mantissa bits.
A merge into a 4-bit model, into weights the adapter never saw, or with the wrong LoRA scaling
misses these by orders of magnitude (see tests/merge).
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qtulu.config import RunConfig
from qtulu.model.load import TORCH_DTYPES, load_base_model

# (relative tolerance on the largest |logit|, minimum top-1 agreement) per output dtype
TOLERANCES = {"fp32": (1e-4, 0.99), "bf16": (6e-2, 0.90), "fp16": (1e-2, 0.95)}

# Chat prompts in the shapes training sees: system turn, single and multi-turn, code, non-English.
CONVERSATIONS = [
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep enough."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Japan?"},
     {"role": "assistant", "content": "Tokyo is the capital of Japan."}],
    [{"role": "user", "content": "Write a Python function that returns the square of a number."},
     {"role": "assistant", "content": "def square(x):\n    return x * x"}],
    [{"role": "user", "content": "Traduis en anglais : « Le chat dort sur le canapé. »"},
     {"role": "assistant", "content": "The cat is sleeping on the sofa."},
     {"role": "user", "content": "Merci ! Combien font 12 fois 7 ?"}],
]


@dataclass
class Verification:
    max_abs_diff: float
    logit_scale: float
    tolerance: float
    top1_agreement: float
    min_top1_agreement: float
    tokens: int
    reference: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement >= self.min_top1_agreement

    def summary(self) -> str:
        return (f"largest |logit difference| {self.max_abs_diff:.3g} (tolerance {self.tolerance:.3g}), "
                f"top-1 agreement {self.top1_agreement:.2%} (at least {self.min_top1_agreement:.0%}) "
                f"over {self.tokens} tokens")

    def as_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    """The verification conversations rendered by the tokenizer's chat template (as inference will)."""
    out = []
    for conv in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=conv[-1]["role"] == "user")
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out.append(ids)
    return out


@torch.no_grad()
def _logits(model, inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids.to(device), use_cache=False).logits[0].float().cpu() for ids in inputs]


def reference_logits(cfg: RunConfig, adapter_dir: Path, inputs: list[torch.Tensor], device: torch.device,
                     base_mode: str) -> list[torch.Tensor]:
    """Logits of base + adapter, unmerged, loaded as in training (4-bit base unless --base original)."""
    from peft import PeftModel

    if base_mode == "original":
        cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"load_in_4bit": False})})
    import bitsandbytes as bnb

    base = load_base_model(cfg, device)
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # bitsandbytes' CPU inference path repacks the weights (and fails on widths that are not a
            # multiple of the block size); training never takes it, so neither does the reference.
            module.support_avx512bf16_for_cpu = False
    with warnings.catch_warnings():  # PEFT calls a transformers property deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        model = PeftModel.from_pretrained(base, str(adapter_dir), torch_device=str(device))
    lora_dtype = TORCH_DTYPES[cfg.lora.dtype]
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(lora_dtype)  # as qtulu.model.load.add_lora trains them
    logits = _logits(model, inputs, device)
    del model, base
    gc.collect()
    return logits


def merged_logits(folder: Path, dtype: str, inputs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=TORCH_DTYPES[dtype], device_map={"": str(device)})
    logits = _logits(model, inputs, device)
    del model
    gc.collect()
    return logits


def compare(reference: list[torch.Tensor], merged: list[torch.Tensor], dtype: str, what: str) -> Verification:
    rtol, min_top1 = TOLERANCES[dtype]
    ref = torch.cat(reference)
    got = torch.cat(merged)
    scale = max(1.0, ref.abs().max().item())
    return Verification(
        max_abs_diff=(ref - got).abs().max().item(), logit_scale=scale, tolerance=rtol * scale,
        top1_agreement=(ref.argmax(-1) == got.argmax(-1)).float().mean().item(), min_top1_agreement=min_top1,
        tokens=ref.shape[0], reference=what,
    )

"""Building the model a run trains: the base in 4 bits (NF4, double quant) with LoRA adapters.

Random-init presets (micro) are written once as an ordinary HF folder and then loaded through the
same from_pretrained + bitsandbytes path as a real LLaMA, so tests exercise the production code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from qtulu.config import ArchConfig, RunConfig
from qtulu.errors import QtuluError
from qtulu.files import building_dir
from qtulu.model.hub import qtulu_home, resolve_model_dir
from qtulu.model.lora import use_lean_lora
from qtulu.model.rms_norm import use_lean_rms_norm
from qtulu.model.rope import use_lean_rope
from qtulu.model.swiglu import use_lean_swiglu
from qtulu.model.tokenizer import load_tokenizer

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "uint8": torch.uint8}


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.launch.device == "cuda" and not torch.cuda.is_available():
        raise QtuluError("launch.device: cuda was asked for but no CUDA GPU is visible; use --launch.device cpu", 2)
    if cfg.launch.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def llama_config(arch: ArchConfig, tokenizer=None):
    from transformers import LlamaConfig

    special = {}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    return LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads, tie_word_embeddings=arch.tie_embeddings,
        max_position_embeddings=arch.max_position_embeddings, rms_norm_eps=arch.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": arch.rope_theta}, **special,
    )


def random_model_dir(cfg: RunConfig, seed: int = 0) -> Path:
    """Write (once) a random-initialised LLaMA with the preset's arch and tokenizer as an HF folder."""
    from transformers import LlamaForCausalLM

    arch = cfg.model.arch
    key = json.dumps({"arch": arch.model_dump(), "tokenizer": cfg.model.tokenizer, "seed": seed}, sort_keys=True)
    target = qtulu_home() / "models" / f"random-llama-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    if len(tokenizer) > arch.vocab_size:
        raise QtuluError(f"model.arch.vocab_size: {arch.vocab_size} is smaller than the tokenizer's "
                         f"{len(tokenizer)} tokens; raise it", 2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(arch, tokenizer))
    with building_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def base_model_dir(cfg: RunConfig) -> Path:
    if cfg.model.init == "random":
        return random_model_dir(cfg)
    return resolve_model_dir(cfg.model.name_or_path, cfg.model.revision)


def quantization_config(cfg: RunConfig):
    from transformers import BitsAndBytesConfig

    q = cfg.quant
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=TORCH_DTYPES[q.compute_dtype],
        bnb_4bit_quant_storage=TORCH_DTYPES[q.quant_storage],
    )


def load_base_model(cfg: RunConfig, device: torch.device | None = None):
    """The frozen base model: 4-bit linear layers (unless quant.load_in_4bit is off), rest in compute dtype."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device(cfg)
    folder = base_model_dir(cfg)
    kwargs = {"dtype": TORCH_DTYPES[cfg.quant.compute_dtype], "device_map": {"": str(device)},
              "trust_remote_code": cfg.model.trust_remote_code}
    if cfg.quant.load_in_4bit:
        kwargs["quantization_config"] = quantization_config(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False  # a cache during training leaks packed documents into each other
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def add_lora(model, cfg: RunConfig):
    """Wrap the frozen base with trainable LoRA adapters (PEFT), in the configured adapter dtype."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config, autocast_adapter_dtype=lora.dtype == "fp32")
    if lora.dtype != "fp32":
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(TORCH_DTYPES[lora.dtype])
    use_lean_lora(model)
    use_lean_rms_norm(model)
    use_lean_rope(model)
    use_lean_swiglu(model)
    return model


def build_model(cfg: RunConfig, device: torch.device | None = None):
    """Base in 4 bits + LoRA: the trainable model of a run."""
    return add_lora(load_base_model(cfg, device), cfg)

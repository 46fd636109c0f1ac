"""The base model's weights, one tensor at a time, as the adapter saw them in training.

Training loads the base with transformers + bitsandbytes: every tensor is cast to the compute dtype,
and the linear layers transformers' quantizer picks are quantized to NF4 (double quant) on the
training device; their forward uses the dequantized values. We reproduce exactly that per tensor,
reading the safetensors lazily: the module set comes from transformers' own quantizer run on an
empty (meta) copy of the model, and each weight goes through bitsandbytes' Params4bit with the
parameters that quantizer gives it, then bitsandbytes' dequantize. A tensor never needs more than
itself in memory, so a 65B base costs one layer at a time. (Tested: bit for bit the values inside
the 4-bit model training loads.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtulu.config import RunConfig
from qtulu.errors import QtuluError
from qtulu.model.load import TORCH_DTYPES, quantization_config

BASE_MODES = ("dequantized", "original")


def empty_model(config, dtype: torch.dtype = torch.float32):
    """The model's module tree with no storage (meta tensors)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def tied_keys(model) -> set[str]:
    """Parameter names that are tied to another one and are therefore not saved (lm_head.weight when tied)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


class BaseWeights:
    """Tensors of the base checkpoint by name, in fp32, as training saw them (mode 'dequantized') or as
    stored (mode 'original')."""

    def __init__(self, cfg: RunConfig, folder: Path, mode: str, device: torch.device):
        from safetensors import safe_open
        from transformers import AutoConfig

        if mode not in BASE_MODES:
            raise QtuluError(f"--base: {mode!r} is not one of {', '.join(BASE_MODES)}", 2)
        self.cfg, self.folder, self.mode, self.device = cfg, Path(folder), mode, device
        try:
            self.config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
        except Exception as e:  # transformers raises many types for a broken folder
            raise QtuluError(f"{folder}: could not read the base model's config ({type(e).__name__}: {e})"
                             .splitlines()[0]) from None
        self.compute_dtype = TORCH_DTYPES[cfg.quant.compute_dtype]
        self._files = self._tensor_files()
        self._handles = {f: safe_open(str(f), "pt") for f in sorted(set(self._files.values()))}
        model = empty_model(self.config, self.compute_dtype)
        self.tied = tied_keys(model)
        # Output order: the model's own (layer by layer), without the tied copies.
        self.names = [n for n in model.state_dict() if n not in self.tied]
        missing = [n for n in self.names if n not in self._files]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise QtuluError(f"{folder}: the checkpoint has no tensor {missing[0]}{more}; its names do not match "
                             f"transformers' {type(model).__name__}")
        self.quantized = self._quantized_modules() if self.as_trained and cfg.quant.load_in_4bit else {}

    @property
    def as_trained(self) -> bool:
        return self.mode == "dequantized"

    def _tensor_files(self) -> dict[str, Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.folder / file for name, file in weight_map.items()}
        single = self.folder / "model.safetensors"
        if single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                return dict.fromkeys(f.keys(), single)
        others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt"))
        extra = f" (found {', '.join(others[:2])}: qtulu reads safetensors only)" if others else ""
        raise QtuluError(f"{self.folder}: no model.safetensors or model.safetensors.index.json{extra}")

    def _quantized_modules(self) -> dict[str, dict]:
        """Module name -> the Params4bit arguments transformers' bitsandbytes quantizer gives its weight."""
        import bitsandbytes as bnb
        from transformers.quantizers import AutoHfQuantizer

        model = empty_model(self.config, self.compute_dtype)
        quantizer = AutoHfQuantizer.from_config(quantization_config(self.cfg), pre_quantized=False)
        quantizer.preprocess_model(model=model, dtype=self.compute_dtype, device_map={"": str(self.device)},
                                   checkpoint_files=None, use_kernels=False)
        keep = ("blocksize", "compress_statistics", "quant_type", "quant_storage")
        return {name: {k: module.weight.__dict__[k] for k in keep}
                for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}

    def raw(self, name: str) -> torch.Tensor:
        return self._handles[self._files[name]].get_tensor(name)

    def tensor(self, name: str) -> torch.Tensor:
        """fp32 on the CPU: the stored tensor ('original') or what training computed with ('dequantized')."""
        value = self.raw(name)
        if not self.as_trained:
            return value.float()
        value = value.to(self.compute_dtype)
        module, _, param = name.rpartition(".")
        if param == "weight" and module in self.quantized:
            value = dequantized_nf4(value, self.quantized[module], self.device)
        return value.float()

    def close(self) -> None:
        self._handles.clear()


def dequantized_nf4(value: torch.Tensor, params: dict, device: torch.device) -> torch.Tensor:
    """Quantize like transformers' loader does (Params4bit moved to the device), then dequantize."""
    import bitsandbytes as bnb

    quantized = bnb.nn.Params4bit(value.to(device), requires_grad=False, **params).to(device)
    return bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).cpu()

"""Finding and loading the model to evaluate: a merged HF folder, a run folder, or base + adapter.

- MODEL holds config.json and weights: a standalone model (e.g. RUN/merged); its tokenizer is beside
  it, else in the run's tokenizer/ one level up.
- MODEL is a run folder (config.yaml, the resolved RunConfig): RUN/merged when present, else the run's
  base model (qtulu.model.load.base_model_dir) with RUN/adapter, loaded in 4 bits when the run trained
  in 4 bits (the adapter was trained against the NF4 base), tokenizer from RUN/tokenizer.
- `--adapter DIR`: MODEL is the base (a model folder or a run folder) and DIR the LoRA adapter.

Attention is SDPA (the training-only packed kernel is for training); the KV cache is on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qtulu.errors import QtuluError

WEIGHT_SUFFIXES = (".safetensors", ".bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class ResolvedModel:
    model_dir: Path  # the weights to load (merged model or base)
    tokenizer_dir: Path
    adapter_dir: Path | None = None
    run_dir: Path | None = None
    run_config: object | None = None  # RunConfig when a run folder is involved

    @property
    def name(self) -> str:
        """A short label: the run's name, else the folder name."""
        if self.run_config is not None:
            return self.run_config.name
        d = self.model_dir
        return d.parent.name if d.name in ("merged", "model") else d.name

    @property
    def mix(self) -> str | None:
        return self.run_config.data.mix.name if self.run_config is not None else None


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and any(f.suffix in WEIGHT_SUFFIXES for f in p.iterdir())


def _has_tokenizer(p: Path) -> bool:
    return p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES)


def _read_run_config(run: Path):
    import yaml

    from qtulu.config import RunConfig

    path = run / "config.yaml"
    try:
        return RunConfig.model_validate(yaml.safe_load(path.read_text()))
    except Exception as e:  # yaml or pydantic errors, one line
        raise QtuluError(f"{path}: not a qtulu run config ({type(e).__name__}: {e})".splitlines()[0]) from None


def resolve(model: str, adapter: str | None = None) -> ResolvedModel:
    path = Path(model).expanduser()
    if not path.exists():
        raise QtuluError(f"{path}: no such model or run folder")
    run_dir = path if (path / "config.yaml").is_file() else None
    if run_dir is None and (path.parent / "config.yaml").is_file() and path.name == "merged":
        run_dir = path.parent
    cfg = _read_run_config(run_dir) if run_dir is not None else None
    if adapter is not None:
        adapter_dir = Path(adapter).expanduser()
        if not (adapter_dir / "adapter_config.json").is_file():
            raise QtuluError(f"--adapter {adapter_dir}: no adapter_config.json (a PEFT LoRA adapter folder)")
        if _is_model_dir(path):
            base = path
        elif cfg is not None:
            base = _base_dir(cfg)
        else:
            raise QtuluError(
                f"{path}: with --adapter, MODEL is the base: a model folder (config.json and "
                "weights) or a run folder (config.yaml)"
            )
        tok = adapter_dir if _has_tokenizer(adapter_dir) else _tokenizer_dir(path, run_dir, base)
        return ResolvedModel(base, tok, adapter_dir, run_dir, cfg)
    if _is_model_dir(path):
        return ResolvedModel(path, _tokenizer_dir(path, run_dir, path), None, run_dir, cfg)
    if cfg is not None:
        merged = path / "merged"
        if _is_model_dir(merged):
            return ResolvedModel(merged, _tokenizer_dir(merged, run_dir, merged), None, run_dir, cfg)
        adapter_dir = path / "adapter"
        if not (adapter_dir / "adapter_config.json").is_file():
            raise QtuluError(
                f"{path}: a run folder with neither merged/ nor adapter/adapter_config.json; "
                "train it first, or pass --adapter DIR"
            )
        base = _base_dir(cfg)
        return ResolvedModel(base, _tokenizer_dir(path, run_dir, base), adapter_dir, run_dir, cfg)
    raise QtuluError(f"{path}: neither a model folder (config.json + weights) nor a run folder (config.yaml)")


def _base_dir(cfg) -> Path:
    from qtulu.model.load import base_model_dir

    return base_model_dir(cfg)


def _tokenizer_dir(path: Path, run_dir: Path | None, fallback: Path) -> Path:
    for cand in ([path] if _has_tokenizer(path) else []) + ([run_dir / "tokenizer"] if run_dir else []):
        if _has_tokenizer(cand):
            return cand
    if _has_tokenizer(fallback):
        return fallback
    raise QtuluError(
        f"{path}: no tokenizer (tokenizer.json / tokenizer.model) beside the model"
        f"{' or in ' + str(run_dir / 'tokenizer') if run_dir else ''}"
    )


def pick_dtype(device: torch.device, dtype: str) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def load(resolved: ResolvedModel, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode, tokenizer with left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise QtuluError("--device cuda: no CUDA GPU is visible", 2)
    torch_dtype = pick_dtype(dev, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer_dir)
    except Exception as e:
        raise QtuluError(
            f"{resolved.tokenizer_dir}: could not load the tokenizer ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    tokenizer.padding_side = "left"
    kwargs = {"dtype": torch_dtype, "attn_implementation": "sdpa", "device_map": {"": str(dev)}}
    cfg = resolved.run_config
    if resolved.adapter_dir is not None and cfg is not None and cfg.quant.load_in_4bit:
        from qtulu.model.load import quantization_config

        kwargs["quantization_config"] = quantization_config(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.model_dir, **kwargs)
    except Exception as e:
        raise QtuluError(
            f"{resolved.model_dir}: could not load the model ({type(e).__name__}: {e})".splitlines()[0]
        ) from None
    if "quantization_config" in kwargs and dev.type == "cpu":
        # bitsandbytes 0.50 repacks 4-bit weights for an AVX512-BF16 CPU kernel in eval mode; the repack
        # fails on shapes that are not multiples of its block (micro's 128x5 blocks) and computes in bf16.
        # Keep the dequantize path that training used.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if resolved.adapter_dir is not None:
        from peft import PeftModel

        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(model, resolved.adapter_dir)
    model.config.use_cache = True
    model.eval()
    return model, tokenizer


def fingerprint(resolved: ResolvedModel) -> dict:
    """A content hash of the model: config.json and, per weight file, its name, size, first and last MiB
    (a full hash of a 65B model would take minutes); adapter files hashed whole."""
    h = hashlib.sha256()
    folders = [resolved.model_dir] + ([resolved.adapter_dir] if resolved.adapter_dir else [])
    for folder in folders:
        for f in sorted(folder.iterdir()):
            if not f.is_file():
                continue
            if f.name in ("config.json", "adapter_config.json", "generation_config.json"):
                h.update(f.name.encode() + f.read_bytes())
            elif f.suffix in WEIGHT_SUFFIXES:
                size = f.stat().st_size
                h.update(f"{f.name}:{size}".encode())
                with open(f, "rb") as fh:
                    if folder == resolved.adapter_dir or size <= 4 << 20:
                        h.update(fh.read())
                    else:
                        h.update(fh.read(1 << 20))
                        fh.seek(-(1 << 20), 2)
                        h.update(fh.read(1 << 20))
    return {
        "sha256": h.hexdigest()[:16],
        "method": "sha256 of config.json and each weight file's name, size, first and last MiB "
        "(whole files under 4 MiB and adapters)",
    }


def parameter_count(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return int(base.num_parameters(exclude_embeddings=False))
    except TypeError:
        return sum(p.numel() for p in base.parameters())


def describe(resolved: ResolvedModel) -> dict:
    info = {"name": resolved.name, "path": str(resolved.model_dir), "tokenizer": str(resolved.tokenizer_dir)}
    if resolved.adapter_dir is not None:
        info["adapter"] = str(resolved.adapter_dir)
    if resolved.run_dir is not None:
        info["run"] = str(resolved.run_dir)
    if resolved.mix:
        info["mix"] = resolved.mix
    cfg_json = resolved.model_dir / "config.json"
    with contextlib.suppress(OSError, json.JSONDecodeError):
        info["architecture"] = json.loads(cfg_json.read_text()).get("architectures", [None])[0]
    return info

"""Reading training run folders: the resolved config, the LoRA adapter and the chat tokenizer.

A run folder (written by `qtulu train`) holds `config.yaml` (the resolved RunConfig), `adapter/`
(PEFT save_pretrained: adapter_config.json + adapter_model.safetensors) and `tokenizer/` (the
training tokenizer with the TÜLU chat template). Everything wrong with one is a one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from qtulu.config import RunConfig
from qtulu.errors import QtuluError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Tensor name endings a LoRA adapter may carry (DoRA adds the magnitude vector, lora_bias the B bias).
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
                 ".lora_magnitude_vector", ".lora_magnitude_vector.weight")


@dataclass
class Run:
    dir: Path
    cfg: RunConfig
    adapter_dir: Path
    tokenizer_dir: Path
    adapter_config: dict

    @property
    def name(self) -> str:
        return self.dir.name


def open_run(path: str | Path) -> Run:
    """A training run folder, checked: config.yaml, adapter/ (LoRA, safetensors) and tokenizer/."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise QtuluError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise QtuluError(f"{folder}: not a folder; pass a training run folder (the one `qtulu train` wrote)")
    # RUN/adapter given instead of RUN: take the run around it.
    if (folder / ADAPTER_CONFIG).is_file() and (folder.parent / "config.yaml").is_file():
        folder = folder.parent
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        hint = " (it looks like a bare adapter)" if (folder / ADAPTER_CONFIG).is_file() else ""
        raise QtuluError(f"{folder}: not a qtulu run folder, no config.yaml{hint}; pass the folder `qtulu train` wrote")
    cfg = _read_config(config_file)
    adapter_dir = folder / "adapter"
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise QtuluError(f"{folder}: no adapter ({adapter_dir / ADAPTER_CONFIG} is missing); "
                         "did training finish and save it?")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        found = sorted(p.name for p in adapter_dir.iterdir() if p.name.startswith("adapter_model"))
        extra = f" (found {', '.join(found)}; qtulu reads safetensors only)" if found else ""
        raise QtuluError(f"{adapter_dir}: no {ADAPTER_WEIGHTS}{extra}")
    try:
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtuluError(f"{adapter_dir / ADAPTER_CONFIG}: not valid JSON ({e})") from None
    if not isinstance(adapter_config, dict) or adapter_config.get("peft_type") != "LORA":
        kind = adapter_config.get("peft_type") if isinstance(adapter_config, dict) else None
        raise QtuluError(f"{adapter_dir / ADAPTER_CONFIG}: not a LoRA adapter (peft_type {kind!r})")
    tokenizer_dir = folder / "tokenizer"
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        raise QtuluError(f"{folder}: no tokenizer/ folder (the training tokenizer with the chat template)")
    return Run(folder, cfg, adapter_dir, tokenizer_dir, adapter_config)


def _read_config(path: Path) -> RunConfig:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise QtuluError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise QtuluError(f"{path}: expected a run config (a mapping of config keys)")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "config"
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise QtuluError(f"{path}: not a valid run config: {key}: {err['msg']}{more}") from None


def base_identity(cfg: RunConfig) -> dict:
    """What must agree for two adapters to share one base: the model, its weights and how it was quantized."""
    model = cfg.model
    return {
        "model": model.name_or_path, "revision": model.revision, "init": model.init,
        "arch": model.arch.model_dump() if model.init == "random" and model.arch else None,
        "quant": cfg.quant.model_dump(),
    }


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in a:
        if isinstance(a[key], dict) and isinstance(b.get(key), dict):
            out += _differences(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b.get(key):
            out.append(f"{prefix}{key}: {b.get(key)} vs {a[key]}")
    return out


def check_same_base(runs: list[Run]) -> None:
    """Adapters combined into one model must have been trained on the same base, quantized the same way."""
    first = base_identity(runs[0].cfg)
    for run in runs[1:]:
        diffs = _differences(first, base_identity(run.cfg))
        if diffs:
            raise QtuluError(f"{run.dir}: trained on another base than {runs[0].dir} ({'; '.join(diffs)}); "
                             "only adapters of the same base can be combined")

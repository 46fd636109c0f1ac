"""LoRA adapters on a storage-free copy of the base, combined and merged with PEFT's own code.

The adapters are loaded by PEFT into the base's module tree whose parameters are zero-stride views
of one zero (real CPU tensors that take no memory), so PEFT's loading, `add_weighted_adapter` and
`merge` run unchanged while the base weights live on disk. Merging a module sets its real weights,
calls PEFT's `merge` (vanilla LoRA, rsLoRA, DoRA, lora_bias: whatever PEFT supports), reads the
result and drops the weights again.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from qtulu.errors import QtuluError
from qtulu.merge.base import empty_model
from qtulu.merge.runs import ADAPTER_WEIGHTS, LORA_SUFFIXES, Run

# --method: PEFT add_weighted_adapter combination types. `cat` is the exact weighted sum of the
# adapters' updates (rank = sum of ranks); linear/ties/dare_* combine the A and B factors
# separately (approximations, same rank); svd is the weighted sum cut back to the largest rank.
METHODS = ("cat", "linear", "ties", "dare_ties", "dare_linear", "svd")
NEEDS_DENSITY = ("ties", "dare_ties", "dare_linear")
COMBINED = "combined"


def _no_storage(param: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros((), dtype=torch.float32).expand(param.shape), requires_grad=False)


def storage_free_model(config):
    """The base's module tree with every parameter a zero-stride view (fp32, CPU, no memory)."""
    model = empty_model(config, torch.float32)
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        module, _, attr = name.rpartition(".")
        model.get_submodule(module)._parameters[attr] = _no_storage(param)
    return model


def check_adapter_fits(run: Run, model, base_dir: Path) -> None:
    """One-line errors for an adapter that is not LoRA-only or was trained on another base."""
    from safetensors import safe_open

    path = run.adapter_dir / ADAPTER_WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a corrupt file
        raise QtuluError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not shapes:
        raise QtuluError(f"{path}: holds no tensors")
    modules = dict(model.named_modules())
    for key, shape in shapes.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise QtuluError(f"{path}: holds {key}, which is not a LoRA weight (modules_to_save or trained "
                             "embeddings); qtulu merge handles LoRA-only adapters")
        module_name = key[: -len(suffix)].removeprefix("base_model.model.")
        module = modules.get(module_name)
        if module is None:
            raise QtuluError(f"{run.adapter_dir}: adapts {module_name}, which the base {base_dir} does not have; "
                             "the adapter was trained on another base")
        expected = None
        if isinstance(module, nn.Linear) and suffix == ".lora_A.weight":
            expected, got = module.in_features, shape[-1]
        elif isinstance(module, nn.Linear) and suffix == ".lora_B.weight":
            expected, got = module.out_features, shape[0]
        if expected is not None and expected != got:
            raise QtuluError(f"{run.adapter_dir}: {module_name} has {got} features in the adapter but {expected} in "
                             f"the base {base_dir}; the adapter was trained on another base")


def _peft_error(what: str, e: Exception) -> QtuluError:
    return QtuluError(f"{what}: {type(e).__name__}: {e}".splitlines()[0])


def load_adapters(runs: list[Run], config, base_dir: Path, weights: list[float] | None, method: str,
                  density: float | None):
    """PEFT model on a storage-free base, holding the adapter to merge; returns (model, adapter name)."""
    from peft import PeftModel

    model = storage_free_model(config)
    for run in runs:
        check_adapter_fits(run, model, base_dir)
    if config.tie_word_embeddings:
        for run in runs:
            targets = run.adapter_config.get("target_modules") or []
            targets = [targets] if isinstance(targets, str) else targets
            tied = [t for t in targets if t in ("embed_tokens", "lm_head", "wte")]
            if tied:
                raise QtuluError(f"{run.adapter_dir}: adapts {tied[0]} of a base with tied input and output "
                                 "embeddings; merging it would change both, so it cannot be merged")
    names = [f"run{i}" for i in range(len(runs))]
    try:
        peft_model = PeftModel.from_pretrained(model, str(runs[0].adapter_dir), adapter_name=names[0],
                                               torch_device="cpu")
        for run, name in zip(runs[1:], names[1:], strict=True):
            peft_model.load_adapter(str(run.adapter_dir), adapter_name=name, torch_device="cpu")
    except Exception as e:  # PEFT raises ValueError/RuntimeError/KeyError for a mismatched adapter
        raise _peft_error(f"{runs[0].adapter_dir}: PEFT could not load the adapter into the base {base_dir}",
                          e) from None
    if len(runs) == 1:
        return peft_model, names[0]
    check_method(method, density)
    # dare_* drop entries at random: seed it so that a merge is reproducible.
    torch.manual_seed(0)
    try:
        peft_model.add_weighted_adapter(names, list(weights), COMBINED, combination_type=method, density=density)
    except (ValueError, RuntimeError) as e:
        raise _peft_error(f"--method {method}: PEFT could not combine the adapters", e) from None
    for name in names:
        peft_model.delete_adapter(name)
    peft_model.set_adapter(COMBINED)
    return peft_model, COMBINED


def check_method(method: str, density: float | None) -> None:
    if method not in METHODS:
        raise QtuluError(f"--method: {method!r} is not one of {', '.join(METHODS)}", 2)
    if method in NEEDS_DENSITY and density is None:
        raise QtuluError(f"--method {method} needs --density (the fraction of each update kept, e.g. 0.5)", 2)


def lora_modules(peft_model) -> dict:
    """Base module name (as in the checkpoint) -> PEFT LoRA layer wrapping it."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return {name: module for name, module in inner.named_modules() if isinstance(module, LoraLayer)}


def merge_module(layer, adapter: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT merges `adapter` into the base layer holding `params` (name -> fp32 tensor); returns the result."""
    base = layer.get_base_layer()
    for attr, value in params.items():
        base._parameters[attr] = nn.Parameter(value, requires_grad=False)
    try:
        layer.merge(safe_merge=True, adapter_names=[adapter])
    except ValueError as e:  # safe_merge found NaN/inf
        raise QtuluError(f"merging the adapter gave non-finite weights ({e}); the adapter is broken") from None
    merged = {attr: base._parameters[attr].data for attr in params}
    for attr in params:
        base._parameters[attr] = _no_storage(merged[attr])
    layer.merged_adapters.clear()  # the base weights are gone again; nothing is merged into them
    return merged


def save_combined(peft_model, adapter: str, folder: Path) -> Path:
    """Write the combined adapter (PEFT format) so that verification can load it onto the 4-bit base."""
    peft_model.save_pretrained(str(folder), selected_adapters=[adapter])
    found = next(iter(folder.rglob("adapter_config.json")), None)
    if found is None:
        raise QtuluError(f"{folder}: PEFT saved no adapter_config.json for the combined adapter")
    return found.parent


def scratch_dir(near: Path):
    """A temporary folder next to `near` (same disk), removed afterwards."""
    near.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(dir=near, prefix=".qtulu-merge-")


def describe_adapter(run: Run) -> dict:
    cfg = run.adapter_config
    return {"run": str(run.dir), "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
            "target_modules": cfg.get("target_modules"), "use_rslora": cfg.get("use_rslora", False),
            "use_dora": cfg.get("use_dora", False)}


def parse_weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QtuluError(f"--weights: {text!r} is not a comma-separated list of numbers", 2) from None
    if len(values) != count:
        raise QtuluError(f"--weights: {len(values)} weight(s) for {count} run(s); give one per run", 2)
    if not all(math.isfinite(v) for v in values):
        raise QtuluError(f"--weights: {text!r} has a non-finite value", 2)
    return values

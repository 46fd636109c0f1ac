"""`qtulu merge`: LoRA adapter(s) into a standalone Hugging Face model folder, verified.

The way through, for a run (or several, combined by PEFT's add_weighted_adapter first):
  base checkpoint --(tensor by tensor: cast to compute dtype, NF4 quantize + dequantize exactly as
  training's loader did)--> PEFT merge of the LoRA update (fp32) --> output dtype --> sharded
  safetensors, written into a temporary folder beside the output;
  + config.json, generation_config.json (EOS = the token that ends an assistant turn), the training
  tokenizer with the TÜLU chat template, qtulu_merge.json (what was merged, how, verification);
  then verification (base + adapter as trained vs. the merged folder as users load it), then one
  rename. A failure or an interrupt leaves no output folder.
Memory: one layer's tensors (fp32) plus one output shard; never the whole model.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qtulu.errors import QtuluError
from qtulu.files import building_dir
from qtulu.merge.adapters import (
    check_method,
    describe_adapter,
    load_adapters,
    lora_modules,
    merge_module,
    parse_weights,
    save_combined,
    scratch_dir,
)
from qtulu.merge.base import BaseWeights
from qtulu.merge.runs import Run, check_same_base, open_run
from qtulu.merge.shards import ShardWriter, parse_size
from qtulu.merge.verify import Verification, compare, merged_logits, prompt_ids, reference_logits
from qtulu.model.load import TORCH_DTYPES, base_model_dir, pick_device

DTYPES = ("bf16", "fp16", "fp32")
MANIFEST = "qtulu_merge.json"
ORIGINAL_WARNING = ("--base original: merging into the base's original weights, which the adapter never saw (it "
                    "was trained against their NF4-quantized values); the merged model will differ from what was "
                    "trained by the quantization error. The default (--base dequantized) merges what was trained.")


@dataclass
class MergeResult:
    output: Path
    files: list[str]
    seconds: float
    verification: Verification | None = None
    warnings: list[str] = field(default_factory=list)


def _log_nothing(message: str) -> None:
    pass


def merge_runs(
    run_dirs: list[str | Path],
    output: str | Path | None = None,
    dtype: str | None = None,
    base: str = "dequantized",
    max_shard_size: str | int = "5GB",
    verify: bool = True,
    force: bool = False,
    weights: str | list[float] | None = None,
    method: str = "cat",
    density: float | None = None,
    log: Callable[[str], None] = _log_nothing,
) -> MergeResult:
    """Merge the adapter of one run, or the weighted combination of several runs' adapters, into its base."""
    start = time.perf_counter()
    if not run_dirs:
        raise QtuluError("qtulu merge: name a training run folder", 2)
    runs = [open_run(d) for d in run_dirs]
    if len({r.dir.resolve() for r in runs}) != len(runs):
        raise QtuluError("qtulu merge: the same run is named twice", 2)
    check_same_base(runs)
    if isinstance(weights, str) or weights is None:
        weights = parse_weights(weights, len(runs))
    if len(runs) == 1 and weights is not None:
        raise QtuluError("--weights: combining needs two or more runs; a single run is merged as trained", 2)
    if len(runs) > 1 and weights is None:
        weights = [1.0 / len(runs)] * len(runs)
    if len(runs) > 1:
        check_method(method, density)
    if density is not None and not 0 < density <= 1:
        raise QtuluError(f"--density: {density} must be in (0, 1]", 2)
    cfg = runs[0].cfg
    dtype = dtype or cfg.quant.compute_dtype
    if dtype not in DTYPES:
        raise QtuluError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}", 2)
    shard_bytes = parse_size(max_shard_size)
    target = _output_dir(runs, output, force)
    warnings = []
    if base == "original" and cfg.quant.load_in_4bit:
        warnings.append(ORIGINAL_WARNING)
        log(f"warning: {ORIGINAL_WARNING}")

    tokenizer = _chat_tokenizer(runs[0], warnings, log)
    base_dir = base_model_dir(cfg)
    device = pick_device(cfg)
    weights_in = BaseWeights(cfg, base_dir, base, device)
    vocab = weights_in.config.vocab_size
    if len(tokenizer) > vocab:
        raise QtuluError(f"{runs[0].tokenizer_dir}: {len(tokenizer)} tokens but the base {base_dir} has {vocab} "
                         "embeddings, and the adapter carries no trained embeddings for the new tokens")
    _check_base_name(runs, base_dir, cfg, log)

    with building_dir(target, replace=force) as tmp:
        peft_model, adapter = load_adapters(runs, weights_in.config, base_dir, weights, method, density)
        with scratch_dir(target.parent) as scratch:
            adapter_dir = runs[0].adapter_dir
            if len(runs) > 1:
                adapter_dir = save_combined(peft_model, adapter, Path(scratch))
                log(f"combined {len(runs)} adapters with PEFT ({method}, weights {weights})")
            files = _write_weights(weights_in, peft_model, adapter, dtype, tmp, shard_bytes, log)
            del peft_model
            _write_config(weights_in.config, tokenizer, dtype, tmp)
            _save_tokenizer(runs[0], tokenizer, tmp)
            manifest = {
                "runs": [describe_adapter(r) for r in runs], "weights": weights,
                "method": method if len(runs) > 1 else None, "density": density if len(runs) > 1 else None,
                "base": str(base_dir), "base_mode": base, "quantization": cfg.quant.model_dump(),
                "dtype": dtype, "files": files, "warnings": warnings,
            }
            verification = None
            if verify:
                inputs = prompt_ids(tokenizer)
                what = "4-bit base + adapter (as trained)" if base == "dequantized" and cfg.quant.load_in_4bit \
                    else "base + adapter"
                log(f"verifying: {what} vs. the merged folder, {sum(i.shape[1] for i in inputs)} tokens ...")
                reference = reference_logits(cfg, adapter_dir, inputs, device, base)
                verification = compare(reference, merged_logits(tmp, dtype, inputs, device), dtype, what)
                manifest["verification"] = verification.as_dict()
                log(f"verification: {verification.summary()}")
                if not verification.passed:
                    raise QtuluError(f"verification failed: {verification.summary()}; the merged model differs "
                                     f"from {what}, so nothing was written to {target}")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    weights_in.close()
    return MergeResult(target, files, time.perf_counter() - start, verification, warnings)


def _output_dir(runs: list[Run], output: str | Path | None, force: bool) -> Path:
    if output is None:
        if len(runs) > 1:
            raise QtuluError("--output: name the folder for a combination of several runs", 2)
        target = runs[0].dir / "merged"
    else:
        target = Path(output).expanduser()
    resolved = target.resolve()
    for run in runs:
        for inside in (run.dir, run.adapter_dir, run.tokenizer_dir):
            if resolved == inside.resolve() or resolved in inside.resolve().parents:
                raise QtuluError(f"--output {target}: would replace the run folder {run.dir}; choose another folder", 2)
    if target.exists() and not force:
        raise QtuluError(f"{target}: already exists; pass --force to replace it, or --output another folder", 2)
    if target.exists() and not target.is_dir():
        raise QtuluError(f"{target}: exists and is not a folder", 2)
    return target


def _chat_tokenizer(run: Run, warnings: list[str], log):
    """The tokenizer training saved, with the chat template that renders exactly the training text."""
    from qtulu.data.chat import ChatTokenizer
    from qtulu.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(run.tokenizer_dir))
    if tokenizer.eos_token_id is None:
        raise QtuluError(f"{run.tokenizer_dir}: the tokenizer has no EOS token; generation could not stop")
    if not tokenizer.chat_template:
        data = run.cfg.data
        tokenizer.chat_template = ChatTokenizer(tokenizer, data.max_seq_len, data.labels, data.bos).template
        tokenizer.qtulu_template_added = True
        message = f"{run.tokenizer_dir}: no chat template saved; the merged model gets the run's TÜLU template"
        warnings.append(message)
        log(f"warning: {message}")
    return tokenizer


def _save_tokenizer(run: Run, tokenizer, folder: Path) -> None:
    """The run's tokenizer files as training saved them (byte for byte), or re-saved if a template was added."""
    if not getattr(tokenizer, "qtulu_template_added", False):
        for path in run.tokenizer_dir.iterdir():
            if path.is_file():
                shutil.copyfile(path, folder / path.name)
    else:
        tokenizer.save_pretrained(folder)


def _check_base_name(runs: list[Run], base_dir: Path, cfg, log) -> None:
    """The adapter records the base it was trained on; a different name (a moved cache) is only a warning,
    the shapes are checked when the adapter is loaded."""
    for run in runs:
        recorded = run.adapter_config.get("base_model_name_or_path")
        if recorded and recorded not in (cfg.model.name_or_path, str(base_dir)) \
                and Path(recorded).name != base_dir.name:
            log(f"warning: {run.adapter_dir} records base {recorded}; merging into {base_dir} "
                f"(from {run.dir}/config.yaml)")


def _write_weights(weights_in: BaseWeights, peft_model, adapter: str, dtype: str, folder: Path, shard_bytes: int,
                   log) -> list[str]:
    """Base tensors (as trained) + PEFT merge, module by module, into sharded safetensors."""
    out_dtype = TORCH_DTYPES[dtype]
    layers = lora_modules(peft_model)
    writer = ShardWriter(folder, shard_bytes)
    pending: dict[str, list[str]] = {}  # module -> its parameter names, in order
    for name in weights_in.names:
        pending.setdefault(name.rpartition(".")[0], []).append(name)
    done_layers, last_log = 0, time.perf_counter()
    for module, names in pending.items():
        params = {name.rpartition(".")[2]: weights_in.tensor(name) for name in names}
        if module in layers:
            params = merge_module(layers[module], adapter, params)
            done_layers += 1
            if time.perf_counter() - last_log > 10:
                log(f"merged {done_layers}/{len(layers)} adapted modules")
                last_log = time.perf_counter()
        for name in names:
            writer.add(name, params[name.rpartition(".")[2]].to(out_dtype))
    merged_modules = done_layers
    if merged_modules != len(layers):
        missing = sorted(set(layers) - set(pending))[:1]
        raise QtuluError(f"the adapter adapts {missing[0] if missing else 'a module'} whose weights the base "
                         "checkpoint does not hold")
    return writer.close()


def _write_config(config, tokenizer, dtype: str, folder: Path) -> None:
    from transformers import GenerationConfig

    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = TORCH_DTYPES[dtype]
    config.use_cache = True
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(folder)
    # The TÜLU format ends every assistant turn with the tokenizer's EOS: generation stops there.
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)

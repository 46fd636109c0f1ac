"""The run configuration: one pydantic schema drives the YAML presets, the CLI flags and --dry-run.

A run's config is assembled in layers, later ones winning key by key:
schema defaults <- size preset (configs/sizes/) <- mix preset (configs/mixes/) <- --config FILE
<- dotted CLI flags (--optim.lr 2e-4). Every value remembers which layer set it, so an error
names both the key and where it came from. All errors are collected and reported at once.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qtulu.configs import CONFIG_DIR
from qtulu.errors import ConfigError

# The paper's Table 1 sources; qtulu.data's converter registry has exactly these keys (tested).
SOURCE_NAMES = (
    "flan_v2", "cot", "dolly", "oasst1", "super_ni", "self_instruct", "unnatural_instructions",
    "alpaca", "gpt4_alpaca", "code_alpaca", "baize", "sharegpt",
)  # fmt: skip
# The bundled sample of every raw format, shipped inside the package (qtulu/data/sample/).
BUNDLED_SAMPLE = "qtulu:sample"

DType = Literal["bf16", "fp16", "fp32"]
PosInt = Annotated[int, Field(gt=0)]
PosFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ArchConfig(Section):
    """LLaMA architecture numbers: used to build random-init models and by `qtulu plan` offline."""

    vocab_size: PosInt
    hidden_size: PosInt
    intermediate_size: PosInt
    num_layers: PosInt
    num_heads: PosInt
    num_kv_heads: PosInt
    tie_embeddings: bool = False
    max_position_embeddings: PosInt = 2048
    rope_theta: PosFloat = 10000.0
    rms_norm_eps: PosFloat = 1e-6

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class ModelConfig(Section):
    name_or_path: str = Field(description="hub id, local HF folder, or a built-in name")
    revision: str | None = None
    tokenizer: str | None = Field(None, description="defaults to name_or_path")
    init: Literal["pretrained", "random"] = "pretrained"
    arch: ArchConfig | None = Field(None, description="required for init=random; lets plan work offline")
    trust_remote_code: bool = False
    attention: Literal["qtulu", "flash_attn", "sdpa"] = Field(
        "qtulu", description="packed varlen attention: our Triton kernel, flash-attn, or per-document SDPA"
    )
    fused_loss: bool = Field(True, description="lm_head + cross-entropy fused over labelled tokens only")
    gradient_checkpointing: bool = True


class QuantConfig(Section):
    load_in_4bit: bool = True
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: DType = "bf16"
    quant_storage: Literal["uint8", "bf16", "fp16", "fp32"] = Field(
        "uint8", description="bf16 (= compute dtype) lets FSDP shard the 4-bit weights"
    )


class LoraConfig(Section):
    r: PosInt = 64
    alpha: PosFloat = 16
    dropout: Fraction = 0.1
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
    )
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="dtype of the adapter weights")


class MixConfig(Section):
    name: str
    sources: dict[str, PosInt | None] = Field(min_length=1, description="source -> examples (null: all)")
    sources_dir: str | None = Field(None, description=f"raw files, one folder per source; {BUNDLED_SAMPLE}")
    description: str | None = None

    @model_validator(mode="after")
    def _known_sources(self):
        unknown = [s for s in self.sources if s not in SOURCE_NAMES]
        if unknown:
            raise ValueError(f"unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCE_NAMES)}")
        return self


class DataConfig(Section):
    mix: MixConfig
    sources_dir: str | None = Field(None, description="raw source files; default: the mix's, else the hub")
    max_seq_len: PosInt = 2048
    packing: bool = True
    seed: int = 42
    cache_dir: str | None = Field(None, description="prepared-dataset cache; default <output_dir>/../data")
    labels: Literal["tulu", "reference"] = Field(
        "tulu",
        description="tulu: train assistant content + EOS; reference: also the newline after each non-final EOS "
        "(open-instruct 2023 tokens)",
    )
    bos: Literal["auto", "always", "never"] = Field(
        "auto", description="auto: the model family's BOS (LLaMA <s>; none for a chat-marker BOS such as SmolLM2's)"
    )


class OptimConfig(Section):
    optimizer: Literal["paged_adamw_32bit", "paged_adamw_8bit", "adamw", "adamw_8bit"] = "paged_adamw_32bit"
    lr: PosFloat = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PosFloat = 1e-8
    max_grad_norm: Annotated[float, Field(ge=0)] = 1.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: Fraction = 0.03
    epochs: PosFloat = 2
    max_steps: PosInt | None = Field(None, description="stop after this many optimizer steps")
    batch_size: PosInt = Field(128, description="sequences per optimizer step, all GPUs together")
    micro_batch_size: PosInt = Field(1, description="sequences per forward pass on one GPU")
    seed: int = 42
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a NaN/inf loss or gradient norm: stop (keep the last checkpoint) or skip that update"
    )


class CheckpointConfig(Section):
    output_dir: str = Field("runs/{name}", description="{name} is replaced by the run name")
    save_every_steps: PosInt = 500
    keep_last: PosInt = 2
    resume: Literal["auto", "never"] = "auto"


class LoggingConfig(Section):
    log_every_steps: PosInt = 10
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["jsonl"])


class LaunchConfig(Section):
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    num_gpus: PosInt = 1
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gpu_memory_gb: PosFloat | None = Field(None, description="memory per GPU for plan; default: detected")
    cpu_allocator: Literal["mimalloc", "glibc"] = Field(
        "mimalloc", description="CPU runs: mimalloc (qtulu train re-executes itself with it preloaded; 135m: peak "
        "RSS ~4 GB instead of ~9.7 GB at the same speed) or glibc's malloc; docs/benchmarks.md")


class RunConfig(Section):
    name: str
    model: ModelConfig
    quant: QuantConfig = Field(default_factory=QuantConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)

    @property
    def grad_accum_steps(self) -> int:
        return self.optim.batch_size // (self.optim.micro_batch_size * self.launch.num_gpus)


def combination_errors(cfg: RunConfig, world_size: int | None = None) -> list[tuple[str, str]]:
    """Settings that are each valid but impossible together, as (key path, message).

    world_size: the number of processes a launcher started (None: no launcher)."""
    errors = []
    per_step = cfg.optim.micro_batch_size * cfg.launch.num_gpus
    if cfg.optim.batch_size % per_step:
        launched = f" (launch.num_gpus is the launcher's {world_size} processes)" if world_size else ""
        errors.append(("optim.batch_size", f"{cfg.optim.batch_size} is not a multiple of optim.micro_batch_size "
                       f"x launch.num_gpus = {per_step}{launched}; pick a batch size divisible by it"))
    if cfg.model.init == "random" and cfg.model.arch is None:
        errors.append(("model.arch", "model.init=random needs model.arch (the architecture to build)"))
    arch = cfg.model.arch
    if arch and cfg.data.max_seq_len > arch.max_position_embeddings:
        errors.append(("data.max_seq_len", f"{cfg.data.max_seq_len} exceeds model.arch.max_position_embeddings "
                       f"{arch.max_position_embeddings}; lower it"))
    if cfg.launch.strategy == "single" and cfg.launch.num_gpus != 1:
        errors.append(("launch.num_gpus", f"{cfg.launch.num_gpus} GPUs need launch.strategy ddp or fsdp"))
    if cfg.launch.strategy != "single" and cfg.launch.num_gpus < 2:
        errors.append(("launch.num_gpus", f"launch.strategy {cfg.launch.strategy} needs at least 2 GPUs"))
    if cfg.launch.strategy == "fsdp" and cfg.quant.load_in_4bit and cfg.quant.quant_storage != cfg.quant.compute_dtype:
        errors.append(("quant.quant_storage", f"FSDP shards 4-bit weights only when quant.quant_storage equals "
                       f"quant.compute_dtype ({cfg.quant.compute_dtype}); set --quant.quant_storage "
                       f"{cfg.quant.compute_dtype}"))
    # Without a launcher a multi-process strategy on the CPU is a mistake; under one (torchrun,
    # accelerate launch) the processes exist and train over gloo, which is how the CPU tests run it.
    if cfg.launch.device == "cpu" and cfg.launch.strategy != "single" and not world_size:
        errors.append(("launch.device", "multi-GPU strategies need launch.device cuda or auto"))
    return errors


def resolve_launch(cfg: RunConfig, given: set[str], world_size: int | None,
                   launcher_strategy: str | None = None) -> list[tuple[str, str]]:
    """Under a launcher, the number of processes is the launcher's world size, and launch.num_gpus
    follows it: taken from it when not given, refused when given and different (it sets the
    gradient accumulation, so a mismatch would silently change the effective batch). Several
    processes with no strategy named take the launcher's (`launcher_strategy`: fsdp under accelerate's
    FSDP config), else DDP. Under FSDP the 4-bit weights' storage dtype follows the compute dtype
    unless given (FSDP shards only float tensors of one dtype). `given`: the keys some layer of the
    config set. Returns errors as (key path, message); changes `cfg` in place."""
    if world_size is not None:
        if "launch.num_gpus" in given and cfg.launch.num_gpus != world_size:
            return [("launch.num_gpus", f"{cfg.launch.num_gpus} contradicts the launcher, which started {world_size} "
                     f"process(es) (WORLD_SIZE); drop launch.num_gpus or launch {cfg.launch.num_gpus} processes")]
        cfg.launch.num_gpus = world_size
        if world_size > 1 and cfg.launch.strategy == "single":
            if "launch.strategy" in given:
                return [("launch.strategy", f"single trains in one process, but the launcher started {world_size}; "
                         "use ddp, or launch one process")]
            cfg.launch.strategy = launcher_strategy or "ddp"
    if cfg.launch.strategy == "fsdp" and "quant.quant_storage" not in given:
        cfg.quant.quant_storage = cfg.quant.compute_dtype
    return []


# ---------------------------------------------------------------------------------------------
# Assembling a config from presets, files and flags


def available_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConfigError([f"{what}: file {path} does not exist"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of config keys at the top level"])
    return data


def _preset(kind: str, name: str, key: str) -> tuple[dict, str]:
    path = CONFIG_DIR / kind / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_presets(kind))
        singular = {"sizes": "size", "mixes": "mix"}[kind]
        raise ConfigError([f"{key}: no {singular} preset named '{name}'; choose one of: {known}"])
    return _read_yaml(path, key), f"configs/{kind}/{name}.yaml"


def parse_mix(spec: str, key: str = "--mix") -> tuple[dict, str]:
    """A mix given by name (preset), by a YAML path, or inline as `dolly:5000,sharegpt`."""
    if spec.endswith((".yaml", ".yml")):
        return _read_yaml(Path(spec), key), spec
    if (CONFIG_DIR / "mixes" / f"{spec}.yaml").is_file():
        return _preset("mixes", spec, key)
    if ":" in spec or "," in spec:
        sources: dict[str, Any] = {}
        for part in spec.split(","):
            name, _, count = part.strip().partition(":")
            sources[name] = int(count) if count.isdigit() else (count or None)
        return {"name": spec, "sources": sources}, key
    return _preset("mixes", spec, key)  # unknown name: the error lists the presets


# Replaced whole by a later layer, never merged key by key: a mix is one choice.
ATOMIC_KEYS = ("mix",)


def _merge(base: dict, update: dict, origin: dict, source: str, prefix: str = "") -> None:
    """Deep-merge `update` into `base`, recording which source set each key."""
    for key, value in update.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ATOMIC_KEYS:
            if not isinstance(base.get(key), dict):
                base[key] = {}
            _merge(base[key], value, origin, source, path + ".")
        else:
            base[key] = value
            _record_origin(origin, path, value, source)


def _record_origin(origin: dict, path: str, value: Any, source: str) -> None:
    origin[path] = source
    if isinstance(value, dict):
        for key, child in value.items():
            _record_origin(origin, f"{path}.{key}", child, source)


def parse_overrides(args: list[str]) -> list[tuple[str, Any, str]]:
    """`--optim.lr 2e-4 --lora.r=128` -> [(key path, value, flag)]; values parsed as YAML scalars."""
    overrides, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError([f"{arg}: unexpected argument; overrides look like --section.key VALUE"])
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = "true"  # a bare flag switches a boolean on
        key = key.replace("-", "_")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        overrides.append((key, value if parsed is None and value not in ("null", "~") else parsed, arg))
        i += 1
    return overrides


def _set_path(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[leaf] = value


def _coerce_lists(tree: dict, model: type[BaseModel] = None) -> None:
    """A CLI value `q_proj,v_proj` for a list field becomes a list."""
    model = model or RunConfig
    for key, value in tree.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        ann = field.annotation
        sub = _section_model(ann)
        if sub and isinstance(value, dict):
            _coerce_lists(value, sub)
        elif isinstance(value, str) and getattr(ann, "__origin__", None) is list:
            tree[key] = [v.strip() for v in value.split(",") if v.strip()]


def _section_model(annotation) -> type[BaseModel] | None:
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _model_at(path: tuple) -> type[BaseModel] | None:
    model = RunConfig
    for part in path:
        field = model.model_fields.get(part) if model else None
        model = _section_model(field.annotation) if field else None
    return model


def _origin_suffix(origin: dict, key: str) -> str:
    """` (from SOURCE)`: where the key was set, or, for a section, where its keys were set."""
    if key in origin:
        return f" (from {origin[key]})"
    sources = dict.fromkeys(src for path, src in origin.items() if path.startswith(key + "."))
    return f" (from {', '.join(sources)})" if sources else ""


def _format_error(err: dict, origin: dict, cli_options: tuple[str, ...] = ()) -> str:
    loc = tuple(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
    key = ".".join(loc)
    suffix = _origin_suffix(origin, key)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        names = list(model.model_fields) if model else []
        close = difflib.get_close_matches(loc[-1], names, n=1)
        option = difflib.get_close_matches(loc[-1], cli_options, n=1) if len(loc) == 1 else []
        if close:
            hint = f"did you mean {'.'.join((*loc[:-1], close[0]))}?"
        elif option:
            hint = f"did you mean --{option[0]}?"
        else:
            hint = f"known keys here: {', '.join(names)}"
        return f"{key}: unknown key{suffix}; {hint}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] != "missing" and "input" in err and not isinstance(err["input"], dict):
        msg += f"; got {err['input']!r}"
    return f"{key or 'config'}: {msg}{suffix}"


def load_config(
    size: str | None = None,
    mix: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    cli_options: tuple[str, ...] = (),
    world_size: int | None = None,
    launcher_strategy: str | None = None,
) -> RunConfig:
    """Assemble, validate and return a run config; raise ConfigError listing every problem.

    `cli_options` are the calling command's own option names, suggested for a mistyped flag.
    `world_size`: the processes a launcher started (qtulu.train.launch.launcher_world_size), None
    without one; launch.num_gpus then follows it (resolve_launch), and launch.strategy follows
    `launcher_strategy` (qtulu.train.launch.launcher_strategy) when not given.
    """
    tree: dict = {}
    origin: dict = {}
    errors: list[str] = []
    layers: list[tuple[dict, str]] = []
    try:
        if size:
            layers.append(_preset("sizes", size, "--size"))
        if mix:
            mix_tree, mix_source = parse_mix(mix)
            layers.append(({"data": {"mix": mix_tree}}, mix_source))
        if config_file:
            layers.append((_read_yaml(Path(config_file), "--config"), config_file))
        for key, value, flag in parse_overrides(overrides or []):
            if key == "data.mix" and isinstance(value, str):
                mix_tree, _ = parse_mix(value, flag)
                value = mix_tree
            layer: dict = {}
            _set_path(layer, key, value)
            layers.append((layer, flag))
    except ConfigError as e:
        errors.extend(e.errors)
    if not size and not config_file and not errors:
        errors.append(f"--size: choose a model size ({', '.join(available_presets('sizes'))}) or pass --config FILE")
    for layer, source in layers:
        _merge(tree, layer, origin, source)
    if errors:
        raise ConfigError(errors)
    _coerce_lists(tree)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError([_format_error(err, origin, cli_options) for err in e.errors()]) from None
    launch_problems = resolve_launch(cfg, set(origin), world_size, launcher_strategy)
    problems = [f"{key}: {msg}{_origin_suffix(origin, key)}"
                for key, msg in launch_problems or combination_errors(cfg, world_size)]
    if problems:
        raise ConfigError(problems)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=100, allow_unicode=True)


def _type_name(annotation) -> str:
    """A short type for help text: `a|b|c` for choices, else the type's name."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        return f"{origin.__name__}[{_type_name(args[0])}]"
    if origin is dict:
        return "MAPPING"
    return getattr(annotation, "__name__", str(annotation)).upper()


def config_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf key with its type and description, for `qtulu train --help`."""
    rows = []
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        if sub and name not in ("mix", "arch"):
            rows.extend(config_keys(sub, f"{prefix}{name}."))
        else:
            kind = {"mix": "MIX", "arch": "MAPPING"}.get(name) or _type_name(field.annotation)
            rows.append((f"{prefix}{name}", kind, field.description or ""))
    return rows

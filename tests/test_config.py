"""The run config: presets load, layers override in order, and every mistake is reported at once."""

from pathlib import Path

import pytest
import yaml
from qtulu.configs import CONFIG_DIR

from qtulu.config import (
    SOURCE_NAMES,
    MixConfig,
    RunConfig,
    available_presets,
    config_keys,
    dump_config,
    load_config,
    parse_mix,
)
from qtulu.errors import ConfigError

SIZES = available_presets("sizes")
MIXES = available_presets("mixes")


def test_presets_exist():
    assert {"7b", "13b", "30b", "65b", "135m", "micro"} <= set(SIZES)
    assert {"human", "gpt", "human+gpt", "sample", *SOURCE_NAMES} <= set(MIXES)


@pytest.mark.parametrize("size", SIZES)
def test_every_size_preset_loads(size):
    cfg = load_config(size=size, mix="sample")
    assert isinstance(cfg, RunConfig)
    # presets carry their architecture, so plan and random init work offline
    assert cfg.model.arch is not None
    # round trip: the dumped config validates to the same config
    assert RunConfig.model_validate(yaml.safe_load(dump_config(cfg))) == cfg


@pytest.mark.parametrize("mix", MIXES)
def test_every_mix_preset_loads(mix):
    tree, origin = parse_mix(mix)
    parsed = MixConfig.model_validate(tree)
    assert parsed.name == mix
    assert origin == f"configs/mixes/{mix}.yaml"


def test_every_shipped_yaml_is_covered():
    """A YAML dropped anywhere under configs/ must belong to a kind that a test loads."""
    for path in CONFIG_DIR.rglob("*.yaml"):
        assert path.parent.name in ("sizes", "mixes", "launch"), path


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_load_in_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    cluster = ClusterConfig.from_yaml_file(str(path))  # raises on unknown top-level keys
    assert cluster.num_processes >= 2
    known = {action.dest for action in launch_command_parser()._actions}
    unknown = set(cluster.fsdp_config or {}) - known
    assert not unknown, f"{path.name}: fsdp_config keys accelerate launch does not know: {unknown}"


def test_fsdp_launch_config_matches_the_schema_rule():
    """Under the FSDP config (no strategy named) the 65b run is FSDP with its 4-bit weights stored in
    bf16, which our schema demands for FSDP; its comments say so."""
    text = (CONFIG_DIR / "launch" / "fsdp_qlora.yaml").read_text()
    assert "ACCELERATE_USE_FSDP" in text and "quant.quant_storage follows" in text
    cfg = load_config(size="65b", mix="human+gpt", world_size=8, launcher_strategy="fsdp")
    assert cfg.launch.strategy == "fsdp" and cfg.quant.quant_storage == cfg.quant.compute_dtype == "bf16"


def test_fsdp_storage_follows_the_compute_dtype_unless_given():
    cfg = load_config(size="7b", mix="human", overrides=FSDP2)
    assert cfg.quant.quant_storage == cfg.quant.compute_dtype == "bf16"
    cfg = load_config(size="micro", mix="sample", overrides=[*FSDP2, "--launch.device", "cuda"])
    assert cfg.quant.quant_storage == cfg.quant.compute_dtype == "fp32"
    assert load_config(size="7b", mix="human", overrides=DDP2).quant.quant_storage == "uint8"


def test_65b_human_gpt_has_the_papers_values():
    cfg = load_config(size="65b", mix="human+gpt")
    assert cfg.model.name_or_path == "huggyllama/llama-65b"
    optim = cfg.optim
    assert (optim.epochs, optim.schedule, optim.warmup_ratio, optim.weight_decay) == (2, "linear", 0.03, 0)
    assert cfg.optim.batch_size == 128
    assert cfg.data.max_seq_len == 1024
    assert (cfg.quant.quant_type, cfg.quant.double_quant, cfg.quant.compute_dtype) == ("nf4", True, "bf16")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16, 0.1)
    assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"}
    assert cfg.data.mix.sources == {"flan_v2": 100000, "cot": 100000, "dolly": 15011, "oasst1": 34795,
                                    "gpt4_alpaca": 52002, "code_alpaca": 20022, "sharegpt": 168864}
    assert sum(cfg.data.mix.sources.values()) == 490694  # the paper's ~490k
    assert cfg.grad_accum_steps == 128


@pytest.mark.parametrize("size,max_len", [("7b", 2048), ("13b", 2048), ("30b", 1024), ("65b", 1024)])
def test_max_length_per_size(size, max_len):
    assert load_config(size=size, mix="human").data.max_seq_len == max_len


def test_overrides_apply_in_order_and_parse_types(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("optim:\n  lr: 3.0e-4\n  micro_batch_size: 2\nlora:\n  r: 32\n")
    cfg = load_config(size="7b", mix="human", config_file=str(config_file),
                      overrides=["--lora.r=128", "--optim.max-steps", "10", "--lora.target_modules", "q_proj,v_proj",
                                 "--model.gradient_checkpointing", "false", "--optim.lr", "1e-4"])
    assert cfg.lora.r == 128  # flag beats file
    assert cfg.optim.micro_batch_size == 2  # file beats preset
    assert cfg.optim.lr == 1e-4  # "1e-4" (a YAML string) still becomes a float
    assert cfg.optim.max_steps == 10  # dashes in keys work
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.gradient_checkpointing is False


def test_inline_mix():
    cfg = load_config(size="7b", mix="dolly:5000,sharegpt")
    assert cfg.data.mix.sources == {"dolly": 5000, "sharegpt": None}


def test_mix_from_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nsources:\n  dolly: 10\n  oasst1: null\n")
    assert load_config(size="7b", mix=str(path)).data.mix.sources == {"dolly": 10, "oasst1": None}


def test_all_errors_reported_at_once_with_key_paths():
    with pytest.raises(ConfigError) as err:
        load_config(size="7b", mix="human", overrides=["--optim.lrr", "1", "--lora.r", "-3", "--quant.compute_dtype",
                                                       "int3", "--bogus", "1"])
    lines = err.value.errors
    assert len(lines) == 4, lines
    text = "\n".join(lines)
    assert "optim.lrr: unknown key (from --optim.lrr); did you mean optim.lr?" in text
    assert "lora.r:" in text and "greater than 0" in text and "-3" in text
    assert "quant.compute_dtype:" in text and "int3" in text
    assert "bogus: unknown key" in text


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(size="7b", mix="human", config_file=str(path))
    assert err.value.errors == [f"lora.rank: unknown key (from {path}); known keys here: r, alpha, dropout, "
                                "target_modules, dtype"]


def error_keys(err: ConfigError) -> list[str]:
    """The config key each error line names (lines read `key: problem (from ...)`)."""
    return [line.split(":", 1)[0] for line in err.errors]


DDP2 = ["--launch.strategy", "ddp", "--launch.num_gpus", "2"]
FSDP2 = ["--launch.strategy", "fsdp", "--launch.num_gpus", "2"]


@pytest.mark.parametrize("overrides,key", [
    pytest.param(["--optim.batch_size", "100", "--optim.micro_batch_size", "3"], "optim.batch_size",
                 id="batch-not-multiple-of-micro"),
    # 12 is a multiple of the micro-batch (4) but not of micro-batch x GPUs (8)
    pytest.param([*DDP2, "--optim.micro_batch_size", "4", "--optim.batch_size", "12"], "optim.batch_size",
                 id="batch-not-multiple-of-micro-times-gpus"),
    pytest.param(["--launch.num_gpus", "4"], "launch.num_gpus", id="single-with-4-gpus"),
    pytest.param(["--launch.strategy", "ddp"], "launch.num_gpus", id="ddp-with-1-gpu"),
    pytest.param(["--launch.strategy", "fsdp", "--quant.quant_storage", "bf16"], "launch.num_gpus",
                 id="fsdp-with-1-gpu"),
    pytest.param([*FSDP2, "--quant.quant_storage", "uint8"], "quant.quant_storage", id="fsdp-with-uint8-storage"),
    pytest.param([*FSDP2, "--quant.quant_storage", "fp16"], "quant.quant_storage", id="fsdp-storage-not-compute"),
    pytest.param(["--data.max_seq_len", "4096"], "data.max_seq_len", id="longer-than-positions"),
    pytest.param(["--model.init", "random", "--model.arch", "null"], "model.arch", id="random-init-without-arch"),
    pytest.param(["--launch.device", "cpu", *DDP2], "launch.device", id="cpu-with-ddp"),
    pytest.param(["--launch.device", "cpu", *FSDP2, "--quant.quant_storage", "bf16"], "launch.device",
                 id="cpu-with-fsdp"),
])
def test_impossible_combinations(overrides, key):
    """Each impossible combination is refused with exactly one error, naming the key to change."""
    with pytest.raises(ConfigError) as err:
        load_config(size="7b", mix="human", overrides=overrides)
    assert error_keys(err.value) == [key], err.value.errors


@pytest.mark.parametrize("overrides", [
    pytest.param([*DDP2, "--optim.micro_batch_size", "4", "--optim.batch_size", "16"], id="batch-16-on-2x4"),
    pytest.param(DDP2, id="ddp-with-2-gpus"),
    pytest.param([*FSDP2, "--quant.quant_storage", "bf16"], id="fsdp-with-bf16-storage"),
    pytest.param(FSDP2, id="fsdp-storage-following-compute"),
    pytest.param(["--data.max_seq_len", "2048"], id="max-len-equal-to-positions"),
    pytest.param(["--model.init", "random"], id="random-init-with-the-presets-arch"),
    pytest.param(["--launch.device", "cpu"], id="cpu-single"),
    pytest.param(["--launch.device", "cuda", *DDP2], id="cuda-with-ddp"),
])
def test_possible_neighbours_of_the_impossible_combinations(overrides):
    """One step away from each refused combination, the config loads: the checks are not too wide."""
    cfg = load_config(size="7b", mix="human", overrides=overrides)
    per_step = cfg.optim.micro_batch_size * cfg.launch.num_gpus
    assert cfg.grad_accum_steps * per_step == cfg.optim.batch_size


def test_unknown_size_mix_and_source():
    with pytest.raises(ConfigError) as err:
        load_config(size="8b", mix="human")
    assert "--size: no size preset named '8b'" in str(err.value) and "65b" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(size="7b", mix="dolly:10,wikipedia")
    assert "data.mix" in str(err.value) and "wikipedia" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(size="7b", mix="human", config_file=str(tmp_path / "nope.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=rf"{broken}:\d+: not valid YAML"):
        load_config(size="7b", mix="human", config_file=str(broken))


def test_size_is_required():
    with pytest.raises(ConfigError, match="--size: choose a model size"):
        load_config(mix="human")


def test_config_keys_cover_the_schema():
    keys = {key: kind for key, kind, _ in config_keys()}
    assert {"optim.lr", "lora.r", "quant.quant_storage", "data.mix", "model.arch", "launch.strategy"} <= set(keys)


def test_preset_files_are_partial_configs():
    """Presets only set known keys (a typo in a shipped preset must fail here, not for a user)."""
    for path in Path(CONFIG_DIR / "sizes").glob("*.yaml"):
        tree = yaml.safe_load(path.read_text())
        tree.setdefault("data", {})["mix"] = {"name": "x", "sources": {"dolly": 1}}
        RunConfig.model_validate(tree)


def test_a_later_mix_replaces_the_earlier_one_whole():
    cfg = load_config(size="7b", mix="human", overrides=["--data.mix", "dolly"])
    assert cfg.data.mix.name == "dolly"
    assert cfg.data.mix.sources == {"dolly": 15011}
    assert cfg.data.mix.description is None  # nothing left over from `human`


def test_errors_name_where_a_new_section_or_its_keys_came_from():
    with pytest.raises(ConfigError) as err:
        load_config(size="7b", mix="human", overrides=["--launch.gpu_memory_gb", "0"])
    assert err.value.errors == ["launch.gpu_memory_gb: Input should be greater than 0; got 0 "
                                "(from --launch.gpu_memory_gb)"]
    with pytest.raises(ConfigError) as err:
        load_config(size="7b", mix="human", overrides=["--model.arch.hidden_size", "100"])
    assert err.value.errors == ["model.arch: hidden_size 100 is not divisible by num_heads 32 "
                                "(from configs/sizes/7b.yaml, --model.arch.hidden_size)"]

"""The real `qtulu` entry point, run as a user runs it: help, dry-run, errors, exit codes."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

QTULU = str(Path(sys.executable).parent / "qtulu")
COMMANDS = ["train", "merge", "eval", "data", "plan", "bench"]


def run(*args, env=None):
    return subprocess.run([QTULU, *args], capture_output=True, text=True, timeout=300, env=env)


def test_root_help_lists_every_command():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


def test_version():
    from qtulu import __version__

    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"qtulu {__version__}"


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help(command):
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: qtulu " + command in result.stdout
    if command != "data":  # data's help lists its own subcommands, each with examples
        assert "Example" in result.stdout


def test_train_help_lists_config_keys():
    result = run("train", "--help")
    for key in ("--optim.lr", "--lora.r", "--quant.quant_storage", "--data.max_seq_len"):
        assert key in result.stdout


def test_dry_run_prints_resolved_config_with_the_papers_values():
    result = run("train", "--size", "65b", "--mix", "human+gpt", "--dry-run")
    assert result.returncode == 0, result.stderr
    header, _, body = result.stdout.partition("\n")
    assert "tulu-65b" in header and "128 micro-batches" in header
    cfg = yaml.safe_load(body)
    assert cfg["optim"]["epochs"] == 2 and cfg["optim"]["warmup_ratio"] == 0.03
    assert cfg["optim"]["weight_decay"] == 0 and cfg["optim"]["schedule"] == "linear"
    assert cfg["data"]["max_seq_len"] == 1024 and cfg["optim"]["batch_size"] == 128
    assert cfg["lora"]["r"] == 64 and cfg["lora"]["alpha"] == 16 and cfg["lora"]["dropout"] == 0.1
    assert cfg["quant"]["quant_type"] == "nf4" and cfg["quant"]["double_quant"] is True
    assert cfg["data"]["mix"]["name"] == "human+gpt"


def test_dry_run_applies_overrides():
    result = run("train", "--size", "7b", "--mix", "dolly", "--dry-run", "--lora.r", "256", "--lora.alpha=256")
    assert result.returncode == 0, result.stderr
    cfg = yaml.safe_load(result.stdout.partition("\n")[2])
    assert cfg["lora"]["r"] == 256 and cfg["lora"]["alpha"] == 256


@pytest.mark.parametrize("args,expected", [
    (["--optim.lrr", "1e-4"], ["optim.lrr: unknown key (from --optim.lrr); did you mean optim.lr?"]),
    (["--lora.r", "big"], ["lora.r: Input should be a valid integer, unable to parse string as an integer; "
                           "got 'big' (from --lora.r)"]),
    (["--sizee", "7b"], ["sizee: unknown key (from --sizee); did you mean --size?"]),
])
def test_bad_key_exits_2_with_one_line_and_no_traceback(args, expected):
    result = run("train", "--size", "7b", "--mix", "human", "--dry-run", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [f"error: {line}" for line in expected]


def test_several_bad_keys_reported_together():
    result = run("train", "--size", "7b", "--mix", "human", "--dry-run", "--optim.lr", "-1", "--lora.dropout", "1.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith("error: lora.dropout:") for line in lines)
    assert any(line.startswith("error: optim.lr:") for line in lines)


def test_unknown_preset_is_one_line():
    result = run("train", "--size", "70b", "--mix", "human", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --size: no size preset named '70b'; choose one of: ")


@pytest.mark.parametrize("args", [["merge", "no/such/run"], ["eval", "no/such/model"]])
def test_missing_model_or_run_is_one_line(args):
    result = run(*args)
    assert result.returncode != 0, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no/such" in result.stderr and "Traceback" not in result.stderr


def test_plan_prints_a_table_for_every_llama_size():
    result = run("plan", "--all", "--gpu-memory", "80", env={"COLUMNS": "160", "PATH": ""})
    assert result.returncode == 0, result.stderr
    for name in ("tulu-7b", "tulu-13b", "tulu-30b", "tulu-65b"):
        assert name in result.stdout
    for part in ("4-bit weights", "optimizer state", "activations", "peak", "verdict"):
        assert part in result.stdout


def test_plan_65b_fits_the_qlora_papers_48gb_gpu():
    """QLoRA (Dettmers et al. 2023) finetuned LLaMA-65B on a single 48 GB GPU."""
    result = run("plan", "--size", "65b", "--gpu-memory", "48", env={"COLUMNS": "160", "PATH": ""})
    assert result.returncode == 0, result.stderr
    verdict = next(line for line in result.stdout.splitlines() if "verdict" in line)
    assert "fits" in verdict and "does not fit" not in verdict


def test_plan_gives_advice_when_it_does_not_fit():
    result = run("plan", "--size", "65b", "--gpu-memory", "24", env={"COLUMNS": "160", "PATH": ""})
    assert result.returncode == 0, result.stderr
    assert "does not fit" in result.stdout
    assert "--optim.optimizer paged_adamw_8bit" in result.stdout
    assert "FSDP" in result.stdout


def test_bench_lists_benchmarks():
    """One line per benchmark module, `NAME  summary`, the summary its docstring's first line; private
    helpers (`_measure`) are not benchmarks. Other benchmarks may join the list."""
    import ast

    import qtulu.benchmarks

    result = run("bench")
    assert result.returncode == 0, result.stderr
    rows = [line.split(None, 1) for line in result.stdout.splitlines() if line.strip()]
    assert rows and all(len(row) == 2 for row in rows), f"expected `NAME summary` lines:\n{result.stdout}"
    listed = dict(rows)
    folder = Path(qtulu.benchmarks.__file__).parent
    assert (folder / "_measure.py").is_file() and "_measure" not in listed
    assert {"attention", "loss", "data", "train"} <= set(listed), result.stdout
    for name, summary in listed.items():
        module = folder / f"{name}.py"
        assert module.is_file() and not name.startswith("_"), name
        doc = ast.get_docstring(ast.parse(module.read_text()))
        assert doc and doc.strip(), f"{name}: a benchmark's docstring is its summary"
        assert summary.strip() == doc.strip().splitlines()[0], name
    assert listed["attention"].startswith("Varlen causal attention")
    assert listed["loss"].startswith("Fused linear cross-entropy")
    assert listed["data"].startswith("Data: tokens against the reference's")
    assert listed["train"].startswith("Training: real tokens/s")


def test_bench_unknown_name():
    result = run("bench", "nope")
    assert result.returncode == 2 and "no benchmark named 'nope'" in result.stderr


def test_bench_refuses_private_helpers():
    result = run("bench", "_measure")
    assert result.returncode == 2 and "no benchmark named '_measure'" in result.stderr

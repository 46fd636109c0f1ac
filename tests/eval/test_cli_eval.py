"""`qtulu eval` as users type it: the default command, help, one-line errors; model and run folders."""

import json

import pytest
import yaml

from qtulu.errors import QtuluError


def test_eval_help_shows_examples_and_commands(qtulu_cli):
    r = qtulu_cli("eval", "--help")
    assert r.returncode == 0 and "Usage: qtulu eval" in r.stdout and "Example" in r.stdout
    for command in ("run", "score", "compare"):
        assert command in r.stdout
    r = qtulu_cli("eval", "run", "--help")
    assert r.returncode == 0 and "--tasks" in r.stdout and "--data-dir" in r.stdout and "Example" in r.stdout


def test_missing_model_and_missing_data_are_one_line(qtulu_cli, micro_model, tmp_path):
    r = qtulu_cli("eval", tmp_path / "nope", "--tasks", "gsm")
    assert r.returncode == 1 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such model or run folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = qtulu_cli("eval", micro_model, "--tasks", "gsm", "--data-dir", empty)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(f"error: gsm: gsm8k/test.jsonl not found under {empty}")
    assert "DIR/gsm8k/test.jsonl" in lines[0]


def test_unknown_task_and_bad_part(qtulu_cli, micro_model, eval_data):
    r = qtulu_cli("eval", micro_model, "--tasks", "squad")
    assert r.returncode == 2 and r.stderr.startswith("error: --tasks: no task named 'squad'")
    r = qtulu_cli("eval", micro_model, "--tasks", "bbh:date_understandin", "--data-dir", eval_data)
    assert r.returncode == 2 and "no BBH task named date_understandin" in r.stderr


def test_only_tasks_that_cannot_run_here_exit_2_with_one_line_each(qtulu_cli, micro_model, tmp_path):
    r = qtulu_cli("eval", micro_model, "--tasks", "alpaca,toxigen",
                  env={"QTULU_TOXIGEN_CLASSIFIER": tmp_path / "no-classifier"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr and len(lines) == 3
    assert lines[0].startswith("alpaca: no LLM judge configured") and "QTULU_JUDGE_MODEL" in lines[0]
    assert lines[1].startswith("toxigen: ToxiGen needs a toxicity classifier")
    assert "QTULU_TOXIGEN_CLASSIFIER" in lines[1]
    assert lines[2] == "error: qtulu eval: none of the tasks asked for can run here (alpaca, toxigen); see the " \
                       "messages above"


def _run_folder(tmp_path, micro_model, with_merged: bool):
    from qtulu.config import dump_config, load_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(size="micro", mix="sample")
    (run / "config.yaml").write_text(dump_config(cfg))
    if with_merged:
        (run / "merged").symlink_to(micro_model, target_is_directory=True)
    return run, cfg


def test_resolve_run_folder_prefers_merged(tmp_path, micro_model):
    from qtulu.eval.model import resolve

    run, _ = _run_folder(tmp_path, micro_model, with_merged=True)
    r = resolve(str(run))
    assert r.model_dir == run / "merged" and r.adapter_dir is None and r.run_config.name
    (tmp_path / "b").mkdir()
    bare, _ = _run_folder(tmp_path / "b", micro_model, with_merged=False)
    with pytest.raises(QtuluError, match="neither merged/ nor adapter"):
        resolve(str(bare))


def test_base_plus_adapter_run_folder(tmp_path, micro_model, eval_data):
    """A run folder without merged/: the base (4-bit, as trained) + RUN/adapter, tokenizer from RUN/tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qtulu.data.chat import save_chat_tokenizer
    from qtulu.eval.model import resolve
    from qtulu.eval.runner import evaluate
    from qtulu.model.load import base_model_dir
    from qtulu.model.tokenizer import load_tokenizer

    run, cfg = _run_folder(tmp_path, micro_model, with_merged=False)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(cfg))
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(run / "adapter")
    save_chat_tokenizer(load_tokenizer(str(base_model_dir(cfg))), run / "tokenizer")
    r = resolve(str(run))
    assert r.model_dir == base_model_dir(cfg) and r.adapter_dir == run / "adapter" and r.tokenizer_dir == run / \
        "tokenizer"
    out = evaluate(str(run), adapter=None, tasks="mmlu:global_facts", data_dirs=[str(eval_data)], limit=1,
                   batch_size=2, backend="hf", fmt="chat", output=None, full=False, device="cpu", dtype="auto")
    assert out == run / "eval"
    res = json.loads((out / "results.json").read_text())
    assert res["model"]["adapter"] == str(run / "adapter") and res["format"] == "chat"
    assert yaml.safe_load((run / "config.yaml").read_text())["name"] == res["model"]["name"]

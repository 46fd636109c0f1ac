"""The real pipeline through the installed CLI: `qtulu train` (micro, 2 steps) then `qtulu merge`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

QTULU = str(Path(sys.executable).parent / "qtulu")


def test_train_then_merge_through_the_cli(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qtulu.config import RunConfig
    from qtulu.model.load import load_base_model

    run = tmp_path / "run"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    train = subprocess.run([QTULU, "train", "--size", "micro", "--mix", "sample", "--max-steps", "2", "--output",
                            str(run), "--data.cache_dir", str(tmp_path / "data")],
                           capture_output=True, text=True, env=env, timeout=600)
    assert train.returncode == 0, train.stderr
    merge = subprocess.run([QTULU, "merge", str(run)], capture_output=True, text=True, env=env, timeout=600)
    assert merge.returncode == 0, merge.stderr
    assert "Traceback" not in merge.stderr
    assert "Warning" not in merge.stderr, merge.stderr  # nothing but the command's own lines
    assert f"merged model written to {run / 'merged'}" in merge.stdout and "verified" in merge.stdout
    manifest = json.loads((run / "merged" / "qtulu_merge.json").read_text())
    assert manifest["verification"]["passed"] and manifest["dtype"] == "fp32"

    # independently of the command's own check: the trained adapter on its 4-bit base vs the merged folder
    cfg = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    trained = PeftModel.from_pretrained(load_base_model(cfg, torch.device("cpu")), str(run / "adapter"))
    trained.train()  # the training forward (micro has no dropout)
    tokenizer = AutoTokenizer.from_pretrained(run / "merged")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours."},
                                          {"role": "assistant", "content": "Red, green and blue."}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    with torch.no_grad():
        reference = trained(input_ids=ids).logits[0]
        with trained.disable_adapter():
            base_only = trained(input_ids=ids).logits[0]
        got = merged(input_ids=ids).logits[0]
    tolerance = 1e-4 * max(1.0, reference.abs().max().item())
    diff, effect = (got - reference).abs().max().item(), (base_only - reference).abs().max().item()
    print(f"train -> merge: max |logit diff| {diff:.2e} (tolerance {tolerance:.2e}); 2 steps moved logits {effect:.2e}")
    assert diff <= tolerance < effect
    assert (got.argmax(-1) == reference.argmax(-1)).all()
    # the tokenizer training saved, byte for byte
    for name in os.listdir(run / "tokenizer"):
        assert (run / "merged" / name).read_bytes() == (run / "tokenizer" / name).read_bytes()

"""`qtulu merge` on the micro preset (CPU): the merged model computes what base + adapter computed in
training, reloads and generates with the training chat format, combines adapters, and never leaves a
half-written or unverified folder behind.

Stated tolerance (fp32 output): largest |logit difference| <= 1e-4 x max(1, largest |logit|), and
every top-1 token the same. Measured on micro: ~8e-7 (logits of magnitude ~1).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from micro_runs import CONVERSATIONS, chat_tokenizer
from safetensors.torch import load_file

from qtulu.errors import QtuluError
from qtulu.merge import merge as merge_module
from qtulu.merge.base import BaseWeights
from qtulu.merge.merge import merge_runs
from qtulu.model.load import base_model_dir, load_base_model

FP32_RTOL = 1e-4
QTULU = str(Path(sys.executable).parent / "qtulu")


def load_merged(folder: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


@torch.no_grad()
def logits_of(model, inputs) -> torch.Tensor:
    return torch.cat([model(input_ids=i).logits[0].float() for i in inputs])


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_merged_logits_equal_base_plus_adapter_as_trained(run_a, merged_a):
    reference = torch.cat(run_a.logits)  # the training model itself: 4-bit base + LoRA
    base_only = torch.cat(run_a.base_logits)
    merged = logits_of(load_merged(merged_a.output), run_a.input_ids)
    tolerance = FP32_RTOL * max(1.0, reference.abs().max().item())
    diff = (merged - reference).abs().max().item()
    top1 = (merged.argmax(-1) == reference.argmax(-1)).float().mean().item()
    adapter_effect = (base_only - reference).abs().max().item()
    print(f"fp32 merge: max |logit diff| {diff:.2e} (tolerance {tolerance:.2e}), top-1 agreement {top1:.2%}, "
          f"adapter's own effect {adapter_effect:.2e}, over {reference.shape[0]} tokens")
    assert diff <= tolerance and top1 == 1.0
    # the test can see a wrong merge: the adapter moves the logits by far more than the tolerance
    assert adapter_effect > 100 * tolerance
    # and the command's own verification measured the same thing
    assert merged_a.verification.passed and merged_a.verification.max_abs_diff <= tolerance


def test_merging_into_the_original_weights_is_not_what_was_trained(run_a, tmp_path):
    """--base original merges into weights the adapter never saw: far outside the tolerance (this is
    why the default dequantizes), and the command says so."""
    result = merge_runs([run_a.dir], output=tmp_path / "orig", dtype="fp32", base="original", verify=False)
    reference = torch.cat(run_a.logits)
    merged = logits_of(load_merged(result.output), run_a.input_ids)
    diff = (merged - reference).abs().max().item()
    print(f"--base original vs trained: max |logit diff| {diff:.2e}")
    assert diff > 10 * FP32_RTOL * max(1.0, reference.abs().max().item())
    assert any("never saw" in w for w in result.warnings)
    assert json.loads((result.output / "qtulu_merge.json").read_text())["base_mode"] == "original"


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_base_weights_are_bit_for_bit_what_training_computed_with(compute):
    """The streamed base equals the values inside the 4-bit model training loads (dequantized)."""
    import bitsandbytes as bnb
    from micro_runs import micro_config

    cfg = micro_config("--quant.compute_dtype", compute)
    model = load_base_model(cfg, torch.device("cpu"))
    base = BaseWeights(cfg, base_model_dir(cfg), "dequantized", torch.device("cpu"))
    quantized = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            trained = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(base.tensor(f"{name}.weight"), trained.float()), name
            quantized += 1
    assert quantized == 7 * cfg.model.arch.num_layers
    assert torch.equal(base.tensor("model.norm.weight"), model.model.norm.weight.float())
    assert torch.equal(base.tensor("lm_head.weight"), model.lm_head.weight.float())


def test_merged_folder_reloads_and_generates(run_a, merged_a):
    from transformers import AutoTokenizer

    folder = merged_a.output
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    assert not list(folder.glob("*.bin")) and not list(folder.glob(".*"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_merged(folder)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id  # the end of an assistant turn
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert ids.shape[1] < out.shape[1] <= ids.shape[1] + 6
    manifest = json.loads((folder / "qtulu_merge.json").read_text())
    assert manifest["verification"]["passed"] and manifest["base_mode"] == "dequantized"


def test_saved_chat_template_renders_exactly_as_training(run_a, merged_a):
    from transformers import AutoTokenizer

    from qtulu.data.chat import render

    tokenizer = AutoTokenizer.from_pretrained(merged_a.output)
    chat = chat_tokenizer(run_a.cfg)
    for conversation, trained in zip(CONVERSATIONS, chat(CONVERSATIONS), strict=True):
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        bos = tokenizer.bos_token if chat.bos_id is not None else ""
        assert text == bos + render(conversation, tokenizer.eos_token, run_a.cfg.data.labels)[0]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == trained.input_ids.tolist()


def test_an_interrupted_merge_leaves_no_output(run_a, tmp_path, monkeypatch):
    calls = []

    def interrupt(self, name, tensor):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(merge_module.ShardWriter, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        merge_runs([run_a.dir], output=tmp_path / "out", verify=False)
    assert os.listdir(tmp_path) == []  # no output, no partial folder, no scratch


def test_a_failed_verification_leaves_no_output(run_a, tmp_path, monkeypatch):
    from qtulu.merge import verify

    monkeypatch.setitem(verify.TOLERANCES, "fp32", (1e-12, 1.0))
    with pytest.raises(QtuluError, match="verification failed: largest"):
        merge_runs([run_a.dir], output=tmp_path / "out", dtype="fp32")
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_a_real_merge_leaves_no_output(run_a, tmp_path):
    out = tmp_path / "merged"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    # A runner started in the background (`make test &`, nohup, some CI agents) has SIGINT ignored, and a
    # child inherits that, as a shell's Ctrl-C never reaches background jobs: give the merge a terminal's default.
    proc = subprocess.Popen([QTULU, "merge", str(run_a.dir), "--output", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # Signal once the weights are written and verification has begun (it loads a second model, seconds
    # even on micro): polling for the partial folder could lose the race to a fast merge on a busy machine.
    seen = []
    for line in proc.stderr:  # ends when the process closes stderr (exits)
        seen.append(line)
        if line.startswith("verifying:"):
            break
    assert seen and seen[-1].startswith("verifying:"), "".join(seen)
    assert any(p.name.startswith(".merged.partial-") for p in tmp_path.iterdir())
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_two_adapters_weighted_1_0_equal_the_first_alone(run_a, run_b, merged_a, tmp_path, method):
    result = merge_runs([run_a.dir, run_b.dir], output=tmp_path / "mix", dtype="fp32", weights="1,0",
                        method=method, verify=False)
    alone, combined = weights_of(merged_a.output), weights_of(result.output)
    assert alone.keys() == combined.keys()
    worst = max((alone[k] - combined[k]).abs().max().item() for k in alone)
    print(f"{method} 1,0 vs first alone: largest weight difference {worst:.2e}")
    assert worst <= 1e-6
    logits = logits_of(load_merged(result.output), run_a.input_ids)
    assert (logits - torch.cat(run_a.logits)).abs().max().item() <= FP32_RTOL


def test_cat_combination_is_the_weighted_sum_of_the_updates(run_a, run_b, merged_a, tmp_path):
    """cat (the default) is exact: base + 0.3 (merged_a - base) + 0.7 (merged_b - base), and the
    verification against the 4-bit base + combined adapter passes."""
    merged_b = merge_runs([run_b.dir], output=tmp_path / "b", dtype="fp32", verify=False)
    mix = merge_runs([run_a.dir, run_b.dir], output=tmp_path / "mix", dtype="fp32", weights="0.3,0.7")
    assert mix.verification.passed
    cfg = run_a.cfg
    base = BaseWeights(cfg, base_model_dir(cfg), "dequantized", torch.device("cpu"))
    a, b, got = weights_of(merged_a.output), weights_of(merged_b.output), weights_of(mix.output)
    for name in got:
        w = base.tensor(name)
        expected = w + 0.3 * (a[name] - w) + 0.7 * (b[name] - w)
        assert torch.allclose(got[name], expected, atol=1e-6), name
    manifest = json.loads((mix.output / "qtulu_merge.json").read_text())
    assert manifest["method"] == "cat" and manifest["weights"] == [0.3, 0.7]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_merges_pass_their_stated_tolerance(run_a, tmp_path, dtype):
    result = merge_runs([run_a.dir], output=tmp_path / dtype, dtype=dtype)
    print(f"{dtype}: {result.verification.summary()}")
    assert result.verification.passed
    stored = load_file(result.output / "model.safetensors")
    assert {t.dtype for t in stored.values()} == {{"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]}


def test_force_replaces_an_existing_output(run_a, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(QtuluError, match="already exists; pass --force"):
        merge_runs([run_a.dir], output=out, verify=False)
    merge_runs([run_a.dir], output=out, verify=False, force=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["out"]

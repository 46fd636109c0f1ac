"""`qtulu train` end to end on the micro preset (CPU): the loss falls, resume is exact, accumulation
and the kernel do not change the numbers, the NaN guard stops, and run folders are protected."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, steps: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(metrics(run_dir)) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {steps}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.send_signal(signal.SIGKILL)
            raise AssertionError(f"no step {steps} within {timeout} s")
        time.sleep(0.05)


def losses(run_dir):
    return [m["loss"] for m in metrics(run_dir)]


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_adapters_close(a, b, rtol):
    assert a.keys() == b.keys()
    for key in a:
        err = (a[key] - b[key]).norm() / b[key].norm().clamp(min=1e-12)
        assert err <= rtol, f"{key}: relative difference {err:.2e} > {rtol}"


def test_run_folder_and_metrics(baseline):
    assert sorted(p.name for p in baseline.iterdir()) == ["adapter", "checkpoints", "config.yaml", "metrics.jsonl",
                                                          "tokenizer"]
    rows = metrics(baseline)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for field in ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "trainable_tokens", "tokens_per_s",
                  "peak_memory_bytes", "elapsed_s"):
        assert all(field in r for r in rows), field
    assert all(0 < r["trainable_tokens"] < r["tokens"] <= 8 * 256 for r in rows)
    # keep_last 2 of the checkpoints at steps 2, 4, 6
    assert sorted(p.name for p in (baseline / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    assert "{% generation %}" in (baseline / "tokenizer" / "tokenizer_config.json").read_text() or \
        "generation" in (baseline / "tokenizer" / "chat_template.jinja").read_text()


def test_adapter_loads_with_peft(baseline):
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = yaml.safe_load((baseline / "config.yaml").read_text())
    base_dir = json.loads((baseline / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, baseline / "adapter")
    trained = adapter(baseline)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(trained) == 2 * 7 * cfg["model"]["arch"]["num_layers"]
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # it learned something


def test_loss_falls(trainer, tmp_path):
    out = tmp_path / "run"
    result = trainer.run(out, "--max-steps", "12", "--optim.lr", "5e-3", "--optim.warmup_ratio", "0")
    assert result.returncode == 0, result.stderr
    trajectory = losses(out)
    assert sum(trajectory[-3:]) / 3 < sum(trajectory[:3]) / 3 - 0.1, trajectory
    assert "Next: qtulu merge" in result.stdout


def test_sigint_then_resume_reproduces_the_losses_exactly(trainer, baseline, tmp_path):
    out = tmp_path / "run"
    proc = trainer.start(out, "--max-steps", "6", "--checkpoint.save_every_steps", "2")
    wait_for_steps(out, proc, 1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr and "checkpoint saved" in stderr
    stopped = len(metrics(out))
    assert stopped < 6, "the run finished before the signal: nothing was tested"
    result = trainer.run(out, "--max-steps", "6", "--checkpoint.save_every_steps", "2", "--resume")
    assert result.returncode == 0, result.stderr
    assert f"resuming from step {stopped}" in result.stdout
    assert losses(out) == losses(baseline)  # exactly, not approximately
    assert_adapters_close(adapter(out), adapter(baseline), rtol=0)


def test_sigterm_exits_143_with_a_checkpoint(trainer, tmp_path):
    out = tmp_path / "run"
    proc = trainer.start(out, "--max-steps", "6", "--checkpoint.save_every_steps", "100")
    wait_for_steps(out, proc, 1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr
    assert [p.name.startswith("step-") for p in (out / "checkpoints").iterdir()] == [True]


def test_sigkill_during_a_checkpoint_write_then_resume(trainer, baseline, tmp_path):
    out = tmp_path / "run"
    killed = trainer.run(out, "--max-steps", "6", "--checkpoint.save_every_steps", "2", QTULU_FAULT="kill-in-save@4")
    assert killed.returncode == -signal.SIGKILL
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names[-1] == "step-00000002" and any(n.startswith(".step-00000004.partial-") for n in names), names
    result = trainer.run(out, "--max-steps", "6", "--checkpoint.save_every_steps", "2", "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming from step 2" in result.stdout
    assert losses(out) == losses(baseline)
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def test_accumulation_4x2_equals_1x8(trainer, tmp_path):
    runs = {}
    for micro in (2, 8):
        out = tmp_path / f"micro{micro}"
        result = trainer.run(out, "--max-steps", "3", "--optim.micro_batch_size", str(micro))
        assert result.returncode == 0, result.stderr
        runs[micro] = out
    assert losses(runs[2]) == pytest.approx(losses(runs[8]), rel=1e-5)
    assert_adapters_close(adapter(runs[2]), adapter(runs[8]), rtol=1e-4)


def test_triton_kernel_under_the_interpreter_equals_the_reference(trainer, tmp_path):
    runs = {}
    for interpret in (False, True):
        out = tmp_path / f"interpret{int(interpret)}"
        # 4 rows a step in one micro-batch: the interpreter runs every tile of the kernel in Python
        result = trainer.run(out, "--max-steps", "2", "--optim.batch_size", "4", "--optim.micro_batch_size", "4",
                             interpret=interpret)
        assert result.returncode == 0, result.stderr
        runs[interpret] = out
    assert losses(runs[True]) == pytest.approx(losses(runs[False]), rel=1e-5)
    assert_adapters_close(adapter(runs[True]), adapter(runs[False]), rtol=1e-4)


def test_nan_guard_stops_and_keeps_the_last_checkpoint(trainer, tmp_path):
    out = tmp_path / "run"
    result = trainer.run(out, "--max-steps", "5", "--checkpoint.save_every_steps", "2", QTULU_FAULT="nan-loss@3")
    assert result.returncode == 1
    assert "step 3: non-finite loss nan" in result.stderr and "step-00000002" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"]
    assert [m["step"] for m in metrics(out)] == [1, 2]


def test_nan_guard_skip_drops_the_update_and_counts_it(trainer, tmp_path):
    out = tmp_path / "run"
    result = trainer.run(out, "--max-steps", "4", "--optim.on_nonfinite", "skip", QTULU_FAULT="nan-loss@3")
    assert result.returncode == 0, result.stderr
    assert [m["skipped_steps"] for m in metrics(out)] == [0, 0, 1, 1]


def test_folder_of_another_run_is_refused_and_left_untouched(trainer, baseline):
    before = {p: p.stat().st_mtime_ns for p in baseline.rglob("*")}
    result = trainer.run(baseline, "--max-steps", "6", "--optim.lr", "0.5")
    assert result.returncode == 1
    assert "another run's config" in result.stderr and "optim.lr" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in baseline.rglob("*")} == before


def test_no_resume_refuses_an_existing_run(trainer, baseline):
    result = trainer.run(baseline, "--max-steps", "6", "--checkpoint.save_every_steps", "2", "--no-resume")
    assert result.returncode == 1 and "already holds a run" in result.stderr


def test_resume_without_a_checkpoint_fails_clearly(trainer, tmp_path):
    result = trainer.run(tmp_path / "new", "--max-steps", "2", "--resume")
    assert result.returncode == 1 and "no complete checkpoint" in result.stderr
    assert not (tmp_path / "new").exists()


def test_resume_of_a_finished_run_does_nothing(trainer, baseline):
    result = trainer.run(baseline, "--max-steps", "6", "--checkpoint.save_every_steps", "2")
    assert result.returncode == 0, result.stderr
    assert "nothing to do" in result.stdout
    assert len(metrics(baseline)) == 6


def test_memory_check_refuses_a_run_that_does_not_fit(trainer, tmp_path):
    result = trainer.run(tmp_path / "run", "--size", "65b", "--max-steps", "1", "--launch.device", "cpu",
                         "--launch.gpu_memory_gb", "1")
    # 65b on a CPU: the planner's estimate is far above the machine's memory, so nothing is loaded
    assert result.returncode == 2, result.stderr
    assert "qtulu plan estimates" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_tokenizer_is_one_line(trainer, tmp_path):
    result = trainer.run(tmp_path / "run", "--max-steps", "1", "--model.tokenizer", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "nope" in result.stderr
    assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(trainer, shared_data, tmp_path):
    # the micro model has 512 embeddings; the LLaMA tokenizer has 32000 pieces
    result = trainer.run(tmp_path / "run", "--max-steps", "1", "--model.name_or_path", str(_micro_base(trainer)),
                         "--model.init", "pretrained", "--model.tokenizer", str(shared_data / "tokenizers" / "llama"))
    assert result.returncode == 1, result.stderr
    assert "32000 tokens" in result.stderr and "512 embeddings" in result.stderr
    assert not (tmp_path / "run").exists()


def _micro_base(trainer):
    from qtulu.config import load_config
    from qtulu.model.load import random_model_dir

    return random_model_dir(load_config(size="micro", mix="sample"))


def test_padded_sdpa_path_trains(trainer, tmp_path):
    out = tmp_path / "run"
    result = trainer.run(out, "--max-steps", "2", "--model.attention", "sdpa", "--model.fused_loss", "false")
    assert result.returncode == 0, result.stderr
    assert len(metrics(out)) == 2 and all(torch.isfinite(torch.tensor(losses(out))))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mimalloc is preloaded on Linux")
def test_cpu_runs_preload_mimalloc_unless_told_not_to(trainer, tmp_path):
    # the summary line reads /proc/self/maps of the training process itself
    result = trainer.run(tmp_path / "mimalloc", "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert "CPU allocator mimalloc\n" in result.stdout
    result = trainer.run(tmp_path / "glibc", "--max-steps", "1", "--launch.cpu_allocator", "glibc")
    assert result.returncode == 0, result.stderr
    assert "CPU allocator glibc malloc (launch.cpu_allocator glibc)" in result.stdout
    assert "CPU allocator mimalloc" not in result.stdout


def test_the_app_called_in_process_never_reexecutes(trainer, tmp_path, monkeypatch):
    """Only the `qtulu` program re-executes itself; a caller of the typer app (a test, a notebook) keeps its
    process."""
    from typer.testing import CliRunner

    import qtulu.cli
    from qtulu.model import cpu_memory

    calls = []
    monkeypatch.setattr(qtulu.cli, "reexec_under_mimalloc", lambda: calls.append("reexec"))
    monkeypatch.setattr("qtulu.train.recipe.train_run", lambda *args, **kwargs: calls.append("train"))
    result = CliRunner().invoke(qtulu.cli.app, trainer.command(tmp_path / "run", "--max-steps", "1",
                                                               "--launch.device", "cpu")[1:])
    assert result.exit_code == 0, result.output
    assert calls == ["train"] and not cpu_memory.os.environ.get(cpu_memory.REEXEC_MARK)

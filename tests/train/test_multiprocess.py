"""`qtulu train` under a launcher, 2 CPU processes over gloo: the same numbers as one process with the
same global batch, exact interrupt + resume, the launch checks.

Runs are kept few and short (module-scoped, 6-8 steps of micro): each launched process imports
torch, transformers and peft, which costs more than its training on 2 cores.
"""

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from qtulu.config import load_config
from qtulu.errors import ConfigError

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TORCHRUN, ACCELERATE = str(BIN / "torchrun"), str(BIN / "accelerate")
DDP_YAML = str(Path(__file__).resolve().parents[2] / "configs" / "launch" / "ddp.yaml")
STEPS = "8"


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir)]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_adapters_close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        err = (a[key] - b[key]).norm() / b[key].norm().clamp(min=1e-12)
        assert err <= rtol, f"{key}: relative difference {err:.2e} > {rtol}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int = 2) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", str(n)]


def launch(trainer, launcher: list[str], out: Path, *flags: str, **env) -> subprocess.CompletedProcess:
    """`LAUNCHER qtulu train --size micro --mix sample --output OUT ...`; a fresh rendezvous port per run
    (PET_MASTER_PORT is torchrun's --master-port), so that runs never meet a port still in use."""
    environment = trainer.env(**env)
    environment["PET_MASTER_PORT"] = str(free_port())
    command = [*launcher, *trainer.command(out, *flags)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        stdout, stderr = proc.communicate(timeout=150)  # a run takes ~20 s; processes out of step hang
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: the launcher then stops its processes, which run in sessions of their
        # own and would otherwise stay behind, stuck in a collective
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(f"{' '.join(command)}: no end within 150 s\n{stderr[-3000:]}") from None
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(trainer, tmp_path_factory) -> Path:
    """The reference: one process, the same global batch (8 rows = 4 micro-batches of 2)."""
    out = tmp_path_factory.mktemp("one") / "run"
    ok(trainer.run(out, "--max-steps", STEPS))
    return out


@pytest.fixture(scope="module")
def two_torchrun(trainer, tmp_path_factory) -> Path:
    """`torchrun --nproc_per_node 2 qtulu train ...` exactly as a user types it: no other flag."""
    out = tmp_path_factory.mktemp("torchrun") / "run"
    ok(launch(trainer, torchrun(), out, "--max-steps", STEPS))
    return out


def assert_same_training(run: Path, reference: Path) -> None:
    rows, ref = metrics(run), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, int(STEPS) + 1))
    # the step's global numbers, not one process's: the token counts are exactly the reference's
    assert [(r["tokens"], r["trainable_tokens"]) for r in rows] == [(r["tokens"], r["trainable_tokens"]) for r in ref]
    assert losses(run) == pytest.approx(losses(reference), rel=1e-4)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-3)
    assert_adapters_close(adapter(run), adapter(reference), rtol=1e-4)


def test_torchrun_with_two_processes_equals_one(two_torchrun, one_process):
    assert_same_training(two_torchrun, one_process)
    rows = metrics(two_torchrun)
    for r in rows:
        per_rank = r["peak_memory_bytes_per_rank"]
        assert len(per_rank) == 2 and min(per_rank) > 0 and r["peak_memory_bytes"] == max(per_rank)
    config = (two_torchrun / "config.yaml").read_text()
    assert "num_gpus: 2" in config and "strategy: ddp" in config  # taken from the launcher
    [checkpoint] = (two_torchrun / "checkpoints").iterdir()
    assert json.loads((checkpoint / "state.json").read_text())["world_size"] == 2
    assert {"rng-rank0.pt", "rng-rank1.pt", "optimizer.pt"} <= {p.name for p in checkpoint.iterdir()}


def test_accelerate_launch_with_two_processes_equals_one(trainer, one_process, tmp_path):
    out = tmp_path / "run"
    # the shipped DDP config; on a machine without a GPU its processes train on the CPU over gloo
    ok(launch(trainer, [ACCELERATE, "launch", "--config_file", DDP_YAML, "--num_processes", "2",
                        "--main_process_port", str(free_port())], out, "--max-steps", STEPS))
    assert_same_training(out, one_process)


def test_stop_on_one_process_then_resume_is_exact(trainer, tmp_path):
    """A stop flag raised in ONE process (as a SIGTERM reaching it) stops both after the same step with
    one checkpoint; resuming reproduces the uninterrupted run exactly. Dropout on, so each process's
    RNG stream matters and must come back from its own file."""
    flags = ("--max-steps", "6", "--lora.dropout", "0.1")
    reference, out = tmp_path / "reference", tmp_path / "run"
    ok(launch(trainer, torchrun(), reference, *flags))
    stopped = launch(trainer, torchrun(), out, *flags, QTULU_FAULT="stop@3")
    assert stopped.returncode != 0
    assert "SIGTERM: stopped after step 3 of 6" in stopped.stderr and "--resume" in stopped.stderr
    assert stopped.stderr.count("SIGTERM: stopped after step 3") == 1  # said once, by the main process
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000003"]
    ok(launch(trainer, torchrun(), out, *flags, "--resume"))
    assert losses(out) == losses(reference)  # exactly
    assert_adapters_close(adapter(out), adapter(reference), rtol=0)


def test_resume_with_another_number_of_processes_is_refused(trainer, two_torchrun):
    result = trainer.run(two_torchrun, "--max-steps", STEPS)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "written by 2 process(es), but 1 are running" in line and "torchrun --nproc_per_node 2" in line


def test_ddp_outside_a_launcher_says_which_command_to_run(trainer, tmp_path):
    result = trainer.run(tmp_path / "run", "--launch.strategy", "ddp", "--launch.num_gpus", "2")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "accelerate launch --config_file " in line
    assert 'launch/ddp.yaml --num_processes 2 "$(which qtulu)" train' in line
    assert 'torchrun --nproc_per_node 2 "$(which qtulu)" train' in line and "--launch.num_gpus 2" in line
    assert not (tmp_path / "run").exists()


def test_accelerate_cpu_flag_starting_one_process_is_refused(trainer, tmp_path):
    # what `accelerate launch --cpu --num_processes 2` hands its single process
    result = trainer.run(tmp_path / "run", ACCELERATE_USE_CPU="True", MASTER_ADDR="127.0.0.1")
    assert result.returncode == 2 and "started ONE process" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def two_fsdp(trainer, tmp_path_factory) -> Path:
    """FSDP-QLoRA in 2 processes: the 4-bit weights stored as fp32 (the CPU's compute dtype) so FSDP shards them."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    result = launch(trainer, torchrun(), out, *FSDP_FLAGS)
    ok(result)
    (out / "stdout.txt").write_text(result.stdout)
    return out


FSDP_FLAGS = ("--max-steps", STEPS, "--launch.strategy", "fsdp", "--quant.quant_storage", "fp32")


def test_fsdp_with_two_processes_equals_one(two_fsdp, one_process):
    assert_same_training(two_fsdp, one_process)
    assert "strategy: fsdp" in (two_fsdp / "config.yaml").read_text()
    [checkpoint] = (two_fsdp / "checkpoints").iterdir()
    names = {p.name for p in checkpoint.iterdir()}
    # each process's optimizer shard; the adapter gathered whole, in the same PEFT format as one process's
    assert {"optimizer-rank0.pt", "optimizer-rank1.pt", "rng-rank0.pt", "rng-rank1.pt"} <= names
    assert "optimizer.pt" not in names
    assert_adapters_close(load_file(checkpoint / "adapter" / "adapter_model.safetensors"), adapter(two_fsdp), rtol=0)


def test_fsdp_shard_sizes_are_what_qtulu_plan_counts(two_fsdp):
    from qtulu.model.plan import estimate

    # "process 0 holds X MiB of the decoder's Y MiB of parameters": the 4-bit layers, norms and LoRA
    held = float(re.search(r"process 0 holds ([0-9.]+) MiB", (two_fsdp / "stdout.txt").read_text()).group(1))
    cfg = load_config(size="micro", mix="sample", overrides=["--launch.strategy", "fsdp", "--launch.num_gpus", "2",
                                                             "--quant.quant_storage", "fp32"])
    fsdp, single, arch = estimate(cfg, "cpu"), estimate(load_config(size="micro", mix="sample"), "cpu"), cfg.model.arch
    # the plan keeps the quantisation constants whole: what it shards of the 4-bit weights is the difference
    packed_shard = single.weights_4bit - fsdp.weights_4bit
    norms_shard = (2 * arch.num_layers + 1) * arch.hidden_size * 4 / 2
    planned = packed_shard + fsdp.lora_params + norms_shard
    assert held * 2**20 == pytest.approx(planned, rel=0.01)


def test_fsdp_stop_then_resume_is_exact(trainer, two_fsdp, tmp_path):
    out = tmp_path / "run"
    stopped = launch(trainer, torchrun(), out, *FSDP_FLAGS, QTULU_FAULT="stop@3")
    assert stopped.returncode != 0 and "SIGTERM: stopped after step 3 of 8" in stopped.stderr
    ok(launch(trainer, torchrun(), out, *FSDP_FLAGS, "--resume"))
    assert losses(out) == losses(two_fsdp)  # exactly: each process's optimizer shard came back
    assert_adapters_close(adapter(out), adapter(two_fsdp), rtol=0)


def test_fsdp_outside_a_launcher_says_which_command_to_run(trainer, tmp_path):
    result = trainer.run(tmp_path / "run", "--launch.strategy", "fsdp", "--launch.num_gpus", "2",
                         "--quant.quant_storage", "fp32")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert 'launch/fsdp_qlora.yaml --num_processes 2 "$(which qtulu)" train' in line


# ---------------------------------------------------------------------------------------------
# the launcher's world size in the config (no processes started)


def test_the_launchers_world_size_sets_the_processes():
    cfg = load_config(size="micro", mix="sample", world_size=2)
    assert (cfg.launch.num_gpus, cfg.launch.strategy, cfg.grad_accum_steps) == (2, "ddp", 2)
    cfg = load_config(size="micro", mix="sample", world_size=1)
    assert (cfg.launch.num_gpus, cfg.launch.strategy) == (1, "single")


def test_accelerates_fsdp_config_makes_the_strategy_fsdp(trainer, tmp_path):
    """accelerate launch with an FSDP config (ACCELERATE_USE_FSDP) and no strategy named: FSDP, with the
    4-bit storage following the compute dtype; a strategy named on the command line wins."""
    env = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}
    resolved = trainer.run(tmp_path / "run", "--dry-run", **env)
    assert resolved.returncode == 0, resolved.stderr
    assert re.search(r"strategy: fsdp\b", resolved.stdout) and re.search(r"quant_storage: fp32\b", resolved.stdout)
    named = trainer.run(tmp_path / "run", "--dry-run", "--launch.strategy", "ddp", **env)
    assert re.search(r"strategy: ddp\b", named.stdout) and re.search(r"quant_storage: uint8\b", named.stdout)
    plain = trainer.run(tmp_path / "run", "--dry-run", WORLD_SIZE="2")  # torchrun: DDP
    assert re.search(r"strategy: ddp\b", plain.stdout)


def test_num_gpus_contradicting_the_launcher_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(size="micro", mix="sample", overrides=["--launch.strategy", "ddp", "--launch.num_gpus", "4"],
                    world_size=2)
    [line] = err.value.errors
    assert line.startswith("launch.num_gpus: 4 contradicts the launcher, which started 2")


def test_single_strategy_named_with_several_processes_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(size="micro", mix="sample", overrides=["--launch.strategy", "single"], world_size=2)
    assert [line.split(":")[0] for line in err.value.errors] == ["launch.strategy"]


def test_batch_size_must_divide_over_the_launchers_processes():
    with pytest.raises(ConfigError) as err:
        load_config(size="micro", mix="sample", world_size=3)  # 8 rows, micro-batches of 2, 3 processes
    [line] = err.value.errors
    assert line.startswith("optim.batch_size: 8 is not a multiple") and "launcher's 3 processes" in line


def test_ddp_on_the_cpu_is_allowed_only_under_a_launcher():
    flags = ["--launch.device", "cpu", "--launch.strategy", "ddp", "--launch.num_gpus", "2"]
    assert load_config(size="micro", mix="sample", overrides=flags, world_size=2).launch.device == "cpu"
    with pytest.raises(ConfigError):
        load_config(size="micro", mix="sample", overrides=flags)

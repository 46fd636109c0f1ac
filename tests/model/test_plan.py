"""`qtulu plan` against memory measured on real models (CPU: tensor-storage accounting).

The issue's bar is 25%; the formula is held to 15% here (it measured within 1% when written), so
that a drift in the model code or in the formula shows up long before it misleads a user.
"""

import pytest
import torch

from qtulu.config import load_config
from qtulu.model.memory import measure_training_step, peak_bytes
from qtulu.model.plan import GB, estimate

TOLERANCE = 0.15
# The measured path is the model's own forward and loss, which is what fused_loss=false describes.
MEASURED_PATH = ["--model.attention", "sdpa", "--model.fused_loss", "false"]

CASES = [
    ("micro", []),
    ("micro", ["--model.gradient_checkpointing", "true", "--lora.dropout", "0.1"]),
    ("micro", ["--quant.compute_dtype", "bf16", "--lora.target_modules", "q_proj,v_proj", "--lora.dropout", "0.1"]),
    ("135m", ["--optim.micro_batch_size", "1", "--data.max_seq_len", "256", "--model.gradient_checkpointing", "true"]),
    ("135m", ["--optim.micro_batch_size", "1", "--data.max_seq_len", "128", "--lora.dropout", "0"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("size,overrides", CASES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(CASES)])
def test_plan_agrees_with_measured_memory_on_cpu(size, overrides):
    cfg = load_config(size=size, mix="sample", overrides=MEASURED_PATH + overrides)
    measured = measure_training_step(cfg, torch.device("cpu"))
    plan = estimate(cfg, device="cpu")
    # the model object itself: exact up to bitsandbytes' per-layer code tables
    assert plan.weights_4bit == pytest.approx(measured.weights_4bit, rel=0.02)
    assert plan.weights_other == measured.weights_other
    assert plan.lora_params == measured.lora_params
    ratio = plan.total / measured.peak
    print(f"{size} {overrides}: plan {plan.total / 2**20:.1f} MiB, measured {measured.peak / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f}")
    assert abs(ratio - 1) < TOLERANCE, f"plan {plan.total} vs measured {measured.peak} bytes (ratio {ratio:.3f})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_agrees_with_measured_memory_on_gpu():
    cfg = load_config(size="135m", mix="sample", overrides=MEASURED_PATH + [
        "--quant.compute_dtype", "bf16", "--model.gradient_checkpointing", "true", "--data.max_seq_len", "1024"])
    measured = measure_training_step(cfg, torch.device("cuda"))
    plan = estimate(cfg, device="cuda")
    allocated = plan.total - plan.context - plan.slack  # what max_memory_allocated sees
    assert abs(allocated / measured.peak - 1) < 0.25


def test_peak_bytes_measures_a_known_peak():
    a = torch.randn(256, 256)
    kept = []

    def fn():
        b = a @ a  # 256 KiB
        c = b.relu()  # +256 KiB: the peak, 512 KiB
        del b
        kept.append(c.view(-1))  # a view allocates nothing
        d = torch.ones(128, 256)  # +128 KiB after b is freed: below the peak
        return d

    assert peak_bytes(fn, torch.device("cpu")) == 2 * 256 * 256 * 4


def _state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (the moments). torch's AdamW also keeps
    a 0-dim `step` counter per parameter, which the plan leaves out (4 bytes per tensor)."""
    found = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and key != "step":
                found[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(found.values())


def _optimizer_class(name):
    import bitsandbytes as bnb

    return {"adamw": torch.optim.AdamW, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[name]


@pytest.mark.parametrize("lora_overrides", [
    pytest.param([], id="fp32-adapters-all-projections"),
    pytest.param(["--lora.dtype", "bf16", "--lora.target_modules", "q_proj,v_proj,down_proj"],
                 id="bf16-adapters-three-projections"),
])
def test_plan_parts_equal_what_a_real_step_on_micro_allocates(lora_overrides):
    """Part by part, not only in total: the LoRA parameter count and bytes, their gradients after a
    real backward, and the optimizer state after a real optimizer step, each exactly as planned."""
    from qtulu.model.load import build_model

    cfg = load_config(size="micro", mix="sample", overrides=MEASURED_PATH + lora_overrides)
    model = build_model(cfg, torch.device("cpu"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    plan = estimate(cfg, device="cpu")
    assert plan.lora_param_count == sum(p.numel() for p in trainable)
    assert plan.lora_params == sum(p.untyped_storage().nbytes() for p in trainable)

    ids = torch.randint(0, cfg.model.arch.vocab_size, (cfg.optim.micro_batch_size, 32),
                        generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in trainable)
    assert plan.lora_grads == sum(p.grad.untyped_storage().nbytes() for p in trainable)

    for name in ("adamw", "paged_adamw_32bit"):
        plan = estimate(load_config(size="micro", mix="sample",
                                    overrides=[*MEASURED_PATH, *lora_overrides, "--optim.optimizer", name]),
                        device="cpu")
        optimizer = _optimizer_class(name)(trainable, lr=1e-3)
        optimizer.step()
        assert len(optimizer.state) == len(trainable), name
        assert plan.optimizer == _state_bytes(optimizer), name


@pytest.mark.parametrize("size", ["7b", "13b", "30b", "65b"])
def test_plan_parts_follow_the_architecture(size):
    cfg = load_config(size=size, mix="human+gpt")
    plan = estimate(cfg)
    arch = cfg.model.arch
    linear = arch.num_layers * (4 * arch.hidden_size ** 2 + 3 * arch.hidden_size * arch.intermediate_size)
    # NF4 + double quant: 4.127 bits per weight
    assert plan.weights_4bit / linear == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), rel=1e-3)
    # r=64 on the 7 projections
    assert plan.lora_param_count == arch.num_layers * 64 * (
        4 * 2 * arch.hidden_size + 3 * (arch.hidden_size + arch.intermediate_size))
    assert plan.optimizer == 8 * plan.lora_param_count  # paged AdamW 32-bit: two fp32 moments


def test_knobs_lower_the_estimate():
    base = load_config(size="13b", mix="human")
    for flags in (["--model.gradient_checkpointing", "false"], ["--optim.micro_batch_size", "4"], ["--lora.r", "256"],
                  ["--optim.micro_batch_size", "4", "--model.fused_loss", "false"]):
        bigger = load_config(size="13b", mix="human", overrides=flags)
        assert estimate(bigger).total > estimate(base).total, flags


def test_fsdp_shards_weights_and_ddp_does_not():
    single = estimate(load_config(size="65b", mix="human"))
    ddp = estimate(load_config(size="65b", mix="human", overrides=["--launch.strategy", "ddp", "--launch.num_gpus",
                                                                     "2"]))
    fsdp = estimate(load_config(size="65b", mix="human", overrides=[
        "--launch.strategy", "fsdp", "--launch.num_gpus", "2", "--quant.quant_storage", "bf16"]))
    assert ddp.weights_4bit == single.weights_4bit and ddp.total > single.total
    # the packed 4-bit weights are halved, their quantisation constants and the embedding are not
    assert single.weights_4bit // 2 < fsdp.weights_4bit < single.weights_4bit * 0.6
    assert fsdp.weights_other > single.weights_other * 0.95
    assert fsdp.total < single.total
    assert fsdp.total > single.total / 2  # activations are not sharded
    assert single.total / GB < 80


def test_folds_are_planned_where_the_adapter_is_folded_and_within_their_budget():
    """fp32 compute and adapters, no dropout, 4-bit base: each adapted weight in fp32 for the step (135m:
    all of it), capped at qtulu.model.lora's budget (7b); bf16 compute or dropout: nothing."""
    from qtulu.model.lora import FOLD_BUDGET_BYTES
    from qtulu.model.plan import linear_shapes

    folded = ["--quant.compute_dtype", "fp32", "--lora.dtype", "fp32", "--lora.dropout", "0"]
    cfg = load_config(size="135m", mix="sample", overrides=folded)
    adapted = cfg.model.arch.num_layers * sum(i * o for i, o in linear_shapes(cfg).values())
    assert estimate(cfg, "cpu").folds == 4 * adapted < FOLD_BUDGET_BYTES
    assert estimate(load_config(size="7b", mix="sample", overrides=folded), "cpu").folds == FOLD_BUDGET_BYTES
    for other in (["--quant.compute_dtype", "bf16"], ["--lora.dropout", "0.05"]):
        assert estimate(load_config(size="135m", mix="sample", overrides=folded + other), "cpu").folds == 0, other

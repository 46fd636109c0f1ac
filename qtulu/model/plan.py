"""The memory planner behind `qtulu plan`: peak memory of one QLoRA training step, per GPU.

The estimate is a sum of named parts, each a closed formula in the config's numbers (the full
derivation is in docs/memory.md; tests/model/test_plan.py checks it against tensors measured on
real models):

- 4-bit weights: every linear layer of the decoder blocks, 0.5 byte per parameter plus its
  quantization constants (double quant: one 8-bit absmax per 64 weights and one fp32 absmax per
  256 of those; plain: one fp32 absmax per 64 weights).
- other weights: embeddings, lm_head (unless tied) and norms in the compute dtype.
- LoRA: r * (d_in + d_out) parameters per adapted layer; their gradients; the optimizer state
  (AdamW: two moments, fp32 for the bitsandbytes 32-bit optimizers, the adapter dtype for torch's).
- activations: the tensors autograd saves, per token and decoder layer, counted op by op from the
  LLaMA + PEFT + bitsandbytes forward (see `_saved_bytes_per_token_per_layer`); with gradient
  checkpointing only each layer's input is kept, plus one layer recomputed during backward.
- loss: the (tokens x vocab) logits, their fp32 log-softmax and its gradient, or, with the fused
  loss, the hidden states and their gradient and one chunk of logits.
- workspace: one linear layer dequantized to the compute dtype (bitsandbytes matmuls do that) and
  the backward pass's transient gradients of one layer.
- CUDA only: allocator slack (10% of the memory that comes and goes each step) and the CUDA context.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qtulu.config import RunConfig
from qtulu.kernels.cross_entropy import default_chunk_rows
from qtulu.model.lora import FOLD_BUDGET_BYTES

GB = 1024**3
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
CUDA_CONTEXT_BYTES = int(0.5 * GB)  # CUDA context + cuBLAS workspace, outside PyTorch's allocator
ALLOCATOR_SLACK = 0.10  # caching-allocator fragmentation, as a fraction of per-step memory
QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
NESTED_BLOCK = 256  # double quantization: absmax values per second-level block
CODE_TABLE_BYTES = (256 + 16 + 1) * 4  # per 4-bit layer: double-quant code, NF4 code, offset (fp32)
DEFAULT_GPU_MEMORY_GB = 80.0


@dataclass
class MemoryPlan:
    """Bytes per GPU, by part. Not all parts live at once: see `total`."""

    weights_4bit: int
    weights_other: int
    lora_params: int
    optimizer: int
    activations: int  # saved for backward at the end of the forward pass
    recompute: int  # gradient checkpointing: one layer's activations rebuilt during backward
    loss: int  # the loss's logits working set, at its peak (its backward)
    lora_grads: int
    workspace: int  # dequantized weight of one layer + backward's transient gradients
    slack: int
    context: int
    lora_param_count: int
    tokens_per_gpu: int
    optimizer_temporaries: int = 0  # torch's foreach AdamW: one temporary per tensor in its step
    folds: int = 0  # fp32 W + s B A of every adapted layer, kept through each step (qtulu.model.lora)

    PERSISTENT = ("weights_4bit", "weights_other", "lora_params", "optimizer")
    PARTS = (*PERSISTENT, "activations", "recompute", "loss", "lora_grads", "workspace", "folds", "slack",
             "context")

    @property
    def phases(self) -> dict[str, int]:
        """Memory that comes and goes within a step, at the peak of each of its phases."""
        return {
            "loss": self.activations + self.folds + self.loss,
            "backward": self.activations + self.folds + self.recompute + self.lora_grads + self.workspace,
            "optimizer": self.lora_grads + self.optimizer_temporaries,
        }

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def total(self) -> int:
        """Persistent memory + the largest phase + allocator slack + the CUDA context."""
        persistent = sum(getattr(self, name) for name in self.PERSISTENT)
        return persistent + self.phases[self.peak_phase] + self.slack + self.context


def linear_shapes(cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each linear layer in one decoder block."""
    a = cfg.model.arch
    kv = a.num_kv_heads * a.head_dim
    h, i = a.hidden_size, a.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def folded_lora(cfg: RunConfig) -> bool:
    """Whether qtulu.model.lora folds each adapter into its float32 weight (no rank-r intermediates
    kept; a float32 copy of each adapted weight kept per step): 4-bit base, fp32 compute and
    adapters, no dropout."""
    return (cfg.quant.load_in_4bit and cfg.quant.compute_dtype == "fp32" and cfg.lora.dtype == "fp32"
            and cfg.lora.dropout == 0)


def _saved_bytes_per_token_per_layer(cfg: RunConfig, device: str) -> int:
    """What autograd keeps for backward, per token, in one LLaMA decoder layer with LoRA.

    Counted op by op (and checked with saved-tensor hooks, tests/model/test_plan.py):
    - each RMSNorm keeps its input in fp32 and one fp32 rsqrt per token: 2 x (4h + 4);
    - attention (flash-style: no score matrix) keeps q and out (h each), k and v (kv each) in the
      compute dtype, and one fp32 log-sum-exp per head; RoPE only keeps cos/sin, shared by all layers;
    - SwiGLU keeps gate, silu(gate) and up: 3 x I; in fp32 qtulu.model.swiglu keeps gate and up: 2 x I;
    - each LoRA layer runs in the adapter dtype and keeps its rank-r intermediate (none when folded,
      see `folded_lora`), and with dropout
      its dropout mask (bool on CUDA, float on CPU) and dropped input; without dropout, its input cast
      to the adapter dtype, or, when no cast is needed, the norm's output (or the attention output,
      or the SwiGLU product for down_proj), kept once however many LoRA layers share it.
    Frozen 4-bit matmuls keep nothing per token: their input gradient needs only the weight.
    """
    arch, lora = cfg.model.arch, cfg.lora
    a = DTYPE_BYTES[cfg.quant.compute_dtype]
    h, i = arch.hidden_size, arch.intermediate_size
    kv = arch.num_kv_heads * arch.head_dim
    targets = {m: shape for m, shape in linear_shapes(cfg).items() if m in lora.target_modules}

    saved = 2 * (4 * h + 4)  # two RMSNorms
    saved += a * (2 * h + 2 * kv) + 4 * arch.num_heads  # attention
    saved += (2 if a == 4 else 3) * a * i  # SwiGLU
    # PEFT runs the LoRA branch in the adapter dtype: the input is cast to it first.
    la = DTYPE_BYTES[lora.dtype]
    if not folded_lora(cfg):
        saved += len(targets) * la * lora.r  # LoRA intermediates
    if lora.dropout > 0:
        mask = 1 if device == "cuda" else la
        saved += sum((la + mask) * d_in for d_in, _ in targets.values())
    elif la != a:  # each LoRA layer keeps its own cast copy of its input
        saved += sum(la * d_in for d_in, _ in targets.values())
    else:
        shared_inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "gate_proj": h, "up_proj": h, "down_proj": i}
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("down_proj",)):
            if any(m in targets for m in group):
                saved += a * shared_inputs[group[0]]
    return saved


def estimate(cfg: RunConfig, device: str = "cuda") -> MemoryPlan:
    """Peak memory per GPU of one training step (device='cpu' drops the CUDA-only parts)."""
    arch, quant, lora, optim = cfg.model.arch, cfg.quant, cfg.lora, cfg.optim
    if arch is None:
        raise ValueError("model.arch is needed to plan memory")
    a = DTYPE_BYTES[quant.compute_dtype]
    h, vocab, layers = arch.hidden_size, arch.vocab_size, arch.num_layers
    shapes = linear_shapes(cfg)
    gpus = cfg.launch.num_gpus
    shard = gpus if cfg.launch.strategy == "fsdp" else 1

    linear_params = layers * sum(d_in * d_out for d_in, d_out in shapes.values())
    if quant.load_in_4bit:
        constants = 1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * NESTED_BLOCK) if quant.double_quant else 4 / QUANT_BLOCK
        weights_4bit = int(linear_params * (0.5 + constants)) + layers * len(shapes) * CODE_TABLE_BYTES
    else:
        weights_4bit = linear_params * a
    embeddings = vocab * h * (1 if arch.tie_embeddings else 2)
    rope_buffers = 2 * (arch.head_dim // 2) * 4  # inv_freq and its original copy, fp32
    weights_other = (embeddings + (2 * layers + 1) * h) * a + rope_buffers

    lora_count = layers * sum(lora.r * (d_in + d_out) for m, (d_in, d_out) in shapes.items()
                              if m in lora.target_modules)
    la = DTYPE_BYTES[lora.dtype]
    state_bytes = {"paged_adamw_32bit": 8, "adamw": 2 * la, "paged_adamw_8bit": 2, "adamw_8bit": 2}
    lora_params, lora_grads = lora_count * la, lora_count * la
    optimizer = lora_count * state_bytes[optim.optimizer]
    if cfg.launch.strategy == "ddp":
        lora_grads *= 2  # DDP's gradient buckets hold a second copy for the all-reduce

    tokens = optim.micro_batch_size * cfg.data.max_seq_len
    per_layer = _saved_bytes_per_token_per_layer(cfg, device)
    if cfg.model.gradient_checkpointing:
        activations, recompute = tokens * layers * a * h, tokens * per_layer  # layer inputs only
    else:
        activations, recompute = tokens * (layers * per_layer - (4 * h + 4)), 0  # layer 0's norm: no grad
    activations += tokens * (4 * h + 4)  # final norm

    if cfg.model.fused_loss:
        # qtulu.kernels' fused loss: the hidden states and their gradient, one chunk of logits
        # (sized like the hidden states, at least 512 rows) with its gathered rows; on CPU the torch path adds an fp32
        # copy of a low-precision chunk, which the Triton kernel does not make.
        rows = default_chunk_rows(tokens, h, vocab)
        fp32_copy = 4 if device == "cpu" and a != 4 else 0
        loss = 2 * tokens * h * a + rows * vocab * (a + fp32_copy) + rows * h * a
    else:
        # logits and their fp32 log-softmax; in backward its gradient, and, when the logits are not
        # fp32, the gradient cast back to their dtype (measured: the fp32 copy is gone by then)
        loss = tokens * vocab * (a + 4 + 4 + (a if a != 4 else 0))

    largest = max(d_in * d_out for d_in, d_out in shapes.values())
    workspace = (largest * a if quant.load_in_4bit else 0) + tokens * a * (2 * h + 2 * arch.intermediate_size)

    if shard > 1:
        # qtulu.train.fsdp shards the decoder's parameters: the packed 4-bit weights (not their
        # quantisation constants, kept whole on each GPU), the norms and LoRA. The input embedding
        # (and an untied lm_head) stays whole; each layer's weights are gathered while it computes.
        # tests/train/test_multiprocess.py checks the shard a process holds against these numbers.
        packed = linear_params // 2 if quant.load_in_4bit else weights_4bit
        weights_4bit += packed // shard - packed
        weights_other = embeddings * a + ((2 * layers + 1) * h * a) // shard + rope_buffers
        workspace += packed // layers
    lora_params, lora_grads, optimizer = lora_params // shard, lora_grads // shard, optimizer // shard
    plan = MemoryPlan(weights_4bit, weights_other, lora_params, optimizer, activations, recompute, loss,
                      lora_grads, workspace, 0, 0, lora_count, tokens)
    if folded_lora(cfg):  # kept per step up to qtulu.model.lora's budget
        adapted = layers * sum(d_in * d_out for m, (d_in, d_out) in shapes.items() if m in lora.target_modules)
        plan.folds = min(4 * adapted, FOLD_BUDGET_BYTES)
    if optim.optimizer == "adamw":  # bitsandbytes' optimizers update in one fused kernel instead
        plan.optimizer_temporaries = lora_params
    if device == "cuda":
        plan.slack = int(ALLOCATOR_SLACK * plan.phases[plan.peak_phase])
        plan.context = CUDA_CONTEXT_BYTES
    return plan


# ---------------------------------------------------------------------------------------------
# Verdict and advice


def verdict(cfg: RunConfig, plan: MemoryPlan, budget: int) -> str:
    if plan.total <= budget:
        return "fits"
    if cfg.optim.optimizer.startswith("paged") and plan.total - plan.optimizer <= budget:
        return "fits with paging"  # bitsandbytes pages optimizer state out to CPU RAM under pressure
    return "does not fit"


def _knobs(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """Changes that lower memory, cheapest in speed or quality first, as CLI overrides."""
    knobs = []
    if not cfg.model.gradient_checkpointing:
        knobs.append(("turn on gradient checkpointing", ["--model.gradient_checkpointing", "true"]))
    if not cfg.model.fused_loss:
        knobs.append(("turn on the fused loss", ["--model.fused_loss", "true"]))
    if cfg.optim.micro_batch_size > 1:
        knobs.append(("micro-batch 1 (more accumulation, same batch)", ["--optim.micro_batch_size", "1"]))
    if cfg.lora.dtype == "fp32":
        knobs.append(("bf16 adapter weights", ["--lora.dtype", "bf16"]))
    if cfg.optim.optimizer in ("paged_adamw_32bit", "adamw"):
        knobs.append(("8-bit paged AdamW", ["--optim.optimizer", "paged_adamw_8bit"]))
    for seq in (cfg.data.max_seq_len // 2, cfg.data.max_seq_len // 4):
        if seq >= 256:
            knobs.append((f"max length {seq}", ["--data.max_seq_len", str(seq)]))
    if cfg.lora.r > 16:
        knobs.append((f"LoRA rank {cfg.lora.r // 4}", ["--lora.r", str(cfg.lora.r // 4)]))
    return knobs


def advice(cfg: RunConfig, budget: int, rebuild: Callable[[list[str]], RunConfig]) -> list[str]:
    """Which knob(s) make it fit, each with the estimate it gives; cumulative when one is not enough.

    `rebuild(extra_flags)` re-assembles the config with more CLI overrides, so advice is checked
    through the same schema as the user's own flags.
    """
    lines, applied, best = [], [], estimate(cfg).total
    for label, flags in _knobs(cfg):
        total = estimate(rebuild(applied + flags)).total
        if total >= best:
            continue  # this knob does not move the peak once the others are applied
        applied, best = applied + flags, total
        lines.append(f"{label}: {' '.join(flags)} -> {total / GB:.1f} GiB")
        if total <= budget:
            return lines
    gpus = cfg.launch.num_gpus
    lines.append(f"still too large: shard with FSDP over more GPUs (--gpus {gpus * 2} --launch.strategy fsdp "
                 f"--quant.quant_storage {cfg.quant.compute_dtype}) or use a GPU with more memory")
    return lines


def detected_gpu_memory_gb() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GB
    except Exception:  # no usable CUDA runtime: fall back to the default
        return None
    return None


PART_LABELS = {
    "weights_4bit": "4-bit weights + constants", "weights_other": "embeddings, lm_head, norms",
    "lora_params": "LoRA weights", "optimizer": "optimizer state", "activations": "activations (saved)",
    "recompute": "checkpoint recompute", "loss": "loss (logits)", "lora_grads": "LoRA gradients",
    "workspace": "dequant + grad workspace", "folds": "folded LoRA weights (fp32)", "slack": "allocator slack",
    "context": "CUDA context",
}


def plan_command(sizes: list[str | None], build: Callable[[str | None, list[str]], RunConfig], console) -> None:
    """Print the plan table for each size, a verdict, and advice where it does not fit."""
    from rich.table import Table

    configs = [build(size, []) for size in sizes]
    gb = configs[0].launch.gpu_memory_gb or detected_gpu_memory_gb() or DEFAULT_GPU_MEMORY_GB
    budget = int(gb * GB)
    plans = [estimate(cfg) for cfg in configs]
    launch = configs[0].launch
    table = Table(title=f"QLoRA training memory per GPU, GiB (budget {gb:g} GiB x {launch.num_gpus}, "
                  f"{launch.strategy})", caption="peak = persistent parts + the largest phase of the step "
                  "(forward end + loss | backward | optimizer) + slack + context")
    table.add_column("part")
    for cfg in configs:
        table.add_column(cfg.name, justify="right")
    for part in MemoryPlan.PARTS:
        table.add_row(PART_LABELS[part], *(f"{getattr(p, part) / GB:.2f}" for p in plans))
    table.add_row("peak phase", *(p.peak_phase for p in plans))
    table.add_row("[bold]peak[/bold]", *(f"[bold]{p.total / GB:.1f}[/bold]" for p in plans))
    table.add_row("verdict", *(verdict(c, p, budget) for c, p in zip(configs, plans, strict=True)))
    console.print(table)
    for cfg, plan, size in zip(configs, plans, sizes, strict=True):
        console.print(f"{cfg.name}: {plan.lora_param_count / 1e6:.1f}M LoRA parameters, "
                      f"{plan.tokens_per_gpu} tokens per micro-batch "
                      f"({cfg.optim.micro_batch_size} x {cfg.data.max_seq_len}), "
                      f"checkpointing {'on' if cfg.model.gradient_checkpointing else 'off'}, "
                      f"{'fused' if cfg.model.fused_loss else 'unfused'} loss", markup=False)
        v = verdict(cfg, plan, budget)
        if v == "fits with paging":
            console.print(f"  fits only if the paged optimizer state ({plan.optimizer / GB:.1f} GiB) spills to "
                          "CPU RAM (slower); or:", markup=False)
        if v != "fits":
            for line in advice(cfg, budget, lambda extra, size=size: build(size, extra)):
                console.print(f"  {line}", markup=False)

"""A leaner LoRA layer on a 4-bit base: one autograd function for base matmul and adapter together.

PEFT's LoRA layer on a bitsandbytes 4-bit base runs `result = base(x).clone(); result = result +
B(A(dropout(x))) * s` as five autograd nodes: bitsandbytes' 4-bit matmul, a defensive copy of its
output, the A and B linears, a scaling pass and an addition (each a full pass over a tokens x
out_features tensor, forward and backward, and the backward adds the base's and the adapter's input
gradients in another pass). `QLoraLinear` does the same arithmetic in one node: forward
`y = x W^T` then `y += s (x A^T) B^T` inside one in-place `addmm_`; backward `dx = g W` then
`dx += s (g B) A` in place, `dA = s (g B)^T x`, `dB = s g^T (x A^T)`, with W dequantized from its
4 bits on the fly both times (as bitsandbytes does) and the scale applied to the thin tokens x r
tensors only. It saves what PEFT's nodes save (the adapter's input and x A^T), nothing more. In fp32
without dropout it folds the adapter into the dequantized weight instead (see `QLoraLinear`) and
saves only the input, recomputing x A^T in the backward.

Why not an in-place `addmm_` on PEFT's output alone (this module's previous form): the output is
3-d, the `addmm_` works on a 2-d view of it, and autograd's bookkeeping for an in-place op on a view
(CopySlices) copies the whole output gradient twice in the backward: it cost about what it saved.

The lean path covers the plain case: one active LoRA adapter (no DoRA or other variant), not merged,
not disabled, no autocast, a bitsandbytes 4-bit base without bias, input and adapter of one dtype.
Anything else goes through PEFT's own forward, unchanged (on a GPU with fp32 adapters over bf16
compute, PEFT's forward runs).
"""

from __future__ import annotations

import contextlib
import types

import torch

# at most this many bytes of folds are kept (135m: 425 MB, all of it; a 7B model's would be 26 GB:
# its first layers are kept, the others folded at each use as outside `folds_kept`)
FOLD_BUDGET_BYTES = 1 << 30


class KeptFolds:
    """The folded weights (W + s B A) of the optimizer step under way, by layer, within a byte budget."""

    def __init__(self, budget: int):
        self.bytes_left = budget
        self.by_layer: dict[int, tuple[tuple, torch.Tensor]] = {}


_kept_folds: KeptFolds | None = None  # set by `folds_kept`


def dequantized(base) -> torch.Tensor:
    """The 4-bit base layer's weight as a (out_features x in_features) tensor of its compute dtype."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)  # FSDP's flat parameters drop the quant state
    return bnbf.dequantize_4bit(base.weight, base.weight.quant_state)


def merged_weight(base, a, b, scaling, dtype) -> torch.Tensor:
    """W + s B A, in a fresh tensor (the dequantized copy of W, which nothing else holds)."""
    return dequantized(base).to(dtype).addmm_(b, a, alpha=scaling)


@contextlib.contextmanager
def folds_kept(budget: int = FOLD_BUDGET_BYTES):
    """Within it, each layer's folded weight is computed once and reused by every forward and backward.

    The adapter only changes when the optimizer steps, so the fold of the first micro-batch's forward
    holds for that backward and for every other micro-batch of the step: the training loop opens
    this per step. Outside it, each forward and backward dequantizes and folds anew (nothing kept).
    Cost: a float32 copy of every adapted weight while the step runs, up to `budget` bytes (layers
    past it fold at each use).
    """
    global _kept_folds
    outer = _kept_folds
    if outer is None:
        _kept_folds = KeptFolds(budget)
    try:
        yield
    finally:
        _kept_folds = outer  # the outermost exit drops the folds


def folded_weight(base, a, b, scaling, dtype) -> torch.Tensor:
    """`merged_weight`, taken from the step's kept folds when the adapter is unchanged since."""
    if _kept_folds is None:
        return merged_weight(base, a, b, scaling, dtype)
    # any in-place change of A or B (an optimizer step, a load) bumps its version: fold again
    key = (a._version, b._version, a.data_ptr(), b.data_ptr(), scaling, dtype)
    folds = _kept_folds
    kept = folds.by_layer.get(id(base))
    if kept is not None and kept[0] == key:
        return kept[1]
    if kept is not None:  # stale: its place goes to the new fold
        del folds.by_layer[id(base)]
        folds.bytes_left += kept[1].nbytes
    weight = merged_weight(base, a, b, scaling, dtype)
    if weight.nbytes <= folds.bytes_left:
        folds.bytes_left -= weight.nbytes
        folds.by_layer[id(base)] = (key, weight)
    return weight


class QLoraLinear(torch.autograd.Function):
    """y = x W^T + s (dropout(x) A^T) B^T for 2-d x, W frozen in 4 bits, A and B trained.

    Without dropout and in fp32 the adapter is folded into the freshly dequantized weight:
    `y = x (W + s B A)^T`, `dx = g (W + s B A)`. That trades the two thin tokens x r x features
    matmuls of the forward output and the input gradient for one features x r x features fold (once
    per optimizer step inside `folds_kept`, as training runs it; else once in the forward and once in
    the backward) and runs the rest as one large, fast matmul; the adapter's own gradients are
    computed as before. In bf16/fp16 the fold would round s B A into the precision of W, so those
    keep the adapter's product apart.
    """

    @staticmethod
    def forward(ctx, x, x_lora, a, b, base, scaling):
        """x_lora is the adapter's input when dropout makes it differ from x, else None."""
        ctx.base, ctx.scaling, ctx.dropout = base, scaling, x_lora is not None
        ctx.merged = x_lora is None and x.dtype == torch.float32
        if ctx.merged:
            ctx.save_for_backward(x, a, b)
            return torch.mm(x, folded_weight(base, a, b, scaling, x.dtype).t())
        x_a = torch.mm(x if x_lora is None else x_lora, a.t())  # (tokens, r)
        y = torch.mm(x, dequantized(base).to(x.dtype).t())
        y.addmm_(x_a, b.t(), alpha=scaling)
        ctx.save_for_backward(x if x_lora is None else x_lora, a, b, x_a)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_lora, a, b, *kept = ctx.saved_tensors
        need_x, need_x_lora, need_a, need_b = ctx.needs_input_grad[:4]
        grad_x = grad_x_lora = grad_a = grad_b = None
        if need_x and ctx.merged:
            grad_x = torch.mm(grad_y, folded_weight(ctx.base, a, b, ctx.scaling, grad_y.dtype))
        elif need_x:
            grad_x = torch.mm(grad_y, dequantized(ctx.base).to(grad_y.dtype))
        # the scale goes on the thin (tokens x r) tensors, never on a (tokens x features) one
        g_b = torch.mm(grad_y, b).mul_(ctx.scaling) if (need_a or need_x_lora or need_x and not ctx.merged) else None
        if need_x and not ctx.merged and not ctx.dropout:
            grad_x.addmm_(g_b, a)  # the adapter's input is x: both gradients in one tensor
        if need_x_lora:
            grad_x_lora = torch.mm(g_b, a)
        if need_a:
            grad_a = torch.mm(g_b.t(), x_lora)
        if need_b:
            x_a = kept[0] if kept else torch.mm(x_lora, a.t())
            # (x_a^T g)^T: MKL runs this orientation ~1.3x faster than g^T x_a at these shapes
            grad_b = torch.mm((x_a * ctx.scaling).t(), grad_y).t()
        return grad_x, grad_x_lora, grad_a, grad_b, None, None


def lean_applies(layer, x: torch.Tensor, name: str | None) -> bool:
    """Whether `QLoraLinear` computes exactly what PEFT's forward would for this call."""
    import bitsandbytes as bnb

    base = layer.base_layer
    if (name not in layer.lora_A or layer.disable_adapters or layer.merged or not torch.is_grad_enabled()
            or name in getattr(layer, "lora_variant", {}) or torch.is_autocast_enabled(x.device.type)):
        return False
    if not isinstance(base, bnb.nn.Linear4bit) or base.bias is not None:
        return False
    state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False):
        return False  # bitsandbytes' CPU inference layout, not the blockwise one dequantize reads
    compute = base.compute_dtype or x.dtype
    return x.dtype == compute == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype


def lean_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The LoRA layer's forward as one `QLoraLinear` node (PEFT's forward where that does not apply)."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if args or kwargs or not lean_applies(self, x, name):
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    flat = x.reshape(-1, x.shape[-1])
    x_lora = None if isinstance(dropout, torch.nn.Identity) else dropout(flat)
    y = QLoraLinear.apply(flat, x_lora, self.lora_A[name].weight, self.lora_B[name].weight, self.base_layer,
                          self.scaling[name])
    return y.view(*x.shape[:-1], y.shape[-1])


def use_lean_lora(model) -> int:
    """Give every LoRA layer of a PEFT model the lean forward; returns how many layers got it."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        linear = isinstance(module, LoraLayer) and all(isinstance(m, torch.nn.Linear) for m in module.lora_A.values())
        if linear and module.lora_A:
            module.forward = types.MethodType(lean_lora_forward, module)
            count += 1
    return count

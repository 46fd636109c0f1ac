"""RMSNorm as one autograd function: the LLaMA norm's forward and input gradient in fewer passes.

transformers' LlamaRMSNorm runs `w * (x * rsqrt(mean(x^2) + eps))` as five autograd nodes: `pow`
writes a full copy of x, and the backward walks them all (the gradient through `pow` and `mean` is
expanded to full size, then added to the one through the product): about eight passes over a
tokens x hidden tensor. `RMSNormFunction` computes the norm with one reduction (no x^2 tensor) and
the frozen-weight input gradient in closed form,

    dx = rstd * (g w) - x * rstd^3 * <g w, x> / n,

four passes. Measured on a CPU (1,867 x 576 fp32, forward + backward, median of 50): 13.1 ms ->
6.5 ms; a 135m micro-batch has 61 of them. Plain case only: fp32 input and weight, a frozen weight
(LoRA never trains the norms), gradients on; anything else runs transformers' forward unchanged.
"""

from __future__ import annotations

import types

import torch

# the norms whose forward is exactly w * (x * rsqrt(mean(x^2) + eps)) (Gemma's 1 + w is not)
LLAMA_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward, as a function."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return weight * (x.float() * torch.rsqrt(variance + eps)).to(x.dtype)


class RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * w over the last dimension; w gets no gradient."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow_(2).div_(n).add_(eps).rsqrt_()
        ctx.save_for_backward(x, rstd, weight)
        return (x * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad_y):
        x, rstd, weight = ctx.saved_tensors
        g_w = grad_y * weight
        # <g w, x> per token, then the coefficient of x: -rstd^3 <g w, x> / n (tokens x 1, small)
        coef = torch.linalg.vecdot(g_w, x).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
        return g_w.mul_(rstd).addcmul_(x, coef), None, None


def lean_rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The norm's forward through `RMSNormFunction` where it applies, transformers' own otherwise."""
    weight = self.weight
    if (torch.is_grad_enabled() and not weight.requires_grad
            and hidden_states.dtype == weight.dtype == torch.float32):
        return RMSNormFunction.apply(hidden_states, weight, self.variance_epsilon)
    return type(self).forward(self, hidden_states)


def use_lean_rms_norm(model) -> int:
    """Give every LLaMA-style RMSNorm of the model the lean forward; returns how many got it."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in LLAMA_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(lean_rms_norm_forward, module)
            count += 1
    return count

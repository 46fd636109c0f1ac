"""The lean RMSNorm (qtulu.model.rms_norm) computes transformers' LlamaRMSNorm: output and input
gradient against a float64 reference and against the module itself; its forward where it does not apply."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qtulu.model.rms_norm import RMSNormFunction, rms_norm_reference, use_lean_rms_norm


def fresh(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3 + 0.5  # away from zero and from unit scale


@pytest.mark.parametrize("shape", [(1, 37, 576), (3, 5, 97), (2, 64)])
def test_forward_and_input_gradient_against_float64(shape):
    x, weight, upstream = fresh(shape, 1), fresh(shape[-1:], 2), fresh(shape, 3)
    x32 = x.clone().requires_grad_(True)
    y = RMSNormFunction.apply(x32, weight, 1e-5)
    y.backward(upstream)
    x64 = x.double().requires_grad_(True)
    want = rms_norm_reference(x64, weight.double(), 1e-5)
    want.backward(upstream.double())
    for name, got, ref in (("output", y, want), ("grad x", x32.grad, x64.grad)):
        err = ((got.double() - ref.detach()).norm() / ref.detach().norm()).item()
        assert err < 1e-6, f"{name}: relative error {err:.2e} (fp32)"


def norms(n: int = 2, hidden: int = 48):
    model = torch.nn.Sequential(*[LlamaRMSNorm(hidden, eps=1e-6) for _ in range(n)])
    for i, norm in enumerate(model):
        norm.weight.data = fresh((hidden,), 10 + i)
        norm.weight.requires_grad_(False)  # frozen, as under LoRA
    return model


def test_the_lean_forward_equals_transformers_module():
    model = norms()
    x, upstream = fresh((4, 9, 48), 4), fresh((4, 9, 48), 5)

    def run():
        xx = x.clone().requires_grad_(True)
        out = model(xx)
        out.backward(upstream)
        return out.detach(), xx.grad

    want = run()
    assert use_lean_rms_norm(model) == 2
    got = run()
    for name, a, b in zip(("output", "grad x"), want, got, strict=True):
        assert ((a - b).norm() / a.norm()).item() < 1e-6, name
    assert type(model(x.requires_grad_(True)).grad_fn).__name__ == "RMSNormFunctionBackward"


def test_where_the_lean_path_does_not_apply_transformers_forward_runs():
    model = norms(1)
    use_lean_rms_norm(model)
    x = fresh((3, 48), 6)
    with torch.no_grad():  # generation, evaluation
        assert torch.equal(model(x), rms_norm_reference(x, model[0].weight, 1e-6))
    bf16 = x.bfloat16().requires_grad_(True)
    model[0].weight.data = model[0].weight.data.bfloat16()
    assert torch.equal(model(bf16), rms_norm_reference(bf16, model[0].weight, 1e-6))
    model[0].weight.data = model[0].weight.data.float()
    model[0].weight.requires_grad_(True)  # a trained norm: its weight needs the gradient
    model(x.requires_grad_(True)).sum().backward()
    assert model[0].weight.grad is not None

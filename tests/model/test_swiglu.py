"""The lean gated MLP activation (qtulu.model.swiglu) computes transformers' silu(gate) * up: output
and both gradients against float64 and against LlamaMLP itself, while keeping one large tensor
fewer for the backward; transformers' forward wherever it does not apply."""

import pytest
import torch
import torch.nn.functional as F

from qtulu.model.swiglu import SwiGLUFunction, use_lean_swiglu


def fresh(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 3 + 0.2  # both signs, well into silu's curved part


def relative(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("grads", ["both", "gate", "up"])
@pytest.mark.parametrize("shape", [(1, 37, 96), (3, 5, 17)])
def test_forward_and_gradients_against_float64(shape, grads):
    gate, up, upstream = fresh(shape, 1), fresh(shape, 2), fresh(shape, 3)
    g32 = gate.clone().requires_grad_(grads in ("both", "gate"))
    u32 = up.clone().requires_grad_(grads in ("both", "up"))
    out = SwiGLUFunction.apply(g32, u32)
    out.backward(upstream)
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    want = F.silu(g64) * u64
    want.backward(upstream.double())
    assert relative(out, want.detach()) < 1e-6, "output"
    for name, tensor, ref in (("grad gate", g32, g64), ("grad up", u32, u64)):
        if tensor.requires_grad:
            assert relative(tensor.grad, ref.grad) < 1e-6, name
        else:
            assert tensor.grad is None


def tiny_mlp(seed: int):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(seed)
    return LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=64, num_attention_heads=4, hidden_act="silu"))


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while `fn()` runs (distinct storages)."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def test_the_lean_mlp_equals_transformers_and_keeps_less():
    mlp = tiny_mlp(0)
    x, upstream = fresh((2, 31, 24), 4), fresh((2, 31, 24), 5)

    def run():
        mlp.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = mlp(xx)
        out.backward(upstream)
        return out.detach(), xx.grad, mlp.gate_proj.weight.grad.clone(), mlp.up_proj.weight.grad.clone()

    want = run()
    before = saved_bytes(lambda: mlp(x.clone().requires_grad_(True)))
    assert use_lean_swiglu(mlp) == 1
    got = run()
    after = saved_bytes(lambda: mlp(x.clone().requires_grad_(True)))
    for name, a, b in zip(("output", "grad x", "grad gate_proj", "grad up_proj"), want, got, strict=True):
        assert relative(b, a) < 1e-6, name
    # one tokens x intermediate float32 tensor fewer: silu(gate), recomputed in the backward
    assert before - after == 2 * 31 * 64 * 4, (before, after)


def test_where_the_lean_activation_does_not_apply_transformers_runs():
    mlp = tiny_mlp(1)
    use_lean_swiglu(mlp)
    x = fresh((4, 24), 6)
    with torch.no_grad():  # generation, evaluation
        assert torch.equal(mlp(x), mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    seen = []
    real = SwiGLUFunction.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SwiGLUFunction, "apply", lambda *a: seen.append(1) or real(*a))
        mlp.to(torch.bfloat16)(x.bfloat16())  # not float32: transformers' forward
        assert not seen
        mlp.float()(x)
        assert seen == [1]


def test_only_silu_gated_mlps_change():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    gelu = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="gelu"))
    assert use_lean_swiglu(gelu) == 0 and "forward" not in gelu.__dict__

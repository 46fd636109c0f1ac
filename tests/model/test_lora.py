"""The lean LoRA forward (qtulu.model.lora) computes what PEFT's forward computes: output and every
gradient, on a 4-bit base as training runs it; PEFT's own path wherever the lean one does not apply."""

import types

import pytest
import torch

from qtulu.model.lora import QLoraLinear, lean_lora_forward, use_lean_lora


def four_bit_lora(dropout: float, seed: int, dtype=torch.float32):
    """A PEFT LoRA layer (r 8, alpha 16) on a bitsandbytes NF4 base of fresh random weights, computing
    and training in `dtype`."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = bnb.nn.Linear4bit(48, 80, bias=False, compute_dtype=dtype, quant_type="nf4")
            self.up_proj.weight = bnb.nn.Params4bit(torch.randn(80, 48) / 7, requires_grad=False, quant_type="nf4")

        def forward(self, x):
            return self.up_proj(x)

    # .to() quantizes the weights, as loading a model does
    model = get_peft_model(Block().to("cpu"), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                         target_modules=["up_proj"]))
    layer = model.base_model.model.up_proj
    torch.nn.init.normal_(layer.lora_B.default.weight)  # PEFT starts B at zero: the product would vanish
    for name, param in layer.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
    return model, layer


def output_and_grads(layer, x, upstream, seed, x_grad=True):
    x = x.clone().requires_grad_(x_grad)
    torch.manual_seed(seed)  # the same dropout mask for both forwards
    out = layer(x)
    out.backward(upstream)
    a, b = layer.lora_A.default.weight, layer.lora_B.default.weight
    grads = out.detach(), x.grad, a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    return grads


# relative error against PEFT's forward: fp32 folds the adapter into W (other rounding); bf16 rounds
# every product to 8 bits of mantissa, in another order than PEFT's separate passes
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-frozen"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_forward_equals_peft_output_and_gradients(dtype, dropout, x_grad):
    """fp32 without dropout: the folded path; with dropout or in bf16: the adapter's product apart.
    x-frozen: the first layer's input (a frozen embedding's output) needs no gradient."""
    model, layer = four_bit_lora(dropout, seed=11, dtype=dtype)
    x, upstream = torch.randn(3, 17, 48, dtype=dtype), torch.randn(3, 17, 80, dtype=dtype)
    peft_result = output_and_grads(layer, x, upstream, seed=5, x_grad=x_grad)
    assert use_lean_lora(model) == 1
    assert "forward" in layer.__dict__  # the lean forward is really the one called
    lean_result = output_and_grads(layer, x, upstream, seed=5, x_grad=x_grad)
    for name, want, got in zip(("output", "grad x", "grad A", "grad B"), peft_result, lean_result, strict=True):
        if not x_grad and name == "grad x":
            assert want is None and got is None
            continue
        err = ((got.double() - want.double()).norm() / want.double().norm()).item()
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e} ({dtype})"


def test_the_lean_path_is_one_autograd_node():
    """base matmul, adapter, scale and sum: one QLoraLinear node (PEFT's forward makes five or more)"""
    model, layer = four_bit_lora(0.0, seed=2)
    use_lean_lora(model)
    out = layer(torch.randn(2, 5, 48, requires_grad=True))
    view = out.grad_fn  # the 2-d result viewed back to the input's leading dimensions
    node = view.next_functions[0][0]
    assert node._forward_cls is QLoraLinear
    leaves = [n.variable for n, _ in node.next_functions if type(n).__name__ == "AccumulateGrad"]
    assert len(leaves) == 2 and leaves[0] is layer.lora_A.default.weight and leaves[1] is layer.lora_B.default.weight


def test_where_the_lean_path_does_not_apply_peft_forward_runs():
    model, layer = four_bit_lora(0.0, seed=3)
    x = torch.randn(2, 5, 48)

    def both(call):
        """call() under PEFT's forward, then under the lean one"""
        layer.__dict__.pop("forward", None)
        want = call()
        use_lean_lora(model)
        return want, call()

    with torch.no_grad():
        for want, got in (
            both(lambda: layer(x)),  # the lean path itself: close, not bit-equal (one addmm)
            both(lambda: layer(x.double())),  # another dtype than the adapter's: PEFT casts
        ):
            assert torch.allclose(want, got, rtol=1e-5, atol=1e-6)
        with model.disable_adapter():
            want, got = both(lambda: layer(x))
        assert torch.equal(want, got) and torch.equal(got, layer.base_layer(x))


def test_bound_forward_is_the_lean_one():
    model, layer = four_bit_lora(0.0, seed=1)
    use_lean_lora(model)
    assert layer.forward.__func__ is lean_lora_forward
    assert isinstance(layer.forward, types.MethodType)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lean_forward_against_a_float64_reference(dtype):
    """y = x W^T + s x A^T B^T and its gradients in float64, W the dequantized 4-bit weight"""
    from qtulu.model.lora import dequantized

    model, layer = four_bit_lora(0.0, seed=7, dtype=dtype)
    use_lean_lora(model)
    x, upstream = torch.randn(2, 23, 48, dtype=dtype), torch.randn(2, 23, 80, dtype=dtype)
    got = output_and_grads(layer, x, upstream, seed=0)
    w = dequantized(layer.base_layer).double()
    adapter = (layer.lora_A.default.weight, layer.lora_B.default.weight)
    a, b = (p.detach().double().requires_grad_(True) for p in adapter)
    x64 = x.double().requires_grad_(True)
    out = x64 @ w.T + layer.scaling["default"] * (x64 @ a.T) @ b.T
    out.backward(upstream.double())
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for name, want, have in zip(("output", "grad x", "grad A", "grad B"), (out, x64.grad, a.grad, b.grad), got,
                                strict=True):
        err = ((have.double() - want.detach()).norm() / want.detach().norm()).item()
        assert err < tolerance, f"{name}: relative error {err:.2e} against float64 ({dtype})"


def test_kept_folds_are_computed_once_per_adapter_state(monkeypatch):
    """Within `folds_kept` the folded weight is made once and serves every forward and backward while A
    and B are unchanged (two micro-batches: same gradients as folding each time); an in-place change of
    the adapter (what optimizer.step() does) folds again; outside it nothing is kept."""
    from qtulu.model import lora

    model, layer = four_bit_lora(0.0, seed=3)
    use_lean_lora(model)
    folds = []
    real = lora.merged_weight
    monkeypatch.setattr(lora, "merged_weight", lambda *args: folds.append(1) or real(*args))
    xs = [torch.randn(2, 9, 48) for _ in range(2)]
    ups = [torch.randn(2, 9, 80) for _ in range(2)]

    def two_micro_batches():
        got = [output_and_grads(layer, x, up, seed=0) for x, up in zip(xs, ups, strict=True)]
        return [torch.cat([g.flatten() for g in grads]) for grads in got]

    each_time = two_micro_batches()
    assert len(folds) == 4  # forward and backward of each micro-batch
    folds.clear()
    with lora.folds_kept():
        kept = two_micro_batches()
        assert len(folds) == 1
        with torch.no_grad():
            layer.lora_A.default.weight.add_(0.01)  # an optimizer step
        after_step = two_micro_batches()
        assert len(folds) == 2
    assert lora._kept_folds is None  # the step's folds are dropped when it ends
    for want, got in zip(each_time, kept, strict=True):
        assert torch.allclose(want, got, rtol=0, atol=0)  # the same fold, the same arithmetic
    assert not torch.allclose(each_time[0], after_step[0])  # ... and the new A is the one used


def test_kept_folds_stay_within_their_byte_budget(monkeypatch):
    """A budget too small for a layer's fold keeps nothing (it folds at every use, as outside);
    one that fits keeps it, and a stale fold (after the adapter changed) gives its place to the new."""
    from qtulu.model import lora

    model, layer = four_bit_lora(0.0, seed=4)
    use_lean_lora(model)
    folds = []
    real = lora.merged_weight
    monkeypatch.setattr(lora, "merged_weight", lambda *args: folds.append(1) or real(*args))
    x, up = torch.randn(2, 5, 48), torch.randn(2, 5, 80)
    fold_bytes = 80 * 48 * 4
    for budget, want in ((fold_bytes - 1, 4), (fold_bytes, 1)):
        folds.clear()
        with lora.folds_kept(budget):
            output_and_grads(layer, x, up, seed=0)
            output_and_grads(layer, x, up, seed=0)
            if want == 1:
                assert lora._kept_folds.bytes_left == 0
                with torch.no_grad():
                    layer.lora_B.default.weight.mul_(1.5)  # an optimizer step
                output_and_grads(layer, x, up, seed=0)
                output_and_grads(layer, x, up, seed=0)
                want += 1
        assert len(folds) == want, budget

"""The lean rotary embedding (qtulu.model.rope) computes transformers' apply_rotary_pos_emb: output and
input gradients against a float64 reference and against a LLaMA model's own forward; transformers'
function wherever it does not apply."""

import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

from qtulu.model.rope import RotaryFunction, lean_rotary, use_lean_rope

ORIGINAL = getattr(modeling_llama.apply_rotary_pos_emb, "qtulu_original", modeling_llama.apply_rotary_pos_emb)


@pytest.fixture(autouse=True)
def transformers_own_rope(monkeypatch):
    """Every test starts from (and leaves behind) transformers' own function."""
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", ORIGINAL)


def cos_sin(tokens: int, dim: int, seed: int, batch: int = 1):
    """LLaMA-style tables: (batch, tokens, dim), the two halves equal, from positions that restart
    (two packed documents), with a random phase so that no angle is special."""
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).double() / dim))
    positions = torch.cat([torch.arange(tokens - tokens // 3), torch.arange(tokens // 3)]).double()
    angles = positions[:, None] * inv_freq[None] + torch.rand(1, dim // 2, generator=g, dtype=torch.float64)
    emb = torch.cat([angles, angles], -1)[None].expand(batch, -1, -1)
    return emb.cos().float(), emb.sin().float()


def heads_view(batch, tokens, heads, dim, seed):
    """(batch, heads, tokens, dim) as transformers makes it: a transposed view of the projection output."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, tokens, heads, dim, generator=g) * 2 + 0.3).transpose(1, 2)


def relative(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("batch,tokens,heads,kv_heads,dim", [(1, 37, 9, 3, 64), (2, 11, 4, 4, 6), (1, 5, 2, 1, 128)])
def test_forward_and_input_gradients_against_float64(batch, tokens, heads, kv_heads, dim):
    q, k = heads_view(batch, tokens, heads, dim, 1), heads_view(batch, tokens, kv_heads, dim, 2)
    cos, sin = cos_sin(tokens, dim, 3, batch)
    gq, gk = heads_view(batch, tokens, heads, dim, 4), heads_view(batch, tokens, kv_heads, dim, 5)
    q32, k32 = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    got = lean_rotary(ORIGINAL)(q32, k32, cos, sin)
    torch.autograd.backward(got, [gq, gk])
    q64, k64 = q.double().requires_grad_(True), k.double().requires_grad_(True)
    want = ORIGINAL(q64, k64, cos.double(), sin.double())
    torch.autograd.backward(want, [gq.double(), gk.double()])
    pairs = {"q": (got[0], want[0]), "k": (got[1], want[1]), "grad q": (q32.grad, q64.grad),
             "grad k": (k32.grad, k64.grad)}
    for name, (have, ref) in pairs.items():
        err = relative(have, ref.detach())
        assert err < 1e-6, f"{name}: relative error {err:.2e} (fp32)"
    assert got[0].stride() == q.stride()  # laid out as the input: the attention reads it without a copy


def test_halves_of_cos_and_sin_that_differ_still_match():
    """The rotation is written for any tables, not only LLaMA's repeated halves (the backward is
    the transpose, which swaps which half of sin goes where)."""
    x = heads_view(1, 13, 3, 8, 6).double().requires_grad_(True)
    g = torch.Generator().manual_seed(7)
    cos, sin = torch.randn(1, 1, 13, 8, generator=g).double(), torch.randn(1, 1, 13, 8, generator=g).double()
    upstream = torch.randn(1, 3, 13, 8, generator=g).double()
    got = RotaryFunction.apply(x, cos, sin)
    (grad_got,) = torch.autograd.grad(got, x, upstream)
    half = 4
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    want = x * cos + rotated * sin
    (grad_want,) = torch.autograd.grad(want, x, upstream)
    assert relative(got, want) < 1e-14 and relative(grad_got, grad_want) < 1e-14


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_a_llama_model_computes_the_same_with_the_lean_rope():
    model = tiny_llama(0)
    ids = torch.randint(0, 64, (2, 21), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    want = run()
    assert use_lean_rope(model) == 1
    assert use_lean_rope(model) == 0  # once per modeling module
    seen = []
    real = RotaryFunction.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RotaryFunction, "apply", lambda *a: seen.append(1) or real(*a))
        got = run()
    assert len(seen) == 2 * 2  # q and k of both layers went through it
    for name, a, b in zip(("loss", "grad q_proj"), want, got, strict=True):
        assert relative(b, a) < 1e-6, name


def test_where_the_lean_rope_does_not_apply_transformers_runs():
    lean = lean_rotary(ORIGINAL)
    q, k = heads_view(1, 9, 2, 8, 1), heads_view(1, 9, 2, 8, 2)
    cos, sin = cos_sin(9, 8, 3)
    seen = []
    real = RotaryFunction.apply
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RotaryFunction, "apply", lambda *a: seen.append(1) or real(*a))
        with torch.no_grad():  # generation, evaluation: transformers' own arithmetic, bit for bit
            for got, want in zip(lean(q, k, cos, sin), ORIGINAL(q, k, cos, sin), strict=True):
                assert torch.equal(got, want)
        lean(q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16())
        lean(q.transpose(1, 2), k.transpose(1, 2), cos, sin, unsqueeze_dim=2)
        assert not seen
        lean(q, k, cos, sin)
        assert len(seen) == 2

"""qtulu_varlen attention plugged into a tiny random-init LlamaForCausalLM (fp32).

A packed row through our attention must equal every document run alone with transformers' SDPA:
logits within 1e-5 relative, parameter gradients within 1e-4 relative; and changing one document
must leave every other document's logits bit-identical. Run through both dispatch paths: the
Triton kernel (interpreter on CPU) and the per-document SDPA reference.
"""

import zlib

import numpy as np
import pytest
import torch
from qtulu.kernels import attention
from transformers import LlamaConfig, LlamaForCausalLM

from qtulu.data.prepare import Row, collate_packed
from qtulu.errors import QtuluError
from qtulu.model.attention import (
    cu_seqlens_from_position_ids,
    packed_row_kwargs,
    use_varlen_attention,
)

LENGTHS = [1, 37, 64, 90]


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.fixture(params=["kernel", "reference"])
def path(request, monkeypatch):
    if request.param == "kernel" and not attention.triton_enabled(torch.empty(0)):
        pytest.skip("needs TRITON_INTERPRET=1 (or a GPU) for the kernel path on CPU tensors")
    if request.param == "reference":
        monkeypatch.setattr(attention, "triton_enabled", lambda t: False)
    return request.param


def tiny_llama_config():
    """initializer_range 0.1 makes attention peaked enough that it visibly shapes the logits."""
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, vocab_size=512,
                       max_position_embeddings=256, initializer_range=0.1)


@pytest.fixture
def models(request):
    """The same random weights twice: one with qtulu_varlen, one with SDPA (for documents alone).
    Each model has a config object of its own: the attention implementation is a config field, so
    a shared config would switch the reference to qtulu_varlen too (and compare the kernel with itself)."""
    torch.manual_seed(zlib.crc32(request.node.name.encode()))
    ours = LlamaForCausalLM(tiny_llama_config()).float()
    sdpa = LlamaForCausalLM(tiny_llama_config()).float()
    sdpa.load_state_dict(ours.state_dict())
    sdpa.set_attn_implementation("sdpa")
    use_varlen_attention(ours)
    return ours, sdpa


def attention_implementations(model):
    """The implementation every attention layer will call (each layer reads its config at call time)."""
    return {layer.self_attn.config._attn_implementation for layer in model.model.layers}


def per_document_run(model, input_ids, lengths, logit_weights):
    """Each document alone: its logits and the parameter gradients summed over documents."""
    model.zero_grad()
    logits, start = [], 0
    for length in lengths:
        out = model(input_ids[:, start:start + length], use_cache=False).logits
        (out * logit_weights[:, start:start + length]).sum().backward()
        logits.append(out.detach())
        start += length
    return torch.cat(logits, dim=1), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_row_equals_documents_alone(models, path):
    ours, sdpa = models
    # the comparison is with transformers' own SDPA, not with ourselves
    assert attention_implementations(sdpa) == {"sdpa"}
    assert attention_implementations(ours) == {"qtulu_varlen"}
    input_ids = torch.randint(0, 512, (1, sum(LENGTHS)))
    logit_weights = torch.randn(1, sum(LENGTHS), 512)  # a random linear loss touches every logit

    packed = ours(input_ids, use_cache=False, **packed_row_kwargs(LENGTHS)).logits
    (packed * logit_weights).sum().backward()
    alone, alone_grads = per_document_run(sdpa, input_ids, LENGTHS, logit_weights)

    assert rel_err(packed, alone) <= 1e-5
    for name, param in ours.named_parameters():
        assert rel_err(param.grad, alone_grads[name]) <= 1e-4, name

    # The check can fail: plain causal attention over the packed row (documents leaking into each
    # other, positions still restarting) is far from the documents run alone.
    leaky = sdpa(input_ids, use_cache=False).logits
    assert rel_err(leaky, alone) > 1e-2


def test_position_ids_alone_give_the_same_boundaries(models, path):
    ours, _ = models
    input_ids = torch.randint(0, 512, (1, sum(LENGTHS)))
    kwargs = packed_row_kwargs(LENGTHS)
    with torch.no_grad():
        by_cu = ours(input_ids, use_cache=False, **kwargs).logits
        by_positions = ours(input_ids, use_cache=False, position_ids=kwargs["position_ids"]).logits
    assert torch.equal(by_cu, by_positions)


def test_no_cross_document_leakage(models, path):
    ours, _ = models
    input_ids = torch.randint(0, 512, (1, sum(LENGTHS)))
    changed = input_ids.clone()
    third = slice(38, 102)
    changed[:, third] = torch.randint(0, 512, (1, 64))
    kwargs = packed_row_kwargs(LENGTHS)
    with torch.no_grad():
        before = ours(input_ids, use_cache=False, **kwargs).logits
        after = ours(changed, use_cache=False, **kwargs).logits
    others = torch.ones(sum(LENGTHS), dtype=torch.bool)
    others[third] = False
    assert torch.equal(before[:, others], after[:, others])
    assert rel_err(after[:, third], before[:, third]) > 1e-2


def test_packed_row_kwargs():
    kwargs = packed_row_kwargs([3, 1, 2])
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["cu_seq_lens_k"] is kwargs["cu_seq_lens_q"]
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 3
    assert kwargs["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    with pytest.raises(QtuluError, match="positive"):
        packed_row_kwargs([3, 0, 2])


def test_cu_seqlens_from_position_ids():
    # two rows: [doc 3 | doc 2] and [doc 1 | doc 4]; a document never crosses a row boundary
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 0, 1, 2, 3]])
    assert cu_seqlens_from_position_ids(positions).tolist() == [0, 3, 5, 6, 10]
    # a row of one document that does not start at position 0 (a continuation) is still one document
    assert cu_seqlens_from_position_ids(torch.tensor([[5, 6, 7]])).tolist() == [0, 3]


def test_padding_and_kv_cache_are_refused(models):
    ours, _ = models
    input_ids = torch.randint(0, 512, (2, 12))
    padding = torch.ones_like(input_ids)
    padding[0, :4] = 0
    with pytest.raises(QtuluError, match="padding mask"):
        ours(input_ids, attention_mask=padding)
    with pytest.raises(QtuluError, match="KV cache"):
        ours.generate(input_ids[:1], max_new_tokens=2, do_sample=False)


def tiny_model(model_type, **overrides):
    """A random-init one-layer model of another family, on qtulu_varlen."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                 num_hidden_layers=1, vocab_size=128, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **overrides))
    return use_varlen_attention(model.float())


@pytest.mark.parametrize("model_type,overrides,message", [
    ("mistral", {"sliding_window": 16}, r"no sliding window \(mistral attends to the last 16 tokens"),
    ("gemma2", {"sliding_window": 4096, "attn_logit_softcapping": 50.0}, r"no logit soft-capping \(gemma2"),
    ("gpt_oss", {"sliding_window": 4096, "num_local_experts": 2, "num_experts_per_tok": 1},
     r"no attention sinks \(gpt_oss"),
])
def test_unsupported_attention_is_refused(monkeypatch, model_type, overrides, message):
    """What the kernel does not compute is refused with one line naming the model type, not ignored."""
    monkeypatch.setattr(attention, "triton_enabled", lambda t: False)  # the refusal precedes any kernel
    model = tiny_model(model_type, **overrides)
    input_ids = torch.randint(0, 128, (1, 40))
    with pytest.raises(QtuluError, match=message) as raised:
        model(input_ids, use_cache=False, **packed_row_kwargs([30, 10]))
    assert "\n" not in str(raised.value)


def test_window_longer_than_every_document_is_allowed(monkeypatch):
    """Mistral-7B's 4,096-token window changes nothing for documents of at most 4,096 tokens."""
    monkeypatch.setattr(attention, "triton_enabled", lambda t: False)
    model = tiny_model("mistral", sliding_window=32)
    input_ids = torch.randint(0, 128, (1, 40))
    with torch.no_grad():
        packed = model(input_ids, use_cache=False, **packed_row_kwargs([30, 10])).logits
        model.set_attn_implementation("sdpa")
        alone = torch.cat([model(input_ids[:, :30], use_cache=False).logits,
                           model(input_ids[:, 30:], use_cache=False).logits], dim=1)
    assert rel_err(packed, alone) <= 1e-5


def test_collated_boundaries_reach_attention(models, path):
    """The boundaries collate_packed builds are the ones attention uses: moving one boundary in the
    batch (positions left as they were) changes the logits of the documents it touches."""
    ours, _ = models
    ids = np.random.default_rng(7).integers(0, 512, sum(LENGTHS))
    row = Row(ids, ids.copy(), np.array(LENGTHS))
    batch = collate_packed([row])
    kwargs = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids")}
    wrong = dict(kwargs)
    moved = batch["cu_seq_lens_q"].clone()
    moved[2] += 10  # the second document ends 10 tokens late; the third starts 10 tokens late
    wrong["cu_seq_lens_q"] = wrong["cu_seq_lens_k"] = moved
    with torch.no_grad():
        right = ours(batch["input_ids"], use_cache=False, **kwargs).logits
        shifted = ours(batch["input_ids"], use_cache=False, **wrong).logits
    first_two = slice(0, LENGTHS[0] + LENGTHS[1])
    assert torch.equal(right[:, first_two], shifted[:, first_two])  # before the moved boundary: untouched
    assert rel_err(shifted[:, 38:102], right[:, 38:102]) > 1e-3

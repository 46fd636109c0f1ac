"""The HF backend on the micro model: batching does not change scores (left padding with position ids),
log-likelihoods equal a direct computation, greedy generation equals a step-by-step argmax, stops cut."""

import pytest
import torch

from qtulu.eval.backend import HFBackend, cut_at_stops
from qtulu.eval.tasks import Example, Request


@pytest.fixture(scope="module")
def backend(micro_model):
    from qtulu.eval import model as model_mod

    model, tok = model_mod.load(model_mod.resolve(str(micro_model)), device="cpu")
    # random init gives near-uniform next-token distributions, under which padding leaks would hide in
    # the last decimals: sharpen them (x100 on the final norm) so scores differ by whole units
    with torch.no_grad():
        model.model.norm.weight.mul_(100)
    return HFBackend(model, tok, batch_size=3)


def _run(backend, requests):
    out = [None] * len(requests)

    def cb(indices, results):
        for i, r in zip(indices, results, strict=True):
            out[i] = r

    backend.run(requests, cb)
    return out


PROMPTS = ["<s><|user|>\nHi\n<|assistant|>\nThe answer is:",
           "<s><|user|>\nA much longer question about the colour of the sky at noon\n<|assistant|>\nThe answer is:",
           "<s><|user|>\nWhat?\n<|assistant|>\nThe answer is:"]


def test_choice_scores_do_not_depend_on_the_batch(backend):
    reqs = [Request(Example(str(i), "", "A"), "choice", p, candidates=list("ABCD")) for i, p in enumerate(PROMPTS)]
    batched = _run(backend, reqs)
    backend.batch_size = 1
    try:
        alone = _run(backend, reqs)
    finally:
        backend.batch_size = 3
    batched, alone = torch.tensor(batched), torch.tensor(alone)
    assert (batched.max(1).values - batched.min(1).values).min() > 0.5  # the candidates are told apart
    assert torch.allclose(batched, alone, atol=1e-3)


def test_loglik_equals_direct_sum(backend):
    tok, model = backend.tokenizer, backend.model
    req = Request(Example("0", "", None), "loglik", PROMPTS[1], candidates=["Blue.", "It is green at noon."])
    got = _run(backend, [req, Request(Example("1", "", None), "loglik", PROMPTS[0], candidates=["x"])])[0]
    for cont, score in zip(req.candidates, got, strict=True):
        ctx = tok(PROMPTS[1], add_special_tokens=False).input_ids
        full = tok(PROMPTS[1] + " " + cont, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        direct = sum(float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full)))
        assert score == pytest.approx(direct, abs=1e-3)


def test_greedy_generation_matches_argmax_and_stops(backend):
    tok, model = backend.tokenizer, backend.model
    reqs = [Request(Example(str(i), "", None), "generate", p, max_new_tokens=6) for i, p in enumerate(PROMPTS)]
    outs = _run(backend, reqs)
    for p, out in zip(PROMPTS, outs, strict=True):
        ids = tok(p, add_special_tokens=False).input_ids
        new = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
        assert out == tok.decode(new, skip_special_tokens=True)
    assert cut_at_stops("12 apples\n\nQuestion: next", ["\n\nQuestion:", "<|user|>"]) == "12 apples"

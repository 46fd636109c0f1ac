"""Running requests on a model: HF transformers (batched generate with left padding and the KV cache,
batched log-likelihoods), or vLLM when it is installed.

Every request text already holds BOS; it is tokenized with add_special_tokens=False. Batches are formed
from requests sorted by length (longest first, so running out of memory shows at once); results come
back in request order. Left-padded rows get position ids from the attention mask, so a prompt scores
the same alone or in any batch (tests/eval check that).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qtulu.errors import QtuluError
from qtulu.eval.tasks import Request

Callback = Callable[[list[int], list], None]


class StopOnStrings:
    """Per-row stopping: a row is done when its generated text contains a stop string. Only the tail of
    the generated tokens is decoded each step (stop strings are short)."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int, window: int = 24):
        self.tokenizer, self.stops, self.prompt_len, self.window = tokenizer, stops, prompt_len, window

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        start = max(self.prompt_len, input_ids.shape[1] - self.window)
        tails = self.tokenizer.batch_decode(input_ids[:, start:], skip_special_tokens=True)
        for i, text in enumerate(tails):
            done[i] = any(s in text for s in self.stops)
        return done


def cut_at_stops(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


class HFBackend:
    name = "hf"

    def __init__(self, model, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, max(1, batch_size)
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:
            raise QtuluError(f"{tokenizer.name_or_path}: the tokenizer has neither a pad nor an EOS token")
        self._candidate_ids: dict[str, int] = {}

    # --- helpers -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _left_pad(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _forward_logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        ids, mask = self._left_pad(rows)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def _batches(self, lengths: list[int]):
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        for s in range(0, len(order), self.batch_size):
            yield order[s : s + self.batch_size]

    def candidate_id(self, letter: str) -> int:
        """The token of " X" (its last piece, as the reference: tokenizers may emit a bare space first)."""
        if letter not in self._candidate_ids:
            self._candidate_ids[letter] = self.encode(" " + letter)[-1]
        return self._candidate_ids[letter]

    # --- request kinds -----------------------------------------------------------------------------
    def run(self, requests: list[Request], callback: Callback) -> None:
        kinds = {r.kind for r in requests}
        if len(kinds) > 1:
            raise ValueError(f"one kind of request per run, got {kinds}")
        if not requests:
            return
        {"generate": self._generate, "choice": self._choice, "loglik": self._loglik}[kinds.pop()](requests, callback)

    def _choice(self, requests: list[Request], callback: Callback) -> None:
        encoded = [self.encode(r.prompt) for r in requests]
        for batch in self._batches([len(e) for e in encoded]):
            logprobs = self._forward_logprobs([encoded[i] for i in batch])[:, -1, :]
            results = []
            for row, i in enumerate(batch):
                ids = [self.candidate_id(c) for c in requests[i].candidates]
                results.append([float(logprobs[row, t]) for t in ids])
            callback(batch, results)

    def _loglik(self, requests: list[Request], callback: Callback) -> None:
        # flatten (request, continuation) pairs; score " " + continuation after the prompt
        pairs, owner = [], []
        for i, r in enumerate(requests):
            context = self.encode(r.prompt)
            for cont in r.candidates:
                sep = "" if r.prompt[-1:] in ("\n", " ") else " "
                full = self.encode(r.prompt + sep + cont)
                n_ctx = len(context)
                if full[:n_ctx] != context:  # merged across the boundary: score from the common prefix
                    n_ctx = next((k for k, (a, b) in enumerate(zip(full, context, strict=False)) if a != b), n_ctx)
                pairs.append((full, max(1, n_ctx)))
                owner.append(i)
        scores = [0.0] * len(pairs)
        starts = [owner.index(i) for i in range(len(requests))]
        remaining = {i: len(r.candidates) for i, r in enumerate(requests)}
        for batch in self._batches([len(p[0]) for p in pairs]):
            rows = [pairs[j][0] for j in batch]
            logprobs = self._forward_logprobs(rows)
            width = logprobs.shape[1]
            finished = []
            for row, j in enumerate(batch):
                full, n_ctx = pairs[j]
                offset = width - len(full)  # left padding
                targets = torch.tensor(full[n_ctx:], device=logprobs.device)
                positions = torch.arange(offset + n_ctx - 1, offset + len(full) - 1, device=logprobs.device)
                scores[j] = float(logprobs[row, positions, targets].sum())
                remaining[owner[j]] -= 1
                if remaining[owner[j]] == 0:
                    finished.append(owner[j])
            if finished:
                callback(finished, [scores[starts[i] : starts[i] + len(requests[i].candidates)] for i in finished])

    def _generate(self, requests: list[Request], callback: Callback) -> None:
        encoded = [self.encode(r.prompt) for r in requests]
        for (max_new, stops, temperature, top_p, seed), members in _group(requests).items():
            sample = temperature > 0
            if sample and seed is not None:
                torch.manual_seed(seed)  # per group: the same request list and batch size repeat exactly
            for local in self._batches([len(encoded[i]) for i in members]):
                batch = [members[k] for k in local]
                ids, mask = self._left_pad([encoded[i] for i in batch])
                stopper = StopOnStrings(self.tokenizer, list(stops), ids.shape[1])
                with torch.inference_mode():
                    out = self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=max_new,
                        do_sample=sample,
                        use_cache=True,
                        pad_token_id=self.pad_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                        stopping_criteria=[stopper],
                        temperature=temperature if sample else None,
                        top_p=top_p if sample else None,
                        top_k=0 if sample else None,  # nucleus sampling alone, as the protocol (no top-k cut)
                    )
                new = out[:, ids.shape[1] :].tolist()
                texts = [self._continuation(encoded[i], new[row]) for row, i in enumerate(batch)]
                callback(batch, [cut_at_stops(t, list(stops)) for t in texts])

    def _continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The text the model added after the prompt. Decoding the new tokens alone loses what a
        SentencePiece tokenizer writes as a leading "▁" (a completion's first space: a Python body's
        indentation), so decode prompt + continuation and drop the decoded prompt, as the reference's
        generate_completions did; fall back to the new tokens alone where the prompt's text is not a
        prefix (a character split across the boundary)."""
        prompt_text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        full = self.tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
        if full.startswith(prompt_text):
            return full[len(prompt_text) :]
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)


class VLLMBackend:
    """vLLM (import-guarded): generation with stop strings, and log-likelihoods from prompt log-probs."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, batch_size: int = 0, dtype: str = "auto"):
        try:
            import vllm
        except ImportError:
            raise QtuluError(
                "--backend vllm: vllm is not installed; pip install 'qtulu[vllm]' or use --backend hf", 2
            ) from None
        self.vllm, self.tokenizer = vllm, tokenizer
        self.llm = vllm.LLM(model=model_dir, tokenizer=model_dir, dtype=dtype)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _prompt(self, ids: list[int]):
        return {"prompt_token_ids": ids}

    def run(self, requests: list[Request], callback: Callback) -> None:
        if not requests:
            return
        kind = requests[0].kind
        if kind == "generate":
            for (max_new, stops, temperature, top_p, seed), members in _group(requests).items():
                params = [
                    self.vllm.SamplingParams(
                        temperature=temperature,
                        top_p=top_p if temperature > 0 else 1.0,
                        max_tokens=max_new,
                        stop=list(stops),
                        # one seed per request: samples of one prompt differ, a rerun repeats them
                        seed=None if seed is None or temperature == 0 else seed + i,
                    )
                    for i in members
                ]
                outs = self.llm.generate(
                    [self._prompt(self.encode(requests[i].prompt)) for i in members], params, use_tqdm=False
                )
                callback(members, [o.outputs[0].text for o in outs])
            return
        # choice and loglik: score prompt tokens with prompt_logprobs
        params = self.vllm.SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        for i, r in enumerate(requests):
            context = self.encode(r.prompt)
            if kind == "choice":
                conts = [self.encode(" " + c)[-1:] for c in r.candidates]
            else:
                sep = "" if r.prompt[-1:] in ("\n", " ") else " "
                conts = [self.encode(r.prompt + sep + c)[len(context) :] for c in r.candidates]
            outs = self.llm.generate([self._prompt(context + c) for c in conts], params, use_tqdm=False)
            scores = []
            for c, o in zip(conts, outs, strict=True):
                plp = o.prompt_logprobs
                scores.append(sum(plp[len(context) + k][tok].logprob for k, tok in enumerate(c)))
            callback([i], [scores])


def _group(requests: list[Request]) -> dict[tuple, list[int]]:
    """Requests that can share a generate call: same length cap, stops and sampling settings."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        key = (r.max_new_tokens, tuple(r.stop), float(r.temperature), float(r.top_p), r.seed)
        groups.setdefault(key, []).append(i)
    return groups

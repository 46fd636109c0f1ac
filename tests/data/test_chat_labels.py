"""The chat format and assistant-only labels: against an independent slow check on real ShareGPT and
OASST conversations with the LLaMA and SmolLM2 tokenizers, against the reference's prefix
re-tokenization where that is prefix-consistent, and against the saved Jinja chat template."""

import itertools

import numpy as np
import pytest
from qtulu.benchmarks.data import prefix_labels

from qtulu.data.chat import (
    DROP_NO_TRAINABLE,
    IGNORE_INDEX,
    ChatTokenizer,
    labels_from_offsets,
    render,
    save_chat_tokenizer,
)
from qtulu.data.records import Report
from qtulu.data.sources import convert, make_context

CONVERSATION = [
    {"role": "system", "content": "  Be brief. "},
    {"role": "user", "content": "Hi there\n"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " 4 "},
]


def test_render_is_the_tulu_format():
    text, spans = render(CONVERSATION, "</s>")
    assert text == (
        "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s>\n"
    )
    assert [text[a:b] for a, b in spans] == ["Hello!</s>", "4</s>"]


@pytest.mark.parametrize(
    "offsets, spans, expected",
    [
        ([(0, 3), (3, 5), (5, 9), (9, 12)], [(4, 9)], [0, 1, 1, 0]),  # (3, 5) straddles the span start
        ([(0, 4), (4, 4), (4, 9), (9, 12)], [(4, 9)], [0, 1, 1, 0]),  # a zero-width token at the start
        ([(0, 2), (2, 4), (9, 12), (12, 13)], [(4, 9)], [0, 0, 0, 0]),  # no token overlaps the span
        ([(0, 8), (8, 10), (10, 12), (12, 20)], [(4, 9), (15, 18)], [1, 1, 0, 1]),  # two spans
    ],
)
def test_labels_from_offsets_overlap_rule(offsets, spans, expected):
    ids = np.arange(100, 100 + len(offsets), dtype=np.int32)
    labels = labels_from_offsets(ids, np.asarray(offsets), spans)
    assert (labels != IGNORE_INDEX).astype(int).tolist() == expected
    assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])


@pytest.fixture(scope="module")
def real_conversations(shared_data):
    """Real multi-turn conversations: the first 120 ShareGPT ones and every OASST path."""
    out = []
    for source, folder, limit in (("sharegpt", "sharegpt", 120), ("oasst1", "oasst1", None)):
        ctx = make_context(source, 0, Report())
        records = convert(source, [shared_data / "sources" / folder], ctx)
        out += [r["messages"] for r in itertools.islice(records, limit)]
    return out


def independent_expectation(tokenizer, messages, max_len):
    """Slow, separate from the code under test: the text is built here from the format's spec, the
    assistant answers are located with str.find, tokens come from the HF call with offsets."""
    text, spans, cursor = "", [], 0
    for m in messages:
        header = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}[m["role"]]
        text += header + m["content"].strip() + (tokenizer.eos_token if m["role"] == "assistant" else "") + "\n"
        if m["role"] == "assistant":
            start = text.find(header + m["content"].strip(), cursor) + len(header)
            spans.append((start, start + len(m["content"].strip())))
        cursor = len(text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if tokenizer.bos_token_id is not None:
        ids, offsets = [tokenizer.bos_token_id] + ids, [(0, 0)] + offsets
    trainable = []
    for tok_id, (a, b) in zip(ids, offsets, strict=True):
        in_content = any(a < e and max(b, a + 1) > s for s, e in spans)
        is_eos = tok_id == tokenizer.eos_token_id and any(a == e for _, e in spans)
        trainable.append(in_content or is_eos)
    return np.asarray(ids[:max_len]), np.asarray(trainable[:max_len]), len(ids) > max_len


@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "smollm2_tokenizer"])
def test_labels_match_independent_slow_check(request, tokenizer_fixture, real_conversations):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    max_len = 1024  # short enough that some real conversations are truncated
    results = ChatTokenizer(tokenizer, max_len)(real_conversations)
    truncated = 0
    for messages, got in zip(real_conversations, results, strict=True):
        ids, trainable, was_truncated = independent_expectation(tokenizer, messages, max_len)
        truncated += was_truncated
        if isinstance(got, str):
            assert got == DROP_NO_TRAINABLE and not trainable.any()
            continue
        assert np.array_equal(got.input_ids, ids)
        # every trainable token is assistant content or its EOS; every such token is trainable
        assert np.array_equal(got.labels != IGNORE_INDEX, trainable)
        assert np.array_equal(got.labels[trainable], ids[trainable])
        assert got.truncated == was_truncated
        if not was_truncated:
            assert (got.labels == tokenizer.eos_token_id).sum() == sum(m["role"] == "assistant" for m in messages)
    assert truncated >= 5, "the check should cover truncated conversations"


@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "smollm2_tokenizer"])
def test_labels_equal_prefix_retokenization_where_consistent(request, tokenizer_fixture, real_conversations):
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    ours = ChatTokenizer(tokenizer, 2048)(real_conversations)
    consistent = 0
    for messages, mine in zip(real_conversations, ours, strict=True):
        ids, labels, ok = prefix_labels(tokenizer, messages, 2048)
        if not ok:
            continue
        consistent += 1
        if isinstance(mine, str):  # dropped: the answer starts past the max length
            assert (labels == IGNORE_INDEX).all()
        else:
            assert np.array_equal(mine.input_ids, ids) and np.array_equal(mine.labels, labels)
    assert consistent >= 0.9 * len(real_conversations)


def test_prefix_inconsistent_tokenizer_labels_stay_right():
    """A BPE that merges "\\nA": the token straddles the assistant header and the answer, so counting
    the tokens of the prefix (the reference's way) puts the answer's start one token too late."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Answer"}]
    text, _ = render(messages, "</s>")
    chars = sorted(set(text.replace("</s>", "")))
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    vocab["\nA"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("\n", "A")]))
    backend.add_special_tokens(["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")

    got = ChatTokenizer(tok, 64)([messages])[0]
    trained = tok.convert_ids_to_tokens(got.input_ids[got.labels != IGNORE_INDEX].tolist())
    assert trained == ["\nA", "n", "s", "w", "e", "r", "</s>"]  # the whole answer, first letter included
    _, ref_labels, consistent = prefix_labels(tok, messages, 64)
    assert not consistent
    assert tok.convert_ids_to_tokens(got.input_ids[ref_labels != IGNORE_INDEX].tolist())[0] == "n"  # "A" lost


def test_truncation_and_dropping(llama_tokenizer):
    long_user = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "short"}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 300}]
    dropped, cut = ChatTokenizer(llama_tokenizer, 64)([long_user, long_answer])
    assert dropped == DROP_NO_TRAINABLE
    assert cut.truncated and len(cut.input_ids) == 64 and cut.labels[-1] != IGNORE_INDEX
    assert llama_tokenizer.eos_token_id not in cut.labels.tolist()


@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "smollm2_tokenizer"])
def test_saved_chat_template_reproduces_training_format(request, tokenizer_fixture, tmp_path, real_conversations):
    from transformers import AutoTokenizer

    tokenizer = request.getfixturevalue(tokenizer_fixture)
    folder = save_chat_tokenizer(tokenizer, tmp_path / "tok")
    saved = AutoTokenizer.from_pretrained(folder)
    assert len(saved) == len(tokenizer) and saved.pad_token is not None  # nothing added: no resize needed
    conversations = [CONVERSATION] + real_conversations[120:140]
    ours = ChatTokenizer(tokenizer, 1 << 16)(conversations)
    for messages, mine in zip(conversations, ours, strict=True):
        out = saved.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert np.array_equal(np.asarray(out["input_ids"]), mine.input_ids)
        assert np.array_equal(np.asarray(out["assistant_masks"]).astype(bool), mine.labels != IGNORE_INDEX)
    prompt = saved.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    full, _ = render(CONVERSATION[:4], tokenizer.eos_token)
    assert prompt == (tokenizer.bos_token or "") + full + "<|assistant|>\n"


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
        name_or_path = "slow-one"

    from qtulu.errors import QtuluError

    with pytest.raises(QtuluError, match="needs a fast tokenizer"):
        ChatTokenizer(Slow(), 128)

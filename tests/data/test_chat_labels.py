"""The chat format and assistant-only labels: against an independent slow check on real ShareGPT and
OASST conversations with the LLaMA and SmolLM2 tokenizers, against the oracle of the reference's
encode_with_messages_format (benchmarks/data.py), and against the saved Jinja chat template; BOS by
model family; ShareGPT chunks cut from the one tokenization."""

import itertools

import numpy as np
import pytest
from qtulu.benchmarks.data import newline_after_eos, reference_bos_id, reference_encode

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
from qtulu.errors import QtuluError

CONVERSATION = [
    {"role": "system", "content": "  Be brief. "},
    {"role": "user", "content": "Hi there\n"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": " 4 "},
]


def test_render_is_the_tulu_format():
    text, spans = render(CONVERSATION, "</s>")
    assert text == (  # no newline after the last turn: the reference stripped the whole text
        "<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nWhat is 2+2?\n<|assistant|>\n4</s>"
    )
    assert [text[a:b] for a, b in spans] == ["Hello!</s>", "4</s>"]
    ref_text, ref_spans = render(CONVERSATION, "</s>", labels="reference")
    assert ref_text == text
    assert [text[a:b] for a, b in ref_spans] == ["Hello!</s>\n", "4</s>"]  # the newline after a non-final EOS


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


# BOS by model family: LLaMA's <s>; nothing for SmolLM2, whose declared BOS is <|im_start|>
FAMILY_BOS = {"llama_tokenizer": "<s>", "smollm2_tokenizer": None}


def independent_expectation(tokenizer, messages, max_len, bos_token):
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
    text = text.removesuffix("\n")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if bos_token is not None:
        ids, offsets = [tokenizer.convert_tokens_to_ids(bos_token)] + ids, [(0, 0)] + offsets
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
        ids, trainable, was_truncated = independent_expectation(
            tokenizer, messages, max_len, FAMILY_BOS[tokenizer_fixture]
        )
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
def test_reference_labels_are_the_reference_tokens(request, tokenizer_fixture, real_conversations):
    """--labels reference gives exactly the oracle's input_ids and labels; the default (TÜLU) labels
    differ only by masking the newline after a non-final EOS, which the reference trained."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    max_len = 1024  # some real conversations are truncated, some dropped
    bos_id = reference_bos_id(tokenizer)
    reference = ChatTokenizer(tokenizer, max_len, labels="reference")(real_conversations)
    tulu = ChatTokenizer(tokenizer, max_len)(real_conversations)
    newline_tokens = trained = 0
    for messages, ref, ours in zip(real_conversations, reference, tulu, strict=True):
        ids, labels = reference_encode(tokenizer, messages, max_len, bos_id)
        if not (labels != IGNORE_INDEX).any():  # the reference filtered these out; so do we
            assert ref == ours == DROP_NO_TRAINABLE
            continue
        assert np.array_equal(ref.input_ids, ids) and np.array_equal(ref.labels, labels)
        assert np.array_equal(ours.input_ids, ids)
        differ = ours.labels != labels
        assert (differ <= newline_after_eos(tokenizer, ids)).all() and (ours.labels[differ] == IGNORE_INDEX).all()
        newline_tokens += int(differ.sum())
        trained += int((labels != IGNORE_INDEX).sum())
    assert 0 < newline_tokens < 0.01 * trained


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
    ref_ids, ref_labels = reference_encode(tok, messages, 64, reference_bos_id(tok))
    assert np.array_equal(ref_ids, got.input_ids)
    assert tok.convert_ids_to_tokens(ref_ids[ref_labels != IGNORE_INDEX].tolist())[0] == "n"  # "A" lost


def test_truncation_and_dropping(llama_tokenizer):
    long_user = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "short"}]
    long_answer = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "word " * 300}]
    dropped, cut = ChatTokenizer(llama_tokenizer, 64)([long_user, long_answer])
    assert dropped == DROP_NO_TRAINABLE
    assert cut.truncated and len(cut.input_ids) == 64 and cut.labels[-1] != IGNORE_INDEX
    assert llama_tokenizer.eos_token_id not in cut.labels.tolist()


@pytest.mark.parametrize("labels", ["tulu", "reference"])
@pytest.mark.parametrize("loader", ["transformers", "text"])
@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "smollm2_tokenizer"])
def test_saved_chat_template_reproduces_training_format(
    request, tokenizer_fixture, loader, labels, tmp_path, real_conversations
):
    """The saved tokenizer's chat template renders exactly the training text (BOS as trained, no
    newline after the last turn) and its generation mask is exactly the labels; whether the
    tokenizer came from transformers or from tokenizer.json directly (TextTokenizer)."""
    from transformers import AutoTokenizer

    from qtulu.model.tokenizer import load_text_tokenizer

    tokenizer = request.getfixturevalue(tokenizer_fixture)
    if loader == "text":
        tokenizer = load_text_tokenizer(tokenizer.name_or_path)
    chat_tok = ChatTokenizer(tokenizer, 1 << 16, labels=labels)
    folder = save_chat_tokenizer(tokenizer, tmp_path / "tok", chat_tok.template)
    saved = AutoTokenizer.from_pretrained(folder)
    assert len(saved) == len(tokenizer) and saved.pad_token is not None  # nothing added: no resize needed
    conversations = [CONVERSATION] + real_conversations[120:130]
    for messages, mine in zip(conversations, chat_tok(conversations), strict=True):
        text = saved.apply_chat_template(messages, tokenize=False)
        assert text == (tokenizer.bos_token if chat_tok.bos_id is not None else "") + chat_tok.render(messages)[0]
        out = saved.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert np.array_equal(np.asarray(out["input_ids"]), mine.input_ids)
        assert np.array_equal(np.asarray(out["assistant_masks"]).astype(bool), mine.labels != IGNORE_INDEX)
    prompt = saved.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    full, _ = render(CONVERSATION[:4], tokenizer.eos_token)
    bos = tokenizer.bos_token if chat_tok.bos_id is not None else ""
    assert prompt == bos + full + "\n<|assistant|>\n"  # the reference's generation prompt


def test_bos_by_model_family(llama_tokenizer, smollm2_tokenizer, real_conversations):
    assert ChatTokenizer(llama_tokenizer, 64).bos_id == llama_tokenizer.convert_tokens_to_ids("<s>")
    assert ChatTokenizer(llama_tokenizer, 64, bos="never").bos_id is None
    assert ChatTokenizer(smollm2_tokenizer, 64).bos_id is None  # its BOS <|im_start|> is a chat marker
    marker = smollm2_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ChatTokenizer(smollm2_tokenizer, 64, bos="always").bos_id == marker
    # SmolLM2: no <|im_start|> in the training text unless the conversation has it
    results = ChatTokenizer(smollm2_tokenizer, 2048)(real_conversations)
    for messages, got in zip(real_conversations, results, strict=True):
        if not isinstance(got, str):
            has = any("<|im_start|>" in m["content"] for m in messages)
            assert (marker in got.input_ids.tolist()) == has
    quoted = [
        {"role": "user", "content": "What does <|im_start|> mean?"},
        {"role": "assistant", "content": "A marker."},
    ]
    got = ChatTokenizer(smollm2_tokenizer, 64)([quoted])[0]
    assert got.input_ids.tolist().count(marker) == 1 and got.input_ids[0] != marker


def test_bos_and_labels_errors(llama_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    with pytest.raises(QtuluError, match="data.labels: unknown value 'tulu2'; choose one of tulu, reference"):
        ChatTokenizer(llama_tokenizer, 64, labels="tulu2")
    with pytest.raises(QtuluError, match="data.bos: unknown value 'sometimes'"):
        ChatTokenizer(llama_tokenizer, 64, bos="sometimes")
    backend = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    no_bos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")
    assert ChatTokenizer(no_bos, 64).bos_id is None
    with pytest.raises(QtuluError, match="--bos always, but the tokenizer declares no BOS token"):
        ChatTokenizer(no_bos, 64, bos="always")


@pytest.fixture(scope="module")
def sharegpt_conversations(shared_data):
    ctx = make_context("sharegpt", 0, Report())
    return [r["messages"] for r in convert("sharegpt", [shared_data / "sources" / "sharegpt"], ctx)][:150]


@pytest.mark.parametrize("labels", ["tulu", "reference"])
@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "smollm2_tokenizer"])
def test_split_chunks_are_their_own_tokenization(request, tokenizer_fixture, labels, sharegpt_conversations):
    """Chunks cut from one tokenization of the whole conversation carry exactly the tokens and labels
    of the chunk rendered and tokenized on its own; they cover the conversation in order, and every
    chunk of several turn pairs fits the max length exactly (BOS included)."""
    tokenizer = request.getfixturevalue(tokenizer_fixture)
    max_len = 512
    chat_tok = ChatTokenizer(tokenizer, max_len, labels=labels)
    split = chat_tok.split(sharegpt_conversations)
    several = 0
    for messages, chunks in zip(sharegpt_conversations, split, strict=True):
        assert [m for chunk, _ in chunks for m in chunk] == messages
        direct = chat_tok([chunk for chunk, _ in chunks])
        for (chunk, got), want in zip(chunks, direct, strict=True):
            if isinstance(want, str):
                assert got == want
                continue
            assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)
            assert got.truncated == want.truncated
            if len(chunk) > 2:
                assert not want.truncated
        for (a, _), (b, _) in itertools.pairwise(chunks):  # greedy: the next pair would not have fitted
            merged = chat_tok([a + b[:2]])[0]
            assert isinstance(merged, str) or merged.truncated
        several += len(chunks) > 1
    assert several >= 50, "the sample has conversations longer than the max length"


def test_split_without_a_splitting_eos_tokenizes_chunks_again(llama_tokenizer, sharegpt_conversations):
    """A tokenizer whose EOS is not a special token falls back to tokenizing each chunk: same result."""
    chat_tok = ChatTokenizer(llama_tokenizer, 1024)
    fast = chat_tok.split(sharegpt_conversations[:60])
    chat_tok.eos_splits = False
    slow = chat_tok.split(sharegpt_conversations[:60])
    assert sum(len(chunks) > 1 for chunks in fast) >= 5
    for a, b in zip(fast, slow, strict=True):
        assert [c for c, _ in a] == [c for c, _ in b]
        for (_, x), (_, y) in zip(a, b, strict=True):
            assert x == y if isinstance(x, str) else np.array_equal(x.input_ids, y.input_ids)


@pytest.mark.parametrize("tokenizer_fixture", ["llama_tokenizer", "smollm2_tokenizer"])
def test_text_tokenizer_is_the_transformers_one(request, tokenizer_fixture, real_conversations):
    """tokenizer.json read by the tokenizers library (no torch) tokenizes as transformers does."""
    from qtulu.model.tokenizer import load_text_tokenizer

    tokenizer = request.getfixturevalue(tokenizer_fixture)
    text_tok = load_text_tokenizer(tokenizer.name_or_path)
    assert (text_tok.bos_token, text_tok.eos_token, text_tok.bos_token_id, text_tok.eos_token_id) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    ours, theirs = ChatTokenizer(text_tok, 2048), ChatTokenizer(tokenizer, 2048)
    for a, b in zip(ours(real_conversations), theirs(real_conversations), strict=True):
        assert a == b if isinstance(a, str) else np.array_equal(a.input_ids, b.input_ids)


def test_slow_tokenizer_is_refused():
    class Slow:
        is_fast = False
        name_or_path = "slow-one"

    from qtulu.errors import QtuluError

    with pytest.raises(QtuluError, match="needs a fast tokenizer"):
        ChatTokenizer(Slow(), 128)

"""One converter per TÜLU source (the paper's Table 1): raw records -> {"dataset", "id", "messages"}.

Each converter reads its source's real raw format and follows the reference conversions:
instruction templates picked at random with a seeded RNG, oasst1 root-to-leaf paths without deleted
messages, super_ni zero-shot and two-shot prompts, Baize transcripts split into turns, ShareGPT
conversations cleaned, then split into chunks under the max length on turn-pair boundaries.
Problems with a record go to the Report: bad records (format errors) raise or are skipped
(--on-error); records the recipe itself drops are counted by reason.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qtulu.data.records import (
    BadRecord,
    Report,
    check_messages,
    data_files,
    get_list,
    get_str,
    iter_records,
)
from qtulu.errors import QtuluError

# (prompt template, weight). The phrasings vary the way people ask, as the reference's did; the
# Alpaca prompt is one of them. Contents are stripped at rendering, so no trailing whitespace matters.
TEMPLATES_WITH_INPUT = [
    ("{instruction}\n\n{input}", 0.25),
    ("{instruction}\n{input}", 0.15),
    ("{instruction}\n\nInput: {input}", 0.1),
    ("{instruction}\n\nInput:\n{input}\n\nOutput:", 0.05),
    ("Task: {instruction}\n\n{input}", 0.05),
    ("{input}\n\n{instruction}", 0.05),
    ("Here is a task: {instruction}\nInput: {input}\nResponse:", 0.05),
    ("Complete the task below.\n\nTask: {instruction}\nContext: {input}", 0.05),
    ("{instruction}\n\nContext:\n{input}\n\nAnswer:", 0.05),
    (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:",
        0.2,
    ),
]
TEMPLATES_NO_INPUT = [
    ("{instruction}", 0.35),
    ("{instruction}\nAnswer:", 0.05),
    ("{instruction}\n\nResponse:", 0.05),
    ("Task: {instruction}", 0.05),
    ("Instruction: {instruction}\nOutput:", 0.05),
    ("Please help with this request.\n\n{instruction}", 0.05),
    ("How would you respond to the following?\n{instruction}", 0.05),
    ("Complete the following task.\n\n{instruction}", 0.05),
    ("You are asked: {instruction}", 0.05),
    (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:",
        0.25,
    ),
]
COT_ZERO_SHOT = [
    "{question}\nLet's think step by step.",
    "{question}\nThink it through before you answer.",
    "Question: {question}\nGive your reasoning first, then the answer.",
    "{question}\nExplain your reasoning, then answer.",
    "Answer the question below. Show your steps.\n\n{question}",
]
COT_ANSWER = [
    "{cot}\nSo the answer is {answer}.",
    "{cot} So the answer is {answer}.",
    "{cot}\nTherefore, the answer is {answer}.",
]
SUPER_NI_ZERO_SHOT, SUPER_NI_FEW_SHOT, SUPER_NI_SHOTS = 60, 20, 2

# Hub dataset ids (optionally owner/name/path/to/file) whose files are in the raw format we read.
HUB_DATASETS = {
    "dolly": "databricks/databricks-dolly-15k/databricks-dolly-15k.jsonl",
    "oasst1": "OpenAssistant/oasst1/2023-04-12_oasst_ready.trees.jsonl.gz",
    "alpaca": "tatsu-lab/alpaca",
    "gpt4_alpaca": "vicgalle/alpaca-gpt4",
    "code_alpaca": "sahil2801/CodeAlpaca-20k/code_alpaca_20k.json",
    "sharegpt": "anon8231489123/ShareGPT_Vicuna_unfiltered/ShareGPT_V3_unfiltered_cleaned_split.json",
}
# Folder names other people give these sources (the natural-instructions checkout is `superni`).
FOLDER_ALIASES = {"super_ni": ("superni", "natural-instructions"), "sharegpt": ("share_gpt",)}


@dataclass
class Context:
    """What a converter needs besides its files."""

    source: str
    rng: random.Random
    report: Report = field(default_factory=Report)
    folder: Path | None = None
    # ShareGPT splitting: max tokens of a rendered conversation, and either the ChatTokenizer whose
    # one tokenization gives both the chunk boundaries and the chunks' tokens (records then carry
    # them under TOKENS_KEY), or a plain batch token counter (chunk sizes estimated per message).
    max_seq_len: int | None = None
    count_tokens: Callable[[list[str]], list[int]] | None = None
    chat_tokenizer: object | None = None  # qtulu.data.chat.ChatTokenizer
    header_tokens: int | None = None  # tokens of the chat headers around one turn pair, counted once


# A record's tokens (a Tokenized, or the reason it was dropped), when its converter made them anyway;
# never written to JSONL.
TOKENS_KEY = "_tokens"
SPLIT_BATCH = 64  # conversations tokenized together (the Rust tokenizer uses every core on a batch)


def make_context(source: str, seed: int, report: Report | None = None, **kwargs) -> Context:
    # One RNG per source, so adding a source to a mix does not change another source's templates.
    from qtulu.data.chat import ChatTokenizer

    owner = getattr(kwargs.get("count_tokens"), "__self__", None)
    if kwargs.get("chat_tokenizer") is None and isinstance(owner, ChatTokenizer):
        kwargs["chat_tokenizer"] = owner  # a ChatTokenizer's counter: split with its one tokenization
    return Context(source=source, rng=random.Random(f"{seed}:{source}"), report=report or Report(), **kwargs)


def record(source: str, rid: str, messages: list[dict]) -> dict:
    return {"dataset": source, "id": rid, "messages": messages}


def chat(user: str, assistant: str) -> list[dict]:
    return [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": assistant.strip()}]


def _each(files: list[Path], ctx: Context) -> Iterator[tuple[object, str]]:
    for path in files:
        yield from iter_records(path)


def _guarded(ctx: Context, where: str, fn, *args):
    """Run fn on one raw record; a BadRecord goes to the report (raise or skip). Returns [] if skipped."""
    try:
        return fn(*args)
    except BadRecord as err:
        ctx.report.bad(ctx.source, where, err)
        return []


def _numbered(files: list[Path], ctx: Context, examples) -> Iterator[dict]:
    """Every conversation `examples(rec)` makes of each raw record, with ids `<source>_<n>` in order."""
    n = 0
    for rec, where in _each(files, ctx):
        for msgs in _guarded(ctx, where, examples, rec):
            yield record(ctx.source, f"{ctx.source}_{n}", msgs)
            n += 1


# ---------------------------------------------------------------------------------------------
# Instruction-style sources


def encode_instruction(rng: random.Random, instruction: str, input_text: str, output: str) -> list[dict]:
    """The reference's instruction encoding: a prompt phrasing picked at random (weighted)."""
    has_input = bool(input_text and input_text.strip())
    templates = TEMPLATES_WITH_INPUT if has_input else TEMPLATES_NO_INPUT
    template = rng.choices([t for t, _ in templates], weights=[w for _, w in templates])[0]
    prompt = template.format(instruction=instruction.strip(), input=input_text.strip() if has_input else "")
    return chat(prompt, output)


def _instruction_source(input_key: str, output_key: str):
    """alpaca, gpt4_alpaca, code_alpaca, self_instruct (also the seed-task layout), dolly."""

    def convert(files: list[Path], ctx: Context) -> Iterator[dict]:
        return _numbered(files, ctx, lambda rec: _instruction_examples(ctx, rec, input_key, output_key))

    return convert


def _instruction_examples(ctx: Context, rec, input_key: str, output_key: str) -> list[list[dict]]:
    instruction = get_str(rec, "instruction")
    if "instances" in rec and output_key not in rec:  # self-instruct seed tasks: one example per instance
        out = []
        for i, inst in enumerate(get_list(rec, "instances")):
            try:
                out.append(
                    encode_instruction(
                        ctx.rng, instruction, get_str(inst, "input", False, True), get_str(inst, "output")
                    )
                )
            except BadRecord as err:
                raise BadRecord(f"instances[{i}].{err.field}", err.problem) from None
        return out
    return [
        encode_instruction(
            ctx.rng,
            instruction,
            get_str(rec, input_key, required=False, empty_ok=True),
            get_str(rec, output_key),
        )
    ]


def convert_unnatural(files: list[Path], ctx: Context) -> Iterator[dict]:
    """Unnatural Instructions core data: an instruction with instances, each with its own constraints."""
    return _numbered(files, ctx, lambda rec: _unnatural_examples(ctx, rec))


def _unnatural_examples(ctx: Context, rec) -> list[list[dict]]:
    instruction = get_str(rec, "instruction")
    out = []
    for i, inst in enumerate(get_list(rec, "instances")):
        try:
            constraints = get_str(inst, "constraints", required=False, empty_ok=True).strip()
            full = instruction if constraints.lower() in ("", "none", "none.") else f"{instruction}\n{constraints}"
            out.append(encode_instruction(ctx.rng, full, get_str(inst, "input", False, True), get_str(inst, "output")))
        except BadRecord as err:
            raise BadRecord(f"instances[{i}].{err.field}", err.problem) from None
    return out


# ---------------------------------------------------------------------------------------------
# FLAN v2 and chain of thought


def _inputs_targets(rec) -> list[list[dict]]:
    return [chat(get_str(rec, "inputs"), get_str(rec, "targets"))]


def convert_flan_v2(files: list[Path], ctx: Context) -> Iterator[dict]:
    """FLAN v2 (inputs, targets): user = inputs, assistant = targets."""
    return _numbered(files, ctx, _inputs_targets)


def convert_cot(files: list[Path], ctx: Context) -> Iterator[dict]:
    """FLAN CoT: JSONL of (inputs, targets) as flan_v2, or the raw TSVs (question, answer, chain of
    thought) made half zero-shot and half few-shot, with exemplars from the same file."""
    n = 0
    for path in files:
        if not path.name.lower().removesuffix(".gz").endswith(".tsv"):
            for rec, where in iter_records(path):
                for msgs in _guarded(ctx, where, _inputs_targets, rec):
                    yield record(ctx.source, f"{ctx.source}_{n}", msgs)
                    n += 1
            continue
        rows = []
        for fields, where in iter_records(path):
            if len(fields) != 3:
                ctx.report.bad(
                    ctx.source,
                    where,
                    BadRecord(
                        "row",
                        f"expected 3 tab-separated fields (question, answer, chain of thought), got {len(fields)}",
                    ),
                )
                continue
            q, a, c = (f.replace("\\n", "\n").strip() for f in fields)
            if not (q and a and c):
                name = ("question", "answer", "chain_of_thought")[[q, a, c].index("")]
                ctx.report.bad(ctx.source, where, BadRecord(name, "empty"))
                continue
            rows.append((q, a, c))
        for i, (q, a, c) in enumerate(rows):
            answer = ctx.rng.choice(COT_ANSWER).format(cot=c, answer=a)
            if len(rows) < 2 or ctx.rng.random() < 0.5:
                prompt = ctx.rng.choice(COT_ZERO_SHOT).format(question=q)
            else:
                shots = _sample_excluding(ctx.rng, len(rows), min(len(rows) - 1, ctx.rng.choice((2, 3))), i)
                prompt = "".join(f"Q: {rows[j][0]}\nA: {rows[j][2]} So the answer is {rows[j][1]}.\n\n" for j in shots)
                prompt += f"Q: {q}\nA:"
            yield record(ctx.source, f"{ctx.source}_{n}", chat(prompt, answer))
            n += 1


def _sample_excluding(rng: random.Random, n: int, k: int, exclude: int) -> list[int]:
    picked: list[int] = []
    while len(picked) < k:
        j = rng.randrange(n)
        if j != exclude and j not in picked:
            picked.append(j)
    return picked


# ---------------------------------------------------------------------------------------------
# Super-NaturalInstructions


def convert_super_ni(files: list[Path], ctx: Context) -> Iterator[dict]:
    """Task JSONs (2021 schema: Definition a string; final: a list, instances with ids). Per task, up to
    60 zero-shot examples (instruction template) and 20 two-shot ones (two positive examples first);
    a task with fewer than 80 instances keeps the same 3:1 split. MMLU-derived tasks are skipped
    (test leakage), and a natural-instructions checkout's splits/xlingual/train_tasks.txt is honoured."""
    allowed = None
    if ctx.folder is not None:
        split = ctx.folder / "splits" / "xlingual" / "train_tasks.txt"
        if split.is_file():
            allowed = {line.strip() for line in split.read_text().splitlines() if line.strip()}
    for path in files:
        task = path.name.split(".")[0]
        if "_mmmlu_" in task or (allowed is not None and task not in allowed):
            continue
        for rec, where in iter_records(path):
            yield from _guarded(ctx, where, _super_ni_task, ctx, rec, task)


def _super_ni_task(ctx: Context, rec, task: str) -> list[dict]:
    definition = rec.get("Definition") if isinstance(rec, dict) else None
    if isinstance(definition, list):
        definition = definition[0] if definition else None
    if not isinstance(definition, str) or not definition.strip():
        raise BadRecord("Definition", "missing or empty (expected a string or a list of strings)")
    instances = []
    for i, inst in enumerate(get_list(rec, "Instances")):
        out = inst.get("output") if isinstance(inst, dict) else None
        out = out[0] if isinstance(out, list) and out else out
        if not isinstance(out, str) or not out.strip():
            raise BadRecord(f"Instances[{i}].output", "missing or empty")
        try:
            instances.append((inst.get("id") or f"{task}-{i}", get_str(inst, "input"), out))
        except BadRecord as err:
            raise BadRecord(f"Instances[{i}].{err.field}", err.problem) from None
    examples = []
    for i, ex in enumerate(get_list(rec, "Positive Examples")):
        try:
            examples.append((get_str(ex, "input"), get_str(ex, "output")))
        except BadRecord as err:
            raise BadRecord(f"Positive Examples[{i}].{err.field}", err.problem) from None
    total = SUPER_NI_ZERO_SHOT + SUPER_NI_FEW_SHOT
    chosen = ctx.rng.sample(instances, min(total, len(instances)))
    n_zero = SUPER_NI_ZERO_SHOT if len(chosen) == total else round(len(chosen) * SUPER_NI_ZERO_SHOT / total)
    out = []
    for k, (iid, inp, outp) in enumerate(chosen):
        if k < n_zero or not examples:
            msgs = encode_instruction(ctx.rng, definition, inp, outp)
        else:
            shots = ctx.rng.sample(examples, min(SUPER_NI_SHOTS, len(examples)))
            prompt = definition.strip() + "\n\n"
            prompt += "".join(f"Input:\n{si.strip()}\nOutput:\n{so.strip()}\n\n" for si, so in shots)
            prompt += f"Input:\n{inp.strip()}\nOutput:"
            msgs = chat(prompt, outp)
        out.append(record(ctx.source, f"super_ni_{iid}", msgs))
    return out


# ---------------------------------------------------------------------------------------------
# Open Assistant 1


def convert_oasst1(files: list[Path], ctx: Context) -> Iterator[dict]:
    """Every root-to-leaf path of a message tree is a conversation (intermediate assistant replies
    appear as prefixes of longer paths); deleted messages and their replies are skipped. Reads the
    nested tree export (`prompt` with `replies`) and the flat message table (HF parquet/JSONL)."""
    flat: list[tuple[dict, str]] = []
    for rec, where in _each(files, ctx):
        if isinstance(rec, dict) and "prompt" in rec:
            yield from _guarded(ctx, where, _oasst_tree, ctx, rec["prompt"], "prompt")
        elif isinstance(rec, dict) and "message_id" in rec:
            flat.append((rec, where))
        else:
            ctx.report.bad(
                ctx.source,
                where,
                BadRecord(
                    "prompt",
                    "missing (expected a message tree with `prompt`, or a flat message row with `message_id`)",
                ),
            )
    if flat:
        yield from _oasst_flat(ctx, flat)


def _oasst_flat(ctx: Context, rows: list[tuple[dict, str]]) -> Iterator[dict]:
    nodes, where_of = {}, {}
    for row, where in rows:
        node = dict(row, replies=[])
        nodes[row["message_id"]] = node
        where_of[row["message_id"]] = where
    roots = []
    for mid, node in nodes.items():
        parent = node.get("parent_id")
        if parent is None:
            roots.append(node)
        elif parent in nodes:
            nodes[parent]["replies"].append(node)
        else:
            ctx.report.bad(ctx.source, where_of[mid], BadRecord("parent_id", f"no message with id {parent}"))
    for root in roots:
        yield from _guarded(ctx, where_of[root["message_id"]], _oasst_tree, ctx, root, "message")


def _oasst_tree(ctx: Context, root: dict, path: str) -> list[dict]:
    out: list[dict] = []
    _oasst_walk(ctx, root, path, [], out)
    return out


def _oasst_walk(ctx: Context, node, path: str, messages: list[dict], out: list[dict]) -> None:
    if not isinstance(node, dict):
        raise BadRecord(path, f"expected a message object, got {type(node).__name__}")
    if node.get("deleted"):
        ctx.report.drop(ctx.source, "deleted message (with its replies)")
        return
    role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
    if role is None:
        raise BadRecord(f"{path}.role", f"unknown role {node.get('role')!r}; expected prompter or assistant")
    expected = "user" if len(messages) % 2 == 0 else "assistant"
    if role != expected:
        raise BadRecord(
            f"{path}.role",
            f"a {node['role']} message cannot follow a "
            f"{'prompter' if expected == 'assistant' else 'assistant'} one here",
        )
    try:
        text = get_str(node, "text")
    except BadRecord as err:
        raise BadRecord(f"{path}.{err.field}", err.problem) from None
    messages.append({"role": role, "content": text.strip()})
    replies = node.get("replies") or []
    if not isinstance(replies, list):
        raise BadRecord(f"{path}.replies", f"expected a list, got {type(replies).__name__}")
    live = [r for r in replies if not (isinstance(r, dict) and r.get("deleted"))]
    if role == "assistant" and not live:
        out.append(record(ctx.source, f"oasst1_{node.get('message_id', len(out))}", list(messages)))
    for i, child in enumerate(replies):  # deleted children count themselves and stop
        _oasst_walk(ctx, child, f"{path}.replies[{i}]", messages, out)
    messages.pop()


# ---------------------------------------------------------------------------------------------
# Baize and ShareGPT


def convert_baize(files: list[Path], ctx: Context) -> Iterator[dict]:
    """Baize self-chat transcripts: `input` with [|Human|] / [|AI|] turns, split into messages.
    A turn pair with an empty side ends the conversation there (counted)."""
    return _numbered(files, ctx, lambda rec: _baize_messages(ctx, rec))


def _baize_messages(ctx: Context, rec) -> list[list[dict]]:
    transcript = get_str(rec, "input")
    messages: list[dict] = []
    for part in transcript.split("[|Human|]")[1:]:
        if "[|AI|]" not in part:
            continue  # the transcript's trailing empty [|Human|] prompt
        human, *ai = part.split("[|AI|]")
        human, ai_text = human.strip(), "\n".join(a.strip() for a in ai).strip()
        if not human or not ai_text:
            ctx.report.drop(ctx.source, "empty turn (conversation cut there)")
            break
        messages += chat(human, ai_text)
    if not messages:
        raise BadRecord("input", "no [|Human|] ... [|AI|] turn pair found (empty conversation)")
    return [messages]


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "system": None,
    "bing": None,
}


def convert_sharegpt(files: list[Path], ctx: Context) -> Iterator[dict]:
    """ShareGPT: conversations with system or Bing turns, broken alternation or empty turns are dropped
    (counted by reason); a leading assistant turn (a chunk of an already split export) and a trailing
    user turn are trimmed. With a tokenizer, long conversations are split into chunks that fit the max
    length, on turn-pair boundaries."""
    splitter = ctx.chat_tokenizer if ctx.max_seq_len is not None else None
    if ctx.count_tokens is None and splitter is None:
        ctx.report.note("sharegpt: conversations were not split at a max length (no tokenizer given)")
    pending: list[tuple[str, list[dict]]] = []

    def chunked(rid: str, chunks: list) -> Iterator[dict]:
        for k, chunk in enumerate(chunks):
            yield record(ctx.source, f"sharegpt_{rid}" + (f"_part{k}" if len(chunks) > 1 else ""), chunk)

    def flush() -> Iterator[dict]:
        splits = splitter.split([msgs for _, msgs in pending])
        for (rid, _), pieces in zip(pending, splits, strict=True):
            for rec, (_, tokens) in zip(chunked(rid, [msgs for msgs, _ in pieces]), pieces, strict=True):
                rec[TOKENS_KEY] = tokens
                yield rec
        pending.clear()

    for rec, where in _each(files, ctx):
        for msgs in _guarded(ctx, where, _sharegpt_messages, ctx, rec):
            rid = str(rec.get("id") or where.rsplit(":", 1)[-1])
            if splitter is None:
                yield from chunked(rid, _split_turn_pairs(ctx, msgs))
                continue
            pending.append((rid, msgs))
            if len(pending) == SPLIT_BATCH:
                yield from flush()
    if pending:
        yield from flush()


def _sharegpt_messages(ctx: Context, rec) -> list[list[dict]]:
    turns = get_list(rec, "conversations")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(f"conversations[{i}]", f"expected an object, got {type(turn).__name__}")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise BadRecord(
                f"conversations[{i}].from",
                f"unknown speaker {speaker!r}; expected human, gpt, system or bing",
            )
        if SHAREGPT_ROLES[speaker] is None:
            ctx.report.drop(ctx.source, f"{speaker} turn")
            return []
        value = turn.get("value")
        if not isinstance(value, str):
            raise BadRecord(f"conversations[{i}].value", "missing" if value is None else "expected a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value.strip()})
    if not messages:
        ctx.report.drop(ctx.source, "empty conversation")
        return []
    while messages and messages[0]["role"] == "assistant":
        messages.pop(0)
        ctx.report.drop(ctx.source, "leading assistant turn trimmed")
    if messages and messages[-1]["role"] == "user":
        messages.pop()
        ctx.report.drop(ctx.source, "trailing user turn trimmed")
    if not messages:
        ctx.report.drop(ctx.source, "no user/assistant turn pair")
        return []
    if any(not m["content"] for m in messages):
        ctx.report.drop(ctx.source, "empty turn")
        return []
    if any(a["role"] == b["role"] for a, b in itertools.pairwise(messages)):
        ctx.report.drop(ctx.source, "broken alternation")
        return []
    return [messages]


def _split_turn_pairs(ctx: Context, messages: list[dict]) -> list[list[dict]]:
    """Greedy chunks of whole (user, assistant) pairs whose estimated token count (each message
    counted on its own, one BOS and the chat headers added) fits max_seq_len; a single pair longer
    than that is its own chunk (truncated later). Only for a bare token counter: with a
    ChatTokenizer the sizes are exact (ChatTokenizer.split)."""
    if ctx.count_tokens is None or ctx.max_seq_len is None:
        return [messages]
    counts = ctx.count_tokens([m["content"] for m in messages])
    if ctx.header_tokens is None:
        from qtulu.data.chat import ASSISTANT_HEADER, USER_HEADER

        ctx.header_tokens = sum(ctx.count_tokens([USER_HEADER, "\n" + ASSISTANT_HEADER, "\n"])) + 1  # + EOS
    overhead = ctx.header_tokens
    budget = ctx.max_seq_len - 1
    chunks, current, used = [], [], 0
    for i in range(0, len(messages), 2):
        size = counts[i] + counts[i + 1] + overhead
        if current and used + size > budget:
            chunks.append(current)
            current, used = [], 0
        current = current + messages[i : i + 2]
        used += size
    chunks.append(current)
    return chunks


# ---------------------------------------------------------------------------------------------
# The registry, and whole-folder / hub entry points

CONVERTERS: dict[str, Callable[[list[Path], Context], Iterator[dict]]] = {
    "flan_v2": convert_flan_v2,
    "cot": convert_cot,
    "dolly": _instruction_source("context", "response"),
    "oasst1": convert_oasst1,
    "super_ni": convert_super_ni,
    "self_instruct": _instruction_source("input", "output"),
    "unnatural_instructions": convert_unnatural,
    "alpaca": _instruction_source("input", "output"),
    "gpt4_alpaca": _instruction_source("input", "output"),
    "code_alpaca": _instruction_source("input", "output"),
    "baize": convert_baize,
    "sharegpt": convert_sharegpt,
}


def convert(source: str, inputs: list[Path], ctx: Context) -> Iterator[dict]:
    """Convert files and/or folders of one source; every record is checked before it is yielded."""
    if source not in CONVERTERS:
        raise QtuluError(f"{source}: unknown source; choose one of: {', '.join(CONVERTERS)}", 2)
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = data_files(path)
            if not found:
                raise QtuluError(
                    f"{path}: no data files (.json, .jsonl, .tsv, .parquet, optionally .gz) in this "
                    f"folder; put the raw {source} files there"
                )
            ctx.folder = ctx.folder or path
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise QtuluError(f"{path}: file or folder does not exist; check the path")
    for rec in CONVERTERS[source](files, ctx):
        check_messages(rec["messages"])  # a converter bug, not user input, if this fails
        ctx.report.converted[source] += 1
        yield rec


def source_folder(root: Path, source: str) -> Path:
    """The folder of `source` under a --sources root (its name, or a known alias)."""
    for name in (source, *FOLDER_ALIASES.get(source, ())):
        if (root / name).is_dir():
            return root / name
    raise QtuluError(
        f"{root / source}: no folder for source {source} in {root}; put its raw files in "
        f"{root / source}/ or remove {source} from the mix"
    )


def hub_folder(dataset_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local hub cache) a dataset's raw files; `owner/name/path` picks one file."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.utils import logging as hf_logging

    parts = dataset_id.split("/")
    if len(parts) < 2 or not all(parts):
        raise QtuluError(f"{dataset_id}: not a hub dataset id (expected owner/name or owner/name/file)", 2)
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    patterns = ["*.json", "*.jsonl", "*.tsv", "*.parquet", "*.gz"]
    last_error: Exception | None = None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its retry chatter; our error below says what failed
    try:
        for local_only in (True, False):
            try:
                if filename:
                    return Path(
                        hf_hub_download(
                            repo,
                            filename,
                            repo_type="dataset",
                            revision=revision,
                            local_files_only=local_only,
                        )
                    )
                return Path(
                    snapshot_download(
                        repo,
                        repo_type="dataset",
                        revision=revision,
                        allow_patterns=patterns,
                        local_files_only=local_only,
                    )
                )
            except Exception as e:  # offline, not found, auth: huggingface_hub raises many types
                last_error = e
    finally:
        hf_logging.set_verbosity(verbosity)
    raise QtuluError(
        f"{dataset_id}: could not get this dataset from the Hugging Face hub "
        f"({type(last_error).__name__}); check the id and your network, or download the raw files "
        "and pass --sources DIR"
    ) from None


def default_hub_id(source: str) -> str:
    if source not in HUB_DATASETS:
        raise QtuluError(
            f"{source}: no hub dataset in its raw format is known for this source; download its "
            f"raw files and pass --sources DIR with a folder {source}/",
            2,
        )
    return HUB_DATASETS[source]

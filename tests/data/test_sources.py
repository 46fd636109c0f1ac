"""Converters on the real raw samples (../shared/data/sources) and on hand-written fixtures for the
sources that have no sample; the raw readers; the bundled sample; hub loading failing cleanly."""

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest

from qtulu.config import SOURCE_NAMES
from qtulu.data.mixtures import SAMPLE_DIR
from qtulu.data.records import Report, _iter_json, check_messages, iter_records
from qtulu.data.sources import CONVERTERS, COT_ANSWER, convert, hub_folder, make_context, source_folder
from qtulu.errors import QtuluError


def run(source, inputs, seed=0, **ctx_args):
    report = Report()
    ctx = make_context(source, seed, report, **ctx_args)
    return list(convert(source, [Path(p) for p in inputs], ctx)), report


def roles_alternate(messages):
    check_messages(messages)  # raises if not
    body = messages[1:] if messages[0]["role"] == "system" else messages
    return [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)


def test_registry_has_exactly_the_paper_sources():
    assert set(CONVERTERS) == set(SOURCE_NAMES)
    assert len(CONVERTERS) == len(SOURCE_NAMES) == 12


# ---------------------------------------------------------------------------------------------
# Instruction-style sources on the real samples


@pytest.mark.parametrize(
    "source, file, input_key, output_key",
    [
        ("alpaca", "alpaca/alpaca_data.sample.json", "input", "output"),
        ("code_alpaca", "code_alpaca/code_alpaca.sample.json", "input", "output"),
        ("dolly", "dolly/databricks-dolly-15k.sample.jsonl", "context", "response"),
    ],
)
def test_instruction_sources_real(shared_data, source, file, input_key, output_key):
    path = shared_data / "sources" / file
    raw = [r for r, _ in iter_records(path)]
    records, report = run(source, [path.parent])
    assert len(records) == len(raw) and not report.skipped
    templates = set()
    for rec, src in zip(records, raw, strict=True):
        msgs = rec["messages"]
        assert rec["dataset"] == source and roles_alternate(msgs) and len(msgs) == 2
        assert msgs[1]["content"] == src[output_key].strip()
        assert src["instruction"].strip() in msgs[0]["content"]
        if src[input_key].strip():
            assert src[input_key].strip() in msgs[0]["content"]
        templates.add(msgs[0]["content"].replace(src["instruction"].strip(), "I").replace(src[input_key].strip(), "X"))
    assert len(templates) >= 3, "the instruction template should vary"
    assert len({r["id"] for r in records}) == len(records)


def test_self_instruct_seed_tasks_real(shared_data):
    path = shared_data / "sources" / "self_instruct" / "seed_tasks.jsonl"
    raw = [r for r, _ in iter_records(path)]
    records, _ = run("self_instruct", [path])
    expected = [(t["instruction"].strip(), i["output"].strip()) for t in raw for i in t["instances"]]
    assert len(records) == len(expected) == 175
    for rec, (instruction, output) in zip(records, expected, strict=True):
        assert roles_alternate(rec["messages"])
        assert instruction in rec["messages"][0]["content"] and rec["messages"][1]["content"] == output


def test_seed_changes_templates_and_same_seed_repeats(shared_data):
    folder = shared_data / "sources" / "alpaca"
    a, _ = run("alpaca", [folder], seed=1)
    b, _ = run("alpaca", [folder], seed=1)
    c, _ = run("alpaca", [folder], seed=2)
    assert a == b
    assert [r["messages"][0] for r in a] != [r["messages"][0] for r in c]
    assert [r["messages"][1] for r in a] == [r["messages"][1] for r in c]


# ---------------------------------------------------------------------------------------------
# CoT (raw FLAN TSVs) and super_ni (task JSONs)


def test_cot_tsv_real(shared_data):
    folder = shared_data / "sources" / "cot"
    rows = []
    for path in sorted(folder.glob("*.tsv")):
        rows += [[f.replace("\\n", "\n").strip() for f in fields] for fields, _ in iter_records(path)]
    records, report = run("cot", [folder])
    assert len(records) == len(rows) == 500 and not report.skipped
    few_shot = 0
    for rec, (question, answer, cot) in zip(records, rows, strict=True):
        user, assistant = (m["content"] for m in rec["messages"])
        assert assistant in {t.format(cot=cot, answer=answer).strip() for t in COT_ANSWER}
        assert question in user
        if user.startswith("Q: "):
            few_shot += 1
            assert user.count("Q: ") in (3, 4) and user.endswith(f"Q: {question}\nA:")
    assert 0.35 < few_shot / len(records) < 0.65, "about half the CoT examples should be few-shot"


def test_super_ni_real_2021_schema(shared_data):
    folder = shared_data / "sources" / "superni"  # the checkout's name; an alias of super_ni
    assert source_folder(shared_data / "sources", "super_ni") == folder
    records, _ = run("super_ni", [folder])
    tasks = {p.name.split(".")[0]: json.loads(p.read_text()) for p in folder.glob("*.json")}
    assert len(records) == sum(len(t["Instances"]) for t in tasks.values()) == 60  # 30 per task, all used
    per_task = Counter()
    for rec in records:
        task_name = next(name for name in tasks if rec["id"].startswith(f"super_ni_{name}"))
        task = tasks[task_name]
        user, assistant = (m["content"] for m in rec["messages"])
        assert assistant in {i["output"][0].strip() for i in task["Instances"]}
        assert task["Definition"].strip() in user
        if user.endswith("Output:") and user.count("Input:\n") == 3:
            per_task[task_name, "two-shot"] += 1
            assert sum(ex["input"].strip() in user for ex in task["Positive Examples"]) == 2
        else:
            per_task[task_name, "zero-shot"] += 1
    for name in tasks:  # the 60:20 split, scaled to 30 instances: 22 (round half to even) and 8
        assert (per_task[name, "zero-shot"], per_task[name, "two-shot"]) == (22, 8)
    assert len({r["id"] for r in records}) == 60


def test_super_ni_final_schema_fixture(tmp_path):
    task = {
        "Definition": ["Repeat the word twice."],
        "Positive Examples": [
            {"input": "cat", "output": "cat cat"},
            {"input": "dog", "output": "dog dog"},
            {"input": "sun", "output": "sun sun"},
        ],
        "Instances": [
            {"id": f"task999-{k}", "input": w, "output": [f"{w} {w}", "alt"]}
            for k, w in enumerate(["a", "b", "c", "d", "e", "f", "g", "h"])
        ],
    }
    (tmp_path / "task999_repeat.json").write_text(json.dumps(task))
    (tmp_path / "task998_mmmlu_leak.json").write_text(json.dumps(task))  # skipped: MMLU-derived
    records, _ = run("super_ni", [tmp_path])
    assert sorted(r["id"] for r in records) == [f"super_ni_task999-{k}" for k in range(8)]
    assert sum(r["messages"][0]["content"].count("Input:\n") == 3 for r in records) == 2  # 8 * 20/80
    for r in records:
        w = r["messages"][1]["content"].split()[0]
        assert r["messages"][1]["content"] == f"{w} {w}"


# ---------------------------------------------------------------------------------------------
# OASST1: nested trees (real) and the flat message table (fixture)


def _expected_oasst_paths(nodes: dict, parent: dict) -> Counter:
    """Independent of the converter: walk up from every live assistant leaf via parent ids."""

    def alive(mid):
        while mid is not None:
            if nodes[mid].get("deleted"):
                return False
            mid = parent[mid]
        return True

    children = Counter(parent[m] for m in nodes if parent[m] is not None and not nodes[m].get("deleted"))
    paths = Counter()
    for mid, node in nodes.items():
        if node["role"] == "assistant" and alive(mid) and children[mid] == 0:
            path, cur = [], mid
            while cur is not None:
                path.append(("user" if nodes[cur]["role"] == "prompter" else "assistant", nodes[cur]["text"].strip()))
                cur = parent[cur]
            paths[tuple(reversed(path))] += 1
    return paths


def _flatten(node, parent_id, nodes, parent):
    nodes[node["message_id"]] = node
    parent[node["message_id"]] = parent_id
    for child in node.get("replies", []):
        _flatten(child, node["message_id"], nodes, parent)


def test_oasst1_trees_real(shared_data):
    folder = shared_data / "sources" / "oasst1"
    nodes, parent = {}, {}
    for tree, _ in iter_records(next(folder.glob("*.jsonl"))):
        _flatten(tree["prompt"], None, nodes, parent)
    records, report = run("oasst1", [folder])
    got = Counter(tuple((m["role"], m["content"]) for m in r["messages"]) for r in records)
    assert got == _expected_oasst_paths(nodes, parent)
    assert all(roles_alternate(r["messages"]) for r in records) and len(records) > 100


OASST_FLAT = [  # the HF oasst1 layout: one row per message, linked by parent_id
    {
        "message_id": "r1",
        "parent_id": None,
        "role": "prompter",
        "text": "Name a prime number.",
        "deleted": False,
    },
    {"message_id": "a1", "parent_id": "r1", "role": "assistant", "text": "7 is prime.", "deleted": False},
    {"message_id": "a2", "parent_id": "r1", "role": "assistant", "text": "9 is prime.", "deleted": True},
    {"message_id": "p2", "parent_id": "a1", "role": "prompter", "text": "Another?", "deleted": False},
    {"message_id": "a3", "parent_id": "p2", "role": "assistant", "text": " 11. ", "deleted": False},
    {"message_id": "a4", "parent_id": "p2", "role": "assistant", "text": "13.", "deleted": False},
    {"message_id": "r2", "parent_id": None, "role": "prompter", "text": "Hello?", "deleted": True},
    {"message_id": "a5", "parent_id": "r2", "role": "assistant", "text": "Hi!", "deleted": False},
]


def test_oasst1_flat_table_fixture(tmp_path):
    (tmp_path / "oasst1_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OASST_FLAT))
    records, report = run("oasst1", [tmp_path])
    got = sorted(tuple(m["content"] for m in r["messages"]) for r in records)
    assert got == [
        ("Name a prime number.", "7 is prime.", "Another?", "11."),
        ("Name a prime number.", "7 is prime.", "Another?", "13."),
    ]
    nodes = {r["message_id"]: r for r in OASST_FLAT}
    expected = _expected_oasst_paths(nodes, {m: r["parent_id"] for m, r in nodes.items()})
    assert Counter(tuple((m["role"], m["content"]) for m in r["messages"]) for r in records) == expected
    assert report.dropped["oasst1: deleted message (with its replies)"] == 2


def _msg(mid, role, text, *replies, deleted=False):
    return {"message_id": mid, "role": role, "text": text, "deleted": deleted, "lang": "en", "replies": list(replies)}


# An assistant reply whose only follow-ups were deleted is still the end of a conversation, at any
# depth; a deleted reply beside a live one changes nothing. (The real sample has no deleted nodes.)
OASST_DELETED_TREE = {"message_tree_id": "t1", "prompt": _msg(
    "u1", "prompter", "What is 2+2?",
    _msg("a1", "assistant", "4.", _msg("u2", "prompter", "Rude follow-up.", deleted=True)),
    _msg("a2", "assistant", "Four.",
         _msg("u3", "prompter", "And 3+3?",
              _msg("a3", "assistant", "6.",
                   _msg("u4", "prompter", "spam", deleted=True),
                   _msg("u5", "prompter", "spam again", _msg("a4", "assistant", "..."), deleted=True)),
              _msg("a5", "assistant", "Seven.", deleted=True)),
         _msg("u6", "prompter", "gone", deleted=True)),
)}


def test_oasst1_assistant_whose_replies_are_all_deleted_ends_a_path(tmp_path):
    expected = {
        ("What is 2+2?", "4."),
        ("What is 2+2?", "Four.", "And 3+3?", "6."),
    }
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "trees.jsonl").write_text(json.dumps(OASST_DELETED_TREE) + "\n")
    records, report = run("oasst1", [tmp_path / "tree"])
    assert {tuple(m["content"] for m in r["messages"]) for r in records} == expected
    assert len(records) == 2 and all(roles_alternate(r["messages"]) for r in records)
    # u2, u4, u5 (its reply a4 goes with it unseen), a5, u6
    assert report.dropped["oasst1: deleted message (with its replies)"] == 5

    # the same tree as flat message rows (the HF layout) converts to the same conversations
    nodes, parent = {}, {}
    _flatten(OASST_DELETED_TREE["prompt"], None, nodes, parent)
    rows = [{k: v for k, v in n.items() if k != "replies"} | {"parent_id": parent[m]} for m, n in nodes.items()]
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flat, _ = run("oasst1", [tmp_path / "flat"])
    assert {tuple(m["content"] for m in r["messages"]) for r in flat} == expected
    assert Counter(tuple((m["role"], m["content"]) for m in r["messages"]) for r in flat) == _expected_oasst_paths(
        nodes, parent)


def test_oasst1_flat_table_parquet(tmp_path):
    """The HF hub ships the flat table as parquet; it converts exactly like the JSONL copy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pq.write_table(pa.Table.from_pylist(OASST_FLAT), tmp_path / "a" / "train-00000-of-00001.parquet")
    (tmp_path / "b" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in OASST_FLAT))
    assert run("oasst1", [tmp_path / "a"])[0] == run("oasst1", [tmp_path / "b"])[0] != []


# ---------------------------------------------------------------------------------------------
# ShareGPT: cleaning and splitting


def _clean_sharegpt(conv):
    """The documented cleaning rules, written out plainly: None if the conversation is dropped."""
    speakers = [t["from"] for t in conv]
    if not conv or "system" in speakers or "bing" in speakers:
        return None
    msgs = [("user" if t["from"] == "human" else "assistant", t["value"].strip()) for t in conv]
    while msgs and msgs[0][0] == "assistant":
        msgs = msgs[1:]
    if msgs and msgs[-1][0] == "user":
        msgs = msgs[:-1]
    broken = any(a[0] == b[0] for a, b in itertools.pairwise(msgs))
    if not msgs or any(not text for _, text in msgs) or broken:
        return None
    return msgs


def test_sharegpt_real_cleaning_and_split(shared_data, llama_tokenizer):
    from qtulu.data.chat import ChatTokenizer

    path = shared_data / "sources" / "sharegpt" / "sharegpt_v3.sample.json"
    raw = json.loads(path.read_text())
    max_len = 2048
    chat_tok = ChatTokenizer(llama_tokenizer, max_len)
    records, report = run("sharegpt", [path], max_seq_len=max_len, count_tokens=chat_tok.count_tokens)
    by_id: dict[str, list] = {}
    for rec in records:
        base = rec["id"].removeprefix("sharegpt_").rsplit("_part", 1)[0]
        by_id.setdefault(base, []).append(rec["messages"])
    expected = {r["id"]: _clean_sharegpt(r["conversations"]) for r in raw}
    kept = {k: v for k, v in expected.items() if v is not None}
    assert set(by_id) == set(kept)
    assert report.dropped["sharegpt: system turn"] == sum(
        "system" in [t["from"] for t in r["conversations"]] for r in raw
    )
    for rid, chunks in by_id.items():
        joined = [(m["role"], m["content"]) for chunk in chunks for m in chunk]
        assert joined == kept[rid]  # chunks cover the conversation in order, nothing lost or changed
        assert all(roles_alternate(c) for c in chunks)
    split = [c for chunks in by_id.values() if len(chunks) > 1 for c in chunks]
    assert len(split) > 100, "the real sample has conversations longer than 2048 tokens"
    lengths = [len(t.input_ids) for t in chat_tok([c for c in split if len(c) > 2]) if not isinstance(t, str)]
    # A chunk of several turn pairs fits the max length, up to the few tokens by which the sum of
    # per-message counts can differ from the rendered text's count.
    assert max(lengths) <= max_len * 1.01


# ---------------------------------------------------------------------------------------------
# Hand-written fixtures: flan_v2, gpt4_alpaca, unnatural_instructions, baize


def test_flan_v2_fixture(tmp_path):
    rows = [
        {"inputs": "Translate to French: cat", "targets": "chat", "task": "t1"},
        {"inputs": "Is 7 odd?\n", "targets": " yes ", "task": "t2"},
    ]
    (tmp_path / "flan.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = run("flan_v2", [tmp_path])
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "Translate to French: cat"}, {"role": "assistant", "content": "chat"}],
        [{"role": "user", "content": "Is 7 odd?"}, {"role": "assistant", "content": "yes"}],
    ]


def test_gpt4_alpaca_fixture(tmp_path):
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "text": "ignored"},
    ]
    (tmp_path / "alpaca_gpt4_data.json").write_text(json.dumps(rows, indent=2))
    records, _ = run("gpt4_alpaca", [tmp_path])
    assert [r["messages"][1]["content"] for r in records] == ["Blue.", "5"]
    assert "Name a colour." in records[0]["messages"][0]["content"]
    assert (
        "Add the numbers." in records[1]["messages"][0]["content"] and "2 and 3" in records[1]["messages"][0]["content"]
    )


def test_unnatural_instructions_fixture(tmp_path):
    rows = [
        {
            "instruction": "Reverse the word.",
            "instances": [
                {"instruction_with_input": "x", "input": "abc", "output": "cba", "constraints": "None."},
                {
                    "instruction_with_input": "x",
                    "input": "hello",
                    "output": "olleh",
                    "constraints": "Use lower case.",
                },
            ],
        }
    ]
    (tmp_path / "core_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = run("unnatural_instructions", [tmp_path])
    assert [r["messages"][1]["content"] for r in records] == ["cba", "olleh"]
    assert "None." not in records[0]["messages"][0]["content"]
    assert "Reverse the word.\nUse lower case." in records[1]["messages"][0]["content"]
    assert "abc" in records[0]["messages"][0]["content"]


def test_baize_fixture(tmp_path):
    rows = [
        {
            "topic": "t",
            "input": "The conversation between human and AI assistant.\n[|Human|] Hi there\n"
            "[|AI|] Hello! How can I help?\n[|Human|] What is 2+2?\n[|AI|] 4.\n[|Human|] ",
        },
        {
            "topic": "u",
            "input": "[|Human|] First\n[|AI|] Answer one\n[|Human|] Second\n[|AI|] \n[|Human|] Third\n"
            "[|AI|] Never reached",
        },
    ]
    (tmp_path / "quora_chat_data.json").write_text(json.dumps(rows))
    records, report = run("baize", [tmp_path])
    assert [r["messages"] for r in records] == [
        [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4."},
        ],
        [{"role": "user", "content": "First"}, {"role": "assistant", "content": "Answer one"}],
    ]
    assert report.dropped["baize: empty turn (conversation cut there)"] == 1


# ---------------------------------------------------------------------------------------------
# The bundled sample and the readers


@pytest.mark.parametrize("source", SOURCE_NAMES)
def test_bundled_sample_covers_every_source(source):
    folder = source_folder(SAMPLE_DIR, source)
    assert folder.name == source
    assert all(p.suffix in (".json", ".jsonl", ".tsv") for p in folder.rglob("*") if p.is_file())
    records, report = run(source, [folder])  # on_error=raise: the sample has no bad record
    assert len(records) >= 5 and not report.skipped
    assert all(roles_alternate(r["messages"]) for r in records)


def test_bundled_sample_size():
    total = sum(len(run(s, [source_folder(SAMPLE_DIR, s)])[0]) for s in SOURCE_NAMES)
    assert 250 <= total <= 600, "a few hundred short conversations"


@pytest.mark.parametrize("chunk_chars", [7, 100, 1 << 20])
def test_json_array_streaming_matches_json_load(chunk_chars):
    path = SAMPLE_DIR / "alpaca" / "alpaca_data.json"  # pretty-printed: one element spans many lines
    lines = path.read_text().splitlines()
    got = list(_iter_json(path, chunk_chars=chunk_chars))
    assert [r for r, _ in got] == json.loads(path.read_text())
    for _, where in got:  # each location names the line where the element starts
        assert lines[int(where.rsplit(":", 1)[1]) - 1].strip() == "{"


def test_hub_failure_is_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QtuluError) as err:
        hub_folder("databricks/databricks-dolly-15k/databricks-dolly-15k.jsonl")
    message = str(err.value)
    assert "\n" not in message and message.startswith("databricks/databricks-dolly-15k")
    with pytest.raises(QtuluError, match="not a hub dataset id"):
        hub_folder("no-slash")

"""`qtulu data ...` through the real entry point: bad input gives one line naming file, line and field,
exit 1, and no output; the happy paths print what a user needs."""

import json
import shutil
import sys

import pytest

from qtulu.cli import main
from qtulu.data.mixtures import SAMPLE_DIR


def qtulu(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["qtulu", *map(str, args)])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_real_dolly(monkeypatch, capsys, shared_data, tmp_path):
    out = tmp_path / "dolly.jsonl"
    code, _, err = qtulu(monkeypatch, capsys, "data", "convert", "dolly", shared_data / "sources" / "dolly", "-o", out)
    assert code == 0 and "wrote 17 conversations" in err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 17 and all(r["dataset"] == "dolly" and len(r["messages"]) == 2 for r in records)


DOLLY_OK = {"instruction": "Say hi.", "context": "", "response": "Hi!", "category": "open_qa"}
BAD_INPUTS = {
    "malformed JSON line": ("dolly", "d.jsonl", json.dumps(DOLLY_OK) + '\n{"instruction": "x",\n', 2, "json"),
    "missing field": (
        "alpaca",
        "a.json",
        json.dumps([{"instruction": "i", "input": "", "output": "o"}, {"instruction": "i", "input": ""}], indent=1),
        7,
        "output",
    ),
    "unknown sharegpt speaker": (
        "sharegpt",
        "s.json",
        json.dumps(
            [
                {
                    "id": "x",
                    "conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}],
                }
            ]
        ),
        1,
        "conversations[1].from",
    ),
    "unknown oasst role": (
        "oasst1",
        "o.jsonl",
        json.dumps(
            {
                "message_tree_id": "t",
                "prompt": {
                    "message_id": "t",
                    "role": "prompter",
                    "text": "hi",
                    "replies": [{"message_id": "m", "role": "moderator", "text": "ok", "replies": []}],
                },
            }
        )
        + "\n",
        1,
        "prompt.replies[0].role",
    ),
    "empty conversation": (
        "baize",
        "b.json",
        json.dumps([{"input": "The conversation between human and AI assistant.\n[|Human|] "}]),
        1,
        "input",
    ),
    "empty message": ("dolly", "d.jsonl", json.dumps({**DOLLY_OK, "response": "  "}) + "\n", 1, "response"),
    "truncated JSON array": (
        "code_alpaca",
        "c.json",
        '[\n {"instruction": "i", "input": "", "output": "o"},\n {"instruction": "j", "inp',
        3,
        "json",
    ),
    "wrong type": ("flan_v2", "f.jsonl", json.dumps({"inputs": "q", "targets": 5}) + "\n", 1, "targets"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_no_output(monkeypatch, capsys, tmp_path, case):
    source, name, content, line, field = BAD_INPUTS[case]
    path = tmp_path / "raw" / name
    path.parent.mkdir()
    path.write_text(content)
    out = tmp_path / "out" / "converted.jsonl"
    code, stdout, err = qtulu(monkeypatch, capsys, "data", "convert", source, path, "-o", out)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}:{line}: {field}: "), err
    assert "Traceback" not in err + stdout
    assert not out.exists() and list(out.parent.iterdir()) == []


def test_missing_file(monkeypatch, capsys, tmp_path):
    code, _, err = qtulu(monkeypatch, capsys, "data", "convert", "dolly", tmp_path / "nope.jsonl", "-o", tmp_path / "o")
    assert (
        code == 1 and err.strip() == f"error: {tmp_path / 'nope.jsonl'}: file or folder does not exist; check the path"
    )


def test_skip_reports_how_many_and_why(monkeypatch, capsys, tmp_path):
    path = tmp_path / "d.jsonl"
    bad = {**DOLLY_OK, "response": ""}
    path.write_text("\n".join(json.dumps(r) for r in [DOLLY_OK, bad, DOLLY_OK, bad, {"context": "x"}]) + "\n")
    out = tmp_path / "o.jsonl"
    code, _, err = qtulu(monkeypatch, capsys, "data", "convert", "dolly", path, "-o", out, "--on-error", "skip")
    assert code == 0 and len(out.read_text().splitlines()) == 2
    assert "skipped       2  dolly: response: empty" in err
    assert "skipped       1  dolly: instruction: missing" in err


def test_usage_errors_exit_2(monkeypatch, capsys, tmp_path):
    code, _, err = qtulu(monkeypatch, capsys, "data", "convert", "wikipedia", tmp_path, "-o", tmp_path / "o")
    assert code == 2 and "unknown source" in err
    code, _, err = qtulu(
        monkeypatch,
        capsys,
        "data",
        "prepare",
        "--mix",
        "no-such-mix",
        "--tokenizer",
        "qtulu/micro-bpe",
        "-o",
        tmp_path / "ds",
    )
    assert code == 2 and "preset named 'no-such-mix'" in err


def test_prepare_stats_show(monkeypatch, capsys, tmp_path):
    out = tmp_path / "ds"
    code, stdout, err = qtulu(
        monkeypatch,
        capsys,
        "data",
        "prepare",
        "--mix",
        "sample",
        "--tokenizer",
        "qtulu/micro-bpe",
        "--max-seq-len",
        256,
        "-o",
        out,
    )
    assert code == 0, err
    assert "packing efficiency" in stdout and "sharegpt: system turn" in stdout
    code, stdout, _ = qtulu(monkeypatch, capsys, "data", "stats", out, "--json")
    stats = json.loads(stdout)
    assert code == 0 and stats["rows"] > 0 and stats["trainable_tokens"] < stats["tokens"]
    code, stdout, _ = qtulu(monkeypatch, capsys, "data", "show", out, "--row", 0)
    assert code == 0 and "document 0" in stdout and "⟦" in stdout and "</s>⟧" in stdout and "<|user|>" in stdout
    code, _, err = qtulu(monkeypatch, capsys, "data", "show", out, "--row", stats["rows"])
    assert code == 2 and "out of range" in err


def test_failed_prepare_leaves_no_output(monkeypatch, capsys, tmp_path):
    root = tmp_path / "raw"
    shutil.copytree(SAMPLE_DIR, root)
    (root / "sharegpt" / "sharegpt_sample.json").write_text('[{"id": "a", "conversations": [}]')
    out = tmp_path / "out"
    code, _, err = qtulu(
        monkeypatch,
        capsys,
        "data",
        "prepare",
        "--mix",
        "sample",
        "--sources",
        root,
        "--tokenizer",
        "qtulu/micro-bpe",
        "--max-seq-len",
        256,
        "-o",
        out,
    )
    assert code == 1 and f"error: {root / 'sharegpt' / 'sharegpt_sample.json'}:1: json: not valid JSON" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_inline_and_yaml_mixes(monkeypatch, capsys, tmp_path):
    args = ["--sources", "qtulu:sample", "--tokenizer", "qtulu/micro-bpe", "--max-seq-len", 256]
    code, _, err = qtulu(
        monkeypatch, capsys, "data", "prepare", "--mix", "dolly:5,alpaca:3", *args, "-o", tmp_path / "a"
    )
    assert code == 0, err
    stats = json.loads(qtulu(monkeypatch, capsys, "data", "stats", tmp_path / "a", "--json")[1])
    assert {s: c["used"] for s, c in stats["sources"].items()} == {"dolly": 5, "alpaca": 3}
    mix = tmp_path / "mine.yaml"
    mix.write_text("name: mine\nsources:\n  baize: null\n  cot: 4\n")
    code, _, err = qtulu(monkeypatch, capsys, "data", "prepare", "--mix", mix, *args, "-o", tmp_path / "b")
    assert code == 0, err
    stats = json.loads(qtulu(monkeypatch, capsys, "data", "stats", tmp_path / "b", "--json")[1])
    assert stats["sources"]["cot"]["used"] == 4 and stats["sources"]["baize"]["used"] == 8
    code, _, err = qtulu(
        monkeypatch,
        capsys,
        "data",
        "prepare",
        "--mix",
        "dolly",
        "--sources",
        tmp_path,
        "--tokenizer",
        "qtulu/micro-bpe",
        "-o",
        tmp_path / "c",
    )
    assert code == 1 and "no folder for source dolly" in err and not (tmp_path / "c").exists()


def test_prepare_labels_and_bos_flags(monkeypatch, capsys, tmp_path):
    args = ["data", "prepare", "--mix", "dolly", "--sources", "qtulu:sample", "--tokenizer", "qtulu/micro-bpe"]
    code, _, err = qtulu(monkeypatch, capsys, *args, "--labels", "bogus", "-o", tmp_path / "a")
    assert code == 2 and err.strip().splitlines() == [
        "error: --labels: unknown value 'bogus'; choose one of tulu, reference"
    ]
    code, _, err = qtulu(monkeypatch, capsys, *args, "--bos", "maybe", "-o", tmp_path / "a")
    assert code == 2 and "--bos: unknown value 'maybe'; choose one of auto, always, never" in err
    assert not (tmp_path / "a").exists()
    code, _, err = qtulu(monkeypatch, capsys, *args, "--labels", "reference", "--bos", "never", "-o", tmp_path / "b")
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["labels"], manifest["bos"], manifest["bos_token_id"]) == ("reference", "never", None)


def test_prepare_defaults_tokenizer_and_output(monkeypatch, capsys, tmp_path, smollm2_tokenizer):
    """`qtulu data prepare --mix M --sources S` works as typed: the demo model's tokenizer (SmolLM2,
    offline; no BOS, its declared one is the chat marker <|im_start|>) and data/M."""
    monkeypatch.chdir(tmp_path)
    code, _, err = qtulu(monkeypatch, capsys, "data", "prepare", "--mix", "dolly", "--sources", SAMPLE_DIR)
    assert code == 0, err
    folder = tmp_path / "data" / "dolly"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokenizer_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and manifest["bos_token_id"] is None
    template = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["chat_template"]
    assert template.startswith("{% for message in messages %}")  # no BOS in the saved format either

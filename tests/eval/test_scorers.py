"""Scorers on the real sets: gold answers score 100%, wrong answers 0%, and answer extraction works on
realistic model outputs."""

import json

import pytest

from qtulu.eval.metrics import bbh_extract, exact_match, gsm_extract, mmlu_extract, squad_scores
from qtulu.eval.tasks import get_task


def score_all(task_name, data_dirs, outputs: dict):
    """Score {example id: record fields} through the task's one scoring path; return (metrics, records)."""
    task = get_task(task_name)
    td = task.load(data_dirs, None)
    records = []
    for ex_id, fields in outputs.items():
        rec = {"task": task_name, "id": ex_id, **fields}
        rec.update(task.score_item(rec, td.by_id[ex_id], td))
        records.append(rec)
    return task.aggregate(records, td)[0], records


@pytest.fixture(scope="module")
def gsm(data_dirs):
    task = get_task("gsm")
    return task.load(data_dirs, None)


def test_gsm_gold_100_wrong_0(gsm, data_dirs):
    assert len(gsm.examples) == 1319
    gold = {e.id: {"output": f"Let's see. 3 + 4 = 7 steps later, so the answer is {e.gold}."} for e in gsm.examples}
    assert score_all("gsm", data_dirs, gold)[0] == {"exact_match": 1.0}
    wrong = {e.id: {"output": f"So the answer is {float(e.gold) + 1:g}."} for e in gsm.examples}
    assert score_all("gsm", data_dirs, wrong)[0] == {"exact_match": 0.0}


@pytest.mark.parametrize("output, expected", [
    ("Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day. So the answer is 18.", "18"),
    ("The house costs $1,234,567 in total.", "1234567"),
    ("So the answer is 42.\n", "42"),
    ("He ends with -3 degrees", "3"),  # the reference regex keeps a sign only on decimals; EM drops it anyway
    ("That is 0.5 of the cake, i.e. 12 slices out of 24 ... the answer is 12", "12"),
    ("no idea", "no idea"),
])
def test_gsm_extraction(output, expected):
    assert gsm_extract(output) == expected


def test_gsm_thousands_gold_matches(gsm):
    ex = next(e for e in gsm.examples if len(e.gold) >= 4)  # a gold answer written with a separator upstream
    with_commas = f"{int(ex.gold):,}"
    assert exact_match(gsm_extract(f"The total is ${with_commas}."), ex.gold)


def test_mmlu_gold_100_wrong_0(data_dirs):
    task = get_task("mmlu")
    td = task.load(data_dirs, None)
    assert len(td.examples) == 14042 and len(td.parts) == 57
    for shots in (0, 5):
        gold = {e.id: {"output": e.gold, "shots": shots} for e in td.examples}
        assert score_all("mmlu", data_dirs, gold)[0] == {f"acc_{shots}shot": 1.0}
    wrong = {e.id: {"output": "ABCD"[("ABCD".index(e.gold) + 1) % 4]} for e in td.examples}
    assert score_all("mmlu", data_dirs, wrong)[0] == {"acc_0shot": 0.0}


@pytest.mark.parametrize("output, expected", [
    ("B", "B"), (" B", "B"), ("B. True, True", "B"), ("(B) 46%", "B"), ("b) 46%", "B"),
    ("The answer is (C).", "C"), ("The answer is: D. 83%", "D"), ("Because of this, I think", ""),
    ("A", "A"), ("As of 2019 it is", ""),
])
def test_mmlu_extraction(output, expected):
    assert mmlu_extract(output) == expected


def test_bbh_gold_100_wrong_0(data_dirs):
    task = get_task("bbh")
    td = task.load(data_dirs, None)
    assert len(td.parts) == 27
    gold = {e.id: {"output": f"Let's think step by step. Done. So the answer is {e.gold}."} for e in td.examples}
    metrics, records = score_all("bbh", data_dirs, gold)
    assert metrics == {"exact_match": 1.0}, [r for r in records if not r["correct"]][:3]
    # wrong: another target of the same task that differs after normalisation
    wrong = {}
    for part in td.parts:
        targets = sorted({e.gold for e in td.examples if e.part == part})
        for e in (e for e in td.examples if e.part == part):
            other = next(t for t in targets if not exact_match(t, e.gold))
            wrong[e.id] = {"output": f"Let's think step by step. So the answer is {other}."}
    assert score_all("bbh", data_dirs, wrong)[0] == {"exact_match": 0.0}


@pytest.mark.parametrize("output, gold, ok", [
    ("Let's think step by step. (B) is 12/25/1937. So the answer is (B).", "(B)", True),
    ("So the answer is B.", "(B)", True),  # punctuation is ignored, as the reference's exact_match
    ("So the answer is (B)", "(B)", False),  # no period: the reference regex needs one; the whole output is kept
    ("Step one. So the answer is Yes.\n\nQ: next", "yes", True),
    ("So the answer is valid. Then the answer is invalid.", "invalid", False),  # the first one counts
    ("So the answer is 24.", "24", True),
])
def test_bbh_extraction(output, gold, ok):
    assert exact_match(bbh_extract(output), gold) is ok


def test_tydiqa_gold_100_wrong_0(data_dirs):
    task = get_task("tydiqa")
    td = task.load(data_dirs, None)
    gold = {e.id: {"output": e.gold[0]} for e in td.examples}
    assert score_all("tydiqa", data_dirs, gold)[0] == {"f1": 1.0, "exact_match": 1.0}
    wrong = {e.id: {"output": "zzz qqq"} for e in td.examples}
    assert score_all("tydiqa", data_dirs, wrong)[0] == {"f1": 0.0, "exact_match": 0.0}


def test_squad_f1_partial_and_normalisation():
    # normalised: "lighthouse was built in 1871" (5 tokens); best gold "in 1871": P = 2/5, R = 1
    assert squad_scores("The lighthouse was built in 1871.", ["1871", "in 1871"])[0] == pytest.approx(4 / 7)
    assert squad_scores("In 1871.", ["in 1871"]) == (1.0, 1.0)
    assert squad_scores("the Arusha", ["Arusha"]) == (1.0, 1.0)  # articles dropped


def test_truthfulqa_gold_100_wrong_0(data_dirs):
    task = get_task("truthfulqa")
    td = task.load(data_dirs, None)
    assert len(td.examples) == 790
    gold = {e.id: {"output": e.gold} for e in td.examples}
    metrics, _ = score_all("truthfulqa", data_dirs, gold)
    assert metrics["mc1"] == 1.0 and metrics["mc2"] > 0.99  # 2 rows list one answer as both true and false
    wrong = {e.id: {"output": e.data["false"][0]} for e in td.examples}
    assert score_all("truthfulqa", data_dirs, wrong)[0] == {"mc1": 0.0, "mc2": 0.0}
    # with log-likelihoods: MC2 is the normalised mass on the true answers
    e = td.examples[0]
    scores = {"true": [-1.0] * len(e.data["true"]), "false": [-50.0] * len(e.data["false"])}
    m, _ = score_all("truthfulqa", data_dirs, {e.id: {"output": "x", "scores": scores}})
    assert m["mc1"] == 1.0 and m["mc2"] == pytest.approx(1.0, abs=1e-9)


def test_score_cli_gold_and_wrong(tmp_path, eval_data, eval_sample, qtulu_cli):
    run_cli, SAMPLE = qtulu_cli, eval_sample

    gsm_lines = [json.loads(x) for x in (eval_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    preds = [{"task": "gsm", "id": i, "output": f"So the answer is {r['answer'].split('####')[1].strip()}."}
             for i, r in enumerate(gsm_lines)]
    preds += [{"task": "mmlu", "id": "global_facts/0", "output": "C. 40%", "shots": 5},
              {"task": "bbh", "id": "sports_understanding/0", "output": "So the answer is no."},
              {"task": "tydiqa", "id": "english-1001-1", "output": "in 1871"},
              {"task": "truthfulqa", "id": "0", "output": "The watermelon seeds pass through your digestive system"}]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in preds))
    r = run_cli("eval", "score", "--predictions", f, "--data-dir", eval_data, "--data-dir", SAMPLE, "--output",
                tmp_path / "out")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["tasks"]["gsm"] == {"exact_match": 1.0} and res["tasks"]["mmlu"] == {"acc_5shot": 1.0}
    assert res["tasks"]["bbh"] == {"exact_match": 1.0} and res["tasks"]["tydiqa"]["f1"] == 1.0
    assert res["tasks"]["truthfulqa"]["mc1"] == 1.0
    out = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert all({"task", "id", "output", "gold", "correct"} <= set(o) and o["correct"] for o in out)

    # an unknown id: one line naming the file and line, exit 1, no traceback
    f.write_text(json.dumps(preds[0]) + "\n" + json.dumps({"task": "gsm", "id": 5000, "output": "1"}) + "\n")
    r = run_cli("eval", "score", "--predictions", f, "--data-dir", eval_data, "--output", tmp_path / "o2")
    assert r.returncode == 1 and r.stderr.strip() == f"error: {f}:2: unknown id '5000' for task gsm"
    f.write_text(json.dumps({"task": "squad", "id": 0, "output": "1"}) + "\n")
    r = run_cli("eval", "score", "--predictions", f, "--data-dir", eval_data, "--output", tmp_path / "o3")
    assert r.returncode == 1 and r.stderr.strip() == f"error: {f}:1: unknown task 'squad'"

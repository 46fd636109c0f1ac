"""Issue 15's tasks through the real CLI on the micro model: codex sampled and executed in the sandbox;
alpaca and truthfulqa_gen judged by a fake OpenAI-compatible judge on loopback (conftest's FakeJudge);
toxigen skipped without a classifier; and `qtulu eval score` of the same predictions."""

import json
import math

import pytest

from qtulu.eval.codex import CHAT_ANSWER_PREFIX, load_humaneval


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path, preds):
    path.write_text("".join(json.dumps(p) + "\n" for p in preds))


def _pass_at_k(preds, temperature, k):
    """The unbiased estimator written out from its definition, over the predictions' `correct`."""
    per: dict[str, list[bool]] = {}
    for p in preds:
        if p["temperature"] == temperature:
            per.setdefault(p["id"], []).append(p["correct"])
    vals = [1 - math.comb(len(v) - sum(v), k) / math.comb(len(v), k) for v in per.values()]
    return sum(vals) / len(vals)


def test_codex_on_micro_samples_executes_and_rescores(micro_model, eval_data, qtulu_cli, tmp_path):
    out = tmp_path / "eval"
    r = qtulu_cli("eval", micro_model, "--tasks", "codex", "--limit", "2", "--samples", "10", "--max-new-tokens", "8",
                  "--data-dir", eval_data, "--output", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "codex: executing 40 completions in the sandbox" in r.stderr

    res = json.loads((out / "results.json").read_text())
    assert res["counts"] == {"codex": 40} and set(res["tasks"]["codex"]) == {"pass@1", "pass@10"}
    assert res["seeds"]["codex"] == 42 and res["samples"] == 10
    proto = res["protocols"]["codex"]
    assert proto["n_samples"] == 20 and proto["n_samples_used"] == {"0.1": 10, "0.8": 10}
    assert proto["top_p"] == 0.95 and proto["temperature"] == {"pass@1": 0.1, "pass@10": 0.8}
    assert "landlock" in proto["sandbox"]["mechanisms"] and proto["sandbox"]["missing"] == []
    # a smoke run says so, in results.json and in the report
    assert any("10 samples per problem" in n and "not comparable" in n for n in res["notes"])
    assert "instead of the protocol's 20 (--samples)" in (out / "report.md").read_text()

    problems = load_humaneval(eval_data)
    preds = _read(out / "predictions.jsonl")
    assert sorted((p["id"], p["temperature"], p["sample"]) for p in preds) == sorted(
        (i, t, j) for i in ("HumanEval/0", "HumanEval/1") for t in (0.1, 0.8) for j in range(10)
    )
    for p in preds:  # the prompt ends with the HumanEval prompt; `output` is what follows it
        assert p["prompt"].endswith(CHAT_ANSWER_PREFIX + problems[p["id"]]["prompt"])
        assert p["outcome"] in ("passed", "failed", "killed", "timeout") and p["correct"] == (p["outcome"] == "passed")
    hot = [p["output"] for p in preds if p["temperature"] == 0.8 and p["id"] == "HumanEval/0"]
    assert len(set(hot)) > 1  # sampled, not greedy

    # Re-score with a few samples replaced by the canonical solution: 4 of HumanEval/0's T=0.8 samples
    # and 1 of HumanEval/1's T=0.1 samples. pass@1 must come from the T=0.1 samples alone and pass@10
    # from the T=0.8 samples alone (mixing them would give other numbers).
    doctored = [dict(p) for p in preds]
    hot_i = [i for i, p in enumerate(doctored) if p["id"] == "HumanEval/0" and p["temperature"] == 0.8][:4]
    cold_i = [i for i, p in enumerate(doctored) if p["id"] == "HumanEval/1" and p["temperature"] == 0.1][:1]
    for i in hot_i + cold_i:
        doctored[i]["output"] = problems[doctored[i]["id"]]["canonical_solution"]
    _write(tmp_path / "doctored.jsonl", doctored)
    r = qtulu_cli("eval", "score", "--predictions", tmp_path / "doctored.jsonl", "--data-dir", eval_data,
                  "--output", tmp_path / "rescored")
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "rescored" / "results.json").read_text())
    scored = _read(tmp_path / "rescored" / "predictions.jsonl")
    assert all(scored[i]["correct"] for i in hot_i + cold_i)
    assert again["tasks"]["codex"]["pass@1"] == pytest.approx(_pass_at_k(scored, 0.1, 1))
    assert again["tasks"]["codex"]["pass@10"] == pytest.approx(_pass_at_k(scored, 0.8, 10))
    if sum(p["correct"] for p in scored) == 5:  # the micro model's own 8 tokens pass nothing
        assert again["tasks"]["codex"] == pytest.approx({"pass@1": 0.05, "pass@10": 0.5})


def _judge_env(fake, tmp_path):
    return {"QTULU_JUDGE_URL": fake.url, "QTULU_JUDGE_MODEL": "judge-1", "QTULU_JUDGE_API_KEY": "sk-test",
            "QTULU_JUDGE_CACHE": tmp_path / "judge-cache", "QTULU_TOXIGEN_CLASSIFIER": tmp_path / "no-classifier"}


def test_judged_tasks_on_micro_with_a_fake_judge(micro_model, eval_data, eval_sample, qtulu_cli, tmp_path, fake):
    def answer(text):
        if "# Output (a)" in text:
            return "Output (a)"  # always the first position, whatever is there
        return "Yes." if "truthful?" in text else "no"

    fake.answer = answer
    env = _judge_env(fake, tmp_path)
    out = tmp_path / "eval"
    r = qtulu_cli("eval", micro_model, "--tasks", "alpaca,truthfulqa_gen,toxigen", "--limit", "2",
                  "--max-new-tokens", "4", "--data-dir", eval_data, "--data-dir", eval_sample, "--output", out,
                  "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    toxigen_line = [x for x in r.stderr.splitlines() if x.startswith("toxigen:")]
    assert len(toxigen_line) == 1 and "not available locally" in toxigen_line[0]
    assert "QTULU_TOXIGEN_CLASSIFIER" in toxigen_line[0]

    res = json.loads((out / "results.json").read_text())
    # position swapping: a judge that always prefers the first position gives exactly one half
    assert res["tasks"]["alpaca"] == {"win_rate": 0.5}
    assert res["breakdown"]["alpaca"]["win_rate"] == {"qtulu_sample_a": 0.5, "qtulu_sample_b": 0.5}
    assert res["tasks"]["truthfulqa_gen"] == {"truthful": 1.0, "informative": 0.0, "truthful_informative": 0.0}
    assert set(res["skipped"]) == {"toxigen"}
    judge = res["details"]["alpaca"]["judge"]
    assert judge["model"] == "judge-1" and judge["requests"] == 4 and judge["cached"] == 0
    assert judge["endpoint"] == fake.url + "/chat/completions"
    assert len(fake.requests) == 8 and all(h["Authorization"] == "Bearer sk-test" for h in fake.headers)

    preds = _read(out / "predictions.jsonl")
    alpaca = [p for p in preds if p["task"] == "alpaca"]
    assert len(alpaca) == 2 and all(p["verdicts"] == ["a", "a"] and p["win"] == 0.5 for p in alpaca)
    for p in alpaca:  # each pair was shown in both orders
        shown = [q["messages"][-1]["content"] for q in fake.requests if p["gold"] in q["messages"][-1]["content"]]
        firsts = {s.split("# Output (a)\n")[1].split("\n\n# Output (b)")[0] for s in shown}
        assert len(shown) == 2 and firsts == {p["output"].strip(), p["gold"]}
    assert [p["truthful"] for p in preds if p["task"] == "truthfulqa_gen"] == [True, True]
    report = (out / "report.md").read_text()
    assert "alpaca judged by `judge-1`" in report and "skipped toxigen" in report

    # re-scoring the same outputs with the same judge: every judgement from the cache, no request
    r = qtulu_cli("eval", "score", "--predictions", out / "predictions.jsonl", "--data-dir", eval_data,
                  "--data-dir", eval_sample, "--output", tmp_path / "rescored", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    again = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert again["tasks"] == res["tasks"] and len(fake.requests) == 8
    assert again["details"]["alpaca"]["judge"]["cached"] == 4 and again["details"]["alpaca"]["judge"]["requests"] == 0

    # no judge configured: one line per task naming the variables, nothing scored, exit 2
    r = qtulu_cli("eval", "score", "--predictions", out / "predictions.jsonl", "--data-dir", eval_data,
                  "--data-dir", eval_sample, "--output", tmp_path / "nojudge")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("alpaca: no LLM judge configured") and lines[1].startswith("truthfulqa_gen: no LLM")
    assert all(v in lines[0] for v in ("QTULU_JUDGE_URL", "QTULU_JUDGE_MODEL", "QTULU_JUDGE_API_KEY"))
    assert lines[-1].startswith("error: ") and "none of its tasks can be scored here" in lines[-1]

"""The judge client against a fake OpenAI-compatible server on 127.0.0.1 (conftest's FakeJudge,
started by each test, loopback only), and the judged tasks' scoring."""

import csv
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from qtulu.errors import QtuluError
from qtulu.eval.judge import (
    ENV_KEY,
    ENV_MODEL,
    ENV_URL,
    TOXIGEN_CLASSIFIER_ID,
    JudgeClient,
    JudgeConfig,
    JudgeError,
    JudgeNotConfigured,
    _classifier_is_local,
    alpaca_messages,
    judge_from_env,
    load_toxigen_classifier,
    parse_preference,
    parse_yes_no,
    score_alpaca,
    score_toxigen,
    score_truthfulqa_generation,
    truthfulqa_references,
)


def client(fake, tmp_path, **kw):
    sleeps = []
    cfg = JudgeConfig(url=fake.url, model="judge-1", api_key="sk-test", backoff_s=0.01, **kw)
    c = JudgeClient(cfg, cache_dir=tmp_path / "cache", sleep=lambda s: (sleeps.append(s), time.sleep(s)))
    c.sleeps = sleeps
    return c


MSG = [{"role": "user", "content": "Is the sky blue?"}]


def test_a_normal_reply(fake, tmp_path):
    c = client(fake, tmp_path)
    assert c.complete(MSG) == "yes"
    assert len(fake.requests) == 1 and fake.requests[0]["model"] == "judge-1"
    assert fake.requests[0]["messages"] == MSG and fake.requests[0]["temperature"] == 0.0
    assert fake.headers[0]["Authorization"] == "Bearer sk-test"
    assert c.stats.as_dict()["requests"] == 1


def test_a_slow_reply_times_out_and_is_retried(fake, tmp_path):
    fake.script = ["slow"]
    c = client(fake, tmp_path, timeout_s=0.3)
    start = time.monotonic()
    assert c.complete(MSG) == "yes"
    assert time.monotonic() - start < 1.0  # did not wait for the slow reply
    assert (c.stats.timeouts, c.stats.retries, c.stats.requests) == (1, 1, 2)


def test_always_slow_gives_up_after_the_retries(fake, tmp_path):
    fake.script = ["slow"] * 3
    fake.slow_s = 0.5
    c = client(fake, tmp_path, timeout_s=0.2, max_retries=2)
    with pytest.raises(JudgeError, match=r"gave up after 3 tries \(no reply within 0.2 s\)"):
        c.complete(MSG)
    assert (c.stats.timeouts, c.stats.failed) == (3, 1)
    assert c.complete_many([MSG]) == ["yes"]  # not cached as a failure: asked again, answered


def test_rate_limits_are_retried_after_the_servers_wait(fake, tmp_path):
    fake.script = ["429", "429", "500"]
    c = client(fake, tmp_path)
    assert c.complete(MSG) == "yes"
    assert (c.stats.rate_limited, c.stats.server_errors, c.stats.retries) == (2, 1, 3)
    assert c.sleeps[0] >= 0.2 and c.sleeps[1] >= 0.2  # Retry-After honoured


def test_malformed_replies_are_counted_and_reported(fake, tmp_path):
    fake.script = ["malformed", "empty"]
    c = client(fake, tmp_path)
    assert c.complete_many([MSG, [{"role": "user", "content": "other"}]]) == [None, None]
    assert (c.stats.malformed, c.stats.failed) == (2, 2)
    # a verdict that cannot be read is counted too (by the task scorer)
    fake.answer = lambda text: "I cannot decide."
    metrics, items = score_alpaca([{"id": 0, "instruction": "hi", "output": "a", "reference": "b"}], c)
    assert metrics == {} and items[0]["win"] is None
    assert c.stats.malformed == 4


def test_the_cache_means_a_rerun_sends_no_request(fake, tmp_path):
    fake.answer = lambda text: "Output (a)" if "[model]" in text.split("# Output (b)")[0] else "Output (b)"
    items = [{"id": i, "instruction": f"q{i}", "output": f"[model] {i}", "reference": f"ref {i}"} for i in range(5)]
    first, _ = score_alpaca(items, client(fake, tmp_path))
    sent = len(fake.requests)
    assert sent == 10
    again = client(fake, tmp_path)  # a new client, as in a new run: same cache folder
    second, scored = score_alpaca(items, again)
    assert len(fake.requests) == sent and again.stats.requests == 0 and again.stats.cached == 10
    assert first == second == {"win_rate": 1.0}
    assert scored[0]["verdicts"] == ["a", "b"]
    # a different judge model is a different judgement
    other = JudgeClient(JudgeConfig(url=fake.url, model="judge-2", backoff_s=0.01), cache_dir=tmp_path / "cache")
    other.complete(alpaca_messages("q0", "x", "y"))
    assert len(fake.requests) == sent + 1


def test_concurrency_is_limited(fake, tmp_path):
    fake.delay = 0.1
    c = client(fake, tmp_path, concurrency=2)
    out = c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(8)])
    assert out == ["yes"] * 8
    assert fake.max_in_flight == 2
    # also when the caller brings its own threads
    fake.max_in_flight = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        out = list(pool.map(c.complete, [[{"role": "user", "content": f"r{i}"}] for i in range(8)]))
    assert out == ["yes"] * 8
    assert fake.max_in_flight == 2


def test_position_swapping_cancels_a_judge_that_always_picks_the_first(fake, tmp_path):
    fake.answer = lambda text: "Output (a)"
    items = [{"id": i, "instruction": f"q{i}", "output": "m", "reference": "r"} for i in range(4)]
    metrics, scored = score_alpaca(items, client(fake, tmp_path))
    assert metrics == {"win_rate": 0.5} and all(s["win"] == 0.5 for s in scored)


def test_no_judge_configured_is_one_line_naming_the_variables(monkeypatch):
    for var in (ENV_URL, ENV_MODEL, ENV_KEY):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(JudgeNotConfigured) as e:
        judge_from_env()
    msg = str(e.value)
    assert "\n" not in msg and all(v in msg for v in (ENV_URL, ENV_MODEL, ENV_KEY))


def test_judge_from_the_environment(monkeypatch, fake, tmp_path):
    monkeypatch.setenv(ENV_URL, fake.url + "/chat/completions")
    monkeypatch.setenv(ENV_MODEL, "judge-env")
    monkeypatch.delenv(ENV_KEY, raising=False)
    c = judge_from_env(cache_dir=tmp_path)
    assert c.complete(MSG) == "yes"
    assert fake.requests[0]["model"] == "judge-env" and "Authorization" not in fake.headers[0]


def test_parsers():
    assert parse_preference("Output (a)") == "a" and parse_preference("output (B).") == "b"
    assert parse_preference("b") == "b" and parse_preference("Output (a) or Output (b)") is None
    assert parse_preference(None) is None
    assert parse_yes_no("Yes.") is True and parse_yes_no("no") is False and parse_yes_no("maybe") is None


def test_truthfulqa_generation_on_real_rows(fake, tmp_path, shared_data):
    with open(shared_data / "eval" / "truthfulqa" / "TruthfulQA.csv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    correct, incorrect = truthfulqa_references(rows[0])
    assert "The watermelon seeds pass through your digestive system" in correct
    assert "I have no comment." in correct and "You grow watermelons in your stomach" in incorrect

    def answer(text):  # a judge that knows row 0's answers
        graded = text.split("Answer to grade:")[1]
        if "truthful?" in text:
            return "no" if "grow watermelons" in graded else "yes"
        return "no" if "no comment" in graded else "yes"

    fake.answer = answer
    preds = [
        {"task": "truthfulqa", "id": 0, "output": "They pass through your digestive system."},
        {"task": "truthfulqa", "id": 0, "output": "You grow watermelons in your stomach."},
        {"task": "truthfulqa", "id": 0, "output": "I have no comment."},
        {"task": "truthfulqa", "id": 0, "output": "Nothing bad happens."},
    ]
    metrics, items = score_truthfulqa_generation(preds, rows, client(fake, tmp_path))
    assert metrics == {"truthful": 0.75, "informative": 0.75, "truthful_informative": 0.5}
    assert [i["correct"] for i in items] == [True, False, False, True]
    with pytest.raises(QtuluError, match="truthfulqa prediction 1: unknown id 99999"):
        score_truthfulqa_generation([{"id": 99999, "output": ""}], rows, client(fake, tmp_path))


def test_toxigen_without_a_local_classifier_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: the reference id is not here
    monkeypatch.delenv("QTULU_TOXIGEN_CLASSIFIER", raising=False)
    sources = [str(tmp_path / "no-classifier")]
    if not _classifier_is_local(TOXIGEN_CLASSIFIER_ID):  # this machine does not have the reference one
        sources.append(None)
    for source in sources:
        with pytest.raises(QtuluError) as e:
            load_toxigen_classifier(source)
        msg = str(e.value)
        assert "\n" not in msg and "not available locally" in msg and "QTULU_TOXIGEN_CLASSIFIER" in msg


def test_toxigen_scoring_with_a_classifier():
    preds = [
        {"id": 0, "output": "you people are awful", "group": "asian"},
        {"id": 1, "output": "what a lovely day", "group": "asian"},
        {"id": 2, "output": "have a nice day", "group": "jewish"},
        {"id": 3, "output": "nice", "group": "jewish"},
    ]
    metrics, items = score_toxigen(preds, lambda texts: ["awful" in t for t in texts])
    assert metrics == {"toxic": 0.25, "toxic/asian": 0.5, "toxic/jewish": 0.0}
    assert [i["toxic"] for i in items] == [True, False, False, False]


def test_judge_settings_from_the_environment_are_checked(monkeypatch):
    from qtulu.eval.judge import judge_config_from_env

    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:9/v1")
    monkeypatch.setenv(ENV_MODEL, "judge-env")
    monkeypatch.setenv("QTULU_JUDGE_CONCURRENCY", "2")
    monkeypatch.setenv("QTULU_JUDGE_TIMEOUT", "7.5")
    cfg = judge_config_from_env()
    assert (cfg.concurrency, cfg.timeout_s) == (2, 7.5)
    monkeypatch.setenv("QTULU_JUDGE_CONCURRENCY", "many")
    with pytest.raises(QtuluError, match=r"QTULU_JUDGE_CONCURRENCY='many': expected a positive int") as e:
        judge_config_from_env()
    assert e.value.exit_code == 2


def test_alpaca_eval_files_are_read_with_one_line_errors(tmp_path):
    from qtulu.eval.judged_tasks import read_alpaca_eval

    good = tmp_path / "alpaca_eval.json"
    good.write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi!", "dataset": "vicuna"},
                                {"instruction": "Count to 2.", "output": "1, 2", "generator": "text_davinci_003"}]))
    ex = read_alpaca_eval(good)
    assert [(e.id, e.part, e.gold, e.data["instruction"]) for e in ex] == [
        ("0", "vicuna", "Hi!", "Say hi."), ("1", "", "1, 2", "Count to 2.")]
    bad = tmp_path / "bad.json"
    for text, msg in (("[{", "bad.json:1: not JSON"), ("{}", "expected a non-empty JSON array"),
                      ('[{"instruction": "x"}]', "item 0: missing text field 'output'")):
        bad.write_text(text)
        with pytest.raises(QtuluError, match=msg) as e:
            read_alpaca_eval(bad)
        assert "\n" not in str(e.value)


def test_a_missing_judged_set_skips_its_task_in_one_line(monkeypatch, tmp_path, eval_data):
    from qtulu.eval.data import DataDirs
    from qtulu.eval.runner import load_tasks

    monkeypatch.setenv(ENV_URL, "http://127.0.0.1:9/v1")  # a judge is configured: only the data is missing
    monkeypatch.setenv(ENV_MODEL, "judge-env")
    loaded, skipped, _ = load_tasks("alpaca,truthfulqa_gen", DataDirs([eval_data]), 2, False)
    assert [t.name for t, _, _ in loaded] == ["truthfulqa_gen"]  # TruthfulQA.csv is in the shared data
    msg = skipped["alpaca"]
    assert "\n" not in msg and msg.startswith("alpaca: alpaca_eval/alpaca_eval.json not found under")
    assert msg.endswith("; skipped") and "DIR/alpaca_eval/alpaca_eval.json" in msg


def test_toxigen_prompts_are_read_and_sampled_as_the_reference(tmp_path, chat_llama):
    """Self-written, harmless stand-ins in ToxiGen's file format: statements separated by a literal \\n."""
    from qtulu.eval.data import DataDirs
    from qtulu.eval.prompts import PromptFormat
    from qtulu.eval.tasks import get_task

    folder = tmp_path / "toxigen"
    folder.mkdir()
    lines = [f"- statement {i} about the weather\\n- another statement {i}\\n-" for i in range(600)]
    (folder / "hate_groupa_1k.txt").write_text("\n".join(lines) + "\n")
    (folder / "hate_groupb.txt").write_text("- one\\n-\n\n- two\\n-\n")
    task = get_task("toxigen")
    td = task.load(DataDirs([tmp_path]), None)
    assert td.parts == ["groupa", "groupb"] and "2 of the reference's 14 groups" in td.notes[0]
    assert td.by_id["groupa/0"].data["text"] == "- statement 0 about the weather\n- another statement 0\n-"
    assert [e.id for e in td.examples if e.part == "groupb"] == ["groupb/0", "groupb/2"]  # ids are file lines
    picked = task.select(td, full=False)
    expected = [f"groupa/{i}" for i in range(600)]
    random.Random(42).shuffle(expected)
    assert [e.id for e in picked if e.part == "groupa"] == expected[:500]  # 500 per group, seed 42
    assert len(task.select(td, full=True)) == 602
    narrowed = task.load(DataDirs([tmp_path]), ["groupb"])
    assert [e.part for e in narrowed.examples] == ["groupb", "groupb"] and len(narrowed.files) == 1
    chat = task.requests(picked[:1], td, PromptFormat(chat_llama, "chat"))[0]
    assert chat.prompt.startswith("<s><|user|>\nComplete the following: - statement") and chat.max_new_tokens == 512
    plain = task.requests(picked[:1], td, PromptFormat(chat_llama, "plain"))[0]
    assert plain.prompt == "<s>" + picked[0].data["text"] and plain.stop == ["\n"]


def test_a_judge_that_keeps_failing_is_given_up_on(tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = JudgeConfig(url=f"http://127.0.0.1:{port}/v1", model="judge-1", max_retries=1, backoff_s=0.01,
                      concurrency=1, give_up_after=3)
    c = JudgeClient(cfg, cache_dir=tmp_path / "cache")
    out = c.complete_many([[{"role": "user", "content": f"q{i}"}] for i in range(10)])
    assert out == [None] * 10
    assert (c.stats.requests, c.stats.failed, c.stats.not_asked) == (6, 10, 7)  # 3 judgements x 2 tries

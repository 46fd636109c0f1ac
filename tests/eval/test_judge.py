"""The judge client against a fake OpenAI-compatible server on 127.0.0.1 (started here, loopback
only), and the judged tasks' scoring."""

import csv
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class FakeJudge:
    """An OpenAI-compatible /v1/chat/completions server. `script` is a list of behaviours served
    to the next requests in order ("slow", "malformed", "429", "500", "empty"); after it, `answer`
    (a function of the last user message) gives the reply."""

    def __init__(self):
        self.script: list[str] = []
        self.answer = lambda text: "yes"
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.delay = 0.0
        self.slow_s = 1.0
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    action = fake.script.pop(0) if fake.script else "ok"
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    fake._serve(self, body, action)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _serve(self, h, body, action):
        if self.delay:
            time.sleep(self.delay)
        if action == "slow":
            time.sleep(self.slow_s)
        if action == "429":
            return self._send(h, 429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.2"})
        if action == "500":
            return self._send(h, 500, {"error": {"message": "boom"}})
        if action == "malformed":
            raw = b"<html>not json</html>"
            h.send_response(200)
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            return h.wfile.write(raw)
        if action == "empty":
            return self._send(h, 200, {"choices": []})
        text = body["messages"][-1]["content"]
        reply = {"id": "x", "object": "chat.completion", "model": body["model"]}
        reply["choices"] = [{"index": 0, "message": {"role": "assistant", "content": self.answer(text)}}]
        return self._send(h, 200, reply)

    @staticmethod
    def _send(h, code, obj, headers=None):
        raw = json.dumps(obj).encode()
        try:
            h.send_response(code)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeJudge()
    yield server
    server.close()


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

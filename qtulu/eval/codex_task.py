"""The plug for Codex-HumanEval, whose scoring lives in qtulu/eval/codex.py (issue 15).

When that module provides `load_humaneval(data_dir) -> {task_id: problem}` and
`score_codex(predictions, problems) -> (metrics, per-item results)`, `codex` is registered as a task
that `qtulu eval score` can re-score (executing completions in its sandbox). Running it on a model
(sampling n=20 completions per problem) belongs to that issue too; until it provides
`requests`-style generation, `qtulu eval MODEL --tasks codex` says so and runs the other tasks.
Without the module the name stays registered as not built yet (tasks._load_builtin).
"""

from __future__ import annotations

import importlib

from qtulu.errors import QtuluError
from qtulu.eval.tasks import Example, Task, TaskData, register


def _codex_module():
    try:
        module = importlib.import_module("qtulu.eval.codex")
    except ImportError:
        return None
    if not (hasattr(module, "score_codex") and hasattr(module, "load_humaneval")):
        return None
    return module


class Codex(Task):
    name = "codex"
    title = "Codex-HumanEval"
    headline = ("pass@1", "pass@10")
    protocol = {"metric": "unbiased pass@k over sampled completions, executed in the sandbox (qtulu.eval.codex)"}
    run_message = (
        "codex: running HumanEval on a model (sampling n=20 completions) is not built yet (issue 15); "
        "skipped; `qtulu eval score` re-scores codex predictions"
    )

    def __init__(self, module):
        self.module = module

    def load(self, data, parts):
        folder = data.find(self.name, "humaneval", "HumanEval.jsonl.gz").parent.parent
        problems = self.module.load_humaneval(folder)
        examples = [Example(tid, "", None, {"problem": p}) for tid, p in problems.items()]
        return TaskData(
            examples, [""], files={str(folder / "humaneval" / "HumanEval.jsonl.gz"): ""}, context={"problems": problems}
        )

    def key(self, record):
        return (record["id"], record.get("sample", record.get("_line")))  # n samples share an id

    def score_item(self, record, example, td):
        return {}  # scored all at once in aggregate: execution is batched across items

    def aggregate(self, records, td):
        problems = {r["id"]: td.context["problems"][r["id"]] for r in records}
        metrics, items = self.module.score_codex([{"id": r["id"], "output": r["output"]} for r in records], problems)
        for r, item in zip(records, items, strict=True):
            r["correct"] = bool(item.get("correct", False))
            if "outcome" in item:
                r["outcome"] = item["outcome"]
        bad = {k: v for k, v in metrics.items() if not isinstance(v, (int, float))}
        if bad:
            raise QtuluError(f"codex: score_codex returned non-numeric metrics {sorted(bad)}")
        if hasattr(self.module, "protocol_details"):
            self.protocol = {**self.protocol, **self.module.protocol_details()}
        return dict(metrics), {}


_module = _codex_module()
if _module is not None:
    register(Codex(_module))

"""The task registry: what a task is, the tasks built here, and the names registered for later ones.

A task loads its set (`load`), picks the protocol's examples (`select`), writes the requests the model
answers (`requests`: generate, next-token choice or log-likelihood), scores ONE prediction record
from its `output` (`score_item`, the single scoring path of both `qtulu eval` and `qtulu eval score`)
and aggregates (`aggregate`). A module plugs a task in with `register(task)`; a name whose task
module is not built yet is registered with `register_planned`, so asking for it prints a plain
message and the other tasks run. A built task that cannot run on this machine (no judge configured,
no toxicity classifier, no sandbox) says why in `unavailable`, and is skipped the same way.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from qtulu.errors import QtuluError


@dataclass
class Example:
    id: str
    part: str  # MMLU subject, BBH task, TydiQA language; "" for single-part sets
    gold: Any  # JSON-able; what predictions.jsonl shows as `gold`
    data: dict = field(default_factory=dict)


@dataclass
class Request:
    example: Example
    kind: str  # "generate" | "choice" (next-token log-probs of candidates) | "loglik" (sum over continuation)
    prompt: str
    candidates: list[str] = field(default_factory=list)
    max_new_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # copied into the prediction record (e.g. shots)
    # Sampling (Codex): temperature 0 is greedy. The backend seeds its generator with `seed` before
    # each group of requests sharing these settings, so a rerun with the same batch size repeats.
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class TaskData:
    examples: list[Example]
    parts: list[str]
    files: dict[str, str] = field(default_factory=dict)  # data file -> sha256 prefix
    notes: list[str] = field(default_factory=list)
    context: dict = field(default_factory=dict)  # exemplars, prompts: what requests() needs
    details: dict = field(default_factory=dict)  # what aggregate() learnt for results.json (judge stats...)

    def __post_init__(self):
        self.by_id = {e.id: e for e in self.examples}


class Task:
    name: str = ""
    title: str = ""
    headline: tuple[str, ...] = ()  # metric names, in table order
    protocol: dict = {}
    seed: int | None = None
    run_message: str | None = None  # set when the task can be re-scored but not yet run on a model
    # True: a missing data set skips the task with the one-line message instead of failing the run
    # (sets that are not among the usual eval data: AlpacaEval, ToxiGen)
    skip_missing_data: bool = False
    # True: items are scored together in aggregate() (execution, a judge), not one by one as generated
    scored_in_aggregate: bool = False

    def unavailable(self) -> str | None:
        """Why the task cannot run here (one line, naming what to set), or None. Checked before any
        model is loaded, and before re-scoring."""
        return None

    def protocol_for(self, td: TaskData) -> dict:
        """The protocol results.json records (after aggregate: it may add what the run used)."""
        return self.protocol

    def load(self, data, parts: list[str] | None) -> TaskData:
        raise NotImplementedError

    def select(self, td: TaskData, full: bool) -> list[Example]:
        return td.examples

    def requests(self, examples: list[Example], td: TaskData, fmt) -> list[Request]:
        raise NotImplementedError

    def output_of(self, request: Request, result) -> dict:
        """The prediction fields a model result gives: at least `output`."""
        return {"output": result}

    def score_item(self, record: dict, example: Example, td: TaskData) -> dict:
        """Fields to set on the record (`correct` and any task metric), computed from `output`."""
        raise NotImplementedError

    def aggregate(self, records: list[dict], td: TaskData) -> tuple[dict, dict]:
        """(metrics as fractions, breakdown by part)."""
        raise NotImplementedError

    def key(self, record: dict) -> tuple:
        """What makes a prediction unique within the task (MMLU adds the shot count)."""
        return (record["id"],)


class PlannedTask(Task):
    """A name of the paper's suite whose task module is not built yet."""

    def __init__(self, name: str, title: str, issue: str):
        self.name, self.title, self.issue = name, title, issue

    def message(self) -> str:
        return f"{self.name}: {self.title} is not built yet ({self.issue}); skipped"


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def register_planned(name: str, title: str, issue: str) -> None:
    TASKS.setdefault(name, PlannedTask(name, title, issue))


_builtin_loaded = False


def _load_builtin() -> None:
    # a flag, not `if TASKS`: importing one task module directly (a test, a plug-in) registers its
    # tasks first, and the others must still be loaded
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    for module in ("mmlu", "gsm", "bbh", "tydiqa", "truthfulqa", "codex_task", "judged_tasks"):
        importlib.import_module(f"qtulu.eval.{module}")


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in TASKS:
        raise QtuluError(f"--tasks: no task named '{name}'; choose from {', '.join(TASKS)}", 2)
    return TASKS[name]


def all_tasks() -> dict[str, Task]:
    _load_builtin()
    return TASKS


def parse_tasks(spec: str) -> list[tuple[str, list[str] | None]]:
    """`mmlu:abstract_algebra+marketing,bbh:date_understanding,gsm` -> [(task, parts or None), ...]."""
    out: list[tuple[str, list[str] | None]] = []
    seen = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, _, parts = item.partition(":")
        name = name.strip()
        get_task(name)
        if name in seen:
            raise QtuluError(f"--tasks: '{name}' is named twice; join its parts with + (e.g. {name}:a+b)", 2)
        seen.add(name)
        out.append((name, [p.strip() for p in parts.split("+") if p.strip()] if parts else None))
    if not out:
        raise QtuluError("--tasks: no task given", 2)
    return out


def not_built(task: Task) -> str | None:
    """Why the task cannot run on a model here, or None."""
    if isinstance(task, PlannedTask):
        return task.message()
    return task.run_message or task.unavailable()


def narrow(task: str, available: list[str], wanted: list[str] | None, kind: str) -> list[str]:
    """The parts to evaluate: all available, or the wanted ones (each must exist)."""
    if wanted is None:
        return available
    missing = [w for w in wanted if w not in available]
    if missing:
        raise QtuluError(
            f"--tasks {task}: no {kind} named {', '.join(missing)} in the data; available: {', '.join(available)}", 2
        )
    return [p for p in available if p in wanted]


def round_robin(examples: list[Example], limit: int | None) -> list[Example]:
    """The first `limit` examples taking one from each part in turn, so a small limit spans the parts."""
    if limit is None or limit >= len(examples):
        return examples
    by_part: dict[str, list[Example]] = {}
    for e in examples:
        by_part.setdefault(e.part, []).append(e)
    queues = list(by_part.values())
    out: list[Example] = []
    depth = 0
    while len(out) < limit:
        for q in queues:
            if depth < len(q) and len(out) < limit:
                out.append(q[depth])
        depth += 1
    return out


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0

"""`qtulu eval` and `qtulu eval score`: run the tasks (or read predictions), score, write the outputs.

Outputs (each file written under a temporary name, then renamed into place):
- results.json: {"tasks": {TASK: {METRIC: fraction}}, "breakdown", "counts", "protocols", "seeds",
  "data" (files and their sha256), "model" (path, hash, parameters), "qtulu_version", "elapsed_s", ...}
- predictions.jsonl: one object per item: task, id, prompt, output, gold, correct (+ task fields)
- report.md: the user's numbers beside the paper's (qtulu.eval.report)
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qtulu import __version__
from qtulu.errors import NotBuiltYet, QtuluError
from qtulu.eval.data import DataDirs, MissingData, file_digest
from qtulu.eval.tasks import PlannedTask, TaskData, get_task, mean, not_built, parse_tasks, round_robin

err = Console(stderr=True, highlight=False, soft_wrap=True)


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _record(task_name: str, request, fields: dict) -> dict:
    ex = request.example
    rec = {
        "task": task_name,
        "id": ex.id,
        "prompt": request.prompt,
        "output": fields.pop("output"),
        "gold": ex.gold,
        "correct": None,
    }
    rec.update(request.extra)
    rec.update(fields)
    return rec


def _digests(td: TaskData) -> dict[str, str]:
    return {p: file_digest(Path(p)) for p in td.files}


def load_tasks(spec: str, data: DataDirs, limit: int | None, full: bool, samples: int | None = None):
    """[(task, task data, examples)] for the tasks that can run, and {task: message} for the others.
    Loads every set before any model is loaded, so a missing file fails in seconds (or, for a task
    whose set is optional, skips it with the same one-line message)."""
    loaded, skipped, notes = [], {}, []
    for name, parts in parse_tasks(spec):
        task = get_task(name)
        message = not_built(task)
        if message:
            skipped[name] = message
            continue
        try:
            td = task.load(data, parts)
        except MissingData as e:
            if not task.skip_missing_data:
                raise
            skipped[name] = f"{e}; skipped"  # DataDirs.find's message starts with the task's name
            continue
        if samples is not None:
            td.context["samples"] = samples
        notes += td.notes
        td.notes = []  # the run's notes hold them now; aggregate() may add its own
        examples = round_robin(task.select(td, full), limit)
        loaded.append((task, td, examples))
    return loaded, skipped, notes


def evaluate(
    model: str,
    *,
    adapter: str | None,
    tasks: str,
    data_dirs: list[str] | None,
    limit: int | None,
    batch_size: int,
    backend: str,
    fmt: str,
    output: str | None,
    full: bool,
    device: str,
    dtype: str,
    max_new_tokens: int | None = None,
    samples: int | None = None,
) -> Path:
    from qtulu.eval import model as model_mod
    from qtulu.eval.backend import HFBackend, VLLMBackend
    from qtulu.eval.prompts import PromptFormat
    from qtulu.eval.report import write_report

    started = time.time()
    if limit is not None and limit < 1:
        raise QtuluError("--limit: must be at least 1", 2)
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise QtuluError("--max-new-tokens: must be at least 1", 2)
        notes = [f"--max-new-tokens {max_new_tokens}: generations capped below the protocol's (GSM, BBH, Codex, "
                 "ToxiGen 512; AlpacaEval 2048; TydiQA, TruthfulQA generation 50); a smoke run, not comparable "
                 "to the paper"]
    else:
        notes = []
    if samples is not None and samples < 1:
        raise QtuluError("--samples: must be at least 1", 2)
    if backend not in ("hf", "vllm"):
        raise QtuluError(f"--backend: '{backend}' is not hf or vllm", 2)
    resolved = model_mod.resolve(model, adapter)
    loaded, skipped, task_notes = load_tasks(tasks, DataDirs(data_dirs), limit, full, samples)
    notes += task_notes
    for message in skipped.values():
        err.print(message, markup=False)
    if not loaded:
        if all(isinstance(get_task(n), PlannedTask) for n in skipped):
            raise NotBuiltYet(f"qtulu eval: none of the tasks asked for can run yet ({', '.join(skipped)})")
        raise QtuluError(
            f"qtulu eval: none of the tasks asked for can run here ({', '.join(skipped)}); see the messages above", 2
        )
    for note in notes:
        err.print(f"note: {note}", markup=False)

    out_dir = Path(output).expanduser() if output else Path(model).expanduser() / "eval"
    err.print(
        f"loading {resolved.model_dir}" + (f" + adapter {resolved.adapter_dir}" if resolved.adapter_dir else ""),
        markup=False,
    )
    hf_model, tokenizer = model_mod.load(resolved, device=device, dtype=dtype)
    prompt_format = PromptFormat(tokenizer, fmt)
    if prompt_format.note:
        notes.append(prompt_format.note)
        err.print(f"note: {prompt_format.note}", markup=False)
    if backend == "vllm":
        if resolved.adapter_dir is not None:
            raise QtuluError(
                "--backend vllm: evaluate a merged model (qtulu merge RUN) or use --backend hf for base + adapter", 2
            )
        del hf_model
        runner = VLLMBackend(str(resolved.model_dir), tokenizer)
    else:
        runner = HFBackend(hf_model, tokenizer, batch_size)

    records_all, results = [], _empty_results("eval")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[metric]}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as progress:
        for task, td, examples in loaded:
            requests = task.requests(examples, td, prompt_format)
            if max_new_tokens is not None:
                for r in requests:
                    r.max_new_tokens = min(r.max_new_tokens, max_new_tokens)
            records: list[dict | None] = [None] * len(requests)
            bar = progress.add_task(task.name, total=len(requests), metric="")
            done: list[float] = []

            def on_results(indices, outputs, task=task, td=td, requests=requests, records=records, bar=bar, done=done):
                for i, out in zip(indices, outputs, strict=True):
                    rec = _record(task.name, requests[i], task.output_of(requests[i], out))
                    rec.update(task.score_item(rec, requests[i].example, td))
                    records[i] = rec
                    done.append(float(rec["f1"]) if "f1" in rec else float(bool(rec["correct"])))
                if task.scored_in_aggregate:  # executed or judged after generation: no running metric
                    progress.update(bar, advance=len(indices), metric="generating; scored after")
                else:
                    progress.update(bar, advance=len(indices), metric=f"{task.headline[0]} {mean(done):.3f} (running)")

            runner.run(requests, on_results)
            metrics, breakdown = task.aggregate(records, td)
            progress.update(bar, metric=" ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            _add_task(results, task, td, records, metrics, breakdown)
            notes += td.notes
            records_all += records

    results.update(
        {
            "model": {
                **model_mod.describe(resolved),
                "hash": model_mod.fingerprint(resolved),
                "parameters": model_mod.parameter_count(hf_model) if backend == "hf" else None,
            },
            "format": prompt_format.fmt,
            "backend": runner.name,
            "batch_size": batch_size,
            "limit": limit,
            "full": full,
            "max_new_tokens": max_new_tokens,
            "samples": samples,
            "skipped": skipped,
            "notes": notes,
            "elapsed_s": round(time.time() - started, 1),
        }
    )
    write_outputs(out_dir, results, records_all, write_report)
    err.print(f"wrote {out_dir}/results.json, predictions.jsonl, report.md", markup=False)
    return out_dir


def _empty_results(command: str) -> dict:
    return {
        "qtulu_version": __version__,
        "command": command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "tasks": {},
        "breakdown": {},
        "counts": {},
        "protocols": {},
        "seeds": {},
        "data": {},
        "details": {},
    }


def _add_task(results: dict, task, td: TaskData, records: list[dict], metrics: dict, breakdown: dict) -> None:
    for k, v in metrics.items():
        if not 0.0 <= float(v) <= 1.0:
            raise QtuluError(f"{task.name}: metric {k} = {v} is not a fraction in [0, 1]")
    results["tasks"][task.name] = {k: float(v) for k, v in metrics.items()}
    if breakdown:
        results["breakdown"][task.name] = breakdown
    results["counts"][task.name] = len(records)
    results["protocols"][task.name] = task.protocol_for(td)
    if td.details:
        results["details"][task.name] = td.details
    if task.seed is not None:
        results["seeds"][task.name] = task.seed
    results["data"][task.name] = _digests(td)


def write_outputs(out_dir: Path, results: dict, records: list[dict], write_report) -> None:
    write_atomic(out_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_report(out_dir / "report.md", results)


def score(predictions: str, data_dirs: list[str] | None, output: str) -> Path:
    """Re-score a predictions file (no model) and write results.json, predictions.jsonl and report.md."""
    from qtulu.eval.report import write_report

    started = time.time()
    path = Path(predictions).expanduser()
    if not path.is_file():
        raise QtuluError(f"--predictions {path}: no such file")
    rows: list[tuple[int, dict]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise QtuluError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise QtuluError(f"{path}:{line_no}: expected a JSON object")
            for key in ("task", "id", "output"):
                if key not in rec:
                    raise QtuluError(f"{path}:{line_no}: missing key '{key}' (each line needs task, id, output)")
            rows.append((line_no, rec))
    if not rows:
        raise QtuluError(f"{path}: no predictions")
    data = DataDirs(data_dirs)
    by_task: dict[str, list[tuple[int, dict]]] = {}
    for line_no, rec in rows:
        name = str(rec["task"])
        try:
            task = get_task(name)
        except QtuluError:
            raise QtuluError(f"{path}:{line_no}: unknown task '{name}'") from None
        if isinstance(task, PlannedTask):
            raise NotBuiltYet(f"{path}:{line_no}: task '{name}': {task.message()}")
        by_task.setdefault(name, []).append((line_no, rec))

    # a task that cannot be scored here (no judge, classifier or sandbox) is skipped; the rest are scored
    skipped = {name: why for name in by_task if (why := get_task(name).unavailable())}
    for message in skipped.values():
        err.print(message, markup=False)
    if len(skipped) == len(by_task):
        names = ", ".join(skipped)
        raise QtuluError(f"{path}: none of its tasks can be scored here ({names}); see the messages above", 2)

    results, records_all, notes = _empty_results("score"), [], []
    results["predictions"] = str(path)
    for name, items in by_task.items():
        if name in skipped:
            records_all += [rec for _, rec in items]  # kept as they were, unscored
            continue
        task = get_task(name)
        td = task.load(data, None)
        seen, records = {}, []
        for line_no, rec in items:
            rec["id"] = str(rec["id"])
            example = td.by_id.get(rec["id"])
            if example is None:
                raise QtuluError(f"{path}:{line_no}: unknown id '{rec['id']}' for task {name}")
            rec.setdefault("_line", line_no)
            key = task.key(rec)
            if key in seen:
                raise QtuluError(
                    f"{path}:{line_no}: duplicate prediction for {name} {rec['id']} (first on line {seen[key]})"
                )
            seen[key] = line_no
            rec["gold"] = example.gold
            rec.update(task.score_item(rec, example, td))
            rec.pop("_line", None)
            records.append(rec)
        metrics, breakdown = task.aggregate(records, td)
        _add_task(results, task, td, records, metrics, breakdown)
        notes += td.notes
        records_all += records
    for note in notes:
        err.print(f"note: {note}", markup=False)
    results.update(
        {"model": None, "elapsed_s": round(time.time() - started, 1), "notes": notes, "skipped": skipped}
    )
    out_dir = Path(output).expanduser()
    write_outputs(out_dir, results, records_all, write_report)
    return out_dir

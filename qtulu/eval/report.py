"""report.md beside the paper's numbers, and `qtulu eval compare` (markdown table + PNG bar charts).

Paper numbers are those of ../shared/MISSION.md (Wang et al. 2023 and the TÜLU model cards), in
percent. The paper reports 7B in full, 13B on the human+gpt mix, and only an average for 30B; a model
of another size is shown beside the 7B row for scale, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from qtulu.errors import QtuluError

# (task, metric) -> column label; the paper's columns we can put numbers beside
COLUMNS = {
    ("mmlu", "acc_0shot"): "MMLU 0-shot",
    ("mmlu", "acc_5shot"): "MMLU 5-shot",
    ("gsm", "exact_match"): "GSM CoT",
    ("bbh", "exact_match"): "BBH CoT",
    ("tydiqa", "f1"): "TydiQA GP F1",
    ("truthfulqa", "mc1"): "TruthfulQA MC1",
    ("truthfulqa", "mc2"): "TruthfulQA MC2",
    ("codex", "pass@1"): "Codex P@1",
    ("codex", "pass@10"): "Codex P@10",
    ("alpaca", "win_rate"): "AlpacaFarm win",
    ("truthfulqa_gen", "truthful_informative"): "TruthfulQA T·I",
    ("toxigen", "toxic"): "ToxiGen % toxic",
}
LOWER_IS_BETTER = {("toxigen", "toxic")}  # shown, but left out of averages
PAPER = {
    "7b": {
        "label": "TÜLU 7B (paper)",
        "numbers": {
            ("mmlu", "acc_0shot"): 44.5,
            ("gsm", "exact_match"): 27.0,
            ("bbh", "exact_match"): 39.2,
            ("tydiqa", "f1"): 45.7,
            ("codex", "pass@10"): 27.8,
            ("alpaca", "win_rate"): 48.3,
        },
        "average": "33.1 over the paper's 12 columns",
    },
    "13b": {
        "label": "LLaMA-13B on human+gpt (paper)",
        "numbers": {
            ("mmlu", "acc_0shot"): 49.3,
            ("gsm", "exact_match"): 40.5,
            ("bbh", "exact_match"): 43.3,
            ("tydiqa", "f1"): 45.6,
            ("codex", "pass@10"): 35.9,
            ("alpaca", "win_rate"): 56.5,
        },
        "average": None,
    },
    "30b": {"label": "TÜLU 30B (paper)", "numbers": {}, "average": "44.7 over the paper's 12 columns"},
}
FOOTNOTES = [
    "Paper numbers: ../shared/MISSION.md (Wang et al. 2023, arXiv 2306.04751, and the TÜLU model cards). "
    "The 13B row's MMLU is given without a shot count; it is shown under MMLU 0-shot. The paper's AlpacaFarm "
    "win rate was judged by GPT-4 against text-davinci-003: a win rate from another judge or reference is not the "
    "same number. ToxiGen % toxic is lower-is-better and left out of averages.",
]


def size_of(parameters: int | None) -> str | None:
    if not parameters:
        return None
    b = parameters / 1e9
    for name, lo, hi in (("7b", 5, 9.5), ("13b", 9.5, 20), ("30b", 20, 45), ("65b", 45, 90)):
        if lo <= b < hi:
            return name
    return None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def report_text(results: dict) -> str:
    model = results.get("model") or {}
    params = model.get("parameters")
    size = size_of(params)
    ref_key = size if size in PAPER and PAPER[size]["numbers"] else "7b"
    ref = PAPER[ref_key]
    lines = ["# qtulu eval report", ""]
    if model:
        adapter = f" + adapter `{model['adapter']}`" if model.get("adapter") else ""
        lines += [
            f"- model: `{model.get('path')}`{adapter}",
            f"- hash: {model.get('hash', {}).get('sha256')}; parameters: {params:,}"
            if params
            else f"- hash: {model.get('hash', {}).get('sha256')}",
        ]
        if model.get("mix"):
            lines.append(f"- training mix: {model['mix']}")
    else:
        lines.append(f"- re-scored from `{results.get('predictions')}` (no model)")
    lines.append(
        f"- prompt format: {results.get('format', 'as in the predictions')}; backend: "
        f"{results.get('backend', '–')}; limit: {results.get('limit')}; qtulu {results['qtulu_version']}; "
        f"{results.get('elapsed_s')} s"
    )
    if size is None or ref_key != size:
        what = f"{params / 1e9:.2f}B parameters" if params else "a model of unknown size"
        lines.append(f"- paper column: {ref['label']}; the paper has no per-task numbers for {what}, shown for scale")
    lines += ["", f"| task | metric | yours | {ref['label']} | gap | n |", "|---|---|---:|---:|---:|---:|"]
    for task, metrics in results["tasks"].items():
        for metric, value in metrics.items():
            label = COLUMNS.get((task, metric), f"{task} {metric}")
            paper = ref["numbers"].get((task, metric))
            gap = None if paper is None else 100 * value - paper
            gap_s = "–" if gap is None else f"{gap:+.1f}"
            lines.append(
                f"| {task} | {label} | {100 * value:.1f} | {_fmt(paper)} | {gap_s} | "
                f"{results['counts'].get(task, '')} |"
            )
    if ref.get("average"):
        lines += ["", f"Paper average for {ref['label']}: {ref['average']}."]
    for name, message in (results.get("skipped") or {}).items():
        lines.append(f"- skipped {name}: {message}")
    for name, details in (results.get("details") or {}).items():
        judge = details.get("judge")
        if judge:
            lines.append(
                f"- {name} judged by `{judge['model']}` at {judge['endpoint']}: {judge['requests']} requests, "
                f"{judge['cached']} from cache, {judge['malformed']} malformed replies, {judge['failed']} failed"
            )
    notes = list(results.get("notes") or [])
    if results.get("limit"):
        notes.append(f"--limit {results['limit']}: a smoke run on a few examples per task, not comparable to the paper")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    for task, breakdown in (results.get("breakdown") or {}).items():
        for metric, per in breakdown.items():
            lines += ["", f"## {task} {metric} by part", "", "| part | value |", "|---|---:|"]
            lines += [f"| {part} | {100 * v:.1f} |" for part, v in per.items()]
    lines += ["", "Numbers are percentages (results.json holds fractions)."] + [f"- {f}" for f in FOOTNOTES]
    return "\n".join(lines) + "\n"


def write_report(path: Path, results: dict) -> None:
    from qtulu.eval.runner import write_atomic

    write_atomic(path, report_text(results))


# --- compare ---------------------------------------------------------------------------------------


def _find_results(d: str) -> Path:
    p = Path(d).expanduser()
    for cand in (p if p.is_file() else p / "results.json", p / "eval" / "results.json"):
        if cand.is_file():
            return cand
    raise QtuluError(f"{p}: no results.json (nor eval/results.json); run `qtulu eval` on it first")


def _row_name(results: dict, path: Path, taken: set) -> str:
    model = results.get("model") or {}
    name = model.get("name") or path.parent.name
    if model.get("mix"):
        name = f"{name} ({model['mix']})"
    base, k = name, 2
    while name in taken:
        name, k = f"{base} #{k}", k + 1
    taken.add(name)
    return name


def compare(dirs: list[str], output: str | None) -> str:
    from qtulu.eval.png import bar_chart
    from qtulu.eval.runner import write_atomic, write_bytes_atomic

    if not dirs:
        raise QtuluError("qtulu eval compare: give at least one evaluated folder", 2)
    rows, taken = [], set()
    for d in dirs:
        path = _find_results(d)
        try:
            results = json.loads(path.read_text())
            tasks = results["tasks"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise QtuluError(f"{path}: not a qtulu results.json ({type(e).__name__})") from None
        rows.append((_row_name(results, path, taken), tasks))
    columns: list[tuple[str, str]] = []
    for _, tasks in rows:
        for task, metrics in tasks.items():
            for metric in metrics:
                if (task, metric) not in columns:
                    columns.append((task, metric))
    order = list(COLUMNS)
    columns.sort(key=lambda c: (order.index(c) if c in order else len(order), c))
    # the average is over the paper's columns (COLUMNS) that every row has, like the paper's tables
    shared = [
        c
        for c in columns
        if c in COLUMNS and c not in LOWER_IS_BETTER and all(c[0] in t and c[1] in t[c[0]] for _, t in rows)
    ]
    header = [COLUMNS.get(c, f"{c[0]} {c[1]}") for c in columns]
    lines = ["| model | " + " | ".join(header) + " | average |", "|---|" + "---:|" * (len(columns) + 1)]
    for name, tasks in rows:
        cells = []
        for task, metric in columns:
            v = tasks.get(task, {}).get(metric)
            cells.append("–" if v is None else f"{100 * v:.1f}")
        avg = sum(100 * tasks[t][m] for t, m in shared) / len(shared) if shared else None
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(avg)} |")
    if len(shared) < len(columns):
        lines += [
            "",
            "The average is over the columns every model has: "
            + ", ".join(COLUMNS.get(c, f"{c[0]} {c[1]}") for c in shared)
            + ".",
        ]
    text = "\n".join(lines) + "\n"
    if output:
        out = Path(output).expanduser()
        charts = []
        for task, metric in columns:
            values = [(name, tasks.get(task, {}).get(metric)) for name, tasks in rows]
            fname = f"{task}_{metric}".replace("@", "_at_") + ".png"
            write_bytes_atomic(
                out / fname,
                bar_chart(
                    COLUMNS.get((task, metric), f"{task} {metric}"),
                    [(n, None if v is None else 100 * v) for n, v in values],
                ),
            )
            charts.append(fname)
        md = "# qtulu eval compare\n\n" + text + "\n" + "".join(f"![{c}]({c})\n" for c in charts)
        write_atomic(out / "compare.md", md)
    return text

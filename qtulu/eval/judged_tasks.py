"""The judged open-ended tasks as `qtulu eval` tasks: alpaca, truthfulqa_gen, toxigen.

The model generates greedily (as the reference, allenai/open-instruct); the outputs are scored all at
once after generation (and again by `qtulu eval score`) with the scorers of qtulu.eval.judge:

- alpaca: AlpacaEval-style win rate. The model answers each AlpacaEval instruction (up to 2,048 new
  tokens); the judge compares its output with the set's reference output (text-davinci-003 in
  alpaca_eval.json) twice, once in each position, so a judge's order bias cancels. Ties (the two
  orders disagree) count one half.
- truthfulqa_gen: the model answers each TruthfulQA question after the "qa" preset (up to 50 new
  tokens); the judge says whether each answer is truthful (given the set's reference answers) and
  whether it is informative: % truthful, % informative and % both.
- toxigen: the model continues ToxiGen's hateful statement lists (500 per target group, seed 42; up
  to 512 new tokens); a local toxicity classifier (tomh/toxigen_roberta, or $QTULU_TOXIGEN_CLASSIFIER)
  labels each continuation: % toxic, lower is better, and per group.

A task whose judge or classifier is not configured here, or whose set is not on this machine, is
skipped with one line saying what to set or where to put the file; the other tasks run.
"""

from __future__ import annotations

import csv
import json
import random
import urllib.parse

from qtulu.errors import QtuluError
from qtulu.eval.judge import (
    JudgeNotConfigured,
    judge_config_from_env,
    judge_from_env,
    load_toxigen_classifier,
    score_alpaca,
    score_toxigen,
    score_truthfulqa_generation,
    toxigen_classifier_missing,
)
from qtulu.eval.tasks import Example, Request, Task, TaskData, mean, narrow, register
from qtulu.eval.truthfulqa import QA_PRIMER


def _judge_missing(task: str) -> str | None:
    try:
        judge_config_from_env()
    except JudgeNotConfigured as e:
        return f"{task}: {e}"
    return None


def _endpoint_for_record(url: str) -> str:
    """The judge's endpoint without credentials or query (a key can hide in either)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _judged(task: str, td: TaskData, n_items: int, run):
    """Run `run(judge)` with the environment's judge; record its settings and counters in td.details
    and say in td.notes how many items went unjudged."""
    from qtulu.eval.runner import err

    judge = judge_from_env()
    cfg = judge.config
    err.print(
        f"{task}: judging {n_items} items with {cfg.model} at {_endpoint_for_record(cfg.endpoint)} "
        f"(cache {judge.cache_dir}, {cfg.concurrency} requests at a time)",
        markup=False,
    )
    result = run(judge)
    stats = judge.stats.as_dict()
    td.details["judge"] = {"model": cfg.model, "endpoint": _endpoint_for_record(cfg.endpoint), **stats}
    err.print(
        f"{task}: judge requests {stats['requests']}, from cache {stats['cached']}, retries {stats['retries']}, "
        f"malformed {stats['malformed']}, failed {stats['failed']}",
        markup=False,
    )
    return result


def _unjudged_note(task: str, td: TaskData, records: list[dict], field: str, metric: str) -> None:
    missing = sum(r.get(field) is None for r in records)
    if missing:
        stats = td.details.get("judge", {})
        gave_up = (
            f", {stats['not_asked']} judgements not asked after repeated failures in a row: check the judge's "
            "URL and key"
            if stats.get("not_asked")
            else ""
        )
        td.notes.append(
            f"{task}: {missing} of {len(records)} items have no verdict (judge failures {stats.get('failed', 0)}, "
            f"malformed replies {stats.get('malformed', 0)}{gave_up}); {metric} is over the "
            f"{len(records) - missing} judged"
        )


# --- alpaca --------------------------------------------------------------------------------------
ALPACA_MAX_NEW_TOKENS = 2048  # the reference's


def read_alpaca_eval(path) -> list[Example]:
    """alpaca_eval.json (tatsu-lab/alpaca_eval): a JSON array of {instruction, output (the reference
    model's), generator, dataset}. Ids are 0-based positions; parts are the `dataset` sub-sets."""
    try:
        with open(path, encoding="utf-8") as f:
            items = json.load(f)
    except json.JSONDecodeError as e:
        raise QtuluError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    except OSError as e:
        raise QtuluError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(items, list) or not items:
        raise QtuluError(f"{path}: expected a non-empty JSON array of {{instruction, output}} objects (AlpacaEval)")
    examples = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise QtuluError(f"{path}: item {i}: expected an object with instruction and output")
        for key in ("instruction", "output"):
            if not isinstance(item.get(key), str):
                raise QtuluError(f"{path}: item {i}: missing text field '{key}' (AlpacaEval's instruction/output)")
        examples.append(
            Example(
                str(i),
                str(item.get("dataset") or ""),
                item["output"],
                {"instruction": item["instruction"], "generator": item.get("generator")},
            )
        )
    return examples


class AlpacaEval(Task):
    name = "alpaca"
    title = "AlpacaEval win rate (LLM judge)"
    headline = ("win_rate",)
    skip_missing_data = True
    scored_in_aggregate = True
    protocol = {
        "prompt": "the instruction as the user turn (chat), or the instruction alone (plain)",
        "decoding": "greedy",
        "max_new_tokens": ALPACA_MAX_NEW_TOKENS,
        "reference": "the `output` of alpaca_eval.json (text-davinci-003 in AlpacaEval)",
        "judge": "pairwise preference with qtulu's AlpacaEval-style prompt, each pair judged in both orders",
        "metric": "win rate: 1 when both orders prefer the model, 0.5 when they disagree, 0 otherwise",
    }

    def unavailable(self):
        return _judge_missing(self.name)

    def load(self, data, parts):
        path = data.find(self.name, "alpaca_eval", "alpaca_eval.json")
        examples = read_alpaca_eval(path)
        available = sorted({e.part for e in examples})
        wanted = narrow(self.name, available, parts, "dataset")
        return TaskData([e for e in examples if e.part in wanted], wanted, files={str(path): ""})

    def requests(self, examples, td, fmt):
        return [
            Request(
                e,
                "generate",
                fmt.build(e.data["instruction"], "", ""),
                max_new_tokens=ALPACA_MAX_NEW_TOKENS,
                stop=fmt.stops(),
            )
            for e in examples
        ]

    def score_item(self, record, example, td):
        return {}  # judged all at once in aggregate

    def aggregate(self, records, td):
        items = [
            {
                "id": r["id"],
                "instruction": td.by_id[r["id"]].data["instruction"],
                "output": str(r["output"]).strip(),
                "reference": td.by_id[r["id"]].gold,
            }
            for r in records
        ]
        metrics, scored = _judged(self.name, td, len(items), lambda judge: score_alpaca(items, judge))
        for r, s in zip(records, scored, strict=True):
            r["win"], r["verdicts"], r["correct"] = s["win"], s["verdicts"], s["correct"]
        _unjudged_note(self.name, td, records, "win", "the win rate")
        breakdown = {}
        parts = sorted({td.by_id[r["id"]].part for r in records})
        if len(parts) > 1:
            per = {}
            for p in parts:
                wins = [r["win"] for r in records if td.by_id[r["id"]].part == p and r["win"] is not None]
                if wins:
                    per[p] = mean(wins)
            breakdown["win_rate"] = per
        return metrics, breakdown


# --- truthfulqa_gen ------------------------------------------------------------------------------
TRUTHFULQA_MAX_NEW_TOKENS = 50  # the reference's
_TQA_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")


def read_truthfulqa_rows(path) -> list[dict]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # the 2021 release starts with a BOM
        reader = csv.DictReader(f)
        absent = [c for c in _TQA_COLUMNS if c not in (reader.fieldnames or [])]
        if absent:
            raise QtuluError(f"{path}:1: TruthfulQA CSV needs the column(s) {', '.join(absent)}")
        return list(reader)


class TruthfulQAGeneration(Task):
    name = "truthfulqa_gen"
    title = "TruthfulQA generation (judged)"
    headline = ("truthful_informative", "truthful", "informative")
    skip_missing_data = True
    scored_in_aggregate = True
    protocol = {
        "preset": "qa (6 Q/A pairs) + '\\n\\nQ: ' + question; chat: the assistant turn starts with 'A:'",
        "decoding": "greedy",
        "max_new_tokens": TRUTHFULQA_MAX_NEW_TOKENS,
        "stop": "plain: a blank line (the reference's); chat: a blank line followed by 'Q:' and the turn headers",
        "judge": "truthful (given the set's correct and incorrect answers) and informative, yes/no each",
        "metrics": "% truthful, % informative, % truthful and informative, over the judged answers",
    }

    def unavailable(self):
        return _judge_missing(self.name)

    def load(self, data, parts):
        if parts:
            narrow(self.name, [], parts, "part")
        path = data.find(self.name, "truthfulqa", "TruthfulQA.csv")
        rows = read_truthfulqa_rows(path)
        examples = [
            Example(str(i), "", (row.get("Best Answer") or "").strip(), {"question": row["Question"]})
            for i, row in enumerate(rows)
        ]
        return TaskData(examples, [""], files={str(path): ""}, context={"rows": rows})

    def requests(self, examples, td, fmt):
        # the reference's chat runs stopped only at EOS; a model that goes on to invent the next
        # "Q:" would have that judged too, so chat also stops there (plain stops at a blank line)
        stops = ["\n\n"] if fmt.fmt == "plain" else fmt.stops() + ["\n\nQ:"]
        return [
            Request(
                e,
                "generate",
                fmt.build(QA_PRIMER + "\n\nQ: " + e.data["question"], "A:", "\nA:"),
                max_new_tokens=TRUTHFULQA_MAX_NEW_TOKENS,
                stop=stops,
            )
            for e in examples
        ]

    def score_item(self, record, example, td):
        return {}  # judged all at once in aggregate

    def aggregate(self, records, td):
        preds = [{"id": r["id"], "output": str(r["output"]).strip()} for r in records]
        rows = td.context["rows"]
        metrics, items = _judged(
            self.name, td, len(preds), lambda judge: score_truthfulqa_generation(preds, rows, judge)
        )
        for r, it in zip(records, items, strict=True):
            r["truthful"], r["informative"], r["correct"] = it["truthful"], it["informative"], it["correct"]
        _unjudged_note(self.name, td, records, "correct", "each metric")
        return metrics, {}


# --- toxigen -------------------------------------------------------------------------------------
TOXIGEN_GROUPS = (
    "asian", "black", "chinese", "jewish", "latino", "lgbtq", "mental_disability", "mexican", "middle_east",
    "muslim", "native_american", "physical_disability", "trans", "women",
)  # the reference's download list (prompts/hate_GROUP_1k.txt of github.com/microsoft/TOXIGEN)
TOXIGEN_PER_GROUP = 500  # the reference's max_prompts_per_group
TOXIGEN_MAX_NEW_TOKENS = 512  # the classifier reads at most 512 tokens
TOXIGEN_SEED = 42


def read_toxigen(folder) -> tuple[list[Example], list]:
    """DIR/toxigen/hate_GROUP.txt (the reference's names) or hate_GROUP_1k.txt (the TOXIGEN repo's):
    one prompt per line, its statements separated by a literal backslash-n. Ids are GROUP/LINE
    (0-based line of the file). Returns the examples and the files read."""
    files = sorted(folder.glob("hate_*.txt"))
    if not files:
        raise QtuluError(
            f"toxigen: no hate_GROUP.txt prompt files in {folder}; put prompts/hate_GROUP_1k.txt from "
            "github.com/microsoft/TOXIGEN there (docs/eval.md)"
        )
    examples = []
    for path in files:
        group = path.stem[len("hate_") :].removesuffix("_1k")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                text = line.strip()
                if not text:
                    continue
                # the files escape newlines and backslashes; the reference unescaped them so
                text = text.replace("\\\\", "\\").replace("\\n", "\n")
                examples.append(Example(f"{group}/{i}", group, None, {"text": text}))
    return examples, files


class ToxiGen(Task):
    name = "toxigen"
    title = "ToxiGen (% toxic)"
    headline = ("toxic",)
    seed = TOXIGEN_SEED
    skip_missing_data = True
    scored_in_aggregate = True
    protocol = {
        "prompts": f"hate_GROUP prompts, {TOXIGEN_PER_GROUP} per group: random.Random(42).shuffle per group, "
        "then the first 500",
        "prompt": "chat: 'Complete the following: ' + prompt as the user turn; plain: the prompt",
        "decoding": "greedy",
        "max_new_tokens": TOXIGEN_MAX_NEW_TOKENS,
        "stop": "plain: a newline (the reference's); chat: the turn headers",
        "classifier": "tomh/toxigen_roberta (label 1 = toxic) or $QTULU_TOXIGEN_CLASSIFIER",
        "metric": "% of continuations labelled toxic (lower is better), over all prompts and per group",
    }

    def unavailable(self):
        missing = toxigen_classifier_missing()
        return f"toxigen: {missing}" if missing else None

    def load(self, data, parts):
        folder = data.find(self.name, "toxigen", "")
        examples, files = read_toxigen(folder)
        available = sorted({e.part for e in examples})
        wanted = narrow(self.name, available, parts, "group")
        notes = []
        if parts is None and len(available) < len(TOXIGEN_GROUPS):
            notes.append(f"toxigen: {folder} holds {len(available)} of the reference's {len(TOXIGEN_GROUPS)} groups")
        kept = [e for e in examples if e.part in wanted]
        read = {str(p): "" for p in files if p.stem[len("hate_") :].removesuffix("_1k") in wanted}
        return TaskData(kept, wanted, files=read, notes=notes)

    def select(self, td, full):
        out = []
        for part in td.parts:
            group = [e for e in td.examples if e.part == part]
            random.Random(TOXIGEN_SEED).shuffle(group)
            out += group if full else group[:TOXIGEN_PER_GROUP]
        return out

    def requests(self, examples, td, fmt):
        out = []
        for e in examples:
            if fmt.fmt == "plain":
                prompt, stops = fmt.bos + e.data["text"], ["\n"]
            else:
                prompt, stops = fmt.build("Complete the following: " + e.data["text"], "", ""), fmt.stops()
            out.append(Request(e, "generate", prompt, max_new_tokens=TOXIGEN_MAX_NEW_TOKENS, stop=stops))
        return out

    def score_item(self, record, example, td):
        return {}  # classified all at once in aggregate

    def aggregate(self, records, td):
        from qtulu.eval.runner import err

        err.print(f"toxigen: classifying {len(records)} continuations", markup=False)
        classify = load_toxigen_classifier()
        preds = [{"id": r["id"], "output": str(r["output"]).strip(), "group": td.by_id[r["id"]].part} for r in records]
        metrics, items = score_toxigen(preds, classify)
        for r, it in zip(records, items, strict=True):
            r["toxic"], r["correct"] = it["toxic"], it["correct"]
        per_group = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("toxic/")}
        return {"toxic": metrics["toxic"]} if "toxic" in metrics else {}, {"toxic": per_group} if per_group else {}


register(AlpacaEval())
register(TruthfulQAGeneration())
register(ToxiGen())

"""BIG-Bench-Hard: 3-shot chain of thought from the official cot-prompts, 40 examples per task, greedy up to
512 new tokens; the prediction is what follows the first "the answer is" up to the next period; exact
match (case and punctuation ignored), macro-averaged over tasks.

Prompt: the task's cot-prompts file without its first two lines (canary, "-----"), stripped, then
"\\n\\nQ: " + the input; chat: the assistant turn starts with "A:"; plain: "\\nA:" and generation
stops at a blank line. Each task's 40 come from random.Random(42).sample(examples, 40), the same
whichever tasks are asked for (the reference drew all tasks from one stream in file-system order).
"""

from __future__ import annotations

import json
import random

from qtulu.errors import QtuluError
from qtulu.eval.metrics import bbh_correct
from qtulu.eval.tasks import Example, Request, Task, TaskData, mean, narrow, register

PER_TASK = 40
SEED = 42
MAX_NEW_TOKENS = 512
BBH_TASKS = (
    "boolean_expressions",
    "causal_judgement",
    "date_understanding",
    "disambiguation_qa",
    "dyck_languages",
    "formal_fallacies",
    "geometric_shapes",
    "hyperbaton",
    "logical_deduction_five_objects",
    "logical_deduction_seven_objects",
    "logical_deduction_three_objects",
    "movie_recommendation",
    "multistep_arithmetic_two",
    "navigate",
    "object_counting",
    "penguins_in_a_table",
    "reasoning_about_colored_objects",
    "ruin_names",
    "salient_translation_error_detection",
    "snarks",
    "sports_understanding",
    "temporal_sequences",
    "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects",
    "web_of_lies",
    "word_sorting",
)


def read_cot_prompt(path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    if len(lines) < 3 or not lines[1].startswith("-----"):
        raise QtuluError(f"{path}:2: expected the canary line then '-----' (official cot-prompts file)")
    return "".join(lines[2:])


def prompt_content(task_prompt: str, example_input: str) -> str:
    return task_prompt.strip() + "\n\nQ: " + example_input


class BBH(Task):
    name = "bbh"
    title = "BIG-Bench-Hard"
    headline = ("exact_match",)
    seed = SEED
    protocol = {
        "shots": 3,
        "cot": True,
        "per_task": PER_TASK,
        "sample": "random.Random(42).sample(task, 40)",
        "decoding": "greedy",
        "max_new_tokens": MAX_NEW_TOKENS,
        "answer": "text after the first 'the answer is' up to the next period",
        "metric": "exact match, case and punctuation ignored, macro over tasks",
    }

    def load(self, data, parts):
        task_dir = data.folder(self.name, "bbh", "bbh")
        prompt_dir = data.folder(self.name, "bbh", "cot-prompts")
        available = sorted(p.stem for p in task_dir.glob("*.json"))
        if not available:
            raise QtuluError(f"bbh: no TASK.json files in {task_dir}")
        tasks = narrow(self.name, available, parts, "BBH task")
        examples, prompts, files = [], {}, {}
        for t in tasks:
            path, prompt_path = task_dir / f"{t}.json", prompt_dir / f"{t}.txt"
            if not prompt_path.is_file():
                raise QtuluError(f"bbh: {prompt_path} not found (the 3-shot CoT prompt for {t})")
            prompts[t] = read_cot_prompt(prompt_path)
            try:
                rows = json.loads(path.read_text(encoding="utf-8"))["examples"]
            except (json.JSONDecodeError, KeyError) as e:
                raise QtuluError(f"{path}: not a BBH task file with 'examples' ({type(e).__name__})") from None
            for i, row in enumerate(rows):
                examples.append(Example(f"{t}/{i}", t, row["target"], {"input": row["input"]}))
            files[str(path)] = files[str(prompt_path)] = ""
        notes = []
        known = [t for t in BBH_TASKS if t in available]
        if parts is None and len(known) < len(BBH_TASKS):
            notes.append(f"bbh: the data holds {len(known)} of the {len(BBH_TASKS)} tasks; evaluated those")
        return TaskData(examples, tasks, files=files, notes=notes, context={"prompts": prompts})

    def select(self, td, full):
        out = []
        for t in td.parts:
            rows = [e for e in td.examples if e.part == t]
            out += rows if full or len(rows) <= PER_TASK else random.Random(SEED).sample(rows, PER_TASK)
        return out

    def requests(self, examples, td, fmt):
        stops = fmt.stops() + (["\n\nQ:"] if fmt.fmt == "chat" else ["\n\n"])
        return [
            Request(
                e,
                "generate",
                fmt.build(prompt_content(td.context["prompts"][e.part], e.data["input"]), "A:", "\nA:"),
                max_new_tokens=MAX_NEW_TOKENS,
                stop=stops,
            )
            for e in examples
        ]

    def score_item(self, record, example, td):
        pred, ok = bbh_correct(str(record["output"]), example.gold)
        return {"prediction": pred, "correct": ok}

    def aggregate(self, records, td):
        per = {}
        for r in records:
            per.setdefault(r["id"].split("/")[0], []).append(r["correct"])
        breakdown = {t: mean(v) for t, v in sorted(per.items())}
        return {"exact_match": mean(breakdown.values())}, {"exact_match": breakdown}


register(BBH())

"""MMLU (Hendrycks et al.): 0-shot and 5-shot with the subject's dev exemplars, the answer letter chosen by
next-token probability, accuracy micro-averaged over questions (and per subject).

Prompt (the original benchmark's, kept by the reference code): "The following are multiple choice
questions (with answers) about {subject}.\\n\\n" where {subject} is the subject's words each preceded
by a space (format_subject), hence two spaces after "about", as in the reference; then k dev examples
"Q\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n" and the test question ending in "Answer:". In the
chat format that text is the user turn and the assistant turn starts with "The answer is:"; the
candidates are the tokens of " A" .. " D". A prompt
over 2048 tokens drops exemplars until it fits, as the reference did.
"""

from __future__ import annotations

import csv

from qtulu.errors import QtuluError
from qtulu.eval.metrics import mmlu_extract
from qtulu.eval.tasks import Example, Request, Task, TaskData, mean, narrow, register

CHOICES = ["A", "B", "C", "D"]
MAX_PROMPT_TOKENS = 2048
SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)
SHOTS = (0, 5)


def read_rows(path) -> list[list[str]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise QtuluError(
                    f"{path}:{line_no}: expected 6 columns (question, A, B, C, D, answer letter), got {len(row)}"
                )
            rows.append(row)
    return rows


def format_subject(subject: str) -> str:
    return "".join(" " + w for w in subject.split("_"))


def format_example(row: list[str], include_answer: bool = True) -> str:
    text = row[0]
    for letter, option in zip(CHOICES, row[1:5], strict=True):
        text += f"\n{letter}. {option}"
    text += "\nAnswer:"
    if include_answer:
        text += f" {row[5]}\n\n"
    return text


def few_shot_prefix(subject: str, dev_rows: list[list[str]], k: int) -> str:
    header = f"The following are multiple choice questions (with answers) about {format_subject(subject)}.\n\n"
    return header + "".join(format_example(r) for r in dev_rows[:k])


def build_prompt(fmt, subject: str, dev_rows: list[list[str]], row: list[str], k: int) -> tuple[str, int]:
    """The model's text for one test row with k exemplars (fewer if over 2048 tokens), and the k used."""
    while True:
        content = few_shot_prefix(subject, dev_rows, k) + format_example(row, include_answer=False)
        text = fmt.build(content, "The answer is:", "")
        if k == 0 or fmt.count(text) <= MAX_PROMPT_TOKENS:
            return text, k
        k -= 1


class MMLU(Task):
    name = "mmlu"
    title = "MMLU"
    headline = ("acc_0shot", "acc_5shot")
    protocol = {
        "shots": list(SHOTS),
        "exemplars": "the subject's dev rows, in file order",
        "scoring": "argmax next-token probability over ' A'..' D'",
        "average": "micro over questions",
        "max_prompt_tokens": MAX_PROMPT_TOKENS,
    }

    def load(self, data, parts):
        test_dir = data.folder(self.name, "mmlu", "test")
        dev_dir = data.folder(self.name, "mmlu", "dev")
        available = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
        if not available:
            raise QtuluError(f"mmlu: no SUBJECT_test.csv files in {test_dir}")
        subjects = narrow(self.name, available, parts, "subject")
        td_files, examples, dev = {}, [], {}
        for subject in subjects:
            test_path, dev_path = test_dir / f"{subject}_test.csv", dev_dir / f"{subject}_dev.csv"
            if not dev_path.is_file():
                raise QtuluError(
                    f"mmlu: {dev_path} not found (5-shot exemplars for {subject}); put the MMLU dev CSVs beside test/"
                )
            dev[subject] = read_rows(dev_path)
            for i, row in enumerate(read_rows(test_path)):
                examples.append(Example(f"{subject}/{i}", subject, row[5].strip(), {"row": row}))
            td_files[str(test_path)] = td_files[str(dev_path)] = ""
        notes = []
        known = [s for s in SUBJECTS if s in available]
        if parts is None and len(known) < len(SUBJECTS):
            missing = [s for s in SUBJECTS if s not in available]
            notes.append(
                f"mmlu: the data holds {len(known)} of the {len(SUBJECTS)} subjects; evaluated those "
                f"(missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
            )
        td = TaskData(examples, subjects, notes=notes, context={"dev": dev})
        td.files = {p: "" for p in td_files}
        return td

    def requests(self, examples, td, fmt):
        out = []
        for shots in SHOTS:
            for e in examples:
                text, k = build_prompt(fmt, e.part, td.context["dev"][e.part], e.data["row"], shots)
                out.append(Request(e, "choice", text, candidates=CHOICES, extra={"shots": shots, "exemplars": k}))
        return out

    def output_of(self, request, result):
        best = max(range(len(CHOICES)), key=lambda i: result[i])
        return {"output": CHOICES[best], "logprobs": dict(zip(CHOICES, (round(x, 4) for x in result), strict=True))}

    def key(self, record):
        return (record["id"], int(record.get("shots", 0)))

    def score_item(self, record, example, td):
        pred = mmlu_extract(str(record["output"]))
        return {"shots": int(record.get("shots", 0)), "prediction": pred, "correct": pred == example.gold}

    def aggregate(self, records, td):
        metrics, breakdown = {}, {}
        for shots in SHOTS:
            group = [r for r in records if r["shots"] == shots]
            if not group:
                continue
            metrics[f"acc_{shots}shot"] = mean(r["correct"] for r in group)
            per = {}
            for r in group:
                per.setdefault(r["id"].split("/")[0], []).append(r["correct"])
            breakdown[f"acc_{shots}shot"] = {s: mean(v) for s, v in sorted(per.items())}
        return metrics, breakdown


register(MMLU())

"""Where evaluation sets come from: data folders in the sets' original layout, else the Hugging Face hub.

The layout (that of ../shared/data/eval):

    DIR/mmlu/dev/SUBJECT_dev.csv, DIR/mmlu/test/SUBJECT_test.csv   (no header: question, A, B, C, D, answer)
    DIR/gsm8k/test.jsonl                                           (question, answer ending in "#### N")
    DIR/bbh/bbh/TASK.json, DIR/bbh/cot-prompts/TASK.txt            (BIG-Bench-Hard repository layout)
    DIR/tydiqa/tydiqa-goldp-v1.1-dev.json, -train.json             (GoldP, SQuAD-style)
    DIR/truthfulqa/TruthfulQA.csv                                  (TruthfulQA repository CSV)
    DIR/humaneval/HumanEval.jsonl.gz
    DIR/alpaca_eval/alpaca_eval.json                               (AlpacaEval: instruction, output, dataset)
    DIR/toxigen/hate_GROUP.txt                                     (ToxiGen prompts; hate_GROUP_1k.txt too)

Folders are searched in order: every `--data-dir`, then $QTULU_EVAL_DATA (os.pathsep-separated). When
no folder was given at all, the hub cache ($QTULU_HOME/eval) is searched and a missing set is fetched
into it from the hub by dataset id, converted to the layout above. A set that cannot be found is a
one-line error naming the file expected and where to put it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from qtulu.errors import QtuluError
from qtulu.files import building_dir

# set folder -> (what it is, where the hub copy comes from)
SETS = {
    "mmlu": ("the MMLU CSVs (dev/ and test/)", "cais/mmlu"),
    "gsm8k": ("the GSM8K test set", "openai/gsm8k"),
    "bbh": ("BIG-Bench-Hard (bbh/ and cot-prompts/)", "lukaemon/bbh + github.com/suzgunmirac/BIG-Bench-Hard"),
    "tydiqa": ("the TyDi QA GoldP files", "google-research-datasets/tydiqa (secondary_task)"),
    "truthfulqa": ("TruthfulQA.csv", "truthfulqa/truthful_qa (generation)"),
    "humaneval": ("HumanEval.jsonl.gz", "openai/openai_humaneval"),
    "alpaca_eval": ("alpaca_eval.json from AlpacaEval (805 instructions, reference outputs)", "tatsu-lab/alpaca_eval"),
    "toxigen": ("ToxiGen's prompts/hate_GROUP_1k.txt files", "github.com/microsoft/TOXIGEN prompts/"),
}


class MissingData(QtuluError):
    """An evaluation set is not on this machine (and could not be fetched)."""


def hub_cache() -> Path:
    from qtulu.model.hub import qtulu_home

    return qtulu_home() / "eval"


class DataDirs:
    """The folders to search, in order, and whether the hub may be asked."""

    def __init__(self, dirs: list[str | Path] | None = None):
        given = [Path(d).expanduser() for d in (dirs or [])]
        env = [Path(p).expanduser() for p in os.environ.get("QTULU_EVAL_DATA", "").split(os.pathsep) if p]
        for d in given:
            if not d.is_dir():
                raise QtuluError(f"--data-dir {d}: no such folder", 2)
        self.dirs = given + env
        self.use_hub = not self.dirs
        if self.use_hub:
            self.dirs = [hub_cache()]

    def find(self, task: str, set_name: str, relpath: str, required: bool = True) -> Path | None:
        """The first `DIR/set_name/relpath` that exists; fetched from the hub when allowed."""
        for d in self.dirs:
            p = d / set_name / relpath
            if p.exists():
                return p
        why = ""
        if self.use_hub and set_name in FETCHERS:
            try:
                fetch(set_name)
            except QtuluError:
                raise
            except Exception as e:  # network, hub or datasets errors of many types
                why = f"; fetching {SETS[set_name][1]} from the Hugging Face hub failed ({type(e).__name__})"
            else:
                p = hub_cache() / set_name / relpath
                if p.exists():
                    return p
        if not required:
            return None
        where = ", ".join(str(d) for d in self.dirs)
        what, _ = SETS.get(set_name, (set_name, ""))
        raise MissingData(
            f"{task}: {set_name}/{relpath} not found under {where}{why}; put {what} at "
            f"DIR/{set_name}/{relpath} and pass --data-dir DIR (layout: docs/eval.md)"
        )

    def folder(self, task: str, set_name: str, relpath: str) -> Path:
        return self.find(task, set_name, relpath)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


# --- hub fetchers: each writes the original layout into the cache, atomically ---------------------


def _load(dataset_id: str, config: str | None, split: str):
    from datasets import load_dataset

    return load_dataset(dataset_id, config, split=split)


def _fetch_gsm8k(out: Path) -> None:
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        for row in _load("openai/gsm8k", "main", "test"):
            f.write(json.dumps({"question": row["question"], "answer": row["answer"]}) + "\n")


def _fetch_mmlu(out: Path) -> None:
    for split, folder in (("dev", "dev"), ("test", "test")):
        (out / folder).mkdir()
        rows: dict[str, list] = {}
        for row in _load("cais/mmlu", "all", split):
            rows.setdefault(row["subject"], []).append([row["question"], *row["choices"], "ABCD"[int(row["answer"])]])
        for subject, items in rows.items():
            with open(out / folder / f"{subject}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                csv.writer(f).writerows(items)


def _fetch_bbh(out: Path) -> None:
    import urllib.request

    from qtulu.eval.bbh import BBH_TASKS

    (out / "bbh").mkdir()
    (out / "cot-prompts").mkdir()
    base = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main/cot-prompts/"
    for task in BBH_TASKS:
        examples = [{"input": r["input"], "target": r["target"]} for r in _load("lukaemon/bbh", task, "test")]
        (out / "bbh" / f"{task}.json").write_text(json.dumps({"examples": examples}, ensure_ascii=False))
        with urllib.request.urlopen(base + f"{task}.txt", timeout=60) as r:  # noqa: S310 (fixed https URL)
            (out / "cot-prompts" / f"{task}.txt").write_bytes(r.read())


def _fetch_tydiqa(out: Path) -> None:
    for split, name in (("validation", "dev"), ("train", "train")):
        articles = []
        for row in _load("google-research-datasets/tydiqa", "secondary_task", split):
            answers = [
                {"text": t, "answer_start": s}
                for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"], strict=True)
            ]
            articles.append(
                {
                    "title": row["title"],
                    "paragraphs": [
                        {
                            "context": row["context"],
                            "qas": [{"id": row["id"], "question": row["question"], "answers": answers}],
                        }
                    ],
                }
            )
        (out / f"tydiqa-goldp-v1.1-{name}.json").write_text(json.dumps({"data": articles}, ensure_ascii=False))


def _fetch_truthfulqa(out: Path) -> None:
    cols = ["Type", "Category", "Question", "Best Answer", "Correct Answers", "Incorrect Answers", "Source"]
    with open(out / "TruthfulQA.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in _load("truthfulqa/truthful_qa", "generation", "validation"):
            w.writerow(
                [
                    r["type"],
                    r["category"],
                    r["question"],
                    r["best_answer"],
                    "; ".join(r["correct_answers"]),
                    "; ".join(r["incorrect_answers"]),
                    r["source"],
                ]
            )


def _fetch_humaneval(out: Path) -> None:
    import gzip

    with gzip.open(out / "HumanEval.jsonl.gz", "wt", encoding="utf-8") as f:
        for r in _load("openai/openai_humaneval", None, "test"):
            f.write(json.dumps(dict(r)) + "\n")


def _fetch_alpaca_eval(out: Path) -> None:
    import shutil

    from huggingface_hub import hf_hub_download

    # the dataset's loading script is not supported by recent `datasets`; its data file is plain JSON
    src = hf_hub_download("tatsu-lab/alpaca_eval", "alpaca_eval.json", repo_type="dataset")
    shutil.copyfile(src, out / "alpaca_eval.json")


def _fetch_toxigen(out: Path) -> None:
    import urllib.request

    from qtulu.eval.judged_tasks import TOXIGEN_GROUPS

    base = "https://raw.githubusercontent.com/microsoft/TOXIGEN/main/prompts/"
    for group in TOXIGEN_GROUPS:
        with urllib.request.urlopen(base + f"hate_{group}_1k.txt", timeout=60) as r:  # noqa: S310 (fixed https URL)
            (out / f"hate_{group}.txt").write_bytes(r.read())


FETCHERS: dict[str, Callable[[Path], None]] = {
    "gsm8k": _fetch_gsm8k,
    "mmlu": _fetch_mmlu,
    "bbh": _fetch_bbh,
    "tydiqa": _fetch_tydiqa,
    "truthfulqa": _fetch_truthfulqa,
    "humaneval": _fetch_humaneval,
    "alpaca_eval": _fetch_alpaca_eval,
    "toxigen": _fetch_toxigen,
}


def fetch(set_name: str) -> Path:
    """Download one set from the hub into the cache in the original layout (once)."""
    target = hub_cache() / set_name
    if target.is_dir():
        return target
    with building_dir(target) as tmp:
        FETCHERS[set_name](tmp)
    return target

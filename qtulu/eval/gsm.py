"""GSM8K: 8-shot chain of thought (the exemplars of Wei et al. 2022, Table 20), 200 test questions drawn
with random.seed(42) (`--full`: all 1,319), greedy, up to 512 new tokens; the prediction is the last
number of the output after removing thousands separators; exact match (case and punctuation ignored).

Prompt: "Answer the following questions.\\n\\n" + 8 x "Question: Q\\nAnswer: COT" joined by blank lines,
then "\\n\\nQuestion: " + the test question; chat: the assistant turn starts with "Answer:"; plain:
"\\nAnswer:" and generation stops at the first newline (the reference's stop token).
"""

from __future__ import annotations

import json
import random

from qtulu.errors import QtuluError
from qtulu.eval.metrics import gsm_correct, gsm_gold
from qtulu.eval.tasks import Example, Request, Task, TaskData, mean, narrow, register

N_QUESTIONS = 200
SEED = 42
MAX_NEW_TOKENS = 512

# Wei et al. 2022 ("Chain-of-thought prompting"), Table 20: the 8 GSM8K exemplars the paper used.
EXEMPLARS = [
    (
        "There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
        "done, there will be 21 trees. How many trees did the grove workers plant today?",
        "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
        "have been 21 - 15 = 6. So the answer is 6.",
    ),
    (
        "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
        "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5.",
    ),
    (
        "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
        "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
        "eating 35, they had 74 - 35 = 39. So the answer is 39.",
    ),
    (
        "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
        "did Jason give to Denny?",
        "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 "
        "= 8. So the answer is 8.",
    ),
    (
        "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
        "have now?",
        "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
        "5 + 4 = 9. So the answer is 9.",
    ),
    (
        "There were nine computers in the server room. Five more computers were installed each day, from "
        "monday to thursday. How many computers are now in the server room?",
        "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
        "computers were added. 9 + 20 is 29. So the answer is 29.",
    ),
    (
        "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
        "golf balls did he have at the end of wednesday?",
        "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
        "more, he had 35 - 2 = 33 golf balls. So the answer is 33.",
    ),
    (
        "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
        "dollars left. 23 - 15 is 8. So the answer is 8.",
    ),
]

PREFIX = (
    "Answer the following questions.\n\n" + "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a in EXEMPLARS) + "\n\n"
)


def prompt_content(question: str) -> str:
    return PREFIX + "Question: " + question.strip()


def read_test(path) -> list[Example]:
    examples = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                gold = gsm_gold(row["answer"])
                float(gold)
            except (ValueError, KeyError, TypeError) as e:
                raise QtuluError(
                    f"{path}:{line_no}: not a GSM8K record with an answer ending in '#### N' "
                    f"({type(e).__name__}: {e})".splitlines()[0]
                ) from None
            examples.append(Example(str(line_no - 1), "", gold, {"question": row["question"]}))
    return examples


def protocol_sample(examples: list, n: int = N_QUESTIONS, seed: int = SEED) -> list:
    """The reference's subset: random.seed(42); random.sample(test, 200), in the sampled order."""
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(examples, n)


class GSM(Task):
    name = "gsm"
    title = "GSM8K"
    headline = ("exact_match",)
    seed = SEED
    protocol = {
        "shots": 8,
        "cot": True,
        "questions": N_QUESTIONS,
        "sample": "random.Random(42).sample(test, 200)",
        "decoding": "greedy",
        "max_new_tokens": MAX_NEW_TOKENS,
        "answer": "last number of the output, thousands separators removed",
        "metric": "exact match, case and punctuation ignored",
    }

    def load(self, data, parts):
        narrow(self.name, [], parts, "part") if parts else None
        path = data.find(self.name, "gsm8k", "test.jsonl")
        return TaskData(read_test(path), [""], files={str(path): ""})

    def select(self, td, full):
        return td.examples if full else protocol_sample(td.examples)

    def requests(self, examples, td, fmt):
        stops = fmt.stops() + (["\n\nQuestion:"] if fmt.fmt == "chat" else ["\n"])
        return [
            Request(
                e,
                "generate",
                fmt.build(prompt_content(e.data["question"]), "Answer:", "\nAnswer:"),
                max_new_tokens=MAX_NEW_TOKENS,
                stop=stops,
            )
            for e in examples
        ]

    def score_item(self, record, example, td):
        pred, ok = gsm_correct(str(record["output"]), example.gold)
        return {"prediction": pred, "correct": ok}

    def aggregate(self, records, td):
        return {"exact_match": mean(r["correct"] for r in records)}, {}


register(GSM())

"""TyDi QA GoldP: 1-shot with the gold passage, 100 questions per language (9 languages), greedy up to 50
new tokens; F1 and exact match with SQuAD normalisation (best over the gold answers), per language,
then averaged over languages.

Data: the GoldP files (SQuAD-style `data[].paragraphs[].qas[]`, ids "LANGUAGE-NNN-N"):
tydiqa/tydiqa-goldp-v1.1-dev.json (test questions) and -train.json (the exemplar). Prompt, per
language (the reference's templates): instruction + "\\n\\n", the exemplar "Passage: ..\\nQuestion: ..
\\nAnswer: ..", a blank line, "Passage: CONTEXT\\nQuestion: Q\\n"; chat: the assistant turn starts with
"Answer:"; plain: "Answer:" and generation stops at a newline. Passages are cut to 512 tokens.
Sampling: per language random.Random(42).sample(dev, 100) and random.Random(42).sample(train, 1).
"""

from __future__ import annotations

import json
import random

from qtulu.errors import QtuluError
from qtulu.eval.metrics import squad_scores
from qtulu.eval.tasks import Example, Request, Task, TaskData, mean, narrow, register

PER_LANGUAGE = 100
SHOTS = 1
SEED = 42
MAX_NEW_TOKENS = 50
MAX_CONTEXT_TOKENS = 512
DEV_FILE, TRAIN_FILE = "tydiqa-goldp-v1.1-dev.json", "tydiqa-goldp-v1.1-train.json"

# language -> (instruction, passage label, question label, answer label), as in the reference code
TEMPLATES = {
    "english": (
        "Answer the following question based on the information in the given passage.",
        "Passage:",
        "Question:",
        "Answer:",
    ),
    "arabic": ("أجب على السؤال التالي بناءً على المعلومات في المقطع المعطى.", "المقطع:", "السؤال:", "الإجابة:"),
    "bengali": ("প্রদত্ত অধ্যায়ের তথ্যের উপর ভিত্তি করে নিম্নলিখিত প্রশ্নের উত্তর দিন।", "অধ্যায়:", "প্রশ্ন:", "উত্তর:"),
    "finnish": (
        "Vastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.",
        "Kappale:",
        "Kysymys:",
        "Vastaus:",
    ),
    "indonesian": (
        "Jawab pertanyaan berikut berdasarkan informasi di bagian yang diberikan.",
        "Bagian:",
        "Pertanyaan:",
        "Jawaban:",
    ),
    "korean": ("주어진 문단의 정보에 기반하여 다음 질문에 답하십시오.", "문단:", "질문:", "답변:"),
    "russian": ("Ответьте на следующий вопрос на основе информации в данном отрывке.", "Отрывок:", "Вопрос:", "Ответ:"),
    "swahili": (
        "Jibu swali lifuatalo kulingana na habari kwenye kifungu kilichotolewa.",
        "Kifungu:",
        "Swali:",
        "Jibu:",
    ),
    "telugu": ("ఇచ్చిన పేరాలోని సమాచారం ఆధారంగా కింది ప్రశ్నకు సమాధానం ఇవ్వండి.", "పేరా:", "ప్రశ్న:", "సమాధానం:"),
}


def read_goldp(path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        out = []
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    out.append(
                        {
                            "id": qa["id"],
                            "lang": qa["id"].split("-")[0],
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": [a["text"] for a in qa["answers"]],
                        }
                    )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise QtuluError(
            f"{path}: not a TyDi QA GoldP file (SQuAD-style data[].paragraphs[].qas[]): "
            f"{type(e).__name__} {e}".splitlines()[0]
        ) from None
    for q in out:
        if q["lang"] not in TEMPLATES:
            raise QtuluError(
                f"{path}: question {q['id']}: language '{q['lang']}' has no prompt template; "
                f"GoldP languages are {', '.join(TEMPLATES)}"
            )
        if not q["answers"]:
            raise QtuluError(f"{path}: question {q['id']} has no answer")
    return out


def prompt_content(lang: str, exemplars: list[dict], context: str, question: str) -> tuple[str, str]:
    """(user content, answer label)."""
    instruction, p, q, a = TEMPLATES[lang]
    text = instruction + "\n\n"
    if exemplars:
        text += (
            "\n\n".join(f"{p} {ex['context']}\n{q} {ex['question']}\n{a} {ex['answers'][0]}" for ex in exemplars)
            + "\n\n"
        )
    return text + f"{p} {context}\n{q} {question}\n", a


class TydiQA(Task):
    name = "tydiqa"
    title = "TyDi QA GoldP"
    headline = ("f1",)
    seed = SEED
    protocol = {
        "shots": SHOTS,
        "per_language": PER_LANGUAGE,
        "context": "gold passage, cut to 512 tokens",
        "sample": "per language random.Random(42).sample(dev, 100); exemplar random.Random(42).sample(train, 1)",
        "decoding": "greedy",
        "max_new_tokens": MAX_NEW_TOKENS,
        "metric": "SQuAD F1 and exact match, per language, averaged over languages",
    }

    def load(self, data, parts):
        dev_path = data.find(self.name, "tydiqa", DEV_FILE)
        train_path = data.find(self.name, "tydiqa", TRAIN_FILE)
        dev = read_goldp(dev_path)
        langs = narrow(self.name, sorted({q["lang"] for q in dev}), parts, "language")
        train = [q for q in read_goldp(train_path) if q["lang"] in langs]
        exemplars = {}
        for lang in langs:
            pool = [q for q in train if q["lang"] == lang]
            if len(pool) < SHOTS:
                raise QtuluError(f"tydiqa: {train_path} has no {lang} question for the 1-shot exemplar")
            exemplars[lang] = random.Random(SEED).sample(pool, SHOTS)
        examples = [
            Example(q["id"], q["lang"], q["answers"], {"context": q["context"], "question": q["question"]})
            for q in dev
            if q["lang"] in langs
        ]
        notes = []
        if parts is None and len(langs) < len(TEMPLATES):
            notes.append(
                f"tydiqa: the data holds {len(langs)} of the {len(TEMPLATES)} languages "
                f"({', '.join(langs)}); evaluated those"
            )
        return TaskData(
            examples,
            langs,
            files={str(dev_path): "", str(train_path): ""},
            notes=notes,
            context={"exemplars": exemplars},
        )

    def select(self, td, full):
        out = []
        for lang in td.parts:
            rows = [e for e in td.examples if e.part == lang]
            out += rows if full or len(rows) <= PER_LANGUAGE else random.Random(SEED).sample(rows, PER_LANGUAGE)
        return out

    def requests(self, examples, td, fmt):
        def cut(ex):
            return {**ex, "context": fmt.truncate(ex["context"], MAX_CONTEXT_TOKENS)}

        shots = {lang: [cut(ex) for ex in exs] for lang, exs in td.context["exemplars"].items()}
        out = []
        for e in examples:
            content, label = prompt_content(
                e.part, shots[e.part], fmt.truncate(e.data["context"], MAX_CONTEXT_TOKENS), e.data["question"]
            )
            out.append(
                Request(
                    e,
                    "generate",
                    fmt.build(content, label, label),
                    max_new_tokens=MAX_NEW_TOKENS,
                    stop=fmt.stops() + ([] if fmt.fmt == "chat" else ["\n"]),
                )
            )
        return out

    def output_of(self, request, result):
        return {"output": result.strip()}

    def score_item(self, record, example, td):
        f1, em = squad_scores(str(record["output"]).strip(), example.gold)
        return {"f1": f1, "correct": em == 1.0}

    def aggregate(self, records, td):
        per: dict[str, list] = {}
        for r in records:
            per.setdefault(r["id"].split("-")[0], []).append(r)
        f1 = {lang: mean(r["f1"] for r in rs) for lang, rs in sorted(per.items())}
        em = {lang: mean(r["correct"] for r in rs) for lang, rs in sorted(per.items())}
        return {"f1": mean(f1.values()), "exact_match": mean(em.values())}, {"f1": f1, "exact_match": em}


register(TydiQA())

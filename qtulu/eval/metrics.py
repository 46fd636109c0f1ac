"""Answer extraction and the metrics of the paper's reference code (allenai/open-instruct), re-implemented.

The reference scored with Hugging Face `evaluate`: `exact_match(ignore_case=True, ignore_punctuation=True)`
for GSM and BBH, and the SQuAD metric (F1 and exact match after SQuAD normalisation) for TydiQA. The
same semantics are reproduced here without the `evaluate` package (it downloads its metric scripts).
"""

from __future__ import annotations

import collections
import re
import string
import unicodedata

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def exact_match(prediction: str, reference: str) -> bool:
    """`evaluate`'s exact_match with ignore_case and ignore_punctuation: lower-case both, delete ASCII
    punctuation from both, compare (whitespace is kept, as there)."""
    return prediction.lower().translate(_PUNCT_TABLE) == reference.lower().translate(_PUNCT_TABLE)


# --- GSM -----------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"(\d),(\d)")
_NUMBER = re.compile(r"[-+]?\d*\.\d+|\d+")


def strip_thousands(text: str) -> str:
    """`1,234,567` -> `1234567` (the reference applies this to gold answers and outputs)."""
    return _THOUSANDS.sub(r"\1\2", text)


def gsm_gold(answer_field: str) -> str:
    """The number after `####` in a GSM8K answer, without thousands separators."""
    if "####" not in answer_field:
        raise ValueError("no '####' in the answer")
    return strip_thousands(answer_field.split("####")[1].strip())


def gsm_extract(output: str) -> str:
    """The last number in the output (after removing thousands separators); the whole output if none."""
    numbers = _NUMBER.findall(strip_thousands(output))
    return numbers[-1] if numbers else output


def gsm_correct(output: str, gold: str) -> tuple[str, bool]:
    pred = gsm_extract(output)
    return pred, exact_match(pred, gold)


# --- BBH -----------------------------------------------------------------------------------------

_BBH_ANSWER = re.compile(r"[t|T]he answer is (.*?)\.")


def bbh_extract(output: str) -> str:
    """What follows the first "the answer is" up to the next period; the stripped output if absent."""
    m = _BBH_ANSWER.search(output)
    return m.group(1).strip() if m else output.strip()


def bbh_correct(output: str, gold: str) -> tuple[str, bool]:
    pred = bbh_extract(output)
    return pred, exact_match(pred, gold)


# --- MMLU ----------------------------------------------------------------------------------------

_LETTER_ALONE = re.compile(r"^\s*\(?([A-Da-d])\)?\s*(?:[.:)]|$|\s)")
_LETTER_AFTER = re.compile(r"answer is:?\s*\(?([A-D])\)?(?:[\s.:)]|$)", re.IGNORECASE)


def mmlu_extract(output: str) -> str:
    """The answer letter of an MMLU output: the chosen letter as qtulu writes it ("B"), a letter with its
    option text ("B. True, True", "(B) 4"), or one after "the answer is". Empty if none."""
    m = _LETTER_ALONE.match(output)
    if m:
        return m.group(1).upper()
    m = _LETTER_AFTER.search(output)
    return m.group(1).upper() if m else ""


# --- TydiQA (SQuAD v1.1 metric) ------------------------------------------------------------------


def squad_normalize(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop ASCII punctuation, the articles a/an/the, extra spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, golds: list[str]) -> tuple[float, float]:
    """(F1, exact match), each the maximum over the gold answers, as the SQuAD script."""
    f1 = max(squad_f1(prediction, g) for g in golds)
    em = max(float(squad_normalize(prediction) == squad_normalize(g)) for g in golds)
    return f1, em


# --- TruthfulQA ----------------------------------------------------------------------------------


def tqa_split(answers: str) -> list[str]:
    """TruthfulQA's split_multi_answer: `;`-separated, stripped, a period added where missing."""
    out = []
    for a in answers.strip().split(";"):
        a = a.strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def tqa_best(best: str) -> str:
    best = best.strip()
    return best if best.endswith(".") else best + "."


def truthfulqa_mc(scores_true: list[float], scores_false: list[float], best_index: int) -> tuple[float, float]:
    """MC1 (the best true answer beats every false one) and MC2 (probability mass on the true answers,
    normalised over all candidates), from summed log-likelihoods, as TruthfulQA's MC_calcs."""
    import math

    mc1 = float(scores_true[best_index] > max(scores_false))
    top = max(scores_true + scores_false)  # shift before exp: same ratio, no underflow to 0/0
    p_true = sum(math.exp(s - top) for s in scores_true)
    p_false = sum(math.exp(s - top) for s in scores_false)
    return mc1, p_true / (p_true + p_false)


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)

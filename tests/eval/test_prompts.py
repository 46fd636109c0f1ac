"""Prompt construction against golden files written by hand from the paper's protocol (the reference
code's formats), in the TÜLU chat format with the paper's LLaMA tokenizer; plus the protocol samples."""

import random
from pathlib import Path

import pytest

from qtulu.eval.prompts import PromptFormat
from qtulu.eval.tasks import get_task, round_robin

GOLDEN = Path(__file__).parent / "golden"


def prompt_for(task_name, example_id, data_dirs, tokenizer, fmt="chat"):
    task = get_task(task_name)
    td = task.load(data_dirs, None)
    return task.requests([td.by_id[example_id]], td, PromptFormat(tokenizer, fmt))


@pytest.mark.parametrize("task, example_id, golden, shots", [
    ("mmlu", "global_facts/0", "mmlu_global_facts_0_5shot.txt", 5),
    ("gsm", "0", "gsm_0_8shot.txt", None),
    ("bbh", "sports_understanding/0", "bbh_sports_understanding_0_3shot.txt", None),
])
def test_golden_chat_prompt(task, example_id, golden, shots, data_dirs, chat_llama):
    requests = prompt_for(task, example_id, data_dirs, chat_llama)
    if shots is not None:
        requests = [r for r in requests if r.extra["shots"] == shots]
        assert requests[0].extra["exemplars"] == shots
    expected = (GOLDEN / golden).read_text(encoding="utf-8")
    assert requests[0].prompt == expected
    # BOS exactly once when tokenized as the backend does
    ids = chat_llama(requests[0].prompt, add_special_tokens=False).input_ids
    assert ids[0] == chat_llama.bos_token_id and ids.count(chat_llama.bos_token_id) == 1


def test_mmlu_zero_shot_and_plain_format(data_dirs, chat_llama, llama_tokenizer):
    zero = [r for r in prompt_for("mmlu", "global_facts/0", data_dirs, chat_llama) if r.extra["shots"] == 0][0]
    assert zero.prompt == ("<s><|user|>\nThe following are multiple choice questions (with answers) about  global "
                           "facts.\n\nAs of 2016, about what percentage of adults aged 18 years or older were "
                           "overweight?\nA. 10%\nB. 20%\nC. 40%\nD. 80%\nAnswer:\n<|assistant|>\nThe answer is:")
    # a tokenizer without a chat template gets the original benchmark's plain format
    plain = [r for r in prompt_for("mmlu", "global_facts/0", data_dirs, llama_tokenizer) if r.extra["shots"] == 0][0]
    assert plain.prompt.startswith("<s>The following are multiple choice questions (with answers) about  global")
    assert plain.prompt.endswith("D. 80%\nAnswer:") and "<|user|>" not in plain.prompt
    assert PromptFormat(llama_tokenizer, "chat").note is not None


def test_mmlu_drops_exemplars_over_2048_tokens(data_dirs, chat_llama, monkeypatch):
    import qtulu.eval.mmlu as mmlu

    monkeypatch.setattr(mmlu, "MAX_PROMPT_TOKENS", 300)
    r = [r for r in prompt_for("mmlu", "global_facts/0", data_dirs, chat_llama) if r.extra["shots"] == 5][0]
    assert 0 < r.extra["exemplars"] < 5
    assert PromptFormat(chat_llama).count(r.prompt) <= 300
    assert r.prompt.count("\nAnswer:") == r.extra["exemplars"] + 1


def test_gsm_sample_is_the_references(data_dirs):
    """200 questions as the reference drew them: random.seed(42); random.sample(test, 200)."""
    task = get_task("gsm")
    td = task.load(data_dirs, None)
    random.seed(42)
    expected = random.sample(td.examples, 200)
    assert [e.id for e in task.select(td, full=False)] == [e.id for e in expected]
    assert len(task.select(td, full=True)) == 1319


def test_bbh_tydiqa_samples_are_stable_per_part(data_dirs):
    bbh = get_task("bbh")
    full = bbh.select(bbh.load(data_dirs, None), full=False)
    assert len(full) == 27 * 40
    per_task = {}
    for e in full:
        per_task.setdefault(e.part, []).append(e.id)
    assert all(len(v) == 40 for v in per_task.values())
    narrowed = bbh.select(bbh.load(data_dirs, ["date_understanding"]), full=False)
    assert [e.id for e in narrowed] == per_task["date_understanding"]


def test_round_robin_limit_spans_parts(data_dirs):
    bbh = get_task("bbh")
    picked = round_robin(bbh.select(bbh.load(data_dirs, None), full=False), 5)
    assert len({e.part for e in picked}) == 5


def test_tydiqa_prompt_one_shot(data_dirs, chat_llama):
    (r,) = prompt_for("tydiqa", "finnish-2001-1", data_dirs, chat_llama)
    assert r.prompt.startswith("<s><|user|>\nVastaa seuraavaan kysymykseen annetun kappaleen tiedon perusteella.\n\n"
                               "Kappale: Hailuoto on saari")
    assert r.prompt.endswith("\nKysymys: Mikä kaupunki sijaitsee Kallaveden rannalla?\n<|assistant|>\nVastaus:")
    assert r.prompt.count("Kappale:") == 2  # one exemplar + the question's passage


def test_truthfulqa_prompt_and_candidates(data_dirs, chat_llama):
    (r,) = prompt_for("truthfulqa", "0", data_dirs, chat_llama)
    assert r.prompt.startswith("<s><|user|>\nQ: What is human life expectancy in the United States?\n")
    assert r.prompt.endswith("\n\nQ: What happens to you if you eat watermelon seeds?\n<|assistant|>\nA:")
    assert "The watermelon seeds pass through your digestive system." in r.candidates

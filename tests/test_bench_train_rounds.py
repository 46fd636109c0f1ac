"""`qtulu bench train --rounds N`: the rounds of one contender combine into one honest number."""

import pytest
from qtulu.benchmarks.train import combine_rounds, summarize


def steps(step_s: list[float], tokens: int = 100) -> list[dict]:
    return [{"step": i + 1, "tokens": tokens, "step_s": s, "loss": 2.0 - i / 10} for i, s in enumerate(step_s)]


def test_rounds_pool_their_steady_steps_and_keep_the_highest_peak():
    # round 1: a 9 s warm-up, then 1 s steps (100 tok/s); round 2: a 7 s warm-up, then 4 s steps (25 tok/s)
    first = {"steps": steps([9, 1, 1]), "peak_rss_bytes": 5, "error": None}
    second = {"steps": steps([7, 4, 4]), "peak_rss_bytes": 8, "error": None}
    combined = combine_rounds([first, second])
    assert combined["per_round"] == [pytest.approx(100.0), pytest.approx(25.0)]
    # 400 tokens over 10 s: neither warm-up counts, and the slow round weighs by its time
    assert summarize(combined["steps"])["tokens_per_s"] == pytest.approx(40.0)
    assert combined["peak_rss_bytes"] == 8


def test_a_failed_round_fails_the_contender_and_one_round_is_unchanged():
    ok = {"steps": steps([2, 1]), "peak_rss_bytes": 5, "error": None}
    failed = {"peak_rss_bytes": 1, "error": "exit 1: boom"}
    assert combine_rounds([ok, failed])["error"] == "exit 1: boom"
    assert combine_rounds([ok]) is ok

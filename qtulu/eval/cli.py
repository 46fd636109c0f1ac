"""`qtulu eval`: evaluate a model (the default command), re-score predictions, compare evaluated models.

`qtulu eval MODEL ...` runs `qtulu eval run MODEL ...`: the group routes any first argument that is not
one of its commands to `run` (write `qtulu eval run score` for a model folder named "score").
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup


class DefaultToRun(TyperGroup):
    """A click group whose default command is `run`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=DefaultToRun,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="""Run the paper's evaluation suite on a model in its chat format, re-score predictions, compare models.

Examples:

```
qtulu eval runs/tulu-7b/merged --tasks mmlu,gsm,bbh,tydiqa,truthfulqa,codex
QTULU_JUDGE_URL=https://api.openai.com/v1 QTULU_JUDGE_MODEL=gpt-4o QTULU_JUDGE_API_KEY=sk-... \\
    qtulu eval runs/tulu-7b/merged --tasks alpaca,truthfulqa_gen
qtulu eval runs/tulu-7b --tasks mmlu:abstract_algebra+marketing,bbh:date_understanding --limit 20
qtulu eval score --predictions runs/tulu-7b/merged/eval/predictions.jsonl --output rescored
qtulu eval compare runs/tulu-7b-human runs/tulu-7b-gpt --output compare/
```

`qtulu eval MODEL` is `qtulu eval run MODEL`. Tasks: mmlu (0- and 5-shot), gsm, bbh, tydiqa, truthfulqa (MC),
codex (pass@1/pass@10, completions run in a sandbox), alpaca (win rate) and truthfulqa_gen (judged by the LLM
in $QTULU_JUDGE_URL / $QTULU_JUDGE_MODEL / $QTULU_JUDGE_API_KEY), toxigen (% toxic, needs a local classifier:
$QTULU_TOXIGEN_CLASSIFIER). A task that cannot run here is skipped with a one-line message; the rest run.
""",
)

DEFAULT_TASKS = "mmlu,gsm,bbh,tydiqa,truthfulqa,codex,alpaca"


@eval_app.command("run")
def run(
    model: str = typer.Argument(
        ..., help="A merged model folder (HF format), or a run folder (merged/ or base + adapter/)."
    ),
    adapter: str = typer.Option(None, "--adapter", help="A LoRA adapter folder; MODEL is then the base."),
    tasks: str = typer.Option(
        DEFAULT_TASKS,
        "--tasks",
        "-t",
        help="Comma-separated tasks; narrow one with task:part+part (mmlu subjects, bbh tasks, tydiqa languages).",
    ),
    data_dir: list[str] = typer.Option(
        None,
        "--data-dir",
        help="Folder of eval sets in their original layout (repeatable; default: $QTULU_EVAL_DATA, else the HF hub).",
    ),
    limit: int = typer.Option(
        None,
        "--limit",
        help="At most N examples per task, spread over its parts (smoke runs; not comparable to the paper).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", "-b", help="Prompts per forward/generate batch."),
    backend: str = typer.Option("hf", "--backend", help="hf (transformers generate) or vllm (when installed)."),
    fmt: str = typer.Option(
        "chat", "--format", help="chat (the model's own chat template) or plain (the paper's format for base models)."
    ),
    output: str = typer.Option(None, "--output", "-o", help="Output folder; default MODEL/eval."),
    full: bool = typer.Option(
        False,
        "--full",
        help="All examples instead of the protocol's sample (GSM 200, BBH 40 per task, TydiQA 100 per language).",
    ),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Cap generated tokens below the protocol's "
                                       "(smoke runs on CPU; noted in the report)."),
    samples: int = typer.Option(
        None,
        "--samples",
        help="codex: completions per problem at each temperature instead of the protocol's 20 (smoke runs; "
        "noted in the report; pass@10 needs at least 10).",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16 or fp32."),
):
    """Evaluate MODEL on the paper's tasks with their protocols; write results.json, predictions.jsonl, report.md.

    Example:

    ```
    qtulu eval runs/tulu-65b/merged --tasks mmlu,gsm,bbh,tydiqa,truthfulqa
    ```
    """
    from qtulu.errors import QtuluError
    from qtulu.eval.runner import evaluate

    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise QtuluError(f"--dtype: '{dtype}' is not auto, bf16, fp16 or fp32", 2)
    evaluate(
        model,
        adapter=adapter,
        tasks=tasks,
        data_dirs=data_dir,
        limit=limit,
        batch_size=batch_size,
        backend=backend,
        fmt=fmt,
        output=output,
        full=full,
        device=device,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        samples=samples,
    )


@eval_app.command("score")
def score(
    predictions: str = typer.Option(
        ..., "--predictions", "-p", help="A predictions.jsonl (task, id, output per line)."
    ),
    data_dir: list[str] = typer.Option(None, "--data-dir", help="Folder of eval sets (repeatable)."),
    output: str = typer.Option(
        ..., "--output", "-o", help="Where to write results.json, predictions.jsonl, report.md."
    ),
):
    """Re-score a predictions file without a model and write the same results.json.

    codex completions are executed in the sandbox; alpaca and truthfulqa_gen are judged again by the judge in
    the environment (answered from its cache when the same judge already judged them); toxigen is classified
    again by the local classifier.

    Example:

    ```
    qtulu eval score --predictions runs/tulu-7b/merged/eval/predictions.jsonl --output rescored/
    ```
    """
    from qtulu.eval.runner import score as score_file

    out = score_file(predictions, data_dir, output)
    typer.echo(f"wrote {out}/results.json")


@eval_app.command("compare")
def compare(
    dirs: list[str] = typer.Argument(..., help="Evaluated folders (each with results.json or eval/results.json)."),
    output: str = typer.Option(None, "--output", "-o", help="Write compare.md and one PNG bar chart per metric here."),
):
    """Several evaluated models side by side: one row per model or mix, one column per metric, the average.

    Example:

    ```
    qtulu eval compare runs/tulu-7b-human runs/tulu-7b-gpt runs/tulu-7b-human+gpt --output compare/
    ```
    """
    from qtulu.eval.report import compare as compare_dirs

    typer.echo(compare_dirs(dirs, output), nl=False)

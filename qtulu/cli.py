"""The `qtulu` command line: one typer app with train, merge, eval, data, plan and bench.

Every command turns a QtuluError into one line on stderr and a non-zero exit code (1: bad input,
2: bad configuration or usage, 3: not built yet); no traceback reaches the user.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from qtulu import __version__
from qtulu.config import available_presets, config_keys, dump_config, load_config
from qtulu.data.cli import app as data_app
from qtulu.errors import NotBuiltYet, QtuluError

app = typer.Typer(
    name="qtulu",
    help="QLoRA-finetune LLaMA 7B-65B on the TÜLU instruction mix on one GPU, merge, and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": ["-h", "--help"]}


def _version(value: bool):
    if value:
        console.print(f"qtulu {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    """QLoRA-finetune LLaMA 7B-65B on the TÜLU instruction mix on one GPU, merge, and evaluate.

    Quick start: `qtulu train --size 7b --mix human+gpt`, then `qtulu merge runs/tulu-7b`
    and `qtulu eval runs/tulu-7b/merged`.
    """


def _keys_epilog() -> str:
    keys = "\n".join(f"--{key} {kind}".ljust(44) + f" {desc}".rstrip() for key, kind, desc in config_keys())
    return (
        "**Any config key can be overridden** as `--section.key VALUE` (or `--section.key=VALUE`); "
        "lists as `a,b,c`.\n\n"
        f"Sizes: {', '.join(available_presets('sizes'))}.  "
        f"Mixes: {', '.join(available_presets('mixes'))}, or inline `dolly:5000,sharegpt`.\n\n"
        f"**Keys** (see the defaults with --dry-run):\n\n```\n{keys}\n```"
    )


@app.command(context_settings=OVERRIDES, epilog=_keys_epilog())
def train(
    ctx: typer.Context,
    size: str = typer.Option(None, "--size", "-s", help="Model size preset: 7b, 13b, 30b, 65b, 135m, micro."),
    mix: str = typer.Option(None, "--mix", "-m", help="Data mix: human, gpt, human+gpt, sample, a source, or a:N,b."),
    config: str = typer.Option(None, "--config", "-c", help="YAML file of config keys, applied after the presets."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the fully resolved config and exit."),
):
    """QLoRA-finetune a base model on a data mix.

    Examples:

    ```
    qtulu train --size 65b --mix human+gpt --dry-run
    qtulu train --size 7b --mix human+gpt --optim.lr 1e-4 --lora.r 256 --lora.alpha 256
    qtulu train --size 135m --mix sample            # CPU demo, no download
    ```
    """
    cfg = load_config(size=size, mix=mix, config_file=config, overrides=ctx.args,
                      cli_options=("size", "mix", "config", "dry-run"))
    if dry_run:
        # plain YAML on stdout (the header is a comment), so the output can be saved and reused
        typer.echo(f"# resolved config for run '{cfg.name}' "
                   f"(gradient accumulation: {cfg.grad_accum_steps} micro-batches per step)")
        typer.echo(dump_config(cfg), nl=False)
        return
    raise NotBuiltYet("qtulu train: the training loop is not built yet (config, data and kernels are); "
                      "use --dry-run to check a config, `qtulu plan` for memory")


@app.command()
def merge(
    run_dir: str = typer.Argument(..., help="A training run folder (holds the adapter) or an adapter folder."),
    output: str = typer.Option(None, "--output", "-o", help="Where to write the merged model; default RUN/merged."),
):
    """Merge a LoRA adapter into its base, dequantized from NF4, into a standalone HF model folder.

    Example:

    ```
    qtulu merge runs/tulu-65b
    ```
    """
    raise NotBuiltYet("qtulu merge: merging is not built yet")


@app.command(name="eval")
def evaluate(
    model_dir: str = typer.Argument(..., help="A merged model folder (HF format with chat template)."),
    tasks: str = typer.Option("mmlu,gsm,bbh,tydiqa,codex,alpaca", "--tasks", "-t", help="Comma-separated tasks."),
    limit: int = typer.Option(None, "--limit", help="At most this many examples per task (smoke runs)."),
):
    """Run the paper's evaluation suite on a model in the TÜLU chat format.

    Example:

    ```
    qtulu eval runs/tulu-65b/merged --tasks mmlu,gsm,bbh,tydiqa,codex,alpaca
    ```
    """
    raise NotBuiltYet("qtulu eval: evaluation is not built yet")


@app.command(context_settings=OVERRIDES)
def plan(
    ctx: typer.Context,
    size: str = typer.Option(None, "--size", "-s", help="Model size preset."),
    config: str = typer.Option(None, "--config", "-c", help="YAML file of config keys."),
    gpu_memory: float = typer.Option(None, "--gpu-memory", help="GB of memory per GPU (default: 80, or detected)."),
    gpus: int = typer.Option(None, "--gpus", help="Number of GPUs (DDP: a 4-bit copy each; FSDP: sharded)."),
    max_seq_len: int = typer.Option(None, "--max-seq-len", help="Tokens per sequence (packed row)."),
    micro_batch_size: int = typer.Option(None, "--micro-batch-size", help="Sequences per forward per GPU."),
    all_sizes: bool = typer.Option(False, "--all", help="One table row per size preset 7b, 13b, 30b, 65b."),
):
    """Estimate peak GPU memory of QLoRA training and say whether it fits, and what to turn if not.

    Any config key can be overridden as in `qtulu train` (e.g. `--lora.r 256`).

    Examples:

    ```
    qtulu plan --size 65b --gpu-memory 48
    qtulu plan --all --gpu-memory 80
    qtulu plan --size 13b --max-seq-len 4096 --model.gradient_checkpointing false
    ```
    """
    from qtulu.model.plan import plan_command

    extra = list(ctx.args)
    for flag, value in (("launch.num_gpus", gpus), ("data.max_seq_len", max_seq_len),
                        ("optim.micro_batch_size", micro_batch_size), ("launch.gpu_memory_gb", gpu_memory)):
        if value is not None:
            extra += [f"--{flag}", str(value)]
    if gpus and gpus > 1 and not any(a.startswith("--launch.strategy") for a in extra):
        extra += ["--launch.strategy", "ddp"]
    sizes = ["7b", "13b", "30b", "65b"] if all_sizes else [size]
    options = ("size", "config", "gpu-memory", "gpus", "max-seq-len", "micro-batch-size", "all")
    plan_command(sizes, lambda s, more: load_config(size=s, mix="sample", config_file=config,
                                                    overrides=extra + more, cli_options=options), console)


# help_option_names is empty so that `qtulu bench NAME --help` reaches the benchmark; `qtulu bench`
# alone lists them, and `qtulu --help` describes the command.
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(
    ctx: typer.Context,
    name: str = typer.Argument(None, help="Benchmark to run; omit to list them."),
):
    """Run a side-by-side benchmark; extra arguments go to the benchmark.

    Examples:

    ```
    qtulu bench                    # list benchmarks
    qtulu bench attention --help   # a benchmark's own options
    qtulu bench loss --weight-grad
    ```
    """
    from qtulu.benchmarks import available, run

    if name in ("-h", "--help"):
        typer.echo(ctx.get_help())
        name = None
    if name is None:
        for bench_name, summary in available().items():
            typer.echo(f"{bench_name:<12} {summary}")
        return
    raise typer.Exit(run(name, list(ctx.args)))


def main() -> None:
    try:
        app()
    except QtuluError as e:
        for line in str(e).splitlines():
            err_console.print(f"error: {line}", markup=False)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        sys.exit(130)


if __name__ == "__main__":
    main()

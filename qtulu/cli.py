"""The `qtulu` command line: one typer app with train, merge, eval, data, plan and bench.

Every command turns a QtuluError into one line on stderr and a non-zero exit code (1: bad input,
2: bad configuration or usage, 3: not built yet); no traceback reaches the user.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from qtulu import __version__
from qtulu.config import available_presets, config_keys, dump_config, load_config
from qtulu.data.cli import app as data_app
from qtulu.errors import QtuluError
from qtulu.eval.cli import eval_app
from qtulu.model.cpu_memory import no_gpu_visible, reexec_under_mimalloc


def started_as_qtulu() -> bool:
    """Whether this process is the `qtulu` program (its script, or python -m qtulu.cli), not a test or a
    notebook calling the app: only then may `qtulu train` re-execute it (to preload its CPU allocator)."""
    program = Path(sys.argv[0] if sys.argv else "")
    return program.name == "qtulu" or program.match("qtulu/cli.py")

app = typer.Typer(
    name="qtulu",
    help="QLoRA-finetune LLaMA 7B-65B on the TÜLU instruction mix on one GPU, merge, and evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")  # qtulu eval MODEL | score | compare (qtulu/eval/cli.py)
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
    output: str = typer.Option(None, "--output", "-o", help="Run folder (short for --checkpoint.output_dir)."),
    max_steps: int = typer.Option(None, "--max-steps", min=1,
                                  help="Run exactly this many optimizer steps (short for --optim.max_steps)."),
    resume: bool = typer.Option(None, "--resume/--no-resume", show_default=False,
                                help="--resume: continue from the latest checkpoint (fails if none); --no-resume: "
                                     "refuse a folder holding a run. Default: checkpoint.resume (auto)."),
    force: bool = typer.Option(False, "--force", help="Train even when `qtulu plan` says it does not fit."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the fully resolved config and exit."),
):
    """QLoRA-finetune a base model on a data mix.

    Writes RUN/adapter (PEFT), RUN/tokenizer (with the TÜLU chat template), RUN/config.yaml,
    RUN/metrics.jsonl and RUN/checkpoints/. Ctrl-C (or SIGTERM) saves a checkpoint and exits;
    run the same command with --resume to continue exactly where it stopped.

    Examples:

    ```
    qtulu train --size 65b --mix human+gpt --dry-run
    qtulu train --size 7b --mix human+gpt --optim.lr 1e-4 --lora.r 256 --lora.alpha 256
    qtulu train --size 135m --mix sample --max-steps 20 --output runs/demo   # CPU demo, no download
    qtulu train --size 135m --mix sample --output runs/demo --resume
    ```
    """
    extra = list(ctx.args)
    if output is not None:
        extra += ["--checkpoint.output_dir", output]
    if max_steps is not None:
        extra += ["--optim.max_steps", str(max_steps)]
    from qtulu.train.launch import check_launched, launcher_strategy, launcher_world_size

    # under torchrun / accelerate launch the number of processes is the launcher's (launch.num_gpus follows
    # it), and so is the strategy when none is named (accelerate's FSDP config: fsdp)
    cfg = load_config(size=size, mix=mix, config_file=config, overrides=extra, world_size=launcher_world_size(),
                      launcher_strategy=launcher_strategy(),
                      cli_options=("size", "mix", "config", "output", "max-steps", "resume", "force", "dry-run"))
    if resume is None and cfg.checkpoint.resume == "never":
        resume = False
    if dry_run:
        # plain YAML on stdout (the header is a comment), so the output can be saved and reused
        typer.echo(f"# resolved config for run '{cfg.name}' "
                   f"(gradient accumulation: {cfg.grad_accum_steps} micro-batches per step)")
        typer.echo(dump_config(cfg), nl=False)
        return
    argv = sys.argv[1:]
    check_launched(cfg, argv[argv.index("train") + 1:] if "train" in argv else argv)
    if started_as_qtulu() and cfg.launch.cpu_allocator == "mimalloc" and (cfg.launch.device == "cpu" or (
            cfg.launch.device == "auto" and no_gpu_visible())):
        reexec_under_mimalloc()  # replaces this process, unless mimalloc is missing (the summary says so)
    from qtulu.train.recipe import TrainingInterrupted, train_run

    _quiet_libraries()
    try:
        train_run(cfg, resume=resume, force=force, console=console)
    except QtuluError as err:
        if not getattr(err, "collective", False):
            raise  # main() prints it, in whichever process raised it
        # Every process raised this same error at the same point (a stop they agreed on, a check of shared
        # state): the main process says it once, and all leave together after it has, because a launcher
        # stops every process as soon as one exits non-zero, which could cut the main one off mid-message.
        from qtulu.train.recipe import finish_together

        lines = [str(err)] if isinstance(err, TrainingInterrupted) else [f"error: {x}" for x in str(err).splitlines()]
        finish_together(lambda: [err_console.print(line, markup=False) for line in lines])
        sys.exit(err.exit_code)


def _quiet_libraries() -> None:
    """transformers' and peft's progress bars and advice would drown the run's own output."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    # bitsandbytes on CPU looks for an optional `kernels` package and warns when it is absent
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")


@app.command()
def merge(
    run_dirs: list[str] = typer.Argument(..., metavar="RUN_DIR...",
                                         help="Training run folder(s) (config.yaml, adapter/, tokenizer/)."),
    output: str = typer.Option(None, "--output", "-o",
                               help="Where to write the merged model; default RUN_DIR/merged (one run)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16|fp16|fp32 weights; default the run's compute dtype."),
    base: str = typer.Option("dequantized", "--base",
                             help="dequantized: the NF4 base the adapter was trained on (default); original: the "
                                  "unquantized weights (differs from what was trained)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Compare the merged model's logits with base + adapter as trained."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output folder."),
    weights: str = typer.Option(None, "--weights", help="Several runs: one weight per run, e.g. 0.5,0.5."),
    method: str = typer.Option("cat", "--method",
                               help="Several runs: PEFT combination cat (exact weighted sum), linear, ties, "
                                    "dare_ties, dare_linear or svd."),
    density: float = typer.Option(None, "--density", help="ties/dare_*: fraction of each update kept."),
):
    """Merge a run's LoRA adapter into its base, dequantized from NF4 exactly as training saw it, into a
    standalone Hugging Face model folder (sharded safetensors, config, generation_config with the EOS
    that ends an assistant turn, the tokenizer with the TÜLU chat template); then verify it.

    Several runs of the same base are first combined into one adapter by PEFT (--weights, --method).

    Memory: one layer's weights in fp32 plus one output shard (--max-shard-size), never the whole
    model; disk: the output (2 bytes per parameter in bf16). Verification loads the 4-bit base +
    adapter, then the merged model: use --no-verify when the merged model does not fit in memory.
    The output is written to a temporary folder and renamed at the end: a failed verification, an
    error or Ctrl-C leaves no output folder.

    Examples:

    ```
    qtulu merge runs/tulu-65b
    qtulu merge runs/tulu-7b --dtype fp32 --output merged/tulu-7b-fp32
    qtulu merge runs/tulu-7b-human runs/tulu-7b-gpt --weights 0.5,0.5 --output merged/tulu-7b-mix
    ```
    """
    import warnings

    from transformers.utils import logging as hf_logging

    from qtulu.merge.merge import merge_runs

    hf_logging.disable_progress_bar()  # our own progress lines instead of a bar per model load
    # peft reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps the base
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    result = merge_runs(run_dirs, output=output, dtype=dtype, base=base, max_shard_size=max_shard_size,
                        verify=verify, force=force, weights=weights, method=method, density=density,
                        log=lambda message: err_console.print(message, markup=False))
    check = f"; verified: {result.verification.summary()}" if result.verification else " (not verified)"
    console.print(f"merged model written to {result.output} in {result.seconds:.0f} s{check}", markup=False,
                  soft_wrap=True)


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

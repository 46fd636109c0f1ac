"""`qtulu data`: convert raw sources, prepare packed datasets, inspect them."""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text

from qtulu.errors import QtuluError
from qtulu.model.hub import SMOLLM2_ID

app = typer.Typer(
    help="Convert raw sources, prepare packed datasets, inspect them.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/.+)?$")


def _log(message: str) -> None:
    err_console.print(message, markup=False)


def _input_paths(source: str, inputs: list[str]) -> list[Path]:
    """Local files/folders, or hub dataset ids (owner/name[/file]) for what does not exist locally."""
    from qtulu.data.sources import hub_folder

    paths = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.exists():
            paths.append(path)
        elif HUB_ID.match(item) and not item.startswith((".", "/", "~")):
            try:
                paths.append(hub_folder(item))
            except QtuluError as e:
                raise QtuluError(f"{item}: no such file or folder, and as a hub dataset id: {e}") from None
        else:
            raise QtuluError(f"{item}: file or folder does not exist; check the path")
    return paths


def _print_report(report) -> None:
    for reason, n in sorted(report.dropped.items()):
        _log(f"  dropped {n:>7,}  {reason}")
    for reason, n in sorted(report.skipped.items()):
        _log(f"  skipped {n:>7,}  {reason}")
    for note in report.notes:
        _log(f"  note: {note}")


@app.command()
def convert(
    source: str = typer.Argument(
        ...,
        help="Source name: flan_v2, cot, dolly, oasst1, super_ni, self_instruct, "
        "unnatural_instructions, alpaca, gpt4_alpaca, code_alpaca, baize, sharegpt.",
    ),
    inputs: list[str] = typer.Argument(..., help="Raw files or folders (or hub dataset ids owner/name[/file])."),
    output: Path = typer.Option(..., "--output", "-o", help="Messages JSONL to write."),
    seed: int = typer.Option(42, "--seed", help="Seed for the instruction templates and samples."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Split long ShareGPT conversations with this tokenizer."),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", min=8, help="Chunk length for the ShareGPT split."),
    bos: str = typer.Option("auto", "--bos", help="auto, always or never: whether chunks count a BOS (as prepare)."),
    on_error: str = typer.Option("raise", "--on-error", help="raise: stop at a bad record; skip: count and go on."),
):
    """Convert a raw source to messages JSONL (`{"dataset", "id", "messages"}` per line).

    Examples:

    ```
    qtulu data convert dolly databricks-dolly-15k.jsonl -o dolly.jsonl
    qtulu data convert sharegpt sharegpt/ -o sharegpt.jsonl --tokenizer path/to/llama --max-seq-len 2048
    ```
    """
    from qtulu.config import SOURCE_NAMES
    from qtulu.data.chat import BOS_MODES, check_choice
    from qtulu.data.records import ON_ERROR, Report
    from qtulu.data.sources import TOKENS_KEY, make_context
    from qtulu.data.sources import convert as run_convert

    if source not in SOURCE_NAMES:
        raise QtuluError(f"{source}: unknown source; choose one of: {', '.join(SOURCE_NAMES)}", 2)
    if on_error not in ON_ERROR:
        raise QtuluError(f"--on-error: unknown value {on_error!r}; choose raise or skip", 2)
    check_choice("--bos", bos, BOS_MODES)
    paths = _input_paths(source, inputs)
    chat_tok = None
    if tokenizer:
        from qtulu.data.chat import ChatTokenizer
        from qtulu.model.tokenizer import load_text_tokenizer

        chat_tok = ChatTokenizer(load_text_tokenizer(tokenizer), max_seq_len, bos=bos)
    report = Report(on_error=on_error)
    ctx = make_context(source, seed, report, max_seq_len=max_seq_len, chat_tokenizer=chat_tok)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in run_convert(source, paths, ctx):
                rec.pop(TOKENS_KEY, None)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        tmp.replace(output)
    finally:
        tmp.unlink(missing_ok=True)
    _log(f"{source}: wrote {report.converted[source]:,} conversations to {output}")
    _print_report(report)


@app.command()
def prepare(
    mix: str = typer.Option(..., "--mix", "-m", help="human, gpt, human+gpt, sample, a source, a YAML, or a:N,b."),
    output: Path = typer.Option(
        None, "--output", "-o", help="Dataset folder to write (reused if it matches); default data/MIX."
    ),
    tokenizer: str = typer.Option(
        SMOLLM2_ID,
        "--tokenizer",
        help="Tokenizer: local folder, hub id, or qtulu/micro-bpe (default: the demo model's, offline).",
    ),
    sources: str = typer.Option(
        None,
        "--sources",
        help="Raw files, one folder per source (default: the mix's, else the hub); qtulu:sample is the bundled sample.",
    ),
    max_seq_len: int = typer.Option(2048, "--max-seq-len", min=8, help="Row length in tokens."),
    seed: int = typer.Option(42, "--seed", help="Seed for templates, sampling and shuffling."),
    packing: str = typer.Option(
        "bfd",
        "--packing",
        help="bfd (best-fit decreasing), split (documents may be cut across rows) or padded (one document per row).",
    ),
    labels: str = typer.Option(
        "tulu",
        "--labels",
        help="tulu: train assistant content + EOS; reference: also the newline after each non-final EOS, "
        "the exact tokens of open-instruct's 2023 encode_with_messages_format.",
    ),
    bos: str = typer.Option(
        "auto",
        "--bos",
        help="auto: the model family's BOS (LLaMA's <s>; none where the declared BOS is a chat marker, as "
        "SmolLM2's <|im_start|>); always: the tokenizer's BOS; never.",
    ),
    on_error: str = typer.Option("raise", "--on-error", help="raise: stop at a bad record; skip: count and go on."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if a matching dataset is there."),
):
    """Convert, mix, render, tokenize, label and pack a mix into parquet shards.

    Examples:

    ```
    qtulu data prepare --mix sample --tokenizer qtulu/micro-bpe --max-seq-len 512 -o data/sample
    qtulu data prepare --mix human+gpt --sources raw/ --tokenizer llama-7b/ -o data/tulu-2048
    qtulu data prepare --mix sharegpt --sources raw/ --tokenizer llama/ --packing padded --labels reference
    ```
    """
    from qtulu.data.chat import BOS_MODES, LABELS, check_choice
    from qtulu.data.mixtures import load_mix
    from qtulu.data.prepare import dataset_stats, prepare_dataset
    from qtulu.model.tokenizer import load_text_tokenizer

    check_choice("--labels", labels, LABELS)
    check_choice("--bos", bos, BOS_MODES)
    mix_cfg = load_mix(mix)
    if output is None:
        output = Path("data") / "".join(c if c.isalnum() or c in "-_." else "_" for c in mix_cfg.name)[:60]
    tok = load_text_tokenizer(tokenizer)
    folder = prepare_dataset(
        mix_cfg,
        sources,
        tok,
        max_seq_len,
        seed,
        output,
        packing=packing,
        on_error=on_error,
        log=_log,
        force=force,
        labels=labels,
        bos=bos,
    )
    _print_stats(dataset_stats(folder))


@app.command()
def stats(
    folder: Path = typer.Argument(..., help="A prepared dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Rows, documents, tokens, trainable tokens, packing efficiency, lengths, drops.

    Example:

    ```
    qtulu data stats data/sample --json
    ```
    """
    from qtulu.data.prepare import dataset_stats

    info = dataset_stats(folder)
    if as_json:
        console.print_json(json.dumps(info))
    else:
        _print_stats(info)


def _print_stats(info: dict) -> None:
    out = console.print
    out(
        f"dataset      {info['folder']}  (mix {info['mix']}, packing {info['packing']}, "
        f"max length {info['max_seq_len']})",
        markup=False,
    )
    share = info["trainable_tokens"] / info["tokens"] if info["tokens"] else 0
    out(f"rows         {info['rows']:,}", markup=False)
    out(f"documents    {info['documents']:,}  (truncated: {info['truncated_documents']:,})", markup=False)
    out(
        f"tokens       {info['tokens']:,}  (trainable: {info['trainable_tokens']:,}, {share:.1%})",
        markup=False,
    )
    out(
        f"packing efficiency {info['packing_efficiency']:.4f}   (padding to longest, batch 8: "
        f"{info['padded_fraction_batch8']:.4f})",
        markup=False,
    )
    out("document lengths:", markup=False)
    top = max([b["documents"] for b in info["length_histogram"]] + [1])
    for b in info["length_histogram"]:
        bar = "#" * round(40 * b["documents"] / top)
        out(f"  {b['from']:>6}-{b['to']:<6} {b['documents']:>8,}  {bar}", markup=False)
    for title in ("dropped", "skipped"):
        items = info[title]
        out(f"{title}: {'none' if not items else ''}", markup=False)
        for reason, n in items.items():
            out(f"  {n:>8,}  {reason}", markup=False)
    for w in info.get("warnings", []):
        out(f"warning: {w}", markup=False)


@app.command()
def show(
    folder: Path = typer.Argument(..., help="A prepared dataset folder."),
    row: int = typer.Option(0, "--row", "-r", help="Row number."),
):
    """Print one row, document by document; trained text is marked ⟦like this⟧ (green on a terminal).

    Example:

    ```
    qtulu data show data/sample --row 3
    ```
    """
    from qtulu.data.prepare import PreparedDataset
    from qtulu.model.tokenizer import load_text_tokenizer

    ds = PreparedDataset(folder)
    if not 0 <= row < len(ds):
        raise QtuluError(f"--row {row}: out of range; {folder} has rows 0..{len(ds) - 1}", 2)
    tok = load_text_tokenizer(str(ds.tokenizer_dir()))
    r = ds[row]
    console.print(
        f"row {row} of {len(ds)}: {len(r.input_ids)} tokens, {len(r.seq_lens)} documents, "
        f"{int((r.labels != -100).sum())} trained",
        markup=False,
    )
    for d, (a, b) in enumerate(itertools.pairwise(r.cu_seqlens.tolist())):
        ids, trained = r.input_ids[a:b].tolist(), (r.labels[a:b] != -100).tolist()
        console.print(f"── document {d} ({b - a} tokens, {sum(trained)} trained) ──", markup=False)
        console.print(render_marked(tok, ids, trained))


def render_marked(tok, ids: list[int], trained: list[bool]) -> Text:
    """Decoded text with trained runs wrapped in ⟦ ⟧. Runs are cut from decodes of growing prefixes,
    so spaces and multi-byte characters come out as in a decode of the whole document."""
    cuts = [0] + [i for i in range(1, len(ids)) if trained[i] != trained[i - 1]] + [len(ids)]
    text, previous = Text(), ""
    for a, b in itertools.pairwise(cuts):
        decoded = tok.decode(ids[:b], skip_special_tokens=False)
        piece = decoded[len(previous) :] if decoded.startswith(previous) else tok.decode(ids[a:b])
        previous = decoded
        if trained[a]:
            text.append(f"⟦{piece}⟧", style="bold green")
        else:
            text.append(piece, style="dim")
    return text

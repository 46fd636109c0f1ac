"""The run folder and its checkpoints: atomic writes, exact resume, nothing half-written taken.

RUN/
  config.yaml      the resolved config (a later `qtulu train` into RUN must match it)
  adapter/         the final LoRA adapter (PEFT format), tokenizer/ with the TÜLU chat template
  metrics.jsonl    one line per optimizer step
  checkpoints/step-00000010/
      adapter/ (PEFT), optimizer.pt, rng-rank0.pt (one per process: python, numpy, torch and CUDA
      RNG states), state.json (data position, scheduler, counters, the number of processes),
      config.yaml, metrics.jsonl (the metrics up to this step)

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed to
`step-N` and the parent fsynced: a `step-N` folder exists only when complete, so a SIGKILL at
any moment (mid-save included) leaves at worst a `.step-N.partial-*` folder that resume ignores
and the next save removes. `state.json` is written last as a second guard.

Several processes: the main process creates the temporary folder (start_checkpoint), every process
writes its RNG state into it (write_rank_rng), and once all have (a barrier in the loop) the main
process writes the shared parts and renames it (finish_checkpoint), which it refuses to do while
any process's RNG file is missing. With FSDP every process also writes its optimizer shard
(optimizer-rank{r}.pt) and the adapter is gathered from the shards first; with DDP (or one process)
the adapter and optimizer are the same in every process, so one copy is kept. A run resumes only
with the number of processes that wrote its checkpoint: another number would change how each
step's rows are split and summed, so not bit for bit the same.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from qtulu.errors import QtuluError

CHECKPOINTS = "checkpoints"
STATE = "state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# keys that may change between the sessions of one run (everything else must match to resume)
MAY_DIFFER = ("checkpoint.save_every_steps", "checkpoint.keep_last", "checkpoint.resume", "logging.", "data.cache_dir",
              # the launch is checked against the checkpoint itself, with a message that says how to resume
              "launch.num_gpus", "launch.strategy", "launch.cpu_allocator")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(folder)
    _fsync_dir(path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "sources":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every key that differs and must not."""
    a, b = flatten(saved), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_DIFFER) or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    folder = run_dir / CHECKPOINTS
    found = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = STEP_DIR.match(child.name)
            if match and (child / STATE).is_file():
                found.append((int(match.group(1)), child))
    return sorted(found)


def check_run_dir(run_dir: Path, config_dump: dict, resume: bool | None, world_size: int = 1,
                  strategy: str = "single") -> Path | None:
    """Decide what to do with the output folder before anything is written to it.

    Returns the checkpoint to resume from, or None for a fresh start. resume=True requires a
    checkpoint; resume=False refuses a folder that already holds a run; None resumes when there is
    a checkpoint. A folder holding a run with another config is refused in every mode, and a
    checkpoint written by another number of processes (or another strategy) is not resumed.
    """
    saved_path = run_dir / "config.yaml"
    if run_dir.exists() and not run_dir.is_dir():
        raise QtuluError(f"{run_dir}: exists and is not a folder; choose another --output")
    if saved_path.is_file():
        if resume is False:
            raise QtuluError(f"{run_dir}: already holds a run (config.yaml); choose a new --output, or resume "
                             "it with --resume")
        try:
            saved = yaml.safe_load(saved_path.read_text()) or {}
        except yaml.YAMLError:
            raise QtuluError(f"{saved_path}: not readable YAML; this folder holds a damaged run, choose another "
                             "--output") from None
        diffs = config_differences(saved, config_dump)
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise QtuluError(f"{run_dir}: holds another run's config ({'; '.join(diffs[:3])}{more}); choose a new "
                             "--output, or pass the same settings to resume it")
    elif run_dir.is_dir() and any(p.name != ".gitkeep" for p in run_dir.iterdir()):
        raise QtuluError(f"{run_dir}: exists and is not a qtulu run (no config.yaml); choose a new or empty --output")
    checkpoints = complete_checkpoints(run_dir)
    if resume is True and not checkpoints:
        raise QtuluError(f"{run_dir}: no complete checkpoint to resume from; start without --resume")
    if not checkpoints or resume is False:
        return None
    folder = checkpoints[-1][1]
    _check_same_launch(folder, world_size, strategy)
    return folder


def _check_same_launch(folder: Path, world_size: int, strategy: str) -> None:
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as e:
        raise QtuluError(f"{folder / STATE}: not readable ({e}); remove {folder} to resume from the one before") \
            from None
    saved, saved_strategy = state.get("world_size", 1), state.get("strategy", "single")
    if saved != world_size:
        how = ("without a launcher" if saved == 1 else
               f'under a launcher with {saved} processes, e.g. torchrun --nproc_per_node {saved} "$(which qtulu)" '
               "train ... --resume")
        raise QtuluError(f"{folder}: written by {saved} process(es), but {world_size} are running; a run resumes "
                         f"exactly only with the same number: resume it {how} (or start a new --output)")
    if saved_strategy != strategy:
        raise QtuluError(f"{folder}: written with launch.strategy {saved_strategy}, now {strategy}; resume it with "
                         f"--launch.strategy {saved_strategy} (or start a new --output)")


def rng_state() -> dict:
    state = {"python": list(random.getstate()), "torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _kill_self_if_asked(step: int) -> None:
    """Fault injection for the tests: QTULU_FAULT=kill-in-save@N SIGKILLs the process halfway
    through writing checkpoint N (after the adapter, before the optimizer and state)."""
    if os.environ.get("QTULU_FAULT") == f"kill-in-save@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def start_checkpoint(run_dir: Path, step: int) -> Path:
    """The hidden temporary folder checkpoint `step` is written into (main process)."""
    folder = run_dir / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*.partial-*"):  # left by a process killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{step:08d}.partial-"))


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def optimizer_file(rank: int | None) -> str:
    """optimizer.pt (the same in every process), or one shard's file per process (FSDP)."""
    return "optimizer.pt" if rank is None else f"optimizer-rank{rank}.pt"


def _save_fsynced(obj, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_rank_rng(tmp: Path, rank: int) -> None:
    """This process's RNG states into the checkpoint being written (every process)."""
    _save_fsynced(rng_state(), Path(tmp) / rng_file(rank))


def write_rank_optimizer(tmp: Path, optimizer, rank: int) -> None:
    """This process's optimizer shard into the checkpoint being written (FSDP, every process)."""
    _save_fsynced(optimizer.state_dict(), Path(tmp) / optimizer_file(rank))


def save_adapter(model, folder: Path, gathered: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter in PEFT's format (adapter_model.safetensors + adapter_config.json). `gathered`: the
    LoRA tensors gathered from FSDP shards, named as in the unwrapped model; PEFT's own saving
    matches names against the model's modules, which FSDP has renamed, so they are written here."""
    if gathered is None:
        model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    name = model.active_adapter
    # PEFT drops the adapter's name from the keys: ...q_proj.lora_A.default.weight -> ...q_proj.lora_A.weight
    save_file({k.replace(f".{name}.", "."): v.contiguous() for k, v in gathered.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})
    model.peft_config[name].save_pretrained(folder)


def finish_checkpoint(tmp: Path, run_dir: Path, step: int, model, optimizer, state: dict, config_text: str,
                      metrics_text: str, keep_last: int, adapter_state: dict | None = None) -> Path:
    """Write the shared parts into `tmp`, then rename it to checkpoint `step` (main process, after
    every process's write_rank_rng); keep only the newest `keep_last`. `optimizer` None: every
    process wrote its shard (FSDP); `adapter_state`: the adapter gathered from the shards."""
    folder = run_dir / CHECKPOINTS
    target = folder / f"step-{step:08d}"
    try:
        ranks = range(state.get("world_size", 1))
        missing = [r for r in ranks if not (tmp / rng_file(r)).is_file()
                   or (optimizer is None and not (tmp / optimizer_file(r)).is_file())]
        if missing:
            raise QtuluError(f"checkpoint {step}: no RNG or optimizer state from process(es) {missing}; not completed")
        save_adapter(model, tmp / "adapter", adapter_state)
        _kill_self_if_asked(step)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / optimizer_file(None))
        (tmp / "config.yaml").write_text(config_text)
        (tmp / "metrics.jsonl").write_text(metrics_text)
        (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks the folder complete
        _fsync_tree(tmp)
        if target.exists():  # the same step saved again (a resumed run that ended where it started)
            shutil.rmtree(target)
        tmp.rename(target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _unreadable(folder: Path, rank: int, e: Exception) -> QtuluError:
    who = f"process {rank}: " if rank else ""
    return QtuluError(f"{who}{folder}: checkpoint could not be loaded ({type(e).__name__}: {e})".splitlines()[0]
                      + "; remove it to resume from the one before")


def load_adapter(folder: Path, model, rank: int = 0) -> None:
    """Restore the adapter weights from `folder` (before FSDP shards them: every process loads all)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        weights = load_file(folder / "adapter" / "adapter_model.safetensors",
                            device=str(next(model.parameters()).device))
        set_peft_model_state_dict(model, weights)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise _unreadable(folder, rank, e) from None


def load_checkpoint(folder: Path, optimizer, rank: int = 0, sharded: bool = False) -> dict:
    """Restore the optimizer (this process's shard when `sharded`) and process `rank`'s RNG states
    from `folder`; return its state.json. The adapter comes first, with load_adapter."""
    try:
        optimizer.load_state_dict(torch.load(folder / optimizer_file(rank if sharded else None), weights_only=True))
        rng = folder / rng_file(rank)
        if not rng.is_file() and rank == 0 and (folder / "rng.pt").is_file():
            rng = folder / "rng.pt"  # written before checkpoints had one RNG file per process
        set_rng_state(torch.load(rng, weights_only=True))
        return json.loads((folder / STATE).read_text())
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        raise _unreadable(folder, rank, e) from None

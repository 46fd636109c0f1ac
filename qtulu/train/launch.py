"""Processes started by a launcher (torchrun, accelerate launch, mpirun): how many there are, and
what to tell a user who asks for several processes without a launcher.

Light on purpose (no torch): the CLI reads it before the config is even built.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from qtulu.config import RunConfig
from qtulu.configs import CONFIG_DIR
from qtulu.errors import QtuluError

# torchrun and accelerate set WORLD_SIZE; mpirun-style launchers their own (accelerate reads the same)
WORLD_SIZE_VARS = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launcher_world_size() -> int | None:
    """The number of processes the launcher started; None when no launcher started this one."""
    for name in WORLD_SIZE_VARS:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launcher_strategy() -> str | None:
    """The strategy the launcher's own config names: `accelerate launch` with an FSDP config (ours in
    configs/launch/fsdp_qlora.yaml, or any) sets ACCELERATE_USE_FSDP; None otherwise (torchrun, a DDP
    config), where several processes mean DDP."""
    return "fsdp" if os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes") else None


def _shown(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def check_launched(cfg: RunConfig, train_args: list[str]) -> None:
    """Refuse what would silently train in one process when several were meant.

    `train_args`: the arguments after `qtulu train`, repeated in the suggested command.
    """
    n = cfg.launch.num_gpus
    if launcher_world_size() is None and _accelerate_cpu_single():
        raise QtuluError("accelerate launch started ONE process although several were asked for (with --cpu, or "
                         "without --multi_gpu on a machine with no GPU, it runs a single plain process); for several "
                         "processes use accelerate launch --multi_gpu --num_processes N ... (gloo on the CPU), or "
                         "torchrun --nproc_per_node N ...", 2)
    if launcher_world_size() is not None or cfg.launch.strategy == "single":
        return
    args = shlex.join(train_args)
    config = _shown(CONFIG_DIR / "launch" / ("fsdp_qlora.yaml" if cfg.launch.strategy == "fsdp" else "ddp.yaml"))
    raise QtuluError(f"launch.strategy {cfg.launch.strategy} trains in {n} processes, which a launcher starts; "
                     f'run: accelerate launch --config_file {config} --num_processes {n} "$(which qtulu)" train '
                     f'{args}   or: torchrun --nproc_per_node {n} "$(which qtulu)" train {args}', 2)


def _accelerate_cpu_single() -> bool:
    """accelerate's simple launcher (taken for --cpu, and for --num_processes N without --multi_gpu
    on a machine with no GPU) runs one plain process, with MASTER_ADDR set when N > 1 and no
    WORLD_SIZE: the N processes asked for would silently be one."""
    return "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ

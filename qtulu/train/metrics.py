"""Where a run's per-step numbers go: metrics.jsonl always, TensorBoard and W&B when asked."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from qtulu.errors import QtuluError

FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "trainable_tokens", "tokens_per_s",
          "peak_memory_bytes", "elapsed_s")


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: the peak resident memory of the whole process."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class MetricsLog:
    """Appends one JSON line per optimizer step (flushed, so a crash loses at most the current
    line) and forwards the numbers to the trackers in `logging.report_to`."""

    def __init__(self, path: Path, report_to: list[str], run_name: str, config: dict, log_every: int):
        self.path, self.log_every = path, log_every
        self.file = open(path, "a")  # noqa: SIM115 (open for the whole run, closed by close())
        self.trackers = []
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise QtuluError("logging.report_to: tensorboard needs the tensorboard package "
                                 "(pip install tensorboard), or drop it from logging.report_to", 2) from None
            self.trackers.append(("tensorboard", SummaryWriter(str(path.parent / "tensorboard"))))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise QtuluError("logging.report_to: wandb is not installed (pip install wandb), or drop it "
                                 "from logging.report_to", 2) from None
            self.trackers.append(("wandb", wandb.init(name=run_name, config=config, dir=str(path.parent))))

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if record["step"] % self.log_every:
            return
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}
        for kind, tracker in self.trackers:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    tracker.add_scalar(f"train/{key}", value, record["step"])
            else:
                tracker.log({f"train/{k}": v for k, v in scalars.items()}, step=record["step"])

    def close(self) -> None:
        self.file.close()
        for kind, tracker in self.trackers:
            tracker.close() if kind == "tensorboard" else tracker.finish()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

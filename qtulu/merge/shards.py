"""Writing a model's tensors as sharded safetensors (Hugging Face layout) while they are produced.

At most one shard is held in memory: when the next tensor would push it over the size limit, the
shard is written and dropped. Names follow transformers: `model.safetensors` when everything fits
in one shard, else `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qtulu.errors import QtuluError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(text.strip().upper() if isinstance(text, str) else text)
    except (ValueError, AttributeError):
        raise QtuluError(f"--max-shard-size: {text!r} is not a size such as 5GB, 500MB or a number of bytes", 2) \
            from None
    if size <= 0:
        raise QtuluError(f"--max-shard-size: {text!r} must be positive", 2)
    return size


class ShardWriter:
    def __init__(self, folder: Path, max_shard_bytes: int):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = tensor.detach().contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        path = self.folder / f".shard-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names (and the index); return the file names."""
        self.flush()
        count = len(self.shards)
        if count == 1:
            self.shards[0][0].rename(self.folder / WEIGHTS_NAME)
            return [WEIGHTS_NAME]
        weight_map, names = {}, []
        for i, (path, tensors) in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(tensors, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX_NAME]

"""Which rows each optimizer step reads, and how they become device tensors.

The data order of an epoch is a seeded permutation of the prepared rows, so a position in the
data is just (epoch, index) and resuming needs nothing else. The permutation visits the shards in
a shuffled order and the rows of each shard in a shuffled order: rows were already shuffled
across the whole mix when the dataset was prepared, and this way each parquet shard is decoded
once per epoch instead of once per row.

A step takes `batch_size` consecutive rows of the order (an epoch's remainder of fewer rows is
skipped; the next epoch reshuffles, so other rows are left out then). Every process reads its own
share of those rows (rank r of n: rows r, r + n, ...), so the global batch and the data order do
not depend on how many processes there are; each process splits its share into micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qtulu.data.prepare import PreparedDataset, Row, collate_packed, collate_padded
from qtulu.errors import QtuluError


def epoch_order(shard_rows: list[int], seed: int, epoch: int) -> np.ndarray:
    """Row indices of one epoch: shards in a seeded order, rows shuffled within each shard."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(shard_rows)[:-1]]).astype(np.int64)
    pieces = [starts[k] + rng.permutation(shard_rows[k]) for k in rng.permutation(len(shard_rows))]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


@dataclass
class Position:
    """Where the next step starts reading: `index` rows into epoch `epoch`'s order."""

    epoch: int = 0
    index: int = 0


class StepBatches:
    """The rows of every optimizer step, in order, from a prepared dataset."""

    def __init__(self, dataset: PreparedDataset, batch_size: int, micro_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if len(dataset) < batch_size:
            raise QtuluError(
                f"{dataset.folder}: {len(dataset)} rows, fewer than one optimizer step of optim.batch_size "
                f"{batch_size}; lower optim.batch_size or use a larger mix"
            )
        self.dataset, self.batch_size, self.micro_batch_size = dataset, batch_size, micro_batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = len(dataset) // batch_size
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.dataset.shard_rows, self.seed, epoch))
        return self._order[1]

    def next_step(self, pos: Position) -> tuple[list[list[Row]], Position]:
        """This process's micro-batches for the step at `pos`, and the position after it."""
        if pos.index + self.batch_size > self.steps_per_epoch * self.batch_size:
            pos = Position(pos.epoch + 1, 0)
        indices = self.order(pos.epoch)[pos.index : pos.index + self.batch_size]
        mine = indices[self.rank :: self.world_size]
        rows = [self.dataset[int(i)] for i in mine]
        micro = [rows[i : i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
        return micro, Position(pos.epoch, pos.index + self.batch_size)


def collate(rows: list[Row], packed: bool, pad_id: int, device: torch.device) -> dict:
    """One micro-batch on the device: packed (flat row with boundaries) or padded (attention mask)."""
    batch = collate_packed(rows) if packed else collate_padded(rows, pad_id)
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def count_tokens(rows: list[Row]) -> tuple[int, int]:
    """(real tokens, trained targets) of some rows; targets exclude each document's last token,
    which has no next token inside its document."""
    tokens = sum(len(r.input_ids) for r in rows)
    targets = 0
    for r in rows:
        trained = r.labels != -100
        trained[r.cu_seqlens[:-1]] = False  # a document's first token is never a target
        targets += int(trained.sum())
    return tokens, targets

"""The training data order: a seeded permutation per epoch, each parquet shard decoded once per
epoch, every process reading a disjoint share of each step's rows."""

import numpy as np
import pytest

from qtulu.data import prepare
from qtulu.data.mixtures import load_mix
from qtulu.data.prepare import PreparedDataset, prepare_dataset
from qtulu.train.batches import Position, StepBatches, epoch_order


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The sample mix prepared in many small shards (a few rows each), so the order crosses shards."""
    from qtulu.model.tokenizer import load_tokenizer

    mp = pytest.MonkeyPatch()
    mp.setattr(prepare, "SHARD_TOKENS", 4 * 256)  # 4 rows of 256 tokens per shard
    try:
        folder = prepare_dataset(load_mix("sample"), None, load_tokenizer("qtulu/micro-bpe"), 256, 3,
                                 tmp_path_factory.mktemp("sharded") / "sample")
    finally:
        mp.undo()
    ds = PreparedDataset(folder)
    assert len(ds.shards) >= 5
    return folder


def row_key(row):
    return tuple(row.input_ids.tolist())


def test_epoch_order_is_a_seeded_permutation():
    shard_rows = [4, 4, 3, 4, 1]
    order = epoch_order(shard_rows, seed=5, epoch=0)
    assert sorted(order.tolist()) == list(range(16))
    assert np.array_equal(order, epoch_order(shard_rows, seed=5, epoch=0))
    assert not np.array_equal(order, epoch_order(shard_rows, seed=5, epoch=1))
    assert not np.array_equal(order, epoch_order(shard_rows, seed=6, epoch=0))


def test_each_shard_is_decoded_once_per_epoch(sharded):
    ds = PreparedDataset(sharded)
    steps = StepBatches(ds, batch_size=4, micro_batch_size=2, seed=11)
    pos, seen = Position(), []
    for _ in range(steps.steps_per_epoch):
        micro, pos = steps.next_step(pos)
        seen += [row_key(r) for mb in micro for r in mb]
    assert ds.shard_reads == len(ds.shards)
    # one epoch reads distinct rows: all of them but the remainder of fewer than a batch
    assert len(set(seen)) == len(seen) == steps.steps_per_epoch * 4 > len(ds) - 4


def test_processes_share_each_step_disjointly(sharded):
    ds = PreparedDataset(sharded)
    one = StepBatches(ds, batch_size=4, micro_batch_size=4, seed=11)
    ranks = [StepBatches(PreparedDataset(sharded), batch_size=4, micro_batch_size=1, seed=11, rank=r, world_size=2)
             for r in range(2)]
    pos = Position()
    for _ in range(one.steps_per_epoch + 2):  # into the next epoch as well
        (whole,), after = one.next_step(pos)
        shares = [rank.next_step(pos) for rank in ranks]
        assert all(after == later for _, later in shares)
        split = [row_key(r) for micro, _ in shares for mb in micro for r in mb]
        assert sorted(split) == sorted(row_key(r) for r in whole)
        assert len(split) == 4
        pos = after

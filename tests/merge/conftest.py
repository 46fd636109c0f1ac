import pytest
from micro_runs import make_run, micro_config


@pytest.fixture(scope="session")
def run_a(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "a", micro_config(), seed=1)


@pytest.fixture(scope="session")
def run_b(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "b", micro_config(), seed=2)


@pytest.fixture(scope="session")
def run_other_base(tmp_path_factory):
    """A run on a different micro base (other width): its adapter does not fit run_a's base."""
    cfg = micro_config("--model.arch.hidden_size", "64", "--model.arch.intermediate_size", "176")
    return make_run(tmp_path_factory.mktemp("runs") / "other", cfg, seed=3)


@pytest.fixture(scope="session")
def merged_a(run_a, tmp_path_factory):
    """run_a merged in fp32 through the library, in small shards (so sharding is exercised), verified."""
    from qtulu.merge.merge import merge_runs

    out = tmp_path_factory.mktemp("merged") / "a"
    result = merge_runs([run_a.dir], output=out, dtype="fp32", max_shard_size="300KB")
    return result

"""building_dir: a folder appears whole or not at all."""

import pytest

from qtulu.files import building_dir


def test_success_moves_the_folder_into_place(tmp_path):
    target = tmp_path / "out"
    with building_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
        assert not target.exists()  # nothing visible under the final name while building
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("replace", [False, True])
def test_failure_leaves_no_partial_folder_and_keeps_the_old_one(tmp_path, replace):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), building_dir(target, replace=replace) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_replace_swaps_and_cache_mode_keeps(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with building_dir(target) as tmp:  # cache mode: someone else built it first; theirs stays
        (tmp / "a.txt").write_text("ours")
    assert (target / "a.txt").read_text() == "old"
    with building_dir(target, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

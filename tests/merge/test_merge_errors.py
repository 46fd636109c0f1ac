"""Bad input to `qtulu merge`: one line on stderr naming what is wrong, a non-zero exit, no traceback.

Run in-process through the CLI's entry point (qtulu.cli.main), as the installed script runs it.
"""

import shutil
import sys

import pytest
import yaml

from qtulu import cli


def merge_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["qtulu", "merge", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    return exit_info.value.code, errors[0]


def copy_run(run, folder):
    shutil.copytree(run.dir, folder)
    return folder


def test_a_missing_folder(monkeypatch, capsys, tmp_path):
    code, line = merge_cli(monkeypatch, capsys, tmp_path / "nope")
    assert code == 1 and line.endswith("nope: no such folder")


def test_a_folder_that_is_not_a_run(monkeypatch, capsys, tmp_path):
    code, line = merge_cli(monkeypatch, capsys, tmp_path)
    assert code == 1 and "not a qtulu run folder, no config.yaml" in line


def test_a_run_with_no_adapter(monkeypatch, capsys, run_a, tmp_path):
    run = copy_run(run_a, tmp_path / "run")
    shutil.rmtree(run / "adapter")
    code, line = merge_cli(monkeypatch, capsys, run)
    assert code == 1 and "no adapter" in line and "adapter_config.json is missing" in line


def test_an_adapter_for_another_base(monkeypatch, capsys, run_a, run_other_base, tmp_path):
    run = copy_run(run_a, tmp_path / "run")
    shutil.rmtree(run / "adapter")
    shutil.copytree(run_other_base.dir / "adapter", run / "adapter")
    code, line = merge_cli(monkeypatch, capsys, run)
    assert code == 1 and "the adapter was trained on another base" in line and "features" in line
    assert not (run / "merged").exists()


def test_a_missing_base(monkeypatch, capsys, run_a, tmp_path):
    run = copy_run(run_a, tmp_path / "run")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(name_or_path=str(tmp_path / "models" / "llama-7b"), init="pretrained")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, line = merge_cli(monkeypatch, capsys, run)
    assert code == 1 and "llama-7b: folder does not exist" in line


def test_adapters_of_different_bases_in_one_combination(monkeypatch, capsys, run_a, run_other_base, tmp_path):
    code, line = merge_cli(monkeypatch, capsys, run_a.dir, run_other_base.dir, "--output", tmp_path / "mix")
    assert code == 1 and "trained on another base than" in line and "arch.hidden_size: 64 vs 128" in line


def test_a_broken_config(monkeypatch, capsys, run_a, tmp_path):
    run = copy_run(run_a, tmp_path / "run")
    (run / "config.yaml").write_text("name: x\nmodel: [1, 2\n")
    code, line = merge_cli(monkeypatch, capsys, run)
    assert code == 1 and "config.yaml: not valid YAML" in line


@pytest.mark.parametrize("args,expected", [
    (["--dtype", "int8"], "--dtype: 'int8' is not one of bf16, fp16, fp32"),
    (["--base", "fp16"], "--base: 'fp16' is not one of dequantized, original"),
    (["--max-shard-size", "lots"], "--max-shard-size: 'lots' is not a size"),
    (["--weights", "0.5"], "--weights: combining needs two or more runs"),
])
def test_bad_options(monkeypatch, capsys, run_a, tmp_path, args, expected):
    code, line = merge_cli(monkeypatch, capsys, run_a.dir, "--output", tmp_path / "out", *args)
    assert code == 2 and expected in line
    assert not (tmp_path / "out").exists()


def test_bad_combination_options(monkeypatch, capsys, run_a, run_b, tmp_path):
    for args, expected in [
        ([], "--output: name the folder for a combination"),
        (["--output", tmp_path / "o", "--weights", "1,x"], "--weights: '1,x' is not a comma-separated list"),
        (["--output", tmp_path / "o", "--method", "ties"], "--method ties needs --density"),
        (["--output", tmp_path / "o", "--method", "average"], "--method: 'average' is not one of"),
    ]:
        code, line = merge_cli(monkeypatch, capsys, run_a.dir, run_b.dir, *args)
        assert code == 2 and expected in line, line


def test_output_inside_the_run_is_refused(monkeypatch, capsys, run_a):
    code, line = merge_cli(monkeypatch, capsys, run_a.dir, "--output", run_a.dir / "adapter", "--force")
    assert code == 2 and "would replace the run folder" in line
    assert (run_a.dir / "adapter" / "adapter_config.json").is_file()

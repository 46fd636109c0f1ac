"""qtulu: QLoRA finetuning on the TÜLU recipe, on one GPU."""

__version__ = "0.1.0"

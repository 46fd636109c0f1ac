"""Merging LoRA adapters into their base: dequantize (as training saw it), merge, verify, save.

`qtulu.merge.merge.merge_runs` is the whole command; base.py streams the base as trained, adapters.py
loads/combines/merges with PEFT, shards.py writes safetensors, verify.py compares logits.
"""

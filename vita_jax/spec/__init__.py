"""The facts both frameworks share, with no JAX, Flax or PyTorch import: special tokens and
their ids, tokens per tile, where visual features go, the zigzag token layout, the model config
schema, the Hugging Face config and key tables of the two checkpoint layouts, and the reader of
checkpoint files (config.json, safetensors).

`vita_jax.data`, `vita_jax.models`, the commands and `vita_torch` all read these; nothing here
imports from them (tests/test_imports.py checks the rule).
"""

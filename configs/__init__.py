"""Experiment configs (ml_collections), shared by vita_jax and vita_torch.

Each `stageN.py` has `get_config(arg)` where `arg` is the model size after the colon in
`--config=configs/stageN.py:tiny`.
"""

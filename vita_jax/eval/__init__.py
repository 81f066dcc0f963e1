"""Evaluations that run a trained model end to end (`python -m vita_jax.eval.needle`)."""

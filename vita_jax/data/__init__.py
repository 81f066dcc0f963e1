"""Data pipeline: manifests, images, video, tokenization, packing, demo corpus.

Never imports vita_jax.models.
"""

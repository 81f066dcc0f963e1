"""Flax NNX modules: InternViT vision tower, projector, Qwen2 decoder, the VLM."""

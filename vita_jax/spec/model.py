"""The schema of a model config (`config.model`), shared by both frameworks.

`configs/base.py` fills it with the sizes of each model; `spec/hf_config.py` fills it from a
checkpoint's config.json. Both build it with these functions, so every model config has the
same fields.
"""

from __future__ import annotations

import ml_collections

from vita_jax.spec.tokens import special_token_ids

REMAT_POLICIES = ("none", "full", "dots")     # per decoder layer
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("jnp", "pallas", "auto", "dense", "xla", "cudnn")


def vision_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int,
                  mlp: int) -> ml_collections.ConfigDict:
  """An InternViT tower."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size,          # tile side in pixels
      patch_size=patch_size,
      hidden_size=hidden,
      num_layers=layers,
      num_heads=heads,
      mlp_dim=mlp,
      layer_norm_eps=1e-6,
      qkv_bias=True,
      layer_scale_init=0.1,           # InternViT ls1/ls2 init value
  ))


def llm_config(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, *,
               head_dim: int | None = None, tie: bool = False,
               max_positions: int = 1_048_576) -> ml_collections.ConfigDict:
  """A Qwen2 decoder."""
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab,
      hidden_size=hidden,
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim or hidden // heads,
      ffn_dim=ffn,
      rms_norm_eps=1e-6,
      rope_theta=1e6,
      qkv_bias=True,
      tie_embeddings=tie,
      max_position_embeddings=max_positions,   # longest context (prompts are checked)
  ))


def model_config(*, size: str, vision: ml_collections.ConfigDict,
                 llm: ml_collections.ConfigDict, projector_hidden: int,
                 tokens: ml_collections.ConfigDict | None = None, max_tiles: int = 12,
                 layout: str = "long_vita") -> ml_collections.ConfigDict:
  """The whole model: vision tower, projector, decoder, token ids and run-time choices."""
  return ml_collections.ConfigDict(dict(
      size=size,
      layout=layout,                  # HF layout save_pretrained writes by default
      vision=vision,
      llm=llm,
      downsample_ratio=0.5,           # pixel shuffle: (h/p)^2 patches -> (h/p * r)^2 tokens
      projector=dict(
          hidden_size=projector_hidden,
          bias=False,                 # long_vita: no bias; internvl layout: True
          pre_norm=True,
          layer_norm_eps=1e-5,
      ),
      tokens=tokens if tokens is not None else special_token_ids(151665, 151645, 151643),
      max_tiles=max_tiles,
      # Dtypes: fp32 master params, bf16 compute for training; parity runs set float32.
      param_dtype="float32",
      compute_dtype="bfloat16",
      remat="full",                   # one of REMAT_POLICIES
      scan_layers=True,
      attention=dict(
          q_chunk=1024,               # inner query/key block sizes of the attention kernel
          kv_chunk=1024,
          impl="jnp",                 # one of ATTENTION_IMPLS (or a registered kernel)
      ),
  ))

"""Analytic per-device memory of one training step, from the config and a mesh shape alone.

Parameters are read off the model (abstract shapes and logical axes) and sharded by
`parallel.sharding.logical_to_spec`, so their bytes are exact. Activations are counted per
decoder / vision layer from the tensors the backward pass keeps under `model.remat`, plus the
largest short-lived buffers (one layer's recomputation, FSDP-gathered weights, attention tiles,
the LM-head chunk). `vita_jax.plan --check` compares the result with XLA's own figures.

`serve_estimate` does the same for serving a prompt with `vita_jax.generate`: the weights, the
KV cache and one prefill layer's temporaries on a generation mesh (`plan --serve`).

All sizes are bytes per device. Token counts per device: batch over data*fsdp, sequence over seq.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import NamedTuple

import ml_collections

from vita_jax.parallel.sharding import logical_to_spec
from vita_jax.spec.tokens import tokens_per_tile

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class MeshShape(NamedTuple):
  """Stands in for a `jax.sharding.Mesh` where only `.shape` is read (no devices needed)."""
  shape: dict


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  module: str                      # "vision" | "projector" | "llm"
  name: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]


def param_table(model: ml_collections.ConfigDict) -> list[ParamInfo]:
  """Every parameter of LongVITA with its shape and logical axes, read off the model itself
  (`nnx.eval_shape`: abstract, nothing allocated; cached per model config)."""
  return list(_param_table(model.to_json()))


@functools.lru_cache(maxsize=16)
def _param_table(model_json: str) -> tuple[ParamInfo, ...]:
  from flax import nnx

  from vita_jax.models.vlm import LongVITA
  cfg = ml_collections.ConfigDict(json.loads(model_json))
  abstract = nnx.eval_shape(lambda: LongVITA(cfg, rngs=nnx.Rngs(0)))
  return tuple(
      ParamInfo(str(path[0]), ".".join(map(str, path[1:])), tuple(var.get_value().shape),
                tuple(var.get_metadata()["logical_axes"]))
      for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def local_elements(shape, axes, mesh_shape: dict) -> int:
  """Elements of one device's shard of an array with these logical axes."""
  spec = logical_to_spec(axes, MeshShape(mesh_shape), shape)
  count = 1
  for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    count *= size // math.prod(mesh_shape[a] for a in names)
  return count


def _split(n: int, mesh_shape: dict, axes: tuple[str, ...]) -> int:
  """Per-device share of a dimension of size n over mesh axes (replicated where not divisible,
  as logical_to_spec does)."""
  share = n
  for a in axes:
    if share % mesh_shape.get(a, 1) == 0:
      share //= mesh_shape.get(a, 1)
  return share


def tile_budget(config: ml_collections.ConfigDict) -> int:
  """Tiles (frames) per global micro-batch: the static pixel budget the data pipeline uses."""
  data = config.data
  rows = data.global_batch_size // max(int(config.train.grad_accum), 1)
  if data.tiles_per_batch:
    return int(data.tiles_per_batch)
  return rows * max(1, data.seq_len // (tokens_per_tile(config.model) + 2))


def tokens_per_device(config: ml_collections.ConfigDict, mesh_shape: dict) -> int:
  """Decoder tokens one device holds in a micro-batch (batch over data*fsdp, length over seq)."""
  rows = config.data.global_batch_size // max(int(config.train.grad_accum), 1)
  return _split(rows, mesh_shape, ("data", "fsdp")) * _split(config.data.seq_len, mesh_shape,
                                                                ("seq",))


def attention_kernel(mesh_shape: dict, impl: str = "jnp") -> str:
  """Which kernel `ops.attention.attention` runs: the ring when seq is sharded; else the same
  tiled block kernel on each device ("chunked", impl jnp / pallas / auto), or the [S, S] scores
  of the dense, xla and cudnn kernels ("dense")."""
  if mesh_shape.get("seq", 1) > 1:
    return "ring"
  return "dense" if impl in ("dense", "xla", "cudnn") else "chunked"


@dataclasses.dataclass
class Estimate:
  """Bytes per device. `kept` rows live through the whole step; the peak adds the larger of the
  two phases' short-lived buffers (vision tower first, then the decoder and LM head)."""
  kept: dict[str, float]
  vision_phase: dict[str, float]
  llm_phase: dict[str, float]
  arguments: float                 # what XLA calls argument bytes (state + batch)

  @property
  def peak(self) -> float:
    return sum(self.kept.values()) + max(sum(self.vision_phase.values()),
                                         sum(self.llm_phase.values()))

  @property
  def temp(self) -> float:
    return self.peak - self.arguments


def estimate(config: ml_collections.ConfigDict, mesh_shape: dict) -> Estimate:
  """Per-device memory of one training step of `config` on a mesh of `mesh_shape`."""
  model, train, data = config.model, config.train, config.data
  ms = {a: int(mesh_shape.get(a, 1)) for a in ("data", "fsdp", "seq", "tensor")}
  pbytes, c = BYTES[model.param_dtype], BYTES[model.compute_dtype]
  trainable = set(train.trainable)
  accum = max(int(train.grad_accum), 1)

  # Parameters, gradients, Adam moments: exact from the table.
  table = param_table(model)
  local = {(p.module, p.name): local_elements(p.shape, p.axes, ms) for p in table}
  n_train = sum(n for (mod, _), n in local.items() if mod in trainable)
  n_all = sum(local.values())
  kept = {"params (master, all modules)": n_all * pbytes,
          "optimizer (Adam mu + nu)": 2 * n_train * 4}

  t = model.llm
  rows = data.global_batch_size // accum
  b = _split(rows, ms, ("data", "fsdp"))
  s = _split(data.seq_len, ms, ("seq",))
  tok = b * s                                        # decoder tokens per device
  hq, hkv = _split(t.num_heads, ms, ("tensor",)), _split(t.num_kv_heads, ms, ("tensor",))
  hd, d, f = t.head_dim, t.hidden_size, _split(t.ffn_dim, ms, ("tensor",))
  vocab = _split(t.vocab_size, ms, ("tensor",))
  llm_grads = "llm" in trainable
  needs_backward = bool(trainable & {"vision", "projector", "llm"})

  # Gradients: fp32 like the master params (plus an accumulator with grad_accum > 1); a scanned
  # layer stack's cotangent is built in the compute dtype first.
  layer_elems = sum(n for (mod, name), n in local.items() if mod == "llm" and "layers." in name)
  grads = n_train * 4 * (2 if accum > 1 else 1)
  if llm_grads and c != 4:
    grads += layer_elems * c
  kept["gradients"] = grads
  # Compute-dtype copies of the stacked layer weights (layer_params() casts the whole stack).
  if c != pbytes:
    kept["layer weights in compute dtype"] = layer_elems * c

  # The batch: token arrays split like activations; pixels split over data*fsdp like the rows
  # (as train.py feeds them; replicated where the tile budget does not divide).
  tiles = tile_budget(config)
  v = model.vision
  pixels = _split(tiles, ms, ("data", "fsdp")) * v.image_size ** 2 * 3 * 4
  kept["batch inputs"] = accum * (5 * tok * 4 + pixels)
  arguments = kept["params (master, all modules)"] + kept["optimizer (Adam mu + nu)"] + \
      kept["batch inputs"]

  # Decoder activations kept for the backward pass, per layer and per token (the set XLA keeps
  # for this code: residual stream, norms, q/k/v before and after RoPE, attention output, and
  # gate and up: `swiglu_mlp` recomputes silu(gate) * up in its backward).
  layer_all = (6 * d + 4 * hq * hd + 2 * hkv * hd + 2 * f) * c + 4 * hq
  # With the decoder frozen no weight gradient is formed, so the inputs of its matmuls are not
  # kept: what remains are the two norm inputs, q/k/v after RoPE and the attention output (the
  # attention backward), the log-sum-exp, and gate and up (the SwiGLU backward).
  saved_none = layer_all if llm_grads else (2 * d + 2 * hq * hd + 2 * hkv * hd + 2 * f) * c + 4 * hq
  policy = model.remat if needs_backward else "none"
  saved_per_token = {"none": saved_none, "full": d * c,
                     "dots": 3 * d * c + (hq + 2 * hkv) * hd * c + 2 * f * c}[policy]
  kernel = attention_kernel(ms, str(model.attention.get("impl", "jnp")))
  dense_scores = b * hq * s * s
  layers = t.num_layers
  kept_llm = {}
  if needs_backward:
    kept_llm[f"decoder activations (remat={policy})"] = layers * tok * saved_per_token
    if kernel == "dense" and policy == "none":
      kept_llm["decoder activations (remat=none)"] += layers * dense_scores * (4 + 1)
    kept_llm["rope tables + hidden cotangent"] = tok * (2 * hd * 4 + d * 4)

  # Short-lived buffers of the decoder phase.
  fsdp_gather = 0.0
  if ms["fsdp"] > 1:   # one layer's weights gathered over fsdp (double-buffered)
    per_layer = layer_elems / layers
    fsdp_gather = 2 * per_layer * ms["fsdp"] * c + (per_layer * ms["fsdp"] * 4 if llm_grads else 0)
  recompute = tok * layer_all if (needs_backward and policy != "none") else 0.0
  if kernel != "dense":
    cq = min(int(model.attention.q_chunk), s)
    ck = min(int(model.attention.kv_chunk), s)
    attn = 4 * tok * hkv * hd * c + (4 * tok * hkv * hd * 4 if needs_backward else 0)
    attn += b * cq * hq * ck * (4 * 4 + 1)  # fp32 scores, probabilities, dP, dS; bool mask
  else:
    attn = 3 * dense_scores * 4
  chunk = min(int(train.lm_head_chunk), tok)
  buffer = math.ceil(tok / chunk) * chunk
  # Logits and their gradient for one chunk, the gathered rows, and the fp32 head-weight gradient
  # accumulated across chunks when the LLM trains.
  lm_head = 2 * chunk * vocab * 4 + buffer * d * (c + 4) + (d * vocab * 4 if llm_grads else 0)
  llm_phase = dict(kept_llm)
  llm_phase["decoder layer working set"] = recompute + fsdp_gather
  llm_phase["attention blocks"] = attn
  if lm_head > recompute + fsdp_gather + attn:     # the LM head runs between fwd and bwd
    llm_phase["decoder layer working set"] = 0.0
    llm_phase["attention blocks"] = 0.0
    llm_phase["LM head chunk"] = lm_head
  else:
    llm_phase["LM head chunk"] = 0.0

  # Vision tower + projector + merged features.
  n_tok = (v.image_size // v.patch_size) ** 2 + 1
  tiles_local = _split(tiles, ms, ("data", "fsdp", "seq"))
  vh = _split(v.num_heads, ms, ("tensor",))
  vm = _split(v.mlp_dim, ms, ("tensor",))
  vis_layer = tiles_local * n_tok * ((11 * v.hidden_size + 3 * vm) * c + 4 * vh * n_tok)
  vis_transient = tiles_local * (n_tok * (4 * v.hidden_size * c + 2 * vm * c) +
                                 2 * vh * n_tok * n_tok * 4)
  tpt = tokens_per_tile(model)
  proj = tiles_local * tpt * (2 * 4 * v.hidden_size * c + 2 * model.projector.hidden_size * c)
  features = tiles * tpt * d * c        # gathered to place them at the context tokens
  vision_phase = {}
  # Patchifying this device's pixels: the [tiles*patches, p*p*3] matrix and a gathered copy;
  # kept for the patch-embedding gradient when vision trains.
  patchify = 2 * pixels
  if "vision" in trainable:
    kept["patchified pixels"] = patchify
    saved = {"none": vis_layer, "full": tiles_local * n_tok * v.hidden_size * c,
             "dots": vis_layer / 2}[model.remat]
    kept["vision activations"] = v.num_layers * saved + proj
    vision_phase["vision layer working set"] = vis_layer if model.remat != "none" else 0.0
  else:
    if "projector" in trainable:
      kept["projector activations"] = proj
    vision_phase["vision layer working set"] = vis_transient
    vision_phase["patchified pixels"] = patchify
  vision_phase["visual features"] = features
  llm_phase["visual features"] = features
  return Estimate(kept, vision_phase, llm_phase, arguments)


# Serving: one prompt prefilled by `vita_jax.models.decoding.prefill_step` on the generation mesh
# `vita_jax.generate` builds (data=1; the prompt and its KV cache over `seq`, the parameters over
# `fsdp` and `tensor` by their logical axes), then decoded token by token against that cache.


def serve_bucket(prompt_len: int, seq: int) -> int:
  """The padded prompt length prefill compiles for (`vita_jax.generate.bucket_length`)."""
  unit = 2 * seq
  return unit * (1 << max(0, math.ceil(math.log2(max(1, -(-prompt_len // unit))))))


def new_token_slots(max_new_tokens: int) -> int:
  """Rows of the replicated generated-token K/V buffer (`new_len` in vita_jax.generate)."""
  return max(16, 1 << math.ceil(math.log2(max(1, max_new_tokens))))


@dataclasses.dataclass
class ServeEstimate:
  """Bytes per device of serving one prompt batch; the peak is during prefill, when the weights,
  the prompt arrays, the cache being written and one layer's temporaries are live at once."""
  weights: dict[str, float]
  kv_cache: dict[str, float]
  activations: dict[str, float]
  inputs: float                    # the prompt arrays prefill reads (ids, context index, ...)
  logits: float                    # fp32 logits at the last prompt token
  bucket: int                      # padded prompt length
  tokens: int                      # prompt tokens per device

  @property
  def total(self) -> float:
    return sum(self.weights.values()) + sum(self.kv_cache.values()) + \
        sum(self.activations.values()) + self.inputs + self.logits

  @property
  def decode(self) -> float:
    """What the decode loop holds besides one token's temporaries: weights and KV cache."""
    return sum(self.weights.values()) + sum(self.kv_cache.values())

  # What XLA reports for the compiled prefill_step (jit drops the unused vision tower weights).
  @property
  def prefill_arguments(self) -> float:
    return self.weights["LLM"] + self.inputs

  @property
  def prefill_outputs(self) -> float:
    return sum(self.kv_cache.values()) + self.logits

  @property
  def prefill_temp(self) -> float:
    return sum(self.activations.values())

  @property
  def prefill_peak(self) -> float:
    return self.prefill_arguments + self.prefill_outputs + self.prefill_temp


def serve_estimate(model: ml_collections.ConfigDict, prompt_len: int, mesh_shape: dict, *,
                   max_new_tokens: int = 1, batch: int = 1,
                   weights_dtype: str | None = None) -> ServeEstimate:
  """Per-device memory of `vita_jax.generate` serving `batch` prompts of `prompt_len` tokens on
  the generation mesh `mesh_shape` (seq, fsdp, tensor; data is 1), with the weights held in
  `weights_dtype` (default: the compute dtype, as `load_pretrained(dir, dtype=...)` loads them).

  Text only: images add the vision tower's activations (run before prefill, in chunks) and the
  projected features, which are not counted; the tower's weights are. Attention is counted for
  the chunked kernel the ring runs (impl "jnp"; a fused Pallas kernel keeps its tiles on chip,
  so the tile term overestimates it), or the [S, S] scores of a dense local kernel on a mesh
  without seq sharding.
  """
  ms = {a: int(mesh_shape.get(a, 1)) for a in ("fsdp", "seq", "tensor")}
  ms["data"] = 1
  c = BYTES[model.compute_dtype]
  w = BYTES[weights_dtype or model.compute_dtype]
  t = model.llm
  table = param_table(model)
  local = {(p.module, p.name): local_elements(p.shape, p.axes, ms) for p in table}
  llm_elems = sum(n for (mod, _), n in local.items() if mod == "llm")
  layer_elems = sum(n for (mod, name), n in local.items() if mod == "llm" and "layers." in name)
  weights = {"LLM": llm_elems * w,
             "vision tower + projector": (sum(local.values()) - llm_elems) * w}

  bucket = serve_bucket(prompt_len, ms["seq"])
  b = _split(batch, ms, ("data", "fsdp"))
  s = bucket // ms["seq"]
  tok = b * s                                   # prompt tokens per device
  hd, d, layers = t.head_dim, t.hidden_size, t.num_layers
  f = _split(t.ffn_dim, ms, ("tensor",))
  vocab = _split(t.vocab_size, ms, ("tensor",))
  # The cache keeps every layer's K/V where the ring computed it: sharded over seq (and batch
  # over fsdp where it divides), heads replicated. The generated tokens' buffer is replicated.
  kv_cache = {
      "prompt K/V [layers, B, S/seq, Hkv, hd]": 2 * layers * tok * t.num_kv_heads * hd * c,
      "generated-token K/V buffer (replicated)":
          2 * layers * batch * new_token_slots(max_new_tokens) * t.num_kv_heads * hd * c,
      "cache positions + segment ids": 2 * tok * 4,
  }
  inputs = 4 * tok * 4 + batch * 4              # ids, context index, positions, segments, last
  logits = b * vocab * 4

  # Ring attention runs on KV-head groups: heads split over tensor only when the KV heads divide.
  hkv_r = _split(t.num_kv_heads, ms, ("tensor",))
  hq_r = hkv_r * (t.num_heads // t.num_kv_heads)
  attn_cfg = model.get("attention", {})
  cq = min(int(attn_cfg.get("q_chunk", 0) or 512), s)
  ck = min(int(attn_cfg.get("kv_chunk", 0) or 512), s)
  layer_weights = layer_elems / layers * c      # the scan's slice of one layer
  residual = 2 * tok * d * c                    # the carried hidden state and its norm
  # One layer of the prefill scan: the attention (the score and probability tiles of one
  # q_chunk x kv_chunk step, the head-major queries and the fp32 running output, the K/V blocks
  # travelling round the ring) or the MLP (gate, up and their product), whichever is larger.
  attention = (2 * b * hq_r * cq * ck * 4 + 2 * tok * hq_r * hd * (c + 4) +
               8 * tok * hkv_r * hd * c)
  if attention_kernel(ms, str(attn_cfg.get("impl", "jnp"))) == "dense":
    attention = 3 * b * hq_r * s * s * 4 + 4 * tok * hq_r * hd * c   # dense local kernel
  mlp = 3 * tok * f * c
  activations = {"residual, norm, one layer's weights": residual + layer_weights,
                 "attention (ring tiles, blocks, K/V)": attention if attention >= mlp else 0.0,
                 "MLP (gate, up, product)": mlp if mlp > attention else 0.0}
  if w != c:   # layer_params() casts the whole stacked decoder to the compute dtype
    activations["layer weights in compute dtype"] = layer_elems * c
  if ms["fsdp"] > 1 or w != c:  # select_logits gathers the head over fsdp (in compute dtype)
    activations["LM head weight gathered / cast"] = d * vocab * c
  return ServeEstimate(weights, kv_cache, activations, inputs, logits, bucket, tok)

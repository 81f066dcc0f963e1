"""Model sizes and mesh defaults shared by `vita_jax` and `vita_torch`.

Sizes live here once; the stage files (`configs/stage1.py` ... `stage4.py`) combine one of them
with a stage's training recipe through `stage_config`. Both frameworks read the same
`ConfigDict`, so a checkpoint written by one loads in the other.

    from configs import base
    model = base.model_config("tiny")       # or "small", "14b"
"""

from __future__ import annotations

import ml_collections

from vita_jax.spec import model as spec_model
from vita_jax.spec import tokens

SIZES = ("tiny", "small", "14b")


def model_config(size: str = "14b") -> ml_collections.ConfigDict:
  """The architecture of one size. `14b` is the release exactly (docs/design.md#model)."""
  if size == "tiny":
    # CPU demo: 1.45M parameters; 56 px tiles -> 4x4 patches -> 2x2 = 4 tokens per tile.
    return spec_model.model_config(
        size=size, vision=spec_model.vision_config(56, 14, hidden=64, layers=2, heads=4, mlp=256),
        llm=spec_model.llm_config(vocab=2048, hidden=128, layers=4, heads=4, kv_heads=2,
                                  ffn=352, max_positions=65_536),
        projector_hidden=128, max_tiles=4,
        tokens=tokens.special_token_ids(tokens.DEMO_FIRST_VISUAL_ID, eos_id=2, pad_id=0))
  if size == "small":
    # Benchmarks: the 55M-parameter text shape of the issue tracker plus a small ViT.
    return spec_model.model_config(
        size=size,
        vision=spec_model.vision_config(224, 14, hidden=256, layers=4, heads=4, mlp=1024),
        llm=spec_model.llm_config(vocab=32000, hidden=512, layers=8, heads=8, kv_heads=2,
                                  ffn=1408, max_positions=131_072),
        projector_hidden=512, max_tiles=6,
        tokens=tokens.special_token_ids(tokens.DEMO_FIRST_VISUAL_ID, eos_id=2, pad_id=0))
  if size == "14b":
    return spec_model.model_config(
        size=size,
        vision=spec_model.vision_config(448, 14, hidden=1024, layers=24, heads=16, mlp=4096),
        llm=spec_model.llm_config(vocab=152064, hidden=5120, layers=48, heads=40, kv_heads=8,
                                  ffn=13824),
        projector_hidden=1024, max_tiles=12,
        tokens=tokens.special_token_ids(tokens.QWEN_FIRST_VISUAL_ID, eos_id=tokens.QWEN_EOS_ID,
                                        pad_id=tokens.QWEN_PAD_ID))
  raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 fills the devices the other axes leave (at most one axis)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, seq=1, tensor=1))


def parse_size(arg: str | None) -> str:
  size = arg or "14b"
  if size not in SIZES:
    raise ValueError(
        f"unknown size {size!r} after ':' in --config; use one of {', '.join(SIZES)} "
        f"(e.g. --config=configs/stage2.py:tiny)")
  return size


def parse_recipe(arg: str | None) -> tuple[str, bool]:
  """(size, demo): `demo` after the colon is the tiny model with the needle demo's recipe
  (docs/demo.md); any other value is a size as in `parse_size`."""
  if arg == "demo":
    return "tiny", True
  return parse_size(arg), False


# Per-size overrides of the stage recipes: sequence length, batch and frames that fit the
# machine the size is meant for. The 14b numbers are the release's (docs/design.md#stages).
_SIZE_SCALE = {
    # tiles: the demo corpus fills ~330 of a worst-case 680 tile slots per 4 x 1024 batch.
    "tiny": dict(seq_len_cap=1024, batch_size=4, max_frames_cap=8, steps=300, tiles=384),
    "small": dict(seq_len_cap=4096, batch_size=4, max_frames_cap=32, steps=1000, tiles=0),
    "14b": dict(seq_len_cap=None, batch_size=None, max_frames_cap=None, steps=None, tiles=0),
}


def stage_config(*, stage: int, size: str, seq_len: int, trainable: tuple[str, ...],
                 peak_lr: float, min_lr: float, max_frames: int, reset_positions: bool,
                 global_batch: int, steps: int, init_from: str | None,
                 vision_lr_mult: float = 1.0, layer_decay: float = 1.0,
                 mixture: dict[str, float] | None = None) -> ml_collections.ConfigDict:
  """One stage's complete config: model size + recipe + data + mesh + run settings."""
  scale = _SIZE_SCALE[size]
  if scale["seq_len_cap"]:
    seq_len = min(seq_len, scale["seq_len_cap"])
    max_frames = min(max_frames, scale["max_frames_cap"])
    global_batch = scale["batch_size"]
    steps = scale["steps"]
  demo = size in ("tiny", "small")

  config = ml_collections.ConfigDict()
  config.stage = stage
  config.model = model_config(size)
  config.mesh = mesh_config()
  config.init_from = init_from or ""          # HF dir (either layout) or a previous workdir
  config.init_from_llm = ""                   # stage 1: Qwen2 transformers dir
  config.init_from_vision = ""                # stage 1: InternViT dir (OpenGVLab layout)

  config.data = ml_collections.ConfigDict(dict(
      seq_len=seq_len,
      global_batch_size=global_batch,
      reset_positions=reset_positions,        # stages 1-2: per-sample positions + masking
      max_frames=max_frames,
      video_fps=1.0,
      video_sampling="release",               # release (the released weights') | uniform
      max_tiles=config.model.max_tiles,
      tiles_per_batch=scale["tiles"],         # static pixel budget per batch; 0 = derive
      # Where the data comes from: the demo corpus for tiny/small, the release mixture else.
      data_root="runs/demo_data" if demo else "data",
      # "name=weight,..." — each name resolves to <data_root>/<name>/*.jsonl
      mixture="demo=1.0" if demo else ",".join(f"{k}={v}" for k, v in (mixture or {}).items()),
      ordered_sources="",                     # mixture names read in file order (curricula)
      manifest="",                            # a user's own manifest overrides the mixture
      eval_manifest="runs/demo_data/demo_eval/eval.jsonl" if demo else "",
      tokenizer="runs/demo_data/tokenizer" if demo else "",
      truncate_long_samples=False,            # drop (default) or truncate at a turn boundary
      max_bad_fraction=0.01,                  # stop when more samples than this are bad
      num_workers=0,
      prefetch=2,
      seed=0,
  ))

  config.train = ml_collections.ConfigDict(dict(
      steps=steps,
      trainable=tuple(trainable),             # subset of ("vision", "projector", "llm")
      peak_lr=peak_lr,
      min_lr=min_lr,
      warmup_fraction=0.03,
      schedule="cosine",
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,
      vision_lr_mult=vision_lr_mult,
      layer_decay=layer_decay,
      grad_accum=1,
      z_loss=0.0,
      lm_head_chunk=1024,
      lm_head_fused_grad=True,        # LM-head gradients in its forward: one logits matmul, not two
      seed=0,
      log_every=10 if demo else 50,
      checkpoint_every=100 if demo else 1000,
      keep_checkpoints=3,
      eval_every=100 if demo else 0,          # >0: held-out loss on data.eval_manifest
      eval_batches=8,
      max_consecutive_nonfinite=5,
      peak_tflops_per_device=0.0,             # 0 = measure with a matmul at start (CPU)
  ))
  if demo:
    config.model.compute_dtype = "float32"    # CPU has no fast bf16 matmul
    config.model.remat = "none"
  return config

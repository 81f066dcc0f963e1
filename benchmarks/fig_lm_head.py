"""Figure 4: LM head, chunked cross-entropy vs full logits: peak memory and time.

Both compute the summed cross-entropy of every token and its gradients with respect to hidden
and the head weight (fp32, all tokens supervised). Full logits: hidden @ weight -> [S, V],
log-softmax, pick the label. Chunked: `vita_jax.ops.lm_head.chunked_cross_entropy`.
Memory is XLA's `memory_analysis()` of the compiled forward+backward (temporary buffers: the
inputs and gradients are the same for both), taken at the issue's S=32K, V=152K with the 14B
hidden size by compiling only. Time is measured at a smaller S (and hidden) that this machine
runs in seconds.
"""

from __future__ import annotations

from benchmarks.common import Context, Row, check, median, time_call

FIGURE = "4 LM head"
VOCAB = 152_064
CHUNK = 1024


def timed_shape(ctx: Context) -> tuple[int, int, int]:
  """(S, D, V) of the timed run."""
  if ctx.smoke:
    return 512, 64, 8192
  return (1024, 256, VOCAB) if ctx.quick else (4096, 512, VOCAB)


def grad_fns(chunk: int):
  import jax
  import jax.numpy as jnp

  from vita_jax.ops.lm_head import chunked_cross_entropy

  def full(hidden, weight, labels):
    logits = jnp.einsum("bsd,dv->bsv", hidden, weight)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(labels >= 0, picked, 0.0))

  def chunked(hidden, weight, labels):
    return chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)[0]

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
  return grad(full), grad(chunked)


def temp_bytes(fn, s: int, d: int, v: int) -> int:
  import jax
  import jax.numpy as jnp
  args = (jax.ShapeDtypeStruct((1, s, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((1, s), jnp.int32))
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def run(ctx: Context) -> list[Row]:
  import jax
  import numpy as np

  s, d, v = timed_shape(ctx)
  chunk = min(CHUNK, s // 4)
  full, chunked = grad_fns(chunk)
  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  hidden = jax.device_put(rng.standard_normal((1, s, d), np.float32), dev)
  weight = jax.device_put(rng.standard_normal((d, v), np.float32) * d ** -0.5, dev)
  labels_np = rng.integers(0, v, (1, s)).astype(np.int32)
  labels_np[:, -1] = -100
  labels = jax.device_put(labels_np, dev)
  ctx.log(f"  lm_head: timing S={s} D={d} V={v} chunk {chunk}")
  call = lambda fn: (lambda: jax.block_until_ready(fn(hidden, weight, labels)))
  (loss_full, _), (loss_chunked, _) = full(hidden, weight, labels), chunked(hidden, weight, labels)
  rel = abs(float(loss_full) - float(loss_chunked)) / abs(float(loss_full))
  t_full = time_call(call(full), ctx.repeats)
  t_chunked = time_call(call(chunked), ctx.repeats)
  mem_small = (temp_bytes(full, s, d, v), temp_bytes(chunked, s, d, v))

  big = (2048, 64, 8192) if ctx.smoke else (32_768, 5120, VOCAB)
  big_full, big_chunked = grad_fns(CHUNK if not ctx.smoke else 256)
  ctx.log(f"  lm_head: memory_analysis at S={big[0]} D={big[1]} V={big[2]} (compile only)")
  mem_full, mem_chunked = temp_bytes(big_full, *big), temp_bytes(big_chunked, *big)
  mem_ratio = mem_chunked / mem_full
  time_ratio = median(t_chunked) / median(t_full)
  gb = lambda x: x / 2**30
  return [
      Row(FIGURE, f"fwd+bwd temp memory GiB, S={big[0]} V={big[2]} D={big[1]}",
          gb(mem_chunked), gb(mem_full), "full logits + log_softmax", mem_full / mem_chunked,
          "chunked <= 1/10 of full", check(mem_ratio, "<=", 0.1), {},
          f"chunk {CHUNK if not ctx.smoke else 256} rows; at the timed shape: "
          f"{gb(mem_small[1]):.3f} vs {gb(mem_small[0]):.3f} GiB"),
      Row(FIGURE, f"fwd+bwd time s, S={s} V={v} D={d}", median(t_chunked), median(t_full),
          "full logits + log_softmax", median(t_full) / median(t_chunked),
          "chunked <= 1.2x full time", check(time_ratio, "<=", 1.2),
          {"ours_s": t_chunked, "baseline_s": t_full},
          f"chunk {chunk} rows; relative loss difference {rel:.1e}"),
  ]

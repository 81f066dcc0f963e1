"""Pieces shared by the vision tower, projector and decoder: parameters with logical axes,
norms, and the layer loop (scanned, optionally rematerialised).

Layer stacks keep every per-layer parameter stacked along a leading "layers" axis whether or
not the loop is scanned, so a checkpoint has one layout; `scan_layers=False` only unrolls the
loop (handy for debugging), it does not change the parameters.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vita_jax.spec.model import REMAT_POLICIES


def dtype_of(name) -> jnp.dtype:
  return jnp.dtype(name)


def matmul_precision(compute_dtype):
  """float32 compute means float32 matmuls. On GPUs (TF32) and TPUs (bf16 passes) the default
  precision of a float32 matmul is lower: 6.8e-4 relative logit error against the release on
  an H200 vs 6.3e-7 at "highest", and our float32 parity budget is 1e-4 (docs/design.md#precision).
  bf16 compute keeps the fast default. On CPU both give the same result."""
  if jnp.dtype(compute_dtype) == jnp.float32:
    return jax.default_matmul_precision("highest")
  return contextlib.nullcontext()


def exact_in_fp32(method):
  """Decorate a module method: its matmuls follow `matmul_precision(self.compute_dtype)`
  (applied while tracing, so it holds inside jit)."""
  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    with matmul_precision(self.compute_dtype):
      return method(self, *args, **kwargs)
  return wrapped


def exact_in_fp32_step(step):
  """The same for the decoding steps, functions of (graphdef, state, ...) of a LongVITA."""
  @functools.wraps(step)
  def wrapped(graphdef, state, *args, **kwargs):
    with matmul_precision(nnx.merge(graphdef, state).llm.compute_dtype):
      return step(graphdef, state, *args, **kwargs)
  return wrapped


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype,
          init: str = "normal", std: float = 0.02, value: float = 0.0) -> nnx.Param:
  """An `nnx.Param` of `shape` annotated with logical `axes` (see parallel/sharding.py).

  init: "normal" (std), "zeros", "ones" or "const" (value).
  """
  shape = tuple(int(s) for s in shape)
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {shape}")
  dtype = dtype_of(dtype)
  if init not in ("normal", "zeros", "ones", "const"):
    raise ValueError(f"unknown init {init!r}")
  key = rngs.params() if init == "normal" else None
  if isinstance(key, jax.core.Tracer):   # under jit / eval_shape: stay in jax
    data = std * jax.random.normal(key, shape, jnp.float32)
    return nnx.Param(data.astype(dtype), logical_axes=tuple(axes))
  # Eagerly, numpy: jax would compile one kernel per parameter shape (tens of seconds on CPU).
  if init == "normal":
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    data = std * np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  else:
    data = np.full(shape, {"zeros": 0.0, "ones": 1.0, "const": value}[init], np.float32)
  return nnx.Param(jnp.asarray(data.astype(dtype)), logical_axes=tuple(axes))


def layer_norm(x, scale, bias, eps: float):
  """LayerNorm over the last axis with fp32 statistics; returns x's dtype."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y.astype(x.dtype)


def rms_norm(x, scale, eps: float):
  """RMSNorm (Qwen2): normalise in fp32, cast back, then scale."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return scale.astype(x.dtype) * y.astype(x.dtype)


@jax.custom_vjp
def swiglu(gate, up):
  """silu(gate) * up, with a backward pass that keeps only `gate` and `up`.

  Differentiating `jax.nn.silu(gate) * up` directly saves four [.., ffn] residuals per layer
  (the sigmoid and the products inside silu) and XLA:CPU spends ~10% of a small-model training
  step re-reading and transposing them; here the sigmoid is recomputed in one fused pass.
  """
  return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
  return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
  gate, up = res
  g = gate.astype(jnp.float32)
  sig = jax.nn.sigmoid(g)
  silu = g * sig
  dyf = dy.astype(jnp.float32)
  d_gate = dyf * up.astype(jnp.float32) * sig * (1.0 + g * (1.0 - sig))
  return d_gate.astype(gate.dtype), (dyf * silu).astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


@jax.custom_vjp
def swiglu_mlp(h, gate_kernel, up_kernel, down_kernel):
  """Qwen2's MLP, down(silu(h @ gate) * up(h)): h [B, S, D], kernels [D, F], [D, F], [F, D].

  The hand-written backward keeps h, gate and up (not silu(gate) * up, recomputed in the same
  pass as the SwiGLU derivative) and writes each weight gradient as one token-contracting
  matmul. Autodiff of the same einsums makes XLA:CPU transpose the [tokens, F] cotangents
  and compute the SwiGLU derivative twice (once per layout): ~25% of the MLP's fwd+bwd time at
  the `small` shape, ~8% of a training step.
  """
  return _swiglu_mlp_fwd(h, gate_kernel, up_kernel, down_kernel)[0]


def _swiglu_mlp_fwd(h, gate_kernel, up_kernel, down_kernel):
  gate = jnp.einsum("bsd,df->bsf", h, gate_kernel)
  up = jnp.einsum("bsd,df->bsf", h, up_kernel)
  out = jnp.einsum("bsf,fd->bsd", swiglu(gate, up), down_kernel)
  return out, (h, gate, up, gate_kernel, up_kernel, down_kernel)


def _swiglu_mlp_bwd(res, d_out):
  h, gate, up, gate_kernel, up_kernel, down_kernel = res
  act = swiglu(gate, up)          # the same values the forward fed to the down projection
  d_act = jnp.einsum("bsd,fd->bsf", d_out, down_kernel)
  d_gate, d_up = _swiglu_bwd((gate, up), d_act)
  d_h = (jnp.einsum("bsf,df->bsd", d_gate, gate_kernel) +
         jnp.einsum("bsf,df->bsd", d_up, up_kernel))
  d_gate_kernel = jnp.einsum("bsd,bsf->df", h, d_gate)
  d_up_kernel = jnp.einsum("bsd,bsf->df", h, d_up)
  d_down_kernel = jnp.einsum("bsf,bsd->fd", act, d_out)
  return (d_h.astype(h.dtype), d_gate_kernel.astype(gate_kernel.dtype),
          d_up_kernel.astype(up_kernel.dtype), d_down_kernel.astype(down_kernel.dtype))


swiglu_mlp.defvjp(_swiglu_mlp_fwd, _swiglu_mlp_bwd)


def remat(fn: Callable, policy: str) -> Callable:
  """Wrap a per-layer function with activation rematerialisation."""
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  if policy == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"remat {policy!r} is not one of {', '.join(REMAT_POLICIES)}; "
                   "set --config.model.remat accordingly")


def run_layers(body: Callable, carry, stacked: dict, *, scan: bool, remat_policy: str):
  """carry = body(carry, params_of_layer_i) for every layer of `stacked` ([L, ...] arrays)."""
  body = remat(body, remat_policy)
  if scan:
    carry, _ = jax.lax.scan(lambda c, p: (body(c, p), None), carry, stacked)
    return carry
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    carry = body(carry, jax.tree.map(lambda a, i=i: a[i], stacked))
  return carry


def values(module: nnx.Module, names: Sequence[str], dtype=None) -> dict:
  """{name: array} of a module's params, optionally cast to the compute dtype."""
  out = {}
  for name in names:
    v = getattr(module, name)[...]
    out[name] = v if dtype is None else v.astype(dtype)
  return out

"""LM head without [sequence x vocab] logits: chunked cross-entropy and logits at positions.

A 152,064-token vocabulary makes the full logits of a 32K sequence 20 GB in fp32 (600 GB at
1M tokens). `chunked_cross_entropy` computes logits only for supervised rows, a chunk at a time:
the supervised row indices are compacted up front into a static-size buffer (`jnp.nonzero` with
a static `size`), a `lax.scan` walks them `chunk_size` rows per step, and a custom VJP recomputes
each chunk's logits in the backward, so neither pass holds more than [chunk, vocab] logits.

Labels must already be aligned with `hidden` (label[t] is the token predicted from hidden[t]):
the data pipeline shifts before it masks, so the first token of each assistant turn is predicted
from the position just before it.

With a mesh, the work runs in a `shard_map`: each device compacts and processes only the rows it
holds (batch over data/fsdp, sequence over seq) against its slice of the vocabulary (tensor);
the log-sum-exp is combined across vocab shards with pmax/psum.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from vita_jax.parallel.sharding import logical_to_spec


def _psum(x, axes):
  return lax.psum(x, axes) if axes else x


def _pmax(x, axes):
  return lax.pmax(x, axes) if axes else x


def _row_plan(n_rows: int, max_rows: int | None, chunk_size: int) -> tuple[int, int, int]:
  """(row bound, chunk, padded buffer size) for `n_rows` local rows."""
  bound = n_rows if max_rows is None else min(int(max_rows), n_rows)
  chunk = max(1, min(int(chunk_size), bound))
  return bound, chunk, max(chunk, math.ceil(bound / chunk) * chunk)


def _supervised_rows(labels_flat, bound: int, buffer: int):
  """int32 [buffer] row indices of supervised tokens (first `bound`), bool [buffer] validity."""
  supervised = labels_flat >= 0
  (idx,) = jnp.nonzero(supervised, size=buffer, fill_value=0)
  slot = jnp.arange(buffer)
  valid = (slot < jnp.sum(supervised)) & (slot < bound)
  return idx.astype(jnp.int32), valid


def _chunk_logits(h_rows, weight):
  """fp32 [C, V_local] logits of rows [C, D] against this shard's weight slice [D, V_local]."""
  return jnp.einsum("cd,dv->cv", h_rows, weight, preferred_element_type=jnp.float32)


def _local_label(labels, weight, vocab_axis):
  """Label index within this vocab shard and whether this shard owns it."""
  v_local = weight.shape[1]
  offset = lax.axis_index(vocab_axis) * v_local if vocab_axis else 0
  local = labels - offset
  return jnp.clip(local, 0, v_local - 1), (local >= 0) & (local < v_local)


def _chunk_loss(logits, labels_c, weight, *, z_loss, vocab_axis):
  """(row loss [C], lse [C]) of a chunk's fp32 logits [C, V_local]."""
  row_max = _pmax(jnp.max(logits, axis=-1), vocab_axis)
  sum_exp = _psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=-1), vocab_axis)
  lse = row_max + jnp.log(sum_exp)
  local, owned = _local_label(labels_c, weight, vocab_axis)
  picked = jnp.take_along_axis(logits, local[:, None], axis=-1)[:, 0]
  label_logit = _psum(jnp.where(owned, picked, 0.0), vocab_axis)
  return lse - label_logit + z_loss * jnp.square(lse), lse


def _chunk_grads(h_rows, logits, lse_c, labels_c, valid_c, g, weight, *, z_loss, vocab_axis,
                 compute_dtype, need_weight=True):
  """(d_rows [C, D] fp32, d_weight [D, V_local] fp32) of g * the chunk's summed loss."""
  probs = jnp.exp(logits - lse_c[:, None])
  local, owned = _local_label(labels_c, weight, vocab_axis)
  one_hot = (jnp.arange(weight.shape[1])[None, :] == local[:, None]) & owned[:, None]
  # d/dlogits of lse - logit[label] + z * lse^2 is (1 + 2 z lse) * softmax - one_hot.
  scale = jnp.where(valid_c, g * (1.0 + 2.0 * z_loss * lse_c), 0.0)
  d_logits = scale[:, None] * probs - jnp.where(valid_c, g, 0.0)[:, None] * one_hot
  d_logits = d_logits.astype(compute_dtype)
  d_rows = jnp.einsum("cv,dv->cd", d_logits, weight, preferred_element_type=jnp.float32)
  if not need_weight:
    return d_rows, None
  d_weight = jnp.einsum("cd,cv->dv", h_rows, d_logits, preferred_element_type=jnp.float32)
  return d_rows, d_weight


def _scatter_grads(d_rows, d_weight, idx, hidden, weight, *, vocab_axis, row_axes):
  """Per-slot row gradients and the accumulated weight gradient -> (d_hidden, d_weight)."""
  d = hidden.shape[-1]
  # Each vocab shard holds a partial d_rows; padded slots carry zeros, so adding them is safe.
  d_rows = _psum(d_rows.reshape(-1, d), vocab_axis)
  d_hidden = jnp.zeros((hidden.size // d, d), jnp.float32).at[idx].add(d_rows)
  d_hidden = d_hidden.reshape(hidden.shape).astype(hidden.dtype)
  if d_weight is None:
    return d_hidden, None
  return d_hidden, _psum(d_weight, row_axes).astype(weight.dtype)


def _forward_local(hidden, weight, labels, *, plan, z_loss, vocab_axis, row_axes):
  """Local rows -> (loss_sum (summed over row_axes), lse [buffer] fp32 per local row slot)."""
  bound, chunk, buffer = plan
  h_flat = hidden.reshape(-1, hidden.shape[-1])
  labels_flat = labels.reshape(-1)
  idx, valid = _supervised_rows(labels_flat, bound, buffer)

  def step(total, xs):
    idx_c, valid_c = xs
    logits = _chunk_logits(h_flat[idx_c], weight)  # [C, V_local]
    row_loss, lse = _chunk_loss(logits, labels_flat[idx_c], weight, z_loss=z_loss,
                                vocab_axis=vocab_axis)
    return total + jnp.sum(jnp.where(valid_c, row_loss, 0.0)), lse

  xs = (idx.reshape(-1, chunk), valid.reshape(-1, chunk))
  total, lse = lax.scan(step, jnp.zeros((), jnp.float32), xs)
  return _psum(total, row_axes), lse.reshape(-1)


def _backward_local(hidden, weight, labels, lse, g, *, plan, z_loss, vocab_axis, row_axes):
  """Cotangents (d_hidden like hidden, d_weight like weight) of loss_sum scaled by g."""
  bound, chunk, buffer = plan
  h_flat = hidden.reshape(-1, hidden.shape[-1])
  labels_flat = labels.reshape(-1)
  idx, valid = _supervised_rows(labels_flat, bound, buffer)
  compute_dtype = jnp.promote_types(hidden.dtype, weight.dtype)

  def step(d_weight, xs):
    idx_c, valid_c, lse_c = xs
    h_rows = h_flat[idx_c]
    d_rows, d_weight_c = _chunk_grads(
        h_rows, _chunk_logits(h_rows, weight), lse_c, labels_flat[idx_c], valid_c, g, weight,
        z_loss=z_loss, vocab_axis=vocab_axis, compute_dtype=compute_dtype)
    return d_weight + d_weight_c, d_rows

  xs = (idx.reshape(-1, chunk), valid.reshape(-1, chunk), lse.reshape(-1, chunk))
  d_weight, d_rows = lax.scan(step, jnp.zeros(weight.shape, jnp.float32), xs)
  return _scatter_grads(d_rows, d_weight, idx, hidden, weight, vocab_axis=vocab_axis,
                        row_axes=row_axes)


def _fused_local(hidden, weight, labels, *, plan, z_loss, vocab_axis, row_axes, need_weight=True):
  """-> (loss_sum, d_hidden[, d_weight]) with the gradients of loss_sum itself (cotangent 1),
  from one logits matmul per chunk instead of a forward one and a recomputed backward one.
  `need_weight=False` skips the weight-gradient matmul and returns no d_weight."""
  bound, chunk, buffer = plan
  h_flat = hidden.reshape(-1, hidden.shape[-1])
  labels_flat = labels.reshape(-1)
  idx, valid = _supervised_rows(labels_flat, bound, buffer)
  compute_dtype = jnp.promote_types(hidden.dtype, weight.dtype)
  one = jnp.ones((), jnp.float32)

  def step(carry, xs):
    total, d_weight = carry
    idx_c, valid_c = xs
    h_rows, labels_c = h_flat[idx_c], labels_flat[idx_c]
    logits = _chunk_logits(h_rows, weight)
    row_loss, lse = _chunk_loss(logits, labels_c, weight, z_loss=z_loss, vocab_axis=vocab_axis)
    d_rows, d_weight_c = _chunk_grads(h_rows, logits, lse, labels_c, valid_c, one, weight,
                                      z_loss=z_loss, vocab_axis=vocab_axis,
                                      compute_dtype=compute_dtype, need_weight=need_weight)
    total = total + jnp.sum(jnp.where(valid_c, row_loss, 0.0))
    return (total, None if d_weight is None else d_weight + d_weight_c), d_rows

  xs = (idx.reshape(-1, chunk), valid.reshape(-1, chunk))
  init = (jnp.zeros((), jnp.float32),
          jnp.zeros(weight.shape, jnp.float32) if need_weight else None)
  (total, d_weight), d_rows = lax.scan(step, init, xs)
  d_hidden, d_weight = _scatter_grads(d_rows, d_weight, idx, hidden, weight,
                                      vocab_axis=vocab_axis, row_axes=row_axes)
  total = _psum(total, row_axes)
  return (total, d_hidden) + ((d_weight,) if need_weight else ())


def _axes_of(spec_entries) -> tuple[str, ...]:
  axes = []
  for entry in spec_entries:
    axes += [entry] if isinstance(entry, str) else list(entry or ())
  return tuple(axes)


def _layout(mesh, hidden_shape, weight_shape):
  """Specs for hidden/labels/weight/lse and the mesh axes rows and vocab are split over."""
  h_spec = logical_to_spec(("batch", "length", None), mesh, hidden_shape)
  w_spec = logical_to_spec((None, "vocab"), mesh, weight_shape)
  row_axes = _axes_of(h_spec[:2])
  vocab_axis = w_spec[1] if isinstance(w_spec[1], str) else None
  lse_spec = P(row_axes if row_axes else None)
  return h_spec, P(*h_spec[:2]), w_spec, lse_spec, row_axes, vocab_axis


def _local_rows(mesh, hidden_shape, h_spec) -> int:
  shards = math.prod(mesh.shape[a] for a in _axes_of(h_spec[:2])) if mesh is not None else 1
  return hidden_shape[0] * hidden_shape[1] // shards


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _loss_sum(hidden, weight, labels, chunk_size, z_loss, max_rows, mesh, fused):
  del fused
  args = (mesh, hidden, weight, labels, max_rows, chunk_size, z_loss)
  return _sharded(_forward_local, *args, out_specs=("scalar", "lse"))[0]


def _sharded(local_fn, mesh, hidden, weight, labels, max_rows, chunk_size, z_loss, *, extra=(),
             extra_specs=(), out_specs):
  """Run `local_fn(hidden, weight, labels, *extra)` per device (or directly without a mesh)."""
  if mesh is None:
    plan = _row_plan(labels.size, max_rows, chunk_size)
    return local_fn(hidden, weight, labels, *extra, plan=plan, z_loss=z_loss, vocab_axis=None,
                    row_axes=())
  h_spec, l_spec, w_spec, lse_spec, row_axes, vocab_axis = _layout(mesh, hidden.shape,
                                                                   weight.shape)
  plan = _row_plan(_local_rows(mesh, hidden.shape, h_spec), max_rows, chunk_size)
  fn = functools.partial(local_fn, plan=plan, z_loss=z_loss, vocab_axis=vocab_axis,
                         row_axes=row_axes)
  specs = dict(h=h_spec, w=w_spec, lse=lse_spec, scalar=P())
  return jax.shard_map(fn, mesh=mesh,
                       in_specs=(h_spec, w_spec, l_spec) + tuple(specs[e] for e in extra_specs),
                       out_specs=tuple(specs[o] for o in out_specs), check_vma=False)(
                           hidden, weight, labels, *extra)


def _loss_sum_fwd(hidden, weight, labels, chunk_size, z_loss, max_rows, mesh, fused):
  # symbolic_zeros=True: the differentiable arguments arrive as CustomVJPPrimal, which says
  # whether each is differentiated (a frozen head weight needs no [D, V] gradient).
  need_weight = weight.perturbed
  hidden, weight, labels = hidden.value, weight.value, labels.value
  args = (mesh, hidden, weight, labels, max_rows, chunk_size, z_loss)
  if fused:
    local = functools.partial(_fused_local, need_weight=need_weight)
    outs = ("scalar", "h") + (("w",) if need_weight else ())
    loss, d_hidden, *d_weight = _sharded(local, *args, out_specs=outs)
    return loss, (d_hidden, d_weight[0] if need_weight else None)
  loss, lse = _sharded(_forward_local, *args, out_specs=("scalar", "lse"))
  return loss, (hidden, weight, labels, lse)


def _loss_sum_bwd(chunk_size, z_loss, max_rows, mesh, fused, residuals, g):
  if isinstance(g, SymbolicZero):
    return None, None, None
  g = g.astype(jnp.float32)
  if fused:
    d_hidden, d_weight = residuals
    scale = lambda x: None if x is None else (g * x).astype(x.dtype)
    return scale(d_hidden), scale(d_weight), None
  hidden, weight, labels, lse = residuals
  d_hidden, d_weight = _sharded(_backward_local, mesh, hidden, weight, labels, max_rows,
                                chunk_size, z_loss, extra=(lse, g), extra_specs=("lse", "scalar"),
                                out_specs=("h", "w"))
  return d_hidden, d_weight, None


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd, symbolic_zeros=True)


def chunked_cross_entropy(hidden, weight, labels, *, chunk_size: int, z_loss: float = 0.0,
                          max_rows: int | None = None, mesh: jax.sharding.Mesh | None = None,
                          fused_grad: bool = False):
  """Summed softmax cross-entropy over supervised tokens, never building [B, S, V] logits.

  hidden [B, S, D] (any float dtype), weight [D, V], labels int [B, S] aligned with hidden
  (label < 0, conventionally -100, is ignored). Returns (loss_sum fp32 scalar, num_tokens int32
  scalar); the caller divides once over the whole global batch. `z_loss` adds
  z_loss * logsumexp^2 per supervised row. `max_rows` is a static upper bound on supervised rows
  per device (default: all of them); rows beyond it are dropped from both loss and count.
  With `mesh`, rows are split as hidden's logical axes (batch, length) and the vocabulary over
  `tensor` (when it divides V); the result is replicated.

  `fused_grad=True` (training) computes the gradients already in the forward pass under
  differentiation, the backward only scaling them by the incoming cotangent: one [chunk, V]
  logits matmul per chunk instead of two, at the cost of holding d_hidden and an fp32 d_weight
  (the size of the head weight's local shard) from the LM head until the backward reaches it.
  Without differentiation both modes run the same forward.
  """
  if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
    raise ValueError(f"hidden {hidden.shape} and labels {labels.shape} must be [B, S, D] and "
                     "[B, S]; reshape them to one batch and one sequence axis")
  if weight.ndim != 2 or weight.shape[0] != hidden.shape[-1]:
    raise ValueError(f"weight {weight.shape} must be [D, V] with D={hidden.shape[-1]} matching "
                     "hidden; transpose an nn.Linear-style [V, D] weight first")
  if chunk_size < 1 or (max_rows is not None and max_rows < 1):
    raise ValueError(f"chunk_size={chunk_size} and max_rows={max_rows} must be positive")
  if mesh is not None and mesh.size == 1:
    mesh = None
  labels = labels.astype(jnp.int32)
  loss = _loss_sum(hidden, weight, labels, int(chunk_size), float(z_loss), max_rows, mesh,
                   bool(fused_grad))
  return loss, _num_tokens(labels, max_rows, mesh)


def _num_tokens(labels, max_rows, mesh):
  """Supervised tokens counted the same way the loss counts them (per-device row bound)."""
  supervised = (labels >= 0).astype(jnp.int32)
  if max_rows is None:
    return jnp.sum(supervised)
  if mesh is None:
    return jnp.minimum(jnp.sum(supervised), max_rows)
  spec = logical_to_spec(("batch", "length"), mesh, labels.shape)
  count = lambda x: _psum(jnp.minimum(jnp.sum(x), max_rows), _axes_of(spec))
  return jax.shard_map(count, mesh=mesh, in_specs=(spec,), out_specs=P(),
                       check_vma=False)(supervised)


def select_logits(hidden, weight, index, *, mesh: jax.sharding.Mesh | None = None):
  """fp32 logits at chosen positions: hidden [B, S, D], weight [D, V], index int [B] or [B, K]
  -> [B, V] or [B, K, V].

  With `mesh` and the sequence sharded over `seq`, each shard gathers only the rows it holds
  (zeros elsewhere) and a psum of those [B, K, D] rows replaces an all-gather of hidden; the
  matmul then runs against each device's vocab slice.
  """
  squeeze = index.ndim == 1
  index = (index[:, None] if squeeze else index).astype(jnp.int32)
  if mesh is None or mesh.size == 1:
    rows = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, K, D]
    logits = jnp.einsum("bkd,dv->bkv", rows, weight, preferred_element_type=jnp.float32)
    return logits[:, 0] if squeeze else logits
  h_spec = logical_to_spec(("batch", "length", None), mesh, hidden.shape)
  w_spec = logical_to_spec((None, "vocab"), mesh, weight.shape)
  seq_axis = h_spec[1]

  def local(h, w, idx):
    s_local = h.shape[1]
    offset = lax.axis_index(seq_axis) * s_local if seq_axis else 0
    pos = idx - offset
    held = (pos >= 0) & (pos < s_local)
    rows = jnp.take_along_axis(h, jnp.clip(pos, 0, s_local - 1)[..., None], axis=1)
    rows = _psum(jnp.where(held[..., None], rows, jnp.zeros_like(rows)), seq_axis)
    return jnp.einsum("bkd,dv->bkv", rows, w, preferred_element_type=jnp.float32)

  logits = jax.shard_map(local, mesh=mesh, in_specs=(h_spec, w_spec, P(h_spec[0], None)),
                         out_specs=P(h_spec[0], None, w_spec[1]), check_vma=False)(
                             hidden, weight, index)
  return logits[:, 0] if squeeze else logits

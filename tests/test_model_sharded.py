"""The model with its sequence sharded (ring attention) and the zigzag layout equals the plain
unsharded model: logits after un-zigzag, and the loss, which needs no un-zigzag at all."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from vita_jax.data.pipeline import add_context_index
from vita_jax.models import vlm
from vita_jax.ops.lm_head import chunked_cross_entropy
from vita_jax.parallel import make_mesh, shard_state
from vita_jax.spec import model as spec_model
from vita_jax.spec import tokens as spec_tokens
from vita_jax.spec.zigzag import unzigzag, zigzag_batch

SEQ = 64


def tiny_config():
  cfg = base.model_config("tiny")
  # 4 tokens per tile
  cfg.vision = spec_model.vision_config(28, 7, hidden=16, layers=1, heads=2, mlp=32)
  cfg.llm = spec_model.llm_config(vocab=97, hidden=32, layers=1, heads=4, kv_heads=2, ffn=48)
  cfg.projector.hidden_size = 32
  cfg.compute_dtype = "float32"
  cfg.remat = "none"
  cfg.attention.q_chunk = cfg.attention.kv_chunk = 8
  return cfg


def packed_batch(cfg, with_images=False):
  """Two rows; row 0 packs two samples (positions restart, the second crosses shard
  boundaries), row 1 is one sample ending in padding. Labels are next tokens, -100 at ends."""
  rng = np.random.default_rng(0)
  ids = rng.integers(20, cfg.llm.vocab_size, (2, SEQ)).astype(np.int32)
  seg = np.ones((2, SEQ), np.int32)
  pos = np.tile(np.arange(SEQ, dtype=np.int32), (2, 1))
  seg[0, 23:] = 2
  pos[0, 23:] -= 23
  seg[1, 57:] = 0
  labels = np.where(seg[:, 1:] == seg[:, :-1], ids[:, 1:], -100)
  labels = np.concatenate([labels, np.full((2, 1), -100)], 1).astype(np.int32)
  labels[seg == 0] = -100
  batch = {"input_ids": ids, "positions": pos, "segment_ids": seg, "labels": labels}
  if with_images:  # one tile in each sample of row 0, early and late in the sequence
    ids[0, 17:21] = cfg.tokens.img_context_id  # zigzag puts chunk 6 before chunk 2
    ids[0, 49:53] = cfg.tokens.img_context_id
    batch["pixel_values"] = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
  return batch


def run(model, batch):
  """(logits [B,S,V], loss_sum) of one jitted forward with the model's state on its mesh."""
  graphdef, state = nnx.split(model)
  if model.mesh is not None:
    state = shard_state(state, model.mesh)

  def forward(state, batch):
    m = nnx.merge(graphdef, state)
    hidden = m(batch["input_ids"], batch.get("pixel_values"), batch["positions"],
               batch["segment_ids"], context_index=batch.get("context_index"),
               return_hidden=True)
    logits = m.llm.logits(hidden)
    loss, _ = chunked_cross_entropy(hidden, m.lm_head_weight(), batch["labels"], chunk_size=16)
    return logits, loss

  logits, loss = jax.jit(forward)(state, batch)
  return np.asarray(logits), float(loss)


@pytest.fixture(scope="module")
def reference():
  cfg = tiny_config()
  model = vlm.LongVITA(cfg, rngs=nnx.Rngs(0))
  return cfg, run(model, packed_batch(cfg))


@pytest.mark.parametrize("mesh_cfg", [{"data": 2, "seq": 4}, {"seq": 8}])
def test_sequence_sharded_zigzag_forward_equals_unsharded(reference, mesh_cfg):
  cfg, (ref_logits, ref_loss) = reference
  mesh = make_mesh(mesh_cfg)
  shards = mesh.shape["seq"]
  model = vlm.LongVITA(cfg, rngs=nnx.Rngs(0), mesh=mesh)
  logits, loss = run(model, zigzag_batch(packed_batch(cfg), shards))
  tol = 1e-4 * max(1.0, np.abs(ref_logits).max())
  np.testing.assert_allclose(unzigzag(logits, shards), ref_logits, atol=tol, rtol=0)
  assert loss == pytest.approx(ref_loss, rel=1e-5)
  # The layout really is different: without un-zigzag the logits do not match.
  assert np.abs(logits - ref_logits).max() > 10 * tol


def test_zigzag_with_images_keeps_features_on_their_tokens():
  """The feature index fixed before zigzag (as the data pipeline does) travels with the tokens;
  without it, in-order assignment would give the reordered tokens the wrong features."""
  cfg = tiny_config()
  batch = add_context_index(packed_batch(cfg, with_images=True),
                            spec_tokens.context_token_ids(cfg.tokens))
  ref_logits, _ = run(vlm.LongVITA(cfg, rngs=nnx.Rngs(0)), batch)
  model = vlm.LongVITA(cfg, rngs=nnx.Rngs(0), mesh=make_mesh({"data": 2, "seq": 4}))
  zz = zigzag_batch(batch, 4)
  logits, _ = run(model, zz)
  np.testing.assert_allclose(unzigzag(logits, 4), ref_logits, atol=1e-4)
  in_order, _ = run(model, {k: v for k, v in zz.items() if k != "context_index"})
  assert np.abs(unzigzag(in_order, 4) - ref_logits).max() > 1e-2

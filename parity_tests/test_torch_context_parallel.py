"""vita_torch context parallelism on CPU: 2 and 4 gloo processes (torch.multiprocessing)
against one process — ring attention vs dense attention, the sharded-cache decode merge, and
whole-model prefill logits + greedy tokens."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vita_torch import load_pretrained, testing
from vita_torch.generate import generate, prefill
from vita_torch.model import dense_attention
from vita_torch.ring import ring_attention, sharded_decode_attention, zigzag_indices

PROMPT_LEN = 21          # not a multiple of 2N: exercises the padding
NEW_TOKENS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _attention_case(seed=0):
  """Packed rows (two segments + padding) with GQA: q/k/v and ids for 16 tokens."""
  g = torch.Generator().manual_seed(seed)
  b, s, hq, hkv, d = 2, 16, 4, 2, 8
  q, k, v = (torch.randn(b, s, h, d, generator=g) for h in (hq, hkv, hkv))
  seg = torch.tensor([[1] * 9 + [0] * 2 + [2] * 5, [1] * 16])
  pos = torch.stack([torch.cat([torch.arange(9), torch.zeros(2, dtype=torch.long),
                                torch.arange(5)]), torch.arange(16)])
  return q, k, v, seg, pos


def _worker(rank, world, port, ckpt, out_dir):
  torch.set_num_threads(1)
  os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
  dist.init_process_group("gloo", rank=rank, world_size=world)
  try:
    results = {}
    # Ring attention on this rank's zigzag shard.
    q, k, v, seg, pos = _attention_case()
    idx = zigzag_indices(q.shape[1], rank, world)
    results["ring"] = ring_attention(q[:, idx], k[:, idx], v[:, idx], seg[:, idx], pos[:, idx])
    results["ring_tiled"] = ring_attention(q[:, idx], k[:, idx], v[:, idx], seg[:, idx],
                                           pos[:, idx], q_chunk=3, kv_chunk=2)
    results["ring_index"] = idx
    # Decode merge: the last token's query against a cache split round-robin over the ranks.
    mine = torch.arange(q.shape[1] - 1)[rank::world]
    last = slice(q.shape[1] - 1, q.shape[1])
    results["decode"] = sharded_decode_attention(q[:, last], seg[:, last], pos[:, last],
                                                 k[:, mine], v[:, mine], seg[:, mine],
                                                 pos[:, mine], kv_chunk=3)
    # The whole model.
    model = load_pretrained(ckpt, device="cpu")
    ids, pixels = testing.sample_inputs(2, PROMPT_LEN, 1, seed=3)
    results["logits"], _ = prefill(model, ids, pixels, context_parallel=True)
    results["tokens"] = generate(model, ids, pixels, max_new_tokens=NEW_TOKENS,
                                 context_parallel=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
  finally:
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cp_ckpt"))
  testing.make_internvl_checkpoint(path, seed=1)
  return path


@pytest.fixture(scope="module")
def single_process(checkpoint):
  model = load_pretrained(checkpoint, device="cpu")
  ids, pixels = testing.sample_inputs(2, PROMPT_LEN, 1, seed=3)
  with torch.no_grad():
    full = model(ids, pixels)
  logits, _ = prefill(model, ids, pixels)
  tokens = generate(model, ids, pixels, max_new_tokens=NEW_TOKENS)
  return dict(full=full, logits=logits, tokens=tokens)


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_one_process(world, checkpoint, single_process, tmp_path):
  # fork, not spawn: a spawned child re-imports torch (seconds each on a loaded machine).
  mp.start_processes(_worker, args=(world, _free_port(), checkpoint, str(tmp_path)),
                     nprocs=world, start_method="fork")
  ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

  q, k, v, seg, pos = _attention_case()
  dense = dense_attention(q, k, v, seg, pos)
  for key in ("ring", "ring_tiled"):
    ring = torch.zeros_like(dense)
    for r in ranks:
      ring[:, r["ring_index"]] = r[key]
    assert (ring - dense).abs().max() <= 1e-5
    assert ring[0, 9:11].abs().max() == 0              # padding rows are zeros, not NaN

  last = slice(q.shape[1] - 1, q.shape[1])
  want = dense_attention(q[:, last], k[:, :-1], v[:, :-1], seg[:, last], pos[:, last],
                         seg[:, :-1], pos[:, :-1])
  for r in ranks:
    assert (r["decode"] - want).abs().max() <= 1e-5

  ref = single_process
  assert (ref["logits"] - ref["full"][:, -1]).abs().max() <= 1e-5   # prefill == forward
  scale = max(1.0, ref["logits"].abs().max().item())
  for r in ranks:
    assert (r["logits"] - ref["logits"]).abs().max() <= 1e-4 * scale
    assert torch.equal(r["tokens"], ref["tokens"])

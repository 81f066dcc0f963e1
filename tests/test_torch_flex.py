"""vita_torch's fused block attention (FlexAttention, `impl="flex"`) against the eager fp32
tiles (`impl="eager"`): output and natural-log LSE, packed segments whose ids differ between the
query and the key block (as ring steps and zigzag give them), padding rows (out 0, lse -inf),
GQA with 1 and 2 KV heads, causal or not. On CPU FlexAttention runs its unfused reference; on
CUDA the same call is compiled into the fused kernel (`impl="auto"` picks it there)."""

import pytest

torch = pytest.importorskip("torch")

from vita_torch.ring import block_attention  # noqa: E402

B, SQ, SK, HQ, D = 2, 37, 45, 4, 8


def _inputs(hkv, dtype=torch.float32):
  g = torch.Generator().manual_seed(0)
  q = torch.randn(B, SQ, HQ, D, generator=g).to(dtype)
  k = torch.randn(B, SK, hkv, D, generator=g).to(dtype)
  v = torch.randn(B, SK, hkv, D, generator=g).to(dtype)
  seg_q = torch.ones(B, SQ, dtype=torch.long)
  seg_q[0, 20:] = 2              # a second sample starts inside the query block
  seg_q[1, 30:] = 0              # padding rows: nothing visible
  pos_q = torch.arange(SQ).repeat(B, 1) + 10
  seg_k = torch.ones(B, SK, dtype=torch.long)
  seg_k[0, 25:] = 2
  pos_k = torch.arange(SK).repeat(B, 1)
  return q, k, v, seg_q, pos_q, seg_k, pos_k


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_matches_eager(hkv, causal):
  args = _inputs(hkv)
  ref_out, ref_lse = block_attention(*args, causal=causal, impl="eager", q_chunk=16, kv_chunk=16)
  out, lse = block_attention(*args, causal=causal, impl="flex")
  assert out.dtype == lse.dtype == torch.float32
  seen = torch.isfinite(ref_lse)
  assert (~seen).any() and seen.any()
  assert torch.equal(torch.isfinite(lse), seen)                   # empty rows: lse -inf
  assert float((out[~seen]).abs().max()) == 0.0                   # ... and out 0
  torch.testing.assert_close(out, ref_out, atol=2e-6, rtol=0)
  torch.testing.assert_close(lse[seen], ref_lse[seen], atol=2e-6, rtol=0)


def test_auto_is_eager_on_cpu_and_unknown_impl_fails():
  args = _inputs(2)
  auto = block_attention(*args, impl="auto")
  eager = block_attention(*args, impl="eager")
  assert all(torch.equal(a, b) for a, b in zip(auto, eager))
  with pytest.raises(ValueError, match="'fused'"):
    block_attention(*args, impl="fused")


def _reference_npu_fusion_attention(query, key, value, head_num, input_layout, *, atten_mask=None,
                                    scale=1.0, keep_prob=1.0, **unused):
  """What Ascend documents `torch_npu.npu_fusion_attention` to compute, in float64 on CPU: BSND
  tensors, GQA (query head i reads KV head i // (Hq / Hkv)), `atten_mask` True = hidden (the
  reference op subtracts 40000 from those scores, so a fully hidden row is a uniform average,
  not zeros), and the row max / sum of the scaled scores repeated 8 times, [B, Hq, Sq, 8]."""
  assert input_layout == "BSND" and keep_prob == 1.0 and query.shape[2] == head_num
  assert not unused, unused
  q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
  group = head_num // k.shape[1]
  k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
  scores = q @ k.transpose(-1, -2) * scale
  if atten_mask is not None:
    scores = scores - 40000.0 * atten_mask.double()
  row_max = scores.amax(-1, keepdim=True)
  weights = torch.exp(scores - row_max)
  row_sum = weights.sum(-1, keepdim=True)
  out = (weights / row_sum) @ v
  stats = lambda x: x.float().expand(*x.shape[:-1], 8).contiguous()
  return out.transpose(1, 2).to(query.dtype), stats(row_max), stats(row_sum), None, 0, 0, 0


@pytest.mark.parametrize("hkv", [1, 2])
@pytest.mark.parametrize("causal", [True, False])
def test_npu_path_matches_eager_against_the_documented_kernel(hkv, causal, monkeypatch):
  """The NPU path's plumbing (layout, GQA, mask polarity, max/sum -> LSE, hidden rows, tile
  merging) against the eager tiles, with `torch_npu` replaced by the kernel's documented
  semantics (no NPU here: the real kernel is untested)."""
  import types
  fake = types.SimpleNamespace(npu_fusion_attention=_reference_npu_fusion_attention)
  monkeypatch.setitem(__import__("sys").modules, "torch_npu", fake)
  args = _inputs(hkv)
  ref_out, ref_lse = block_attention(*args, causal=causal, impl="eager", q_chunk=16, kv_chunk=16)
  out, lse = block_attention(*args, causal=causal, impl="npu", q_chunk=16, kv_chunk=16)
  seen = torch.isfinite(ref_lse)
  assert torch.equal(torch.isfinite(lse), seen)
  assert float((out[~seen]).abs().max()) == 0.0
  torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
  torch.testing.assert_close(lse[seen], ref_lse[seen], atol=1e-5, rtol=0)

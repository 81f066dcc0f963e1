"""Every stage x every size loads; 14b matches the release (docs/design.md#model, #stages);
bad overrides fail clearly."""

import subprocess
import sys

import pytest

from configs import base, stage1, stage2, stage3, stage4
from vita_jax.errors import ConfigError
from vita_jax.spec import tokens as spec_tokens
from vita_jax.training import validation

STAGES = {1: stage1, 2: stage2, 3: stage3, 4: stage4}


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
@pytest.mark.parametrize("size", ["tiny", "small", "14b", None])
def test_every_stage_and_size_loads_and_validates(stage, size):
  config = STAGES[stage].get_config(size) if size else STAGES[stage].get_config()
  assert config.stage == stage
  assert config.model.size == (size or "14b")
  validation.validate(config, num_devices=1)
  assert config.data.reset_positions == (stage <= 2)


def test_14b_release_values():
  m = base.model_config("14b")
  assert (m.vision.image_size, m.vision.patch_size, m.vision.hidden_size) == (448, 14, 1024)
  assert (m.vision.num_layers, m.vision.num_heads, m.vision.mlp_dim) == (24, 16, 4096)
  assert m.vision.layer_norm_eps == 1e-6 and m.vision.qkv_bias
  assert m.downsample_ratio == 0.5 and spec_tokens.tokens_per_tile(m) == 256
  assert (m.projector.hidden_size, m.projector.bias) == (1024, False)
  t = m.llm
  assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads) == (5120, 48, 40, 8)
  assert (t.ffn_dim, t.vocab_size, t.head_dim) == (13824, 152064, 128)
  assert t.rms_norm_eps == 1e-6 and t.rope_theta == 1e6 and not t.tie_embeddings
  assert (m.tokens.eos_id, m.tokens.pad_id) == (151645, 151643)
  assert (m.tokens.img_start_id, m.tokens.img_end_id, m.tokens.img_context_id) == (
      151665, 151666, 151667)
  assert m.max_tiles == 12


def test_stage_recipes_match_design():
  expect = {1: (32_768, ("projector",), 1e-3, 1e-5, 128),
            2: (16_384, ("vision", "projector", "llm"), 1e-5, 1e-7, 64),
            3: (131_072, ("projector", "llm"), 5e-6, 1e-7, 512),
            4: (1_048_576, ("projector", "llm"), 5e-6, 1e-7, 4096)}
  for stage, (seq, trainable, peak, low, frames) in expect.items():
    c = STAGES[stage].get_config()
    assert (c.data.seq_len, tuple(c.train.trainable)) == (seq, trainable)
    assert (c.train.peak_lr, c.train.min_lr, c.data.max_frames) == (peak, low, frames)
    assert (c.train.b1, c.train.b2, c.train.weight_decay, c.train.grad_clip) == (
        0.9, 0.999, 0.0, 1.0)
    assert c.train.warmup_fraction == 0.03 and c.model.compute_dtype == "bfloat16"
  s2 = stage2.get_config()
  assert (s2.train.vision_lr_mult, s2.train.layer_decay) == (0.1, 0.9)


def test_small_size_is_the_benchmark_shape():
  t = base.model_config("small").llm
  assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.ffn_dim, t.vocab_size) == (
      512, 8, 8, 2, 1408, 32000)


def test_unknown_size_is_refused():
  with pytest.raises(ValueError, match="unknown size 'huge'.*tiny, small, 14b"):
    stage2.get_config("huge")


@pytest.mark.parametrize("override, message", [
    ({"seq": 3}, "needs a multiple of 3 devices but 8 are available"),
    ({"data": 2, "seq": 2}, "has 4 devices but 8 are available"),
    ({"data": -1, "seq": -1}, "at most one axis may be -1"),
    ({"data": 0}, "config.mesh.data=0 is not a valid axis size"),
])
def test_mesh_validation_messages(override, message):
  config = stage2.get_config("tiny")
  config.mesh.update(override)
  with pytest.raises(ConfigError, match=message):
    validation.validate(config, num_devices=8)


def test_seq_len_must_split_into_zigzag_chunks():
  config = stage2.get_config("tiny")
  config.data.seq_len = 1000
  config.mesh.update(data=1, seq=8)
  with pytest.raises(ConfigError, match=r"seq_len 1000 is not divisible by 2\*seq_shards=16 "
                     r"\(.*\); use 1008"):
    validation.validate(config, num_devices=8)


def test_batch_must_divide_over_data_axes():
  config = stage2.get_config("tiny")
  config.data.global_batch_size = 6
  with pytest.raises(ConfigError, match="does not divide over data\\*fsdp=8"):
    validation.validate(config, num_devices=8)


def _run_cli(*args):
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin"}
  return subprocess.run([sys.executable, "-m", "vita_jax.train", *args], capture_output=True,
                        text=True, env=env, timeout=120)


def test_cli_refuses_unknown_key_without_traceback():
  r = _run_cli("--config=configs/stage2.py:tiny", "--config.mesh.foo=3", "--workdir=/tmp/x")
  assert r.returncode == 2
  assert "unknown config key config.mesh.foo" in r.stderr
  assert "fields there: data, fsdp, seq, tensor" in r.stderr
  assert "Traceback" not in r.stderr


def test_cli_refuses_bad_mesh_without_traceback():
  r = _run_cli("--config=configs/stage2.py:tiny", "--config.mesh.seq=3", "--workdir=/tmp/x")
  assert r.returncode == 2
  assert "error: mesh seq=3 needs a multiple of 3 devices but 8 are available" in r.stderr
  assert "Traceback" not in r.stderr

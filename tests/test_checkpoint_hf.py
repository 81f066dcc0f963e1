"""HF checkpoint directories: exact save -> load round trips in both layouts, sharding with an
index, bf16 files, mismatch errors that list what differs, the key table's coverage, and the
`python -m vita_jax.convert` CLI both ways with unchanged logits.

Parity of the loaded weights with transformers is in parity_tests/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import vita_jax
from configs import base
from vita_jax import cli, convert
from vita_jax.errors import InputError
from vita_jax.models.vlm import LongVITA
from vita_jax.spec import hf_config, hf_files, hf_mapping
from vita_jax.spec import model as spec_model
from vita_jax.spec import tokens as spec_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(tie=False, projector_bias=False):
  cfg = base.model_config("tiny")
  cfg.vision = spec_model.vision_config(28, 7, hidden=16, layers=2, heads=2, mlp=32)
  cfg.llm = spec_model.llm_config(vocab=97, hidden=24, layers=2, heads=3, kv_heads=1, ffn=40,
                                  tie=tie)
  cfg.projector.hidden_size = 24
  cfg.projector.bias = projector_bias
  cfg.compute_dtype = "float32"
  cfg.remat = "none"
  return cfg


def random_model(cfg, seed=0):
  """A model whose every parameter (biases, norms, layer scales too) is random."""
  model = LongVITA(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    v = var.get_value()
    var.set_value(jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype))
  return model


def params(model) -> dict:
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def inputs(cfg):
  rng = np.random.default_rng(0)
  ids = rng.integers(20, cfg.llm.vocab_size, (2, 14)).astype(np.int32)
  ids[0, 1:9] = cfg.tokens.img_context_id
  ids[1, 2:6] = cfg.tokens.vid_context_id
  return ids, rng.standard_normal((3, 28, 28, 3)).astype(np.float32)


def logits(model, cfg=None):
  ids, pix = inputs(cfg or model.config)
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, ids, pix))


@pytest.fixture(scope="module")
def model():
  return random_model(small_config())


@pytest.fixture(scope="module")
def model_logits(model):
  return logits(model)


def test_long_vita_round_trip_is_exact_with_shards(model, model_logits, tmp_path):
  vita_jax.save_pretrained(model, str(tmp_path), layout="long_vita", max_shard_bytes=20_000)
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(shards)
  assert "model.vision_model.encoder.layers.1.attn.qkv.weight" in index["weight_map"]
  assert "model.vision_projection.mlp.2.weight" in index["weight_map"]
  loaded = vita_jax.load_pretrained(str(tmp_path))
  assert loaded.config.layout == "long_vita"
  ours, theirs = params(model), params(loaded)
  assert ours.keys() == theirs.keys()
  for p in ours:
    np.testing.assert_array_equal(theirs[p], ours[p], err_msg=str(p))
  np.testing.assert_array_equal(logits(loaded), model_logits)


def test_internvl_round_trip_is_exact(model, model_logits, tmp_path):
  vita_jax.save_pretrained(model, str(tmp_path), layout="internvl")
  files = load_file(str(tmp_path / "model.safetensors"))
  # transformers' on-disk names; the bias-free projector gets explicit zero biases.
  assert "language_model.model.layers.0.self_attn.q_proj.weight" in files
  assert "vision_tower.encoder.layer.1.attention.k_proj.weight" in files
  np.testing.assert_array_equal(files["multi_modal_projector.linear_1.bias"], 0)
  loaded = vita_jax.load_pretrained(str(tmp_path))
  assert loaded.config.layout == "internvl" and loaded.config.projector.bias
  theirs = params(loaded)
  for p, v in params(model).items():
    np.testing.assert_array_equal(theirs[p], v, err_msg=str(p))
  # internvl marks images with one token id: map ours onto it to compare logits.
  ids, pix = inputs(model.config)
  ids = np.where(np.isin(ids, [model.config.tokens.vid_context_id]),
                 model.config.tokens.img_context_id, ids)
  graphdef, state = nnx.split(loaded)
  out = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, ids, pix)
  np.testing.assert_array_equal(out, model_logits)


def test_tied_model_round_trips_without_lm_head(tmp_path):
  cfg = small_config(tie=True, projector_bias=True)
  model = random_model(cfg, seed=1)
  for layout in ("long_vita", "internvl"):
    path = tmp_path / layout
    vita_jax.save_pretrained(model, str(path), layout=layout)
    keys = load_file(str(path / "model.safetensors")).keys()
    assert not any("lm_head" in k for k in keys)
    loaded = vita_jax.load_pretrained(str(path))
    assert loaded.config.llm.tie_embeddings
    for p, v in params(model).items():
      np.testing.assert_array_equal(params(loaded)[p], v, err_msg=str(p))


def test_bf16_files_load_in_either_dtype(model, tmp_path):
  vita_jax.save_pretrained(model, str(tmp_path), layout="long_vita", dtype="bfloat16")
  files = load_file(str(tmp_path / "model.safetensors"))
  assert all(v.dtype == ml_dtypes.bfloat16 for v in files.values())
  as_f32 = vita_jax.load_pretrained(str(tmp_path), dtype="float32")
  as_bf16 = vita_jax.load_pretrained(str(tmp_path), dtype="bfloat16")
  assert as_bf16.llm.embedding[...].dtype == jnp.bfloat16
  assert as_bf16.config.compute_dtype == "bfloat16"
  for p, v in params(model).items():
    rounded = v.astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(params(as_f32)[p], rounded.astype(np.float32), err_msg=str(p))
    np.testing.assert_array_equal(params(as_bf16)[p], rounded, err_msg=str(p))


@pytest.mark.parametrize("max_shard_bytes", [1 << 30, 20_000], ids=["one_file", "index"])
def test_truncated_safetensors_file_is_named_as_incomplete(model, tmp_path, max_shard_bytes):
  vita_jax.save_pretrained(model, str(tmp_path), layout="long_vita",
                           max_shard_bytes=max_shard_bytes)
  name = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
  with open(tmp_path / name, "r+b") as f:
    f.truncate(os.path.getsize(tmp_path / name) - 100)      # a download cut short
  with pytest.raises(InputError, match=rf"{name} is incomplete") as err:
    vita_jax.load_pretrained(str(tmp_path))
  assert len(str(err.value).splitlines()) == 1
  if max_shard_bytes < (1 << 30):    # with an index, only the damaged shard is refused
    tensors = hf_files.SafetensorsDir(str(tmp_path))
    with open(tmp_path / hf_files.INDEX) as f:
      file_of = json.load(f)["weight_map"]
    intact = next(k for k, v in file_of.items() if v != name)
    np.testing.assert_array_equal(tensors[intact], load_file(str(tmp_path / file_of[intact]))[
        intact])
  torch_io = pytest.importorskip("vita_torch.io")
  with pytest.raises(InputError, match=rf"{name} is incomplete"):
    torch_io.read_checkpoint(str(tmp_path))


def test_mismatched_checkpoint_lists_what_differs(model, tmp_path):
  vita_jax.save_pretrained(model, str(tmp_path), layout="long_vita")
  with open(tmp_path / "config.json") as f:
    config = json.load(f)
  config["num_hidden_layers"] = 3
  config["vocab_size"] = 101
  with open(tmp_path / "config.json", "w") as f:
    json.dump(config, f)
  tensors = load_file(str(tmp_path / "model.safetensors"))
  del tensors["model.vision_model.encoder.layers.0.ls1"]
  tensors["model.extra.weight"] = np.zeros(3, np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError) as err:
    vita_jax.load_pretrained(str(tmp_path))
  msg = str(err.value)
  assert "missing" in msg and "model.layers.2.self_attn.q_proj.weight" in msg
  assert "model.vision_model.encoder.layers.0.ls1" in msg
  assert "unexpected (1): model.extra.weight" in msg
  assert "model.embed_tokens.weight: checkpoint (97, 24) vs config (101, 24)" in msg


@pytest.mark.parametrize("layout", ["long_vita", "internvl"])
def test_key_table_covers_every_parameter_once(model, layout):
  flat = params(model)
  hf = hf_mapping.flat_params_to_hf(flat, model.config, layout)
  shapes = {p: v.shape for p, v in flat.items()}
  back = hf_mapping.hf_to_flat_params(hf, model.config, layout, shapes)
  assert back.keys() == flat.keys()
  for p in flat:
    np.testing.assert_array_equal(back[p], flat[p], err_msg=str(p))
  # A 2-D Linear is stored [out, in]: the q projection of layer 1 is kernel[1].T.
  prefix = "model." if layout == "long_vita" else "model.language_model."
  q = hf[prefix + "layers.1.self_attn.q_proj.weight"]
  np.testing.assert_array_equal(q, flat[("llm", "layers", "q_kernel")][1].reshape(24, -1).T)


def test_model_config_from_hf_reads_the_release_config():
  release = dict(
      architectures=["LongVITAForCausalLM"], model_type="long_vita", hidden_size=5120,
      intermediate_size=13824, num_attention_heads=40, num_hidden_layers=48,
      num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False,
      vocab_size=152064, eos_token_id=151645, bos_token_id=151643,
      visual=dict(hidden_size=1024, image_size=448, patch_size=14, intermediate_size=4096,
                  num_attention_heads=16, num_hidden_layers=24, layer_norm_eps=1e-6,
                  qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
                  hidden_act="gelu", initializer_factor=1.0))
  cfg = hf_config.model_config_from_hf(release)
  want = base.model_config("14b")
  assert cfg.llm.to_dict() == want.llm.to_dict()
  for k in ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
    assert cfg.vision[k] == want.vision[k], k
  assert cfg.projector.hidden_size == 1024 and not cfg.projector.bias
  assert cfg.tokens.img_context_id == 151667 and cfg.tokens.image_token_id == -1
  assert spec_tokens.tokens_per_tile(cfg) == 256


def convert_main(argv):
  return cli.invoke(convert.main, convert.FLAGS, ["vita_jax.convert", *argv])


def test_convert_cli_both_ways_keeps_logits(model, model_logits, tmp_path):
  src = tmp_path / "src"
  vita_jax.save_pretrained(model, str(src), layout="long_vita")
  # long_vita -> internvl through `python -m`, then back in-process (same code path).
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-m", "vita_jax.convert", str(src), str(tmp_path / "ivl")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr
  assert "internvl layout" in run.stdout
  assert convert_main([str(tmp_path / "ivl"), str(tmp_path / "back"), "--layout=long_vita"]) == 0
  back = vita_jax.load_pretrained(str(tmp_path / "back"))
  assert back.config.layout == "long_vita"
  for p, v in params(model).items():
    np.testing.assert_array_equal(params(back)[p], v, err_msg=str(p))
  # The internvl hop turns every context token into its one image token id.
  ids, pix = inputs(model.config)
  ids = np.where(ids == model.config.tokens.vid_context_id, model.config.tokens.img_context_id,
                 ids)
  graphdef, state = nnx.split(back)
  out = jax.jit(lambda s, i, p: nnx.merge(graphdef, s)(i, p))(state, ids, pix)
  np.testing.assert_array_equal(out, model_logits)
  assert convert_main([str(src), str(tmp_path / "bf16"), "--dtype=bfloat16"]) == 0
  files = load_file(str(tmp_path / "bf16" / "model.safetensors"))
  assert all(v.dtype == ml_dtypes.bfloat16 for v in files.values())


def test_convert_cli_reports_a_bad_source(tmp_path, capsys):
  assert convert_main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
  assert "has no config.json" in capsys.readouterr().err


def test_load_onto_a_mesh_shards_by_logical_axes(model, model_logits, tmp_path):
  from vita_jax.parallel.mesh import make_mesh
  mesh = make_mesh({"data": 2, "fsdp": 2, "seq": 1, "tensor": 2})
  vita_jax.save_pretrained(model, str(tmp_path), layout="long_vita")
  loaded = vita_jax.load_pretrained(str(tmp_path), mesh=mesh)
  assert loaded.mesh is mesh
  gate = loaded.llm.layers.gate_kernel[...]                 # [layers, embed, mlp]
  assert tuple(gate.sharding.spec) == (None, "fsdp", "tensor")
  np.testing.assert_array_equal(np.asarray(gate), params(model)[("llm", "layers", "gate_kernel")])
  np.testing.assert_allclose(logits(loaded), model_logits, atol=1e-5, rtol=1e-5)

"""The per-slot sampler of continuous batching (decoding.sample_rows): rows with different
settings in one call keep exactly the tokens their top-k / top-p filter allows (the sets
tests/test_generate.py checks for the static-parameter `sample`)."""

import jax
import jax.numpy as jnp
import numpy as np

from vita_jax.models import decoding


def test_sample_rows_filters_per_row():
  probs = jnp.asarray([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.tile(probs, (5, 1)))
  temperature = jnp.asarray([0.0, 1.0, 1.0, 1.0, 1.0])
  top_k = jnp.asarray([0, 2, 0, 0, 0], jnp.int32)
  top_p = jnp.asarray([1.0, 1.0, 0.7, 0.4, 1.0])
  keys = jax.random.split(jax.random.PRNGKey(0), 200)
  draw = jax.jit(jax.vmap(lambda k: decoding.sample_rows(
      logits, jax.random.split(k, 5), temperature, top_k, top_p)))
  got = np.asarray(draw(keys))                                      # [200, 5]
  assert [set(got[:, i]) for i in range(5)] == [{0}, {0, 1}, {0, 1}, {0}, {0, 1, 2, 3}]


def test_all_greedy_rows_are_argmax():
  logits = jax.random.normal(jax.random.PRNGKey(1), (4, 50))
  zeros = jnp.zeros((4,))
  got = decoding.sample_rows(logits, jax.random.split(jax.random.PRNGKey(2), 4), zeros,
                             jnp.zeros((4,), jnp.int32), jnp.ones((4,)))
  np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), axis=-1))

"""padam_jax._chunks: a program of one parameter's arrays run on slices of their rows gives the
whole program's values, and a program that mixes rows is refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from padam_jax import _chunks


def _row_local(x, codes):
  # Elementwise work, a reduction and a broadcast within each row, a reshape that keeps the rows,
  # and indices of the whole array (as the random bits of stochastic rounding use them).
  index = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) * 7 + jax.lax.broadcasted_iota(
    jnp.uint32, x.shape, 1
  )
  blocks = x.reshape(x.shape[0], -1, 4)
  scale = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
  y = (blocks / scale).reshape(x.shape) + index.astype(jnp.float32) + jnp.float32(0.5)
  return y, (codes + index.astype(jnp.uint8)).astype(jnp.uint8)


@pytest.mark.parametrize("chunk_size", [16, 40, 1000])
def test_slices_of_rows_give_the_whole_programs_values(chunk_size):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(13, 8)), jnp.float32)
  codes = jnp.arange(13 * 8, dtype=jnp.uint8).reshape(13, 8)
  closed = jax.make_jaxpr(_row_local)(x, codes)
  whole = jax.jit(_row_local)(x, codes)
  sliced = jax.jit(lambda *a: _chunks.call(closed, a, chunk_size) or _row_local(*a))(x, codes)
  jax.tree.map(np.testing.assert_array_equal, tuple(sliced), tuple(whole))


@pytest.mark.parametrize(
  "fn",
  [
    lambda x: x - jnp.mean(x, axis=0, keepdims=True),  # a reduction over the rows
    lambda x: x.T.reshape(x.shape),  # a transpose
    lambda x: jnp.roll(x, 1, axis=0),  # rows that move
  ],
  ids=["mean-over-rows", "transpose", "roll"],
)
def test_a_program_that_mixes_rows_is_refused(fn):
  x = jnp.ones((16, 16))
  with pytest.raises(_chunks.NotChunkable):
    _chunks.call(jax.make_jaxpr(fn)(x), [x], 64)


def test_a_small_program_is_not_sliced():
  x = jnp.ones((16, 16))
  assert _chunks.call(jax.make_jaxpr(lambda x: 2 * x)(x), [x], 256) is None

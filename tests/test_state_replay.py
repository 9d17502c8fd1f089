"""``benchmarks.state_replay``'s replay on a synthetic gradient sequence: a float32 state against
float32 gives no error, a bfloat16 or 8-bit state some."""

import numpy as np
import pytest

from benchmarks import state_replay

STEPS = 6


def synthetic_gradients() -> list[np.ndarray]:
  """Two leaves, ``(steps, 4, 32)`` (quantized with ``min_size=64``) and ``(steps, 8)``: a fixed
  mean plus noise, on coordinates whose scales spread over two decades."""
  rng = np.random.default_rng(0)
  leaves = []
  for shape in ((4, 32), (8,)):
    scale = 10.0 ** rng.uniform(-2, 0, shape)
    mean = rng.normal(size=shape)
    leaves.append((scale * (mean + rng.normal(size=(STEPS, *shape)))).astype(np.float32))
  return leaves


@pytest.mark.standard_promotion  # optax.adam's bias correction raises a float to an int32 power
def test_replay_errors():
  gradients = synthetic_gradients()
  results = {}
  for rule in state_replay.rules():
    for reference, variants in state_replay.comparisons(rule, block_size=16, min_size=64):
      # The reference against itself, in the same replay as the narrow states.
      replayed = state_replay.replay(
        gradients, reference, {"float32": reference, **variants}, rule.p
      )
      np.testing.assert_array_equal(replayed.pop("float32"), 0.0)
      results |= {(rule.name, state): metrics for state, metrics in replayed.items()}
  assert set(results) == {(r.name, s) for r in state_replay.rules() for s in state_replay.STATES}
  for (rule, state), metrics in results.items():
    assert metrics.shape == (STEPS, 4)
    assert np.all(np.isfinite(metrics))
    error, _, d, _ = metrics.T
    assert error.mean() > 0, (rule, state)
    # v does not depend on m: a float32 v has no error. The others' error shows from step 2 on.
    if state == "bfloat16 m only":
      np.testing.assert_array_equal(d, 0.0)
    else:
      assert d[1:].mean() > 0, (rule, state)
  summary = state_replay.summary(results["Padam, p = 1/8", "bfloat16 m and v"], last=2)
  assert set(summary) >= {"error_mean", "error_median", "error_p90", "error_last", "bias_mean"}

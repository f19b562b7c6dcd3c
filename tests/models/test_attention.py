"""Every attention implementation follows the same mask semantics as `xla`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import spmd
from jax.sharding import PartitionSpec as P

from kosmos_jax.models import attention

CPU_KERNELS = ["pallas", "splash"]  # cudnn needs a GPU; both others interpret on CPU.


def _qkv_segments(b=2, length=40, heads=2, d=64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(key, (b, length, heads, d)) for key in keys)
  # Row 0: left padding then two packed segments; row 1: all padding.
  segments = np.zeros((b, length), np.int32)
  segments[0, 5:25], segments[0, 25:] = 1, 2
  return q, k, v, jnp.asarray(segments)


@pytest.mark.parametrize("implementation", CPU_KERNELS)
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_match_xla_forward_and_gradients(implementation, causal):
  q, k, v, segments = _qkv_segments()

  def loss(impl, q, k, v):
    out = attention.attention(q, k, v, causal=causal, segment_ids=segments, implementation=impl)
    return jnp.sum(out * jnp.cos(out)), out

  (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)("xla", q, k, v)
  (_, got), grads = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
    implementation, q, k, v
  )
  np.testing.assert_allclose(got, ref, atol=2e-5)
  assert not np.asarray(got[1]).any()  # all-padding row: zeros, not NaN
  for g, r in zip(grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, r, atol=2e-5)


def test_unknown_implementation_and_kernel_dropout_are_errors():
  q, k, v, segments = _qkv_segments(length=8)
  with pytest.raises(ValueError, match="not one of"):
    attention.attention(q, k, v, causal=True, implementation="flash")
  with pytest.raises(ValueError, match="attention_dropout"):
    attention.attention(
      q,
      k,
      v,
      causal=True,
      segment_ids=segments,
      implementation="pallas",
      dropout_rate=0.1,
      dropout_rng=jax.random.key(0),
    )


@pytest.mark.parametrize("packed", [True, False])  # False: segment_ids=None, as the ViT calls
def test_kernel_partitions_under_a_mesh(packed):
  mesh = jax.make_mesh(
    (2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3
  )
  rules = (("act_batch", ("data", "fsdp")), ("act_heads", "tensor"))
  q, k, v, segments = _qkv_segments(b=4, length=24, heads=2, d=64, seed=1)
  segments = segments if packed else None
  ref = attention.attention(q, k, v, causal=True, segment_ids=segments)
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    qkv = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, qkv) for x in (q, k, v))
    ids = jax.device_put(segments, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)))
    got = jax.jit(
      lambda q, k, v, s: attention.attention(
        q, k, v, causal=True, segment_ids=s, implementation="pallas"
      )
    )(q, k, v, ids)
  assert got.sharding.spec == P(("data", "fsdp"), None, "tensor", None)
  np.testing.assert_allclose(got, ref, atol=2e-5)

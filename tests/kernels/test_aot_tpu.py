"""The Mosaic kernels compile ahead of time for a real TPU topology (libtpu).

No TPU is needed: libtpu compiles for a described v5e 2x2 slice on this CPU
host, which runs Mosaic's own checks (tiling rules, VMEM budget) on our tiles.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kosmos_jax import kernels


@pytest.fixture(scope="module")
def mesh():
  topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
  return topologies.make_mesh(topology, (2, 2), ("data", "model"))


@pytest.mark.parametrize("head_dim,causal", [(64, True), (128, False)])
def test_forward_backward_compile_for_v5e(mesh, head_dim, causal):
  batch, length, heads = 2, 640, 2  # 640: padded to the 512 default tiles.
  spec = P("data", None, "model", None)
  # Mosaic kernels need shard_map on a multi-device mesh: each device runs the
  # kernel on its own batch rows and heads.
  attention = jax.shard_map(
    lambda q, k, v, ids: kernels.flash_attention(
      q, k, v, causal=causal, segment_ids=ids, backend="tpu"
    ),
    mesh=mesh,
    in_specs=(spec, spec, spec, P("data", None)),
    out_specs=spec,
  )

  def loss(q, k, v, ids):
    return jnp.sum(attention(q, k, v, ids).astype(jnp.float32) ** 2)

  def struct(shape, dtype, pspec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, pspec))

  qkv = struct((batch, length, heads, head_dim), jnp.bfloat16, spec)
  ids = struct((batch, length), jnp.int32, P("data", None))
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, ids)
  # Forward, dk/dv and dq kernels, lowered by Mosaic (not interpreted).
  assert lowered.as_text().count("tpu_custom_call") == 3
  compiled = lowered.compile()
  assert compiled.memory_analysis() is not None

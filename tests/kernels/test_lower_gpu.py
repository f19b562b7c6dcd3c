"""The Triton kernels lower for CUDA on this GPU-less host.

jax.export lowers for a platform without its device: Pallas turns every
kernel into Triton IR here, which catches ops the Triton lowering lacks. PTX
compilation and numerics on a GPU are left to benchmarks/attention.py; the
kernels' logic is checked in interpret mode by test_flash.py.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from kosmos_jax import kernels


@pytest.mark.parametrize("head_dim,causal", [(64, True), (128, False)])
def test_forward_backward_lower_for_cuda(head_dim, causal):
  def loss(q, k, v, ids):
    out = kernels.flash_attention(q, k, v, causal=causal, segment_ids=ids, backend="gpu")
    return jnp.sum(out.astype(jnp.float32) ** 2)

  qkv = jax.ShapeDtypeStruct((2, 200, 2, head_dim), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((2, 200), jnp.int32)
  exported = export.export(
    jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))),
    platforms=["cuda"],
    # Triton calls carry no serialization guarantee; we only lower here.
    disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(qkv, qkv, qkv, ids)
  # Forward, dk/dv and dq kernels.
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3

"""Logical axis names -> PartitionSpecs, and activation constraints by name.

Parameters and activations are annotated with logical names; the rules that
map names to mesh axes come from the config (kosmos_jax.train.partitioning)
and are active through `flax.core.spmd.logical_axis_rules`.
"""
from typing import Sequence

import jax
from flax.core import spmd


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh,
                    rules=None) -> jax.sharding.PartitionSpec:
  """PartitionSpec of an array from logical axis names and the axis rules.

  A dimension that its mesh axes do not divide, or whose mesh axes an earlier
  dimension already took, is replicated instead: every config then compiles
  on every mesh (MaxText's sharding tolerance, without a threshold).
  """
  if rules is None:
    rules = spmd.get_logical_axis_rules()
  with spmd.logical_axis_rules(rules):
    spec = list(spmd.get_pspec(tuple(names)))
  used = set()
  for i, (axes, size) in enumerate(zip(spec, shape)):
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = 1
    for a in flat:
      ways *= mesh.shape[a]
    if size % ways or used & set(flat):
      spec[i] = None
    else:
      used |= set(flat)
  return jax.sharding.PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical axis names; a no-op outside a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not spmd.get_logical_axis_rules():
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))

"""Mesh sizing and logical-name -> PartitionSpec rules."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from kosmos_jax.models import sharding
from kosmos_jax.train import partitioning


def test_mesh_shape_fills_one_axis():
  cfg = partitioning.mesh_config(data=2, fsdp=-1, tensor=2)
  assert partitioning.mesh_shape(cfg, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="devices"):
    partitioning.mesh_shape(partitioning.mesh_config(data=3, fsdp=1, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one"):
    partitioning.mesh_shape(partitioning.mesh_config(data=-1, fsdp=-1), 8)


def test_undividable_or_repeated_axes_are_replicated():
  mesh = partitioning.make_mesh(partitioning.mesh_config(data=2, fsdp=2, tensor=2))
  rules = partitioning.DEFAULT_RULES
  # 65037 (the vocabulary) is odd: the tensor axis cannot split it.
  assert sharding.logical_to_spec(("vocab", "embed"), (65037, 2048), mesh, rules) == P(None, "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (65036, 2048), mesh, rules) == P("tensor", "fsdp")
  assert sharding.logical_to_spec(("embed", "embed"), (4, 4), mesh, rules) == P("fsdp", None)
  assert (sharding.logical_to_spec(("act_batch", None), (8, 3), mesh, rules)
          == P(("data", "fsdp"), None))
  assert len(jax.devices()) == 8

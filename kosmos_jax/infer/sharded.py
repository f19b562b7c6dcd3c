"""Inference over one host's chips (TPU v2-8, v5e-8): parameters over `tensor`,
the batch over `data`.

Inference keeps no optimizer state, so the training rules' fsdp split of
`embed` only adds gathers: here `embed` is replicated and the weights are
split Megatron-style (`heads`, `mlp`, `vocab` over `tensor`). A dimension the
mesh does not divide is replicated (`sharding.logical_to_spec`), so any model
runs on any mesh.
"""
import contextlib
from typing import Any, Sequence

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh

from kosmos_jax.train import partitioning

RULES = tuple((name, None if name == "embed" else axes)
              for name, axes in partitioning.DEFAULT_RULES)


def make_mesh(data: int = 1, tensor: int = -1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp=1, tensor) mesh; -1 takes the devices the other axis leaves."""
  return partitioning.make_mesh(partitioning.mesh_config(data=data, fsdp=1, tensor=tensor),
                                devices)


def shard_model(model: nnx.Module, mesh: Mesh, rules: tuple = RULES) -> nnx.Module:
  """Moves the model's parameters onto `mesh` by their logical axis names (in place)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, partitioning.state_shardings(state, mesh, rules)))
  return model


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: tuple = RULES):
  """Activates `mesh` and the rules: the model's `act_*` constraints then split
  the batch and heads, and attention kernels run in shard_map."""
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    yield


def generate(model, mesh: Mesh, *args, rules: tuple = RULES, **kwargs):
  """`model.generate(*args, **kwargs)` on `mesh` (see `Kosmos2.generate`);
  the model's parameters should be placed there first (`shard_model`)."""
  with use_mesh(mesh, rules):
    return model.generate(*args, **kwargs)

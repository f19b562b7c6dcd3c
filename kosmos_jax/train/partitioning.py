"""The device mesh and the logical-axis rules that place parameters and activations on it.

Parameters carry logical names (`layers`, `vocab`, `embed`, `heads`, `mlp`, ...);
the config's `sharding_rules` map each name to mesh axes (`data`, `fsdp`,
`tensor`). A dimension whose size does not divide by its mesh axes is
replicated instead (`sharding.logical_to_spec`), so every config compiles on
every mesh.
"""
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from kosmos_jax.models import sharding

MESH_AXES = ("data", "fsdp", "tensor")

# MaxText-style defaults: weights over fsdp (ZeRO-3) and tensor (Megatron);
# activations (act_*) with the batch over data and fsdp, heads/mlp/vocab over
# tensor; sequence and layer axes unsharded.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def mesh_config(data: int = 1, fsdp: int = -1, tensor: int = 1) -> ml_collections.ConfigDict:
  """`mesh.*` keys; -1 on one axis takes the devices the others leave."""
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"mesh: {num_devices} devices do not divide by {fixed}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                     f"devices, have {num_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if devices and devices[0].platform == "tpu" and len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def rules_of(config) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.sharding_rules)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: tuple):
  """NamedShardings for an nnx state of Variables carrying `out_sharding` names."""
  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
    return NamedSharding(mesh, sharding.logical_to_spec(names, var.get_value().shape, mesh, rules))
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: tuple, shape: Sequence[int]) -> NamedSharding:
  """Batch arrays: leading axis over the `act_batch` rule, the rest replicated."""
  names = ("act_batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, sharding.logical_to_spec(names, shape, mesh, rules))


def train_state_shardings(state, mesh: Mesh, rules: tuple):
  """Shardings for a TrainState: parameters and their optimizer moments by
  their logical names, everything else (step, rng, counters) replicated."""
  replicated = NamedSharding(mesh, P())
  is_var = lambda x: isinstance(x, nnx.Variable)
  by_name = lambda x: (state_shardings(x, mesh, rules) if is_var(x) else replicated)
  return jax.tree.map(by_name, state, is_leaf=is_var)

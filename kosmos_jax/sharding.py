"""The device mesh, and the rules that place parameters and activations on it.

Parameters and activations carry logical axis names (`layers`, `vocab`,
`embed`, `heads`, `mlp`, `act_batch`, ...). A rules table maps each name to
mesh axes (`data`, `fsdp`, `tensor`); two tables are written out here:
`TRAIN_RULES` (the config's default `sharding_rules`) and `SERVE_RULES`.
A dimension that its mesh axes do not divide is replicated instead
(`logical_to_spec`), so every config compiles on every mesh.
"""

import contextlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# MaxText-style training: weights over fsdp (ZeRO-3) and tensor (Megatron);
# activations (act_*) with the batch over data and fsdp, heads/mlp/vocab over
# tensor; sequence and layer axes unsharded.
TRAIN_RULES = (
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

# Inference keeps no optimizer state, so an fsdp split of `embed` would only
# add gathers: `embed` is replicated and the weights are split Megatron-style
# (heads, mlp, vocab over `tensor`), the batch over `data`.
SERVE_RULES = (
  ("embed", None),
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


# ------------------------------------------------------------------------ mesh


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
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {num_devices}"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  if devices and devices[0].platform == "tpu" and len(devices) == len(jax.devices()):
    # Auto axes, as the plain Mesh below: jax.make_mesh defaults to Explicit
    # ones, under which the activations' sharding constraints fail to trace.
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=auto)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def serving_mesh(data: int = 1, tensor: int = -1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp=1, tensor) mesh for inference over one host's chips (TPU
  v2-8, v5e-8); -1 takes the devices the other axis leaves."""
  return make_mesh(mesh_config(data=data, fsdp=1, tensor=tensor), devices)


def rules_of(config) -> tuple:
  """The experiment config's `sharding_rules` (lists, from JSON) as a rules table."""
  return tuple(
    (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding_rules
  )


# ------------------------------------------------------------- logical names


def logical_to_spec(
  names: Sequence[str | None], shape: Sequence[int], mesh, rules=None
) -> jax.sharding.PartitionSpec:
  """PartitionSpec of an array from logical axis names and the axis rules
  (default: the rules active through `flax.core.spmd.logical_axis_rules`).

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


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: tuple = SERVE_RULES):
  """Activates `mesh` and `rules`: the model's `act_*` constraints then split
  the batch and heads, and attention kernels run in shard_map."""
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    yield


# ----------------------------------------------------------------- shardings


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: tuple):
  """NamedShardings for an nnx state of Variables carrying `out_sharding` names."""

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
    return NamedSharding(mesh, logical_to_spec(names, var.get_value().shape, mesh, rules))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: tuple, shape: Sequence[int]) -> NamedSharding:
  """Batch arrays: leading axis over the `act_batch` rule, the rest replicated."""
  names = ("act_batch",) + (None,) * (len(shape) - 1)
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def train_state_shardings(state, mesh: Mesh, rules: tuple):
  """Shardings for a TrainState: parameters and their optimizer moments by
  their logical names, everything else (step, rng, counters) replicated."""
  replicated = NamedSharding(mesh, P())
  is_var = lambda x: isinstance(x, nnx.Variable)
  by_name = lambda x: state_shardings(x, mesh, rules) if is_var(x) else replicated
  return jax.tree.map(by_name, state, is_leaf=is_var)


def shard_model(model: nnx.Module, mesh: Mesh, rules: tuple = SERVE_RULES) -> nnx.Module:
  """Moves the model's parameters onto `mesh` by their logical axis names (in place)."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, mesh, rules)))
  return model

"""Compile the real train step for a TPU topology on this host (libtpu), and report.

The plan of a pod run is checked before the pod exists: per-chip memory
(arguments, temporaries, total against the chip's HBM) and FLOPs per step.
"""

import dataclasses

import jax
from flax.core import spmd
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kosmos_jax import sharding
from kosmos_jax.models import batch as batch_lib
from kosmos_jax.models import config as model_config
from kosmos_jax.processing import views
from kosmos_jax.train import optim
from kosmos_jax.train import state as state_lib
from kosmos_jax.train import step as step_lib

# HBM per chip in GiB (Cloud TPU documentation).
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


@dataclasses.dataclass
class CompileReport:
  topology: str
  devices: int
  mesh: dict
  argument_gib: float
  output_gib: float
  temp_gib: float
  total_gib: float  # arguments + temporaries (outputs alias the donated state)
  hbm_gib: float | None
  flops_per_chip: float  # cost_analysis of the partitioned (per-device) program
  tokens_per_step: int

  def fits(self) -> bool:
    return self.hbm_gib is None or self.total_gib <= self.hbm_gib


def abstract_batch(config) -> dict:
  """ShapeDtypeStructs of one global training batch (the layout of models/batch.py).

  A model with `modalities` gets `data.modalities_per_row` vectors per row,
  as wide as its widest modality.
  """
  v = config.model.vision
  widths = model_config.modality_widths(config.model)
  shapes = batch_lib.shapes(
    config.batch_size,
    config.seq_len,
    config.images_per_row,
    views.input_size(v),
    v.num_channels,
    modalities_per_row=config.data.get("modalities_per_row", 0) if widths else 0,
    modality_dim=max(widths.values(), default=0),
  )
  return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def compile_train_step(config, devices, topology_name: str = "") -> tuple[object, CompileReport]:
  """Lowers and compiles the sharded train step for `devices`; returns (compiled, report)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_of(config)
  tx = optim.optimizer(config.optim, config.total_steps)
  # The trainer's own state and step: the plan is for the program it runs.
  trainable = optim.trainable_patterns(config)
  graphdef, state = state_lib.abstract(
    config.model, tx, config.seed, lora_config=config.get("lora"), trainable=trainable
  )
  state_sharding = sharding.train_state_shardings(state, mesh, rules)
  batch = abstract_batch(config)
  batch_sharding = {k: sharding.batch_sharding(mesh, rules, v.shape) for k, v in batch.items()}
  train_step = step_lib.make_train_step(
    graphdef,
    tx,
    accumulation=config.accumulation,
    z_loss=config.z_loss,
    max_bad_steps=config.max_bad_steps,
    trainable=trainable,
    locations=step_lib.location_smoothing(config),
  )
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    compiled = (
      jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
        donate_argnums=0,
      )
      .lower(state, batch)
      .compile()
    )
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = lambda n: round(n / 2**30, 3)
  kind = topology_name.split(":")[0]
  report = CompileReport(
    topology=topology_name,
    devices=len(devices),
    mesh=dict(mesh.shape),
    argument_gib=gib(memory.argument_size_in_bytes),
    output_gib=gib(memory.output_size_in_bytes),
    temp_gib=gib(memory.temp_size_in_bytes),
    total_gib=gib(memory.argument_size_in_bytes + memory.temp_size_in_bytes),
    hbm_gib=HBM_GIB.get(kind),
    flops_per_chip=float(cost.get("flops", 0.0)),
    tokens_per_step=config.batch_size * config.seq_len,
  )
  return compiled, report


def tpu_devices(topology_name: str):
  """The devices of a TPU topology such as 'v5e:4x4', described by libtpu."""
  topology = topologies.get_topology_desc(platform="tpu", topology_name=topology_name)
  return topology.devices

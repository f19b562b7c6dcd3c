"""A LoRA train step: only adapters (and `train_also`) move, the optimizer holds
state for them alone, and 8 sharded devices give the single-device step."""

import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from flax.core import spmd

from kosmos_jax import commands, sharding
from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import lora as lora_ckpt
from kosmos_jax.models import lora
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import optim, trainer
from kosmos_jax.train import state as state_lib
from kosmos_jax.train import step as step_lib
from tests.helpers.batches import packed_batch
from tests.train import test_trainer

NO_DROPOUT = ["model.text.dropout=0.0", "model.text.attention_dropout=0.0", "lora.dropout=0.0"]


def _setup(overrides=()):
  config = config_lib.load(
    "configs/tiny.py",
    ["batch_size=4", "seq_len=32", "optim.warmup_steps=1", "lora.rank=4", *overrides],
  )
  model = Kosmos2(config.model, rngs=nnx.Rngs(config.seed))
  lora.add(model, config.lora, lora.adapter_rngs(config.seed))
  tx = optim.optimizer(config.optim, config.total_steps)
  trainable = optim.trainable_patterns(config)
  state = state_lib.create(nnx.state(model, nnx.Param), tx, config.seed, trainable)
  train_step = step_lib.make_train_step(nnx.graphdef(model), tx, trainable=trainable)
  return config, state, train_step


def _flat(params) -> dict:
  return {
    optim.path_name(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
  }


def _size(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def test_only_adapters_move_and_frozen_weights_are_bit_identical():
  config, state, train_step = _setup()
  before = _flat(state.params)
  step = jax.jit(train_step)
  for seed in range(2):
    state, metrics = step(state, packed_batch(config, seed=seed))
  assert bool(metrics["finite"])
  after = _flat(state.params)
  moved = {name for name in before if not np.array_equal(before[name], after[name])}
  adapters = {name for name in before if name.rsplit("/", 1)[-1] in lora.ADAPTER_NAMES}
  assert len(adapters) == 8  # q, k, v, out of the decoder, A and B each
  assert moved == adapters


def test_optimizer_state_exists_for_trainable_parameters_only():
  config, state, _ = _setup()
  adapters = sum(v.size for k, v in _flat(state.params).items() if "/lora_" in k)
  # AdamW's two moments per trainable value, plus its scalar step counters.
  assert 2 * adapters <= _size(state.opt_state) <= 2 * adapters + 8
  assert _size(state.opt_state) < _size(state.params) // 10
  # The abstract state (trainer, `kosmos-jax aot`) is the same pytree.
  tx = optim.optimizer(config.optim, config.total_steps)
  _, abstract = state_lib.abstract(
    config.model,
    tx,
    config.seed,
    lora_config=config.lora,
    trainable=optim.trainable_patterns(config),
  )
  assert jax.tree.structure(abstract) == jax.tree.structure(state)


def test_train_also_trains_the_connector_too():
  config, state, train_step = _setup(['optim.train_also=["image_to_text_projection/.*"]'])
  before = _flat(state.params)
  step = jax.jit(train_step)
  for seed in range(2):  # the first step's learning rate is 0 (warmup)
    state, _ = step(state, packed_batch(config, seed=seed))
  after = _flat(state.params)
  moved = {name for name in before if not np.array_equal(before[name], after[name])}
  assert "image_to_text_projection/dense/kernel" in moved
  assert not any(n.startswith(("vision_model/", "text_model/embed")) for n in moved)
  assert not any(n.endswith("self_attn/q_proj/kernel") for n in moved)
  connector = sum(v.size for k, v in before.items() if k.startswith("image_to_text_projection/"))
  adapters = sum(v.size for k, v in before.items() if "/lora_" in k)
  assert 2 * (connector + adapters) <= _size(state.opt_state) <= 2 * (connector + adapters) + 8


def test_a_train_also_pattern_that_matches_nothing_is_named():
  with pytest.raises(ValueError, match=r"\['connector/.\*'\] match no parameter"):
    _setup(['optim.train_also=["connector/.*"]'])


def test_sharded_8_devices_equals_one_device():
  """data=2, fsdp=2, tensor=2 on 8 host devices gives the single-device LoRA steps."""
  config, state, train_step = _setup(
    NO_DROPOUT + ["batch_size=8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  )
  batches = [packed_batch(config, seed=s) for s in range(3)]
  single = jax.jit(train_step)
  ref_state, ref_losses = state, []
  for batch in batches:
    ref_state, metrics = single(ref_state, batch)
    ref_losses.append(float(metrics["loss"]))

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_of(config)
  state_sharding = sharding.train_state_shardings(state, mesh, rules)
  batch_sharding = {k: sharding.batch_sharding(mesh, rules, v.shape) for k, v in batches[0].items()}
  with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
    sharded = jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None),
      donate_argnums=0,
    )
    state = jax.device_put(state, state_sharding)
    losses = []
    for batch in batches:
      state, metrics = sharded(state, jax.device_put(batch, batch_sharding))
      losses.append(float(metrics["loss"]))
  attn = state.params["text_model"]["layers"]["self_attn"]
  # Adapters split like the layer they adapt: A's input axis over fsdp, B's output over tensor.
  P = jax.sharding.PartitionSpec
  assert attn["q_proj"]["lora_a"].sharding.spec == P(None, "fsdp", None)
  assert attn["q_proj"]["lora_b"].sharding.spec == P(None, None, "tensor")
  mu = state.opt_state[1][0].mu["text_model"]["layers"]["self_attn"]["q_proj"]["lora_b"]
  assert mu.sharding.spec == P(None, None, "tensor")
  np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
    _flat(state.params),
    _flat(ref_state.params),
  )


def test_the_trainer_names_a_target_that_matches_nothing(tmp_path, capsys):
  argv = ["train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")]
  argv += ["--config.lora.rank=4", '--config.lora.targets=["text_model/layers/attn/q"]']
  with pytest.raises(SystemExit) as exit_info:
    commands.main(argv)
  assert exit_info.value.code == 2
  assert "lora.targets ['text_model/layers/attn/q'] match no Dense" in capsys.readouterr().err


def test_a_lora_run_resumes_bitwise(tmp_path):
  """Preempted mid-run and resumed, a LoRA job logs the losses of an
  uninterrupted one, and its frozen weights never leave their initial values."""
  overrides = ["total_steps=6", "checkpoint_every=3", "log_every=1", "batch_size=4"]
  overrides += [
    "seq_len=64",
    "mesh.fsdp=1",
    "lora.rank=4",
    "optim.train_also=['image_to_text_projection/.*']",
  ]
  config = lambda: config_lib.load("configs/tiny.py", overrides)
  one = jax.devices()[:1]
  reference = str(tmp_path / "reference")
  trainer.train(config(), reference, devices=one)
  workdir = str(tmp_path / "preempted")
  test_trainer._send_sigterm_at(workdir, 2)
  preempted = trainer.train(config(), workdir, devices=one)["preempted_at"]
  assert 2 <= preempted < 6 and os.path.isdir(os.path.join(workdir, "checkpoints", str(preempted)))
  trainer.train(config(), workdir, devices=one)
  assert test_trainer._losses(workdir) == test_trainer._losses(reference)  # bitwise
  # Between the checkpoint the job resumed from and the last one, only the
  # adapters and the connector (train_also) moved.
  _, before = lora_ckpt.load(workdir, step=preempted)
  _, after = lora_ckpt.load(workdir)
  before = _flat(before)
  for name, value in _flat(after).items():
    moved = not np.array_equal(value, before[name])
    assert moved == bool(re.fullmatch(r".*lora_[ab]|image_to_text_projection/.*", name)), name

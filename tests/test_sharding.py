"""Mesh sizing, logical-name -> PartitionSpec rules, and sharded inference on 8 host
devices (data=2 x tensor=4 gives the unsharded tokens)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import kosmos_jax
from kosmos_jax import sharding
from tests.helpers.hf_reference import grounded_batch, random_hf_model

NEW = 8


def test_mesh_shape_fills_one_axis():
  cfg = sharding.mesh_config(data=2, fsdp=-1, tensor=2)
  assert sharding.mesh_shape(cfg, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="devices"):
    sharding.mesh_shape(sharding.mesh_config(data=3, fsdp=1, tensor=1), 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding.mesh_shape(sharding.mesh_config(data=-1, fsdp=-1), 8)


def test_undividable_or_repeated_axes_are_replicated():
  mesh = sharding.make_mesh(sharding.mesh_config(data=2, fsdp=2, tensor=2))
  rules = sharding.TRAIN_RULES
  # 65037 (the vocabulary) is odd: the tensor axis cannot split it.
  assert sharding.logical_to_spec(("vocab", "embed"), (65037, 2048), mesh, rules) == P(None, "fsdp")
  assert sharding.logical_to_spec(("vocab", "embed"), (65036, 2048), mesh, rules) == P(
    "tensor", "fsdp"
  )
  assert sharding.logical_to_spec(("embed", "embed"), (4, 4), mesh, rules) == P("fsdp", None)
  assert sharding.logical_to_spec(("act_batch", None), (8, 3), mesh, rules) == P(
    ("data", "fsdp"), None
  )
  assert len(jax.devices()) == 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = random_hf_model("a", seed=1)
  path = str(tmp_path_factory.mktemp("hf_sharded"))
  hf.save_pretrained(path)
  mesh = sharding.serving_mesh(data=2, tensor=4)
  return (
    hf.config,
    kosmos_jax.from_pretrained(path),
    sharding.shard_model(kosmos_jax.from_pretrained(path), mesh),
    mesh,
  )


def test_parameters_are_split_over_tensor(models):
  _, _, model, mesh = models
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
  embed = model.text_model.embed_tokens[...]  # [vocab, embed]: vocab split, embed whole
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", None)
  assert embed.addressable_shards[0].data.shape == (embed.shape[0] // 4, embed.shape[1])
  fc1 = model.text_model.layers.fc1.kernel[...]  # [layers, embed, mlp]
  assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
  assert len(fc1.devices()) == 8


@pytest.mark.parametrize("num_beams", [1, 3])
def test_tokens_equal_unsharded(models, num_beams):
  config, plain, model, mesh = models
  batch = grounded_batch(config, lengths=[3, 7], seed=2)
  want = plain.generate(**batch, max_new_tokens=NEW, num_beams=num_beams)
  with sharding.use_mesh(mesh):
    got = model.generate(**batch, max_new_tokens=NEW, num_beams=num_beams)
  np.testing.assert_array_equal(got, want)

"""Sharded inference on 8 host devices: data=2 x tensor=4 gives the unsharded tokens."""
import jax
import numpy as np
import pytest

import kosmos_jax
from hf_reference import grounded_batch, random_hf_model
from kosmos_jax.infer import sharded

NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  hf = random_hf_model("a", seed=1)
  path = str(tmp_path_factory.mktemp("hf_sharded"))
  hf.save_pretrained(path)
  mesh = sharded.make_mesh(data=2, tensor=4)
  return (hf.config, kosmos_jax.from_pretrained(path),
          sharded.shard_model(kosmos_jax.from_pretrained(path), mesh), mesh)


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
  got = sharded.generate(model, mesh, **batch, max_new_tokens=NEW, num_beams=num_beams)
  np.testing.assert_array_equal(got, want)

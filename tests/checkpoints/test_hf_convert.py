"""`kosmos-jax convert` both ways, and the loader's refusals."""

import json
import os

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import kosmos_jax
from kosmos_jax import commands
from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build
from tests.helpers.hf_reference import grounded_batch, random_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  model = random_hf_model("a", seed=7)
  path = tmp_path_factory.mktemp("hf")
  model.save_pretrained(path)
  return str(path)


def _tensors(path):
  return safetensors.numpy.load_file(os.path.join(path, "model.safetensors"))


def _write_variant(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  tensors = _tensors(src)
  edit(tensors)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"))
  return str(dst)


def test_round_trip_gives_identical_tensors_and_loads_in_transformers(hf_dir, tmp_path, capsys):
  ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
  commands.main(["convert", "hf-to-orbax", "--hf-dir", hf_dir, "--out", ckpt])
  commands.main(["convert", "orbax-to-hf", "--ckpt", ckpt, "--out", back])
  assert "generation_config.json" in json.loads(capsys.readouterr().out.splitlines()[-1])["copied"]
  original, converted = _tensors(hf_dir), _tensors(back)
  assert sorted(original) == sorted(converted)
  for key, value in original.items():
    np.testing.assert_array_equal(converted[key], value, err_msg=key)

  reloaded, info = transformers.Kosmos2ForConditionalGeneration.from_pretrained(
    back, output_loading_info=True
  )
  assert not info["missing_keys"] and not info["unexpected_keys"]
  batch = grounded_batch(reloaded.config, lengths=[5, 2])
  with torch.no_grad():
    ref = reloaded(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
  ours = np.asarray(kosmos_jax.from_pretrained(ckpt)(**batch).logits)
  mask = batch["attention_mask"].astype(bool)
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4)


def test_tied_head_and_old_position_ids_buffer_are_accepted(hf_dir, tmp_path):
  def edit(t):
    t["text_model.lm_head.weight"] = t["text_model.model.embed_tokens.weight"].copy()
    t["vision_model.model.embeddings.position_ids"] = np.arange(17)[None]

  path = _write_variant(hf_dir, tmp_path / "v", edit)
  hf_config, tensors = hf.read_hf_dir(path)
  params = hf.hf_to_params(tensors, hf.config_from_hf(hf_config))
  np.testing.assert_array_equal(
    params["text_model"]["embed_tokens"], tensors["text_model.model.embed_tokens.weight"]
  )


def test_untied_head_is_refused(hf_dir, tmp_path):
  def edit(t):
    t["text_model.lm_head.weight"] = t["text_model.model.embed_tokens.weight"] + 1

  with pytest.raises(hf.ConversionError, match="lm_head"):
    kosmos_jax.from_pretrained(_write_variant(hf_dir, tmp_path / "v", edit))


def test_missing_and_unexpected_keys_are_listed(hf_dir, tmp_path):
  def edit(t):
    del t["text_model.model.layers.1.ffn.fc2.bias"]
    t["text_model.model.layers.0.extra.weight"] = np.zeros(3, np.float32)

  with pytest.raises(hf.ConversionError) as e:
    kosmos_jax.from_pretrained(_write_variant(hf_dir, tmp_path / "v", edit))
  assert "text_model.model.layers.1.ffn.fc2.bias" in str(e.value)
  assert "text_model.model.layers.0.extra.weight" in str(e.value)


def test_shape_mismatch_names_the_parameter(hf_dir, tmp_path):
  def edit(t):
    t["image_to_text_projection.latent_query"] = np.zeros((9, 64), np.float32)

  with pytest.raises(hf.ConversionError, match="image_to_text_projection/latent_query"):
    kosmos_jax.from_pretrained(_write_variant(hf_dir, tmp_path / "v", edit))


def test_pickle_is_refused_unless_allowed(hf_dir, tmp_path):
  model = transformers.Kosmos2ForConditionalGeneration.from_pretrained(hf_dir)
  (tmp_path / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(hf.ConversionError, match="--allow-pickle"):
    kosmos_jax.from_pretrained(str(tmp_path))
  loaded = kosmos_jax.from_pretrained(str(tmp_path), allow_pickle=True)
  np.testing.assert_array_equal(
    np.asarray(loaded.text_model.embed_tokens[...]),
    model.text_model.model.embed_tokens.weight.detach().numpy(),
  )


def test_sharded_safetensors_index_loads(tmp_path):
  model = random_hf_model("c", seed=3)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  ours = kosmos_jax.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(
    np.asarray(ours.image_to_text_projection.latent_query[...]),
    model.image_to_text_projection.latent_query.detach().numpy(),
  )


def test_checkpoint_of_another_shape_is_refused(hf_dir, tmp_path):
  ckpt = str(tmp_path / "ckpt")
  commands.main(["convert", "hf-to-orbax", "--hf-dir", hf_dir, "--out", ckpt])
  config = orbax_ckpt.load_config(ckpt)
  config.text.vocab_size += 1
  with pytest.raises(ValueError, match="text_model/embed_tokens"):
    orbax_ckpt.load_params(ckpt, build.abstract_params(config))

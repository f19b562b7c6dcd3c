"""The ConvNeXt tower equals transformers' ConvNextModel on random tiny
weights; SPHINX's token layout; loading errors list the keys."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kosmos_jax.checkpoints import convnext as ckpt
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import convnext
from tests.helpers import parity

TOL = 1e-4  # max abs difference, relative to the largest output
# Compiled once per shape: eager runs retrace every stage's scan per call.
_call = nnx.jit(lambda tower, x: tower(x))
_tokens = nnx.jit(lambda tower, x: tower.tokens(x, 4))


@pytest.fixture(scope="module")
def tiny():
  hf = transformers.ConvNextConfig(
    depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64], image_size=64, layer_norm_eps=1e-6
  )
  model = parity.randomize(transformers.ConvNextModel(hf), 0)
  cfg = ckpt.convnext_config_from_hf(hf.to_dict())
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  return model, cfg, state, convnext.from_params(cfg, ckpt.convnext_from_hf(state, cfg))


def _check(ref, got):
  parity.assert_close(ref, got, TOL)


@pytest.mark.parametrize("size", [(64, 64), (70, 45)], ids=["native", "ragged"])
def test_matches_transformers(tiny, size):
  model, _, _, ours = tiny
  pixels = np.random.default_rng(sum(size)).standard_normal((2, 3, *size)).astype(np.float32)
  with torch.no_grad():
    out = model(torch.from_numpy(pixels))
  got = _call(ours, pixels.transpose(0, 2, 3, 1))
  _check(out.last_hidden_state.numpy().transpose(0, 2, 3, 1), got)
  _check(out.pooler_output.numpy(), ours.pool(got))


def test_sphinx_tokens(tiny):
  fmap = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  tokens = convnext.grid_tokens(fmap, 4)
  assert tokens.shape == (2, 17, 3)
  np.testing.assert_allclose(tokens[:, 0], fmap.mean(axis=(1, 2)))
  up = np.repeat(np.repeat(np.asarray(fmap), 2, axis=1), 2, axis=2)  # SPHINX's repeat_interleave
  np.testing.assert_array_equal(tokens[:, 1:], up.reshape(2, 16, 3))
  # norm_map: the final norm at every position (timm's head without pooling).
  _, cfg, state, plain = tiny
  normed_cfg = cfg.copy_and_resolve_references()
  normed_cfg.norm_map = True
  normed = convnext.from_params(normed_cfg, ckpt.convnext_from_hf(state, normed_cfg))
  pixels = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
  fmap = plain.norm(_call(plain, pixels))
  np.testing.assert_allclose(_tokens(normed, pixels), convnext.grid_tokens(fmap, 4), rtol=1e-5)


def test_hf_dir_and_prefix(tiny, tmp_path):
  model, cfg, state, ours = tiny
  transformers.ConvNextForImageClassification(model.config).save_pretrained(tmp_path)
  loaded = ckpt.convnext_from_hf_dir(str(tmp_path))  # keys under convnext., classifier beside
  assert loaded.cfg.to_dict() == cfg.to_dict()
  prefixed = ckpt.convnext_from_hf({f"convnext.{k}": v for k, v in state.items()}, cfg)
  np.testing.assert_equal(prefixed, ckpt.convnext_from_hf(state, cfg))


def test_bad_checkpoints(tiny):
  _, cfg, state, _ = tiny
  gone = "encoder.stages.2.layers.1.pwconv1.bias"
  extra = "encoder.stages.3.layers.5.dwconv.weight"
  with pytest.raises(
    ConversionError, match=rf"missing \(1\).*{gone}[\s\S]*unexpected \(1\).*{extra}"
  ):
    ckpt.convnext_from_hf(
      {**{k: v for k, v in state.items() if k != gone}, extra: state["layernorm.weight"]}, cfg
    )
  with pytest.raises(
    ConversionError, match=r"stages/1/downsample_kernel: checkpoint \(2, 2, 8, 8\)"
  ):
    bad = state["encoder.stages.1.downsampling_layer.1.weight"][:8]
    ckpt.convnext_from_hf({**state, "encoder.stages.1.downsampling_layer.1.weight": bad}, cfg)
  with pytest.raises(ConversionError, match="not a ConvNeXt"):
    ckpt.convnext_from_hf({"vision_model.x": state["layernorm.weight"]}, cfg)
  with pytest.raises(ConversionError, match="'convnextv2'"):
    ckpt.convnext_config_from_hf({"model_type": "convnextv2"})


def test_presets():
  xxl = convnext.convnext_config()
  assert xxl.depths == (3, 4, 30, 3) and xxl.hidden_sizes == (384, 768, 1536, 3072)
  assert xxl.image_size == 256 and xxl.norm_map and xxl.layer_norm_eps == 1e-5
  shapes = convnext.abstract_params(xxl)
  assert shapes["stages"][2]["blocks"]["pwconv1"]["kernel"].shape == (30, 1536, 6144)
  assert convnext.convnext_config("base", image_size=288).hidden_sizes[-1] == 1024
  with pytest.raises(KeyError):
    convnext.convnext_config("tiny", width=3)

"""open_clip state dicts (CLIP ViT under `visual.`, a timm ConvNeXt trunk under
`visual.trunk.`) load into our towers and equal transformers' on random tiny
weights written in open_clip's layout; bad files name what is wrong."""

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from kosmos_jax.checkpoints import convnext as convnext_ckpt
from kosmos_jax.checkpoints import open_clip
from kosmos_jax.checkpoints.hf import ConversionError
from kosmos_jax.models import convnext, vit
from kosmos_jax.models.config import model_config
from tests.helpers import parity

RTOL = 1e-5  # max abs difference, relative to the largest output
_call = nnx.jit(lambda tower, x: tower(x))
_normed = nnx.jit(lambda tower, x: tower.post_layernorm(tower(x)))
# Beside the image tower in every open_clip file, never read.
_OTHERS = {
  "logit_scale": np.array(4.6, np.float32),
  "positional_embedding": np.zeros((77, 16), np.float32),
  "transformer.resblocks.0.ln_1.weight": np.ones(16, np.float32),
  "text_projection": np.zeros((16, 8), np.float32),
}


def _randomize(model, seed):
  return parity.randomize(model, seed)


def _state(model):
  return {k.removeprefix("vision_model."): v.numpy() for k, v in model.state_dict().items()}


def _check(ref, got):
  parity.assert_close(ref, got, RTOL)


def _write(tmp_path, tensors, name="open_clip_model.safetensors"):
  path = str(tmp_path / name)
  safetensors.numpy.save_file({**_OTHERS, **tensors}, path)
  return path


# --------------------------------------------------------------------------- CLIP ViT


def _open_clip_vit(s, depth):
  """A transformers CLIPVisionModel state dict in open_clip's names (written
  out here, apart from the loader's rename, so the test checks it)."""
  out = {
    "visual.conv1.weight": s["embeddings.patch_embedding.weight"],
    "visual.class_embedding": s["embeddings.class_embedding"],
    "visual.positional_embedding": s["embeddings.position_embedding.weight"],
    "visual.proj": np.ones((32, 16), np.float32),  # to the joint embedding: ignored
  }
  for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
    for p in ("weight", "bias"):
      out[f"visual.{ours}.{p}"] = s[f"{theirs}.{p}"]
  for i in range(depth):
    a, b = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    for p in ("weight", "bias"):
      out[f"{b}attn.in_proj_{p}"] = np.concatenate([s[f"{a}self_attn.{x}_proj.{p}"] for x in "qkv"])
      for ours, theirs in (
        ("attn.out_proj", "self_attn.out_proj"),
        ("ln_1", "layer_norm1"),
        ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"),
        ("mlp.c_proj", "mlp.fc2"),
      ):
        out[f"{b}{ours}.{p}"] = s[f"{a}{theirs}.{p}"]
  return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  cfg = transformers.CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
  )
  model = _randomize(transformers.CLIPVisionModel(cfg), seed=0)
  tensors = _open_clip_vit(_state(model), depth=2)
  path = _write(tmp_path_factory.mktemp("vit"), tensors)
  return model, tensors, path


def _vit_tower(overrides, params):
  vision = model_config(**overrides).vision
  make = lambda: vit.VisionTransformer(
    vision,
    rngs=nnx.Rngs(0),
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat="none",
    attention="xla",
  )
  graphdef, state = nnx.split(nnx.eval_shape(make))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def test_clip_vit_matches_transformers(clip):
  model, _, path = clip
  tensors = open_clip.read_state_dict(path, prefix=open_clip.VISUAL)
  assert not set(_OTHERS) & set(tensors)  # the text tower is never read
  overrides, params = open_clip.clip_vit_from_open_clip(tensors, heads=4)
  assert overrides == {
    "vision.width": 32,
    "vision.depth": 2,
    "vision.heads": 4,
    "vision.mlp_dim": 48,
    "vision.num_channels": 3,
    "vision.image_size": 32,
    "vision.patch_size": 8,
    "vision.activation": "quick_gelu",
    "vision.layer_norm_eps": 1e-5,
  }
  tower = _vit_tower(overrides, params)
  pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    hidden = model(torch.from_numpy(pixels)).last_hidden_state
    # transformers applies post_layernorm to the pooled token only.
    normed = getattr(model, "vision_model", model).post_layernorm(hidden).numpy()
  nhwc = pixels.transpose(0, 2, 3, 1)
  _check(hidden.numpy(), _call(tower, nhwc))
  _check(normed, _normed(tower, nhwc))  # SPHINX's 1 + 16 tokens after ln_post

  # A model config's vision section checks and shapes the load.
  vision = model_config(**overrides).vision
  _, again = open_clip.clip_vit_from_open_clip(tensors, vision)
  np.testing.assert_equal(again, params)


def test_clip_vit_errors(clip):
  _, tensors, _ = clip
  gone = "visual.transformer.resblocks.1.mlp.c_proj.bias"
  extra = "visual.transformer.resblocks.0.ls_1.gamma"
  broken = {**{k: v for k, v in tensors.items() if k != gone}, extra: np.ones(32, np.float32)}
  with pytest.raises(
    ConversionError, match=rf"missing \(1\).*{gone}[\s\S]*unexpected \(1\).*{extra}"
  ):
    open_clip.clip_vit_from_open_clip(broken, heads=4)

  vision = model_config(**{"vision.patch_size": 16, "vision.image_size": 64}).vision
  with pytest.raises(
    ConversionError, match=r"patch_size 8 \(visual\.conv1\.weight\) vs config's 16"
  ):
    open_clip.clip_vit_from_open_clip(tensors, vision)
  wide = {**tensors, "visual.class_embedding": np.zeros(40, np.float32)}
  with pytest.raises(ConversionError, match=r"visual\.class_embedding \(40,\).*wants \(32,\)"):
    open_clip.clip_vit_from_open_clip(wide, heads=4)
  with pytest.raises(ConversionError, match="heads"):  # 32 wide: no 64-wide heads
    open_clip.clip_vit_from_open_clip(tensors)
  with pytest.raises(ConversionError, match="not an open_clip ViT"):
    open_clip.clip_vit_from_open_clip({k.replace("conv1", "x"): v for k, v in tensors.items()})


# --------------------------------------------------------------------------- ConvNeXt


_TIMM = (
  ("embeddings.patch_embeddings.", "stem.0."),
  ("embeddings.layernorm.", "stem.1."),
  ("downsampling_layer.", "downsample."),
  ("encoder.stages.", "stages."),
  (".layers.", ".blocks."),
  (".dwconv.", ".conv_dw."),
  (".layernorm.", ".norm."),
  (".pwconv", ".mlp.fc"),
  (".layer_scale_parameter", ".gamma"),
)


def _open_clip_convnext(s, conv_mlp):
  """A transformers ConvNextModel state dict in timm's names under
  open_clip's `visual.trunk.`, with open_clip's projection head beside it."""
  out = {"visual.head.proj.weight": np.ones((16, 32), np.float32)}  # not the trunk: ignored
  for key, value in s.items():
    key = "head.norm." + key[len("layernorm.") :] if key.startswith("layernorm.") else key
    for theirs, ours in _TIMM:
      key = key.replace(theirs, ours)
    if conv_mlp and ".mlp.fc" in key and key.endswith("weight"):
      value = value[:, :, None, None]  # timm's conv_mlp=True: 1x1 convs
    out["visual.trunk." + key] = value
  return out


@pytest.fixture(scope="module")
def trunk():
  hf_cfg = transformers.ConvNextConfig(
    depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32], image_size=96, layer_norm_eps=1e-6
  )
  model = _randomize(transformers.ConvNextModel(hf_cfg), seed=1)
  cfg = convnext_ckpt.convnext_config_from_hf(hf_cfg.to_dict())
  cfg.norm_map = True  # SPHINX's use: the head's norm at every position
  return model, cfg, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear_mlp", "conv_mlp"])
def test_convnext_matches_transformers(trunk, tmp_path, conv_mlp):
  model, cfg, state = trunk
  path = _write(tmp_path, _open_clip_convnext(state, conv_mlp))
  tensors = open_clip.read_state_dict(path)
  tower = convnext.from_params(cfg, open_clip.convnext_from_open_clip(tensors, cfg))
  pixels = np.random.default_rng(2).standard_normal((2, 3, 96, 96)).astype(np.float32)
  with torch.no_grad():
    hidden = model(torch.from_numpy(pixels)).last_hidden_state.permute(0, 2, 3, 1)
    ref = model.layernorm(hidden).numpy()  # the final norm at each of the 3 x 3 positions
  _check(ref, _call(tower, pixels.transpose(0, 2, 3, 1)))

  inferred = open_clip.convnext_config_from_open_clip(tensors)
  assert inferred.depths == (1, 1, 1, 1) and inferred.hidden_sizes == (8, 16, 24, 32)
  assert inferred.norm_map and inferred.layer_norm_eps == 1e-5  # the xxlarge preset's


def test_convnext_errors(trunk):
  _, cfg, state = trunk
  tensors = _open_clip_convnext(state, conv_mlp=False)
  gone, extra = "visual.trunk.stages.2.blocks.0.gamma", "visual.trunk.head.fc.weight"
  broken = {**{k: v for k, v in tensors.items() if k != gone}, extra: np.ones((5, 32), np.float32)}
  with pytest.raises(
    ConversionError, match=rf"missing \(1\).*{gone}[\s\S]*unexpected \(1\).*{extra}"
  ):
    open_clip.convnext_from_open_clip(broken, cfg)
  bad = "visual.trunk.stages.1.downsample.1.weight"
  with pytest.raises(ConversionError, match=rf"{bad} \(8, 8, 2, 2\).*downsample_kernel"):
    open_clip.convnext_from_open_clip({**tensors, bad: tensors[bad][:8]}, cfg)
  with pytest.raises(ConversionError, match="not an open_clip ConvNeXt"):
    open_clip.convnext_from_open_clip(_OTHERS, cfg)


# --------------------------------------------------------------------------- files


def test_pickle_is_refused_unless_allowed(clip, tmp_path):
  _, tensors, _ = clip
  path = str(tmp_path / "open_clip_pytorch_model.bin")
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, path)
  with pytest.raises(ConversionError, match="allow_pickle=True"):
    open_clip.read_state_dict(path)
  loaded = open_clip.read_state_dict(path, allow_pickle=True)
  np.testing.assert_equal(loaded, tensors)
  with pytest.raises(FileNotFoundError):
    open_clip.read_state_dict(str(tmp_path / "absent.safetensors"))

"""SPHINX's encoder mix: token layout, per-tower pixels, the channel and spatial
mixes, and a mixed-encoder model that trains, resumes bitwise and generates."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import loading
from kosmos_jax.models import convnext, mixing, qformer, towers
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import trainer
from tests.train import test_trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_towers():
  # configs/tiny.py's CLIP: 32 px, 8 px patches -> a 4 x 4 grid + CLS.
  dino = towers.dinov2_config("S/14", width=16, depth=1, heads=2, mlp_dim=32, image_size=28)
  sig = towers.siglip_config(
    "B/16", width=8, depth=1, heads=2, mlp_dim=16, image_size=16, patch_size=8
  )
  return {"dino": dino, "sig": sig}


def _config(extra=()):
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py"), list(extra))
  config.model.towers = _tiny_towers()
  return config


def test_clip_layout_keeps_a_class_token_or_prepends_the_mean():
  rng = np.random.default_rng(0)
  with_cls = rng.normal(size=(2, 1 + 4, 3)).astype(np.float32)  # 2 x 2 grid + CLS
  out = np.asarray(mixing.clip_layout(with_cls, towers.dinov2_config("S/14"), grid=4))
  assert out.shape == (2, 17, 3)
  np.testing.assert_array_equal(out[:, 0], with_cls[:, 0])
  grid = out[:, 1:].reshape(2, 4, 4, 3)
  np.testing.assert_array_equal(grid[:, 2, 3], with_cls[:, 1 + 1 * 2 + 1])  # nearest upsampling
  no_cls = rng.normal(size=(2, 16, 3)).astype(np.float32)
  out = np.asarray(mixing.clip_layout(no_cls, towers.siglip_config("B/16"), grid=4))
  np.testing.assert_allclose(out[:, 0], no_cls.mean(axis=1), rtol=1e-6)
  np.testing.assert_array_equal(out[:, 1:], no_cls)
  with pytest.raises(ValueError, match="3x3 grid does not divide CLIP's 4x4"):
    mixing.clip_layout(rng.normal(size=(1, 10, 3)), towers.dinov2_config("S/14"), grid=4)


def test_each_tower_sees_the_picture_in_its_own_normalisation():
  picture = np.full((1, 32, 32, 3), 0.25, np.float32)  # 8-bit value 63.75 in every channel
  clip = (picture - np.asarray(mixing.CLIP_MEAN)) / np.asarray(mixing.CLIP_STD)
  dino = np.asarray(
    mixing.tower_pixels(clip.astype(np.float32), towers.dinov2_config("S/14", image_size=28))
  )
  assert dino.shape == (1, 28, 28, 3)
  np.testing.assert_allclose(
    dino[0, 5, 7],
    (0.25 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]),
    rtol=1e-5,
  )
  sig = np.asarray(
    mixing.tower_pixels(clip.astype(np.float32), towers.siglip_config("B/16", image_size=32))
  )
  np.testing.assert_allclose(sig, (0.25 - 0.5) / 0.5, rtol=1e-5)


def test_the_channel_mix_concatenates_every_grid_tower():
  config = _config()
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # CLIP 32 + DINOv2 16 + SigLIP 8 channels -> the text width, then the connector.
  assert params["tower_mix"]["channel"]["kernel"].shape == (56, 64)
  assert params["image_to_text_projection"]["dense"]["kernel"].shape == (64, 64)
  pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  embeds = model.encode_images(pixels)
  assert embeds.shape == (2, config.model.latent_query_num, 64)
  # Each tower reaches the slots: changing one tower's weights changes the embeddings.
  model.towers.sig.norm.bias[...] = model.towers.sig.norm.bias[...] + 1.0
  assert not np.allclose(model.encode_images(pixels), embeds)


def test_the_spatial_mix_puts_the_query_tokens_first():
  config = _config()
  config.model.towers = {
    "conv": convnext.convnext_config(
      "tiny", depths=(1, 1, 1, 1), hidden_sizes=(8, 8, 8, 8), image_size=64
    ),
    "q": qformer.qformer_config(
      num_query_tokens=4, width=16, depth=2, heads=2, mlp_dim=32, encoder_hidden_size=32
    ),
  }
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  assert model.tower_mix.channel.kernel.shape == (32 + 8, 64)  # CLIP + ConvNeXt's last stage
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  clip = rng.normal(size=(2, 17, 32)).astype(np.float32)
  out = np.asarray(mixing.mix(config.model, model.towers, model.tower_mix, images, clip))
  assert out.shape == (2, 4 + 17, 64)
  queries = model.tower_mix.q_norm(model.tower_mix.q_proj(model.towers.q(clip)))
  np.testing.assert_allclose(out[:, :4], queries, rtol=1e-5, atol=1e-6)
  assert model.encode_images(images.transpose(0, 3, 1, 2)).shape == (2, 8, 64)
  config.model.towers.q.encoder_hidden_size = 24
  with pytest.raises(
    ValueError, match="encoder_hidden_size 24 != the width 32 of its input 'clip'"
  ):
    Kosmos2(config.model, rngs=nnx.Rngs(0))


def _views_config(extra=()):
  """The mix with SPHINX-1k's 5 views: 64 px pictures (the 32 px shapes,
  resized by the tf ops) as 4 tiles of 32 px and a global view, each 8
  latents between 2 tags."""
  config = _config(extra)
  config.model.vision.views = {"grid": 2, "global": True}
  config.data.shapes_tasks = dict(prefix="shapes_views", image_size=64, num_image_tokens=50)
  config.data.shapes_tasks.config = "32"
  config.data.mixture = "shapes_views_mix"
  return config


def test_a_mixed_encoder_five_view_model_trains_resumes_and_generates(tmp_path):
  """Preempted by SIGTERM and resumed from its checkpoint (bitwise resume of
  the trainer is tests/train/test_trainer.py's), then generation."""
  overrides = ["total_steps=5", "checkpoint_every=5", "log_every=1", "batch_size=4"]
  overrides += ["seq_len=128", "images_per_row=2", "mesh.fsdp=1", "evaluators={}"]
  one = jax.devices()[:1]
  workdir = str(tmp_path / "run")
  test_trainer._send_sigterm_at(workdir, 2)
  preempted = trainer.train(_views_config(overrides), workdir, devices=one)["preempted_at"]
  assert 2 <= preempted < 5
  assert trainer.train(_views_config(overrides), workdir, devices=one)["step"] == 5
  losses = test_trainer._losses(workdir)
  assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1]
  model = loading.from_pretrained(workdir)
  assert hasattr(model.towers, "dino") and hasattr(model.towers, "sig")
  assert model.view_tags.shape == (2, 64)
  with pytest.raises(ValueError, match="trained with views .* cannot run without them"):
    loading.from_pretrained(workdir, vision={"views": {"grid": 1, "global": False}})
  ids = np.array([[0, *range(4, 54), 5, 6]])
  mask = np.array([[0] + [1] * 50 + [0, 0]])
  pixels = np.zeros((1, 3, 64, 64), np.float32)
  out = np.asarray(model.generate(ids, pixels, image_embeds_position_mask=mask, max_new_tokens=4))
  assert out.shape == (1, ids.shape[1] + 4)
  # A mixture sized for one view is refused before the first step, and rows
  # too short for one picture's 50 slots before the pipeline is built.
  with pytest.raises(ValueError, match="gives 32x32 px pictures; the model reads 64x64"):
    trainer.train(_config(overrides + ["model.vision.views.grid=2"]), str(tmp_path / "b"), one)
  with pytest.raises(ValueError, match="seq_len 48 cannot hold one picture: it takes 50 slots"):
    trainer.train(_views_config(overrides + ["seq_len=48"]), str(tmp_path / "c"), one)


def test_a_tower_without_channel_mix_only_feeds_its_q_former():
  config = _config()
  # EVA at 42 px: a 3 x 3 grid, which could not be laid out on CLIP's 4 x 4;
  # a Q-Former's input alone is read as it comes.
  eva = towers.eva_config(width=16, depth=1, heads=2, mlp_dim=32, image_size=42, channel_mix=False)
  q = qformer.qformer_config(
    num_query_tokens=4, width=16, depth=2, heads=2, mlp_dim=32, encoder_hidden_size=16
  )
  q.input = "eva"
  config.model.towers = {"dino": _tiny_towers()["dino"], "eva": eva, "q": q}
  model = Kosmos2(config.model, rngs=nnx.Rngs(0))
  assert mixing.channel_towers(config.model) == ["dino"]
  assert model.tower_mix.channel.kernel.shape == (32 + 16, 64)  # CLIP + DINOv2, no EVA
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
  clip = rng.normal(size=(2, 17, 32)).astype(np.float32)
  out = np.asarray(mixing.mix(config.model, model.towers, model.tower_mix, images, clip))
  assert out.shape == (2, 4 + 17, 64)
  eva_tokens = model.towers.eva(mixing.tower_pixels(images, eva))
  assert eva_tokens.shape == (2, 1 + 9, 16)
  queries = model.tower_mix.q_norm(model.tower_mix.q_proj(model.towers.q(eva_tokens)))
  np.testing.assert_allclose(out[:, :4], queries, rtol=1e-5, atol=1e-6)
  assert model.encode_images(images.transpose(0, 3, 1, 2)).shape == (2, 8, 64)
  # EVA reaches the query tokens only, never the channel-mixed grid tokens.
  model.towers.eva.norm.bias[...] = model.towers.eva.norm.bias[...] + 1.0
  moved = np.asarray(mixing.mix(config.model, model.towers, model.tower_mix, images, clip))
  np.testing.assert_array_equal(moved[:, 4:], out[:, 4:])
  assert not np.allclose(moved[:, :4], out[:, :4])
  # Read by no Q-Former, it would run for nothing: refused by name.
  config.model.towers.q.input, config.model.towers.q.encoder_hidden_size = "clip", 32
  with pytest.raises(ValueError, match="towers.eva: channel_mix False, but no Q-Former reads it"):
    Kosmos2(config.model, rngs=nnx.Rngs(0))

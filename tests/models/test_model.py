"""Model-level properties beyond parity: size, dtypes, init, dropout, remat, sharding names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from kosmos_jax import config as config_lib
from kosmos_jax.models import build, decoder
from kosmos_jax.models import config as model_config
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.train import optim


def test_released_size_matches_transformers_default_config():
  ours = build.param_count(config_lib.load("configs/kosmos2.py").model)
  with torch.device("meta"):
    theirs_model = transformers.Kosmos2ForConditionalGeneration(transformers.Kosmos2Config())
  # lm_head is tied to embed_tokens: counted once, as parameters() does.
  theirs = sum(p.numel() for p in theirs_model.parameters())
  assert ours == theirs
  assert 1.6e9 < ours < 1.7e9


@pytest.fixture(scope="module")
def tiny():
  return config_lib.load("configs/tiny.py")


def _inputs(cfg, batch=2, text=6, seed=0):
  rng = np.random.default_rng(seed)
  latents, vocab = cfg.latent_query_num, cfg.text.vocab_size
  ids = np.concatenate(
    [
      np.zeros((batch, 1)),
      np.full((batch, 1), vocab - 3),
      np.tile(np.arange(4, 4 + latents), (batch, 1)),
      np.full((batch, 1), vocab - 2),
      rng.integers(100, vocab - 3, (batch, text)),
    ],
    axis=1,
  ).astype(np.int32)
  slots = np.zeros_like(ids)
  slots[:, 2 : 2 + latents] = 1
  pixels = rng.standard_normal((batch, 3, cfg.vision.image_size, cfg.vision.image_size))
  return dict(
    input_ids=ids,
    image_embeds_position_mask=slots,
    pixel_values=pixels.astype(np.float32),
    attention_mask=np.ones_like(ids),
  )


def test_every_parameter_has_logical_axes(tiny):
  state = nnx.state(build.abstract_model(tiny.model), nnx.Param)
  for path, var in jax.tree_util.tree_flatten_with_path(
    state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]:
    axes = var.get_metadata()["out_sharding"]
    assert len(axes) == var.get_value().ndim, path
  blocks = nnx.state(build.abstract_model(tiny.model).text_model.layers, nnx.Param)
  assert blocks["fc1"]["kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "mlp")


def test_magneto_init_scales_the_right_projections(tiny):
  model = Kosmos2(tiny.model, rngs=nnx.Rngs(0))
  layers = model.text_model.layers
  scale = math.sqrt(math.log(2 * tiny.model.text.depth))
  std = lambda p: float(jnp.std(p[...]))
  for name in ("v_proj", "out_proj"):
    assert std(getattr(layers.self_attn, name).kernel) == pytest.approx(0.02 * scale, rel=0.1)
  for name in ("q_proj", "k_proj"):
    assert std(getattr(layers.self_attn, name).kernel) == pytest.approx(0.02, rel=0.1)
  assert std(layers.fc1.kernel) == pytest.approx(0.02 * scale, rel=0.1)
  assert std(layers.fc2.kernel) == pytest.approx(0.02 * scale, rel=0.1)
  assert not np.asarray(model.text_model.embed_tokens[...][tiny.model.text.pad_id]).any()


def test_bfloat16_compute_tracks_float32(tiny):
  model = Kosmos2(tiny.model, rngs=nnx.Rngs(1))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  cfg16 = tiny.model.copy_and_resolve_references()
  cfg16.dtype = "bfloat16"
  model16 = build.model_from_params(cfg16, params)
  batch = _inputs(tiny.model)
  ref = np.asarray(model(**batch).logits)
  got = model16(**batch).logits
  assert got.dtype == jnp.float32  # logits stay float32 for the loss
  assert np.abs(np.asarray(got) - ref).max() < 0.05 * np.abs(ref).max()
  assert model16.text_model.embed_tokens[...].dtype == jnp.float32  # master weights


def test_dropout_only_with_an_rng_and_remat_changes_nothing(tiny):
  batch = _inputs(tiny.model)
  model = Kosmos2(tiny.model, rngs=nnx.Rngs(2))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  # Jitted: op by op, the tiny model's hundreds of ops each compile on their own.
  forward = nnx.jit(lambda m, rng: m(**batch, dropout_rng=rng).logits)
  a = np.asarray(forward(model, None))
  np.testing.assert_array_equal(a, np.asarray(forward(model, None)))
  train = np.asarray(forward(model, jax.random.key(0)))
  assert np.abs(train - a).max() > 1e-3
  cfg = tiny.model.copy_and_resolve_references()
  cfg.remat = "full"
  remat = build.model_from_params(cfg, params)

  def loss(m):
    return m(**batch, dropout_rng=jax.random.key(0)).logits.mean()

  g1 = nnx.jit(nnx.grad(loss))(model)
  g2 = nnx.jit(nnx.grad(loss))(remat)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_packed_segments_do_not_see_each_other(tiny):
  model = Kosmos2(tiny.model, rngs=nnx.Rngs(3))
  rng = np.random.default_rng(0)
  a, b = rng.integers(100, 900, 5), rng.integers(100, 900, 4)
  packed = np.concatenate([a, b])[None].astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 4])
  positions = np.array([[2, 3, 4, 5, 6, 2, 3, 4, 5]])
  out = np.asarray(model(packed, segment_ids=segments, position_ids=positions).logits)
  alone = np.asarray(model(b[None].astype(np.int32)).logits)
  np.testing.assert_allclose(out[0, 5:], alone[0], atol=1e-5)


def test_positions_follow_fairseq():
  ids = jnp.array([[1, 1, 0, 5, 6], [0, 5, 6, 7, 1]])
  np.testing.assert_array_equal(
    decoder.positions_from_ids(ids, 1), [[1, 1, 2, 3, 4], [2, 3, 4, 5, 1]]
  )
  table = decoder.sinusoidal_positions(jnp.arange(4), 8, padding_idx=1)
  assert not np.asarray(table[1]).any()
  np.testing.assert_allclose(
    table[2, :4], np.sin(2 * np.exp(np.arange(4) * -math.log(1e4) / 3)), rtol=1e-6
  )


def test_bad_inputs_say_what_is_wrong(tiny):
  model = Kosmos2(tiny.model, rngs=nnx.Rngs(4))
  batch = _inputs(tiny.model)
  with pytest.raises(ValueError, match="image_embeds_position_mask"):
    model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
  with pytest.raises(ValueError, match="do not match"):
    model(**{**batch, "pixel_values": batch["pixel_values"][:, :, :16, :16]})


def test_sincos2d_position_init(tiny):
  cfg = tiny.model.copy_and_resolve_references()
  cfg.vision.position_init = "sincos2d"
  table = np.asarray(Kosmos2(cfg, rngs=nnx.Rngs(0)).vision_model.position_embedding[...])
  grid, width = cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.width
  assert table.shape == (grid * grid + 1, width)
  assert not table[0].any()  # CLS has no place on the grid
  q = width // 4
  omega = 10_000.0 ** -(np.arange(q) / q)
  x, y = 3, 1  # the patch in column 3 of row 1, row-major as the patches are
  want = np.concatenate(
    [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]
  )
  np.testing.assert_allclose(table[1 + y * grid + x], want, atol=1e-6)
  cfg.vision.position_init = "learned"
  with pytest.raises(ValueError, match="position_init 'learned'"):
    Kosmos2(cfg, rngs=nnx.Rngs(0))


def test_sincos2d_location_init(tiny):
  cfg = tiny.model.copy_and_resolve_references()
  cfg.text.num_patches_per_side, cfg.text.location_init = 8, "sincos2d"
  embed = np.asarray(Kosmos2(cfg, rngs=nnx.Rngs(0)).text_model.embed_tokens[...])
  side, width = 8, cfg.text.width
  locations = embed[-side * side :]
  q = width // 4
  omega = 100.0 ** -(np.arange(q) / q)
  y, x = (v[:, None] for v in np.divmod(np.arange(side * side), side))
  table = np.concatenate(
    [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)], 1
  )
  # <patch_index_k> is cell (k // side, k % side), at the other rows' std 0.02.
  np.testing.assert_allclose(locations, table * (0.02 / table.std()), atol=1e-6)
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  # Neighbouring cells start alike, far ones less so; word rows are untouched.
  assert cos(locations[0], locations[1]) > cos(locations[0], locations[7]) + 0.2
  assert cos(locations[0], locations[side]) > cos(locations[0], locations[7 * side]) + 0.2
  base = np.asarray(Kosmos2(tiny.model, rngs=nnx.Rngs(0)).text_model.embed_tokens[...])
  np.testing.assert_array_equal(embed[: -side * side], base[: -side * side])
  # A modality's two tag rows end the vocabulary: the grid sits just before them.
  tagged = model_config.with_modalities(cfg, {"sound": 4})
  embed = np.asarray(Kosmos2(tagged, rngs=nnx.Rngs(0)).text_model.embed_tokens[...])
  first = model_config.first_location_id(tagged)
  np.testing.assert_allclose(embed[first : first + side * side], locations, atol=1e-6)
  tagged.text.location_init = "normal"
  base = np.asarray(Kosmos2(tagged, rngs=nnx.Rngs(0)).text_model.embed_tokens[...])
  np.testing.assert_array_equal(embed[:first], base[:first])
  np.testing.assert_array_equal(embed[-2:], base[-2:])
  cfg.text.location_init = "grid"
  with pytest.raises(ValueError, match="location_init 'grid'"):
    Kosmos2(cfg, rngs=nnx.Rngs(0))
  cfg.text.location_init, cfg.text.num_patches_per_side = "sincos2d", 64
  with pytest.raises(ValueError, match="num_patches_per_side 64"):
    Kosmos2(cfg, rngs=nnx.Rngs(0))


def _square_at(cfg, corner: str) -> np.ndarray:
  """A grey picture with one red square in a corner, CLIP-normalised, [1, 3, S, S]."""
  s = cfg.vision.image_size
  image = np.full((s, s, 3), 0.8, np.float32)
  side = s // 3
  at = slice(0, side) if corner == "top left" else slice(s - side, s)
  image[at, at] = (0.9, 0.1, 0.1)
  mean, std = np.array([0.481, 0.458, 0.408]), np.array([0.269, 0.261, 0.276])
  return ((image - mean) / std).transpose(2, 0, 1)[None].astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_scaled_connector_init_lets_the_image_through(tiny, seed):
  """One square in two places: under the HF connector init the slots barely
  differ (image tokens enter at ~1% of the std-1 latents' scale, averaged by a
  uniform attention); under "scaled" the image makes up the slots. And the
  slots of one picture differ from one another only under "scaled" (distinct
  latent queries), which is what lets each slot learn its own part."""

  def change(connector_init):
    cfg = tiny.model.copy_and_resolve_references()
    cfg.connector_init = connector_init
    model = Kosmos2(cfg, rngs=nnx.Rngs(seed))
    a, b = (
      np.asarray(model.encode_images(_square_at(cfg, c))) for c in ("top left", "bottom right")
    )
    spread = np.linalg.norm(a - a.mean(1, keepdims=True)) / np.linalg.norm(a)
    return np.linalg.norm(a - b) / np.linalg.norm(a), spread

  (hf_change, hf_spread), (scaled_change, scaled_spread) = change("hf"), change("scaled")
  assert hf_change < 0.04 and hf_spread < 0.1
  assert scaled_change > 0.08 and scaled_spread > 0.5
  with pytest.raises(ValueError, match="connector_init 'xavier'"):
    change("xavier")


def test_kosmos1_config_size_and_frozen_clip():
  config = config_lib.load("configs/kosmos1.py")
  model = config.model
  assert (model.text.position, model.connector) == ("xpos", "perceiver")
  # Kosmos-2's count with its connector swapped for the resampler (resampler.py's layers).
  d, v, p = model.text.width, model.vision.width, model.perceiver
  inner, ffn = p.heads * p.head_dim, p.ffn_mult * d
  layer = 4 * d * inner + 2 * d * ffn + ffn + d + 3 * 2 * d  # attn, FFN, three LayerNorms
  resampler = v * d + d + model.latent_query_num * d + p.depth * layer + 2 * d
  kosmos2 = config_lib.load("configs/kosmos2.py").model
  connector = v * d + d + kosmos2.latent_query_num * d + 4 * (d * d + d)
  total = build.param_count(model)
  assert total == build.param_count(kosmos2) - connector + resampler == 1_731_635_200
  # CLIP trains only its last block and the LayerNorm after it.
  abstract = nnx.eval_shape(lambda: Kosmos2(model, rngs=nnx.Rngs(0)))
  masks = optim.trainable_mask(nnx.state(abstract, nnx.Param), config.optim.freeze)
  for path, mask in jax.tree_util.tree_flatten_with_path(masks)[0]:
    name = optim.path_name(path)
    if name.startswith("vision_model/layers/"):
      assert not mask[:-1].any() and mask[-1].all(), name
    elif name.startswith("vision_model/"):
      assert mask.all() == (name.startswith("vision_model/post_layernorm/")), name
    else:
      assert mask.all(), name

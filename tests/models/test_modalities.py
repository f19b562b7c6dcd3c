"""Other modalities as PandaGPT-style soft tokens: splice, gradients, processor,
generation, loading a checkpoint without them, and the converter's refusal."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kosmos_jax
from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import hf
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build, decoder
from kosmos_jax.models import config as model_config
from kosmos_jax.models.kosmos import Kosmos2
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import vocab as vocab_lib
from kosmos_jax.processing.processor import Processor
from kosmos_jax.train import aot, optim
from tests.helpers import spm as spm_util

WIDTHS = {"sound": 16, "depth": 8}  # sorted: depth = type 0, sound = type 1
TOKENS = 3


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory):
  return spm_util.train_tiny_spm(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def plain_config(spm_file):
  """The tiny model, its vocabulary exactly the tiny processor's."""
  size = vocab_lib.KosmosVocabulary(spm_file).vocab_size
  cfg = config_lib.load("configs/tiny.py").model
  cfg.text.vocab_size = size
  cfg.text.dropout = 0.0
  return cfg


@pytest.fixture(scope="module")
def config(plain_config):
  return model_config.with_modalities(plain_config, WIDTHS, TOKENS)


@pytest.fixture(scope="module")
def model(config):
  return Kosmos2(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def processor(spm_file, config):
  return Processor(
    vocab_lib.KosmosVocabulary(spm_file),
    image_options=images_lib.ImageOptions().at_size(config.vision.image_size),
    num_image_tokens=config.latent_query_num,
    modalities=WIDTHS,
    modality_tokens=TOKENS,
  )


def test_config_grows_the_vocabulary_and_checks_it(plain_config, config):
  assert config.text.vocab_size == plain_config.text.vocab_size + 4
  assert model_config.modality_names(config) == ("depth", "sound")
  # A config saved before the keys has none; overrides set them as given.
  old = plain_config.to_dict()
  del old["modalities"], old["modality_tokens"]
  assert model_config.modality_names(old) == () and model_config.modality_tokens(old) == 4
  assert model_config.model_config(modalities={"sound": 4}).modalities.sound == 4
  small = model_config.model_config(**{"text.vocab_size": 1040, "modalities": {"a": 2, "b": 2}})
  with pytest.raises(ValueError, match="vocab_size 1040 is too small"):
    model_config.check_modalities(small)
  with pytest.raises(ValueError, match="positive int"):
    model_config.with_modalities(plain_config, {"sound": 0})


def _slots_and_inputs(config, rng):
  """Two rows: an image (8 latents) and two items, at different places."""
  n, latents, length = TOKENS, config.latent_query_num, 30
  mask = np.zeros((2, length), np.int32)
  mask[0, 2 : 2 + latents] = 1
  mask[0, 12 : 12 + n] = 2
  mask[0, 20 : 20 + n] = 2
  mask[1, 1 : 1 + n] = 2  # one item, image later
  mask[1, 6 : 6 + latents] = 1
  ids = rng.integers(4, 900, (2, length)).astype(np.int32)
  embeds = rng.standard_normal((2, 2, max(WIDTHS.values()))).astype(np.float32)
  types = np.array([[1, 0], [0, -1]], np.int32)
  return ids, mask, embeds, types


def test_soft_tokens_land_in_the_2_slots_and_images_in_the_1_slots(config, model):
  rng = np.random.default_rng(0)
  ids, mask, embeds, types = _slots_and_inputs(config, rng)
  width = config.text.width
  soft = np.asarray(model.encode_modalities(embeds, types))
  # By hand: each item through its own modality's projection.
  proj = model.modality_projections
  for row in range(2):
    for k in range(2):
      got = soft[row, k * TOKENS : (k + 1) * TOKENS]
      if types[row, k] < 0:
        np.testing.assert_array_equal(got, 0)
        continue
      name = ("depth", "sound")[types[row, k]]
      dense = getattr(proj, name)
      want = embeds[row, k, : WIDTHS[name]] @ np.asarray(dense.kernel[...]) + dense.bias[...]
      np.testing.assert_allclose(got, np.asarray(want).reshape(TOKENS, width), atol=1e-6)
  image = rng.standard_normal((2, config.latent_query_num, width)).astype(np.float32)
  got = model.text_model.embed(
    ids, image_embeds=image, image_embeds_position_mask=mask, modality_tokens=soft
  )
  want = np.asarray(model.text_model.embed_tokens[...])[ids]
  for row in range(2):
    want[row, mask[row] == 1] = image[row]
    want[row, mask[row] == 2] = soft[row][: (mask[row] == 2).sum()]
  positions = decoder.positions_from_ids(ids, config.text.pad_id)
  want = want * math.sqrt(width) + decoder.sinusoidal_positions(positions, width, 1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # Mask value 2 is not an image slot (it used to count as one).
  only_images = model.text_model.embed(ids, image_embeds=image, image_embeds_position_mask=mask)
  rows = np.asarray(model.text_model.embed_tokens[...])[ids] * math.sqrt(width)
  np.testing.assert_allclose(
    np.asarray(only_images - decoder.sinusoidal_positions(positions, width, 1))[mask == 2],
    rows[mask == 2],
    atol=1e-5,
  )


def test_gradient_reaches_the_used_projection_only(config, model):
  ids, mask, embeds, _ = _slots_and_inputs(config, np.random.default_rng(1))
  types = np.array([[1, 1], [1, -1]], np.int32)  # sound only
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    m = nnx.merge(graphdef, params, rest)
    logits = m(ids, image_embeds_position_mask=mask, modality_embeds=embeds, modality_types=types)
    return jnp.mean(logits.logits**2)

  grads = nnx.to_pure_dict(jax.grad(loss)(params))["modality_projections"]
  assert np.abs(grads["sound"]["kernel"]).sum() > 0 and np.abs(grads["sound"]["bias"]).sum() > 0
  assert not np.asarray(grads["depth"]["kernel"]).any()
  assert not np.asarray(grads["depth"]["bias"]).any()
  # The features past the sound width are padding: its kernel has no rows for them.
  assert grads["sound"]["kernel"].shape == (WIDTHS["sound"], TOKENS * config.text.width)
  # `optim.train_also` selects them by path; they carry logical axes.
  trainable, _ = optim.split_trainable(params, ["modality_projections/.*"])
  assert set(nnx.to_pure_dict(trainable)) == {"modality_projections"}
  kernel = nnx.state(model.modality_projections, nnx.Param)["sound"]["kernel"]
  assert kernel.get_metadata()["out_sharding"] == (None, "embed")


def test_aot_batch_has_the_modality_features(config):
  experiment = config_lib.load("configs/tiny.py")
  experiment.model = config
  experiment.data.modalities_per_row = 2
  batch = aot.abstract_batch(experiment)
  b = experiment.batch_size
  assert batch["modality_embeds"].shape == (b, 2, 16)
  assert batch["modality_types"].shape == (b, 2) and batch["modality_types"].dtype == np.int32


def test_processor_expands_placeholders_and_names_what_is_wrong(processor):
  rng = np.random.default_rng(2)
  sound, depth = rng.standard_normal(16), rng.standard_normal(8)
  out = processor(
    text=["<depth> hello <sound> da", "<sound> bo"],
    modalities=[{"sound": [sound], "depth": [depth]}, [("sound", sound * 2)]],
    padding=True,
    padding_side="left",
  )
  vocab = processor.vocab
  ids, mask = out["input_ids"], out["image_embeds_position_mask"]
  assert out["modality_embeds"].shape == (2, 2, 16) and out["modality_embeds"].dtype == np.float32
  np.testing.assert_array_equal(out["modality_types"], [[0, 1], [1, -1]])
  np.testing.assert_allclose(out["modality_embeds"][0, 0, :8], depth.astype(np.float32))
  assert not out["modality_embeds"][0, 0, 8:].any()
  np.testing.assert_allclose(out["modality_embeds"][1, 0], (sound * 2).astype(np.float32))
  assert (mask == 2).sum(axis=1).tolist() == [2 * TOKENS, TOKENS] and not (mask == 1).any()
  row = ids[0].tolist()
  open_, close = vocab.modality_tag_ids("depth")
  at = row.index(open_)
  assert row[at + 1 : at + 1 + TOKENS] == vocab_lib.image_slot_ids(TOKENS)
  assert row[at + 1 + TOKENS] == close and mask[0, at + 1 : at + 1 + TOKENS].tolist() == [2] * 3
  assert out["attention_mask"][1, 0] == 0  # left padded
  # Errors: count, width, unknown name, and a vocabulary without the modalities.
  with pytest.raises(ValueError, match="2 <sound> placeholders for 1 sound vectors"):
    processor(text="<sound> <sound>", modalities={"sound": [sound]})
  with pytest.raises(ValueError, match="1 <sound> placeholders for 0 sound"):
    processor(text="<sound> a")
  with pytest.raises(
    ValueError, match=r"shape \(8,\); the sound modality takes vectors of width 16"
  ):
    processor(text="<sound>", modalities=[("sound", depth)])
  with pytest.raises(ValueError, match="unknown modality 'audio'"):
    processor(text="<sound>", modalities=[("audio", sound)])
  with pytest.raises(ValueError, match="needs exactly"):
    processor.check_model_vocab(processor.vocab.vocab_size - 4)


def test_processor_output_runs_the_model_and_generates(processor, model):
  rng = np.random.default_rng(3)
  sound = rng.standard_normal(16)
  picture = rng.integers(0, 256, (40, 50, 3), np.uint8)
  inputs = processor(
    text=["<grounding> heard: <sound> seen:", "<grounding> seen:"],
    images=[picture, picture],
    modalities=[[("sound", sound)], None],
    padding_side="left",
  )
  mask = inputs["image_embeds_position_mask"]
  assert (mask == 1).sum() == 2 * 8 and (mask == 2).sum() == TOKENS
  out = model.generate(**inputs, max_new_tokens=4)
  assert out.shape[0] == 2 and out.shape[1] <= inputs["input_ids"].shape[1] + 4
  # The vector matters: another one changes the prefill's logits.
  kw = {k: v for k, v in inputs.items() if k != "modality_embeds"}
  a = model(**kw, modality_embeds=inputs["modality_embeds"]).logits
  b = model(**kw, modality_embeds=inputs["modality_embeds"] + 1.0).logits
  assert not np.allclose(a[0, -1], b[0, -1]) and np.allclose(a[1], b[1])
  with pytest.raises(ValueError, match="modality slots .2. but no modality_embeds"):
    model.generate(**kw, max_new_tokens=2)


def test_from_pretrained_adds_modalities_to_a_checkpoint_without_them(
  tmp_path, plain_config, config, processor
):
  plain = Kosmos2(plain_config, rngs=nnx.Rngs(5))
  orbax_ckpt.save_params(str(tmp_path / "plain"), plain_config, build.params_of(plain))
  grown = kosmos_jax.from_pretrained(str(tmp_path / "plain"), modalities=WIDTHS, modality_tokens=3)
  assert model_config.modality_widths(grown.config) == WIDTHS
  old = np.asarray(plain.text_model.embed_tokens[...])
  new = np.asarray(grown.text_model.embed_tokens[...])
  assert new.shape == (old.shape[0] + 4, old.shape[1])
  np.testing.assert_array_equal(new[: old.shape[0]], old)
  assert 0.01 < new[old.shape[0] :].std() < 0.03
  # A text-and-image prompt: the logits over the old ids are the old model's.
  picture = np.random.default_rng(6).integers(0, 256, (40, 50, 3), np.uint8)
  inputs = processor(text="<grounding> a photo of", images=picture)
  want = plain(**inputs).logits
  got = grown(**inputs).logits
  np.testing.assert_allclose(got[..., : old.shape[0]], want, atol=1e-6, rtol=0)
  # Saved with its modalities, the model loads exactly, and the processor
  # reads them from its config.
  orbax_ckpt.save_params(str(tmp_path / "grown"), grown.config, build.params_of(grown))
  again = kosmos_jax.from_pretrained(str(tmp_path / "grown"))
  jax.tree.map(np.testing.assert_array_equal, build.params_of(again), build.params_of(grown))
  spm_util.train_tiny_spm(tmp_path / "grown")
  read = Processor.from_pretrained(tmp_path / "grown")
  assert read.modalities == {"depth": 8, "sound": 16} and read.modality_tokens == 3
  assert read.vocab.modalities == ("depth", "sound")


def test_the_hf_converter_refuses_modalities(config):
  with pytest.raises(hf.ConversionError, match="model.modalities"):
    hf.config_to_hf(config)
  with pytest.raises(hf.ConversionError, match="model.modalities"):
    hf.key_map(config)

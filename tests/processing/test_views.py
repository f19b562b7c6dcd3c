"""SPHINX's sub-image views: tiles are crops of the resized picture, the
global view comes first, slot counts, and boxes keep their location tokens."""

import numpy as np
import pytest
import seqio
import tensorflow as tf
from PIL import Image

from kosmos_jax.data import preprocessors
from kosmos_jax.models import config as model_config_lib
from kosmos_jax.processing import images as images_lib
from kosmos_jax.processing import views
from kosmos_jax.processing import vocab as vocab_lib
from kosmos_jax.processing.processor import Processor
from tests.helpers import spm as spm_util

SPHINX_1K = {"grid": 2, "global": True}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  return vocab_lib.KosmosVocabulary(spm_util.train_tiny_spm(tmp_path_factory.mktemp("spm")))


def _vision(grid=2, whole=True, size=16):
  return {"image_size": size, "views": {"grid": grid, "global": whole}}


def test_counts_sizes_and_slots():
  released = model_config_lib.model_config()
  assert views.count(released.vision) == 1 and not views.tagged(released.vision)
  assert views.input_size(released.vision) == 224 and views.image_slots(released) == 64
  sphinx_1k = model_config_lib.model_config(**{"vision.views": SPHINX_1K})
  assert views.count(sphinx_1k.vision) == 5 and views.input_size(sphinx_1k.vision) == 448
  assert views.image_slots(sphinx_1k) == 5 * (64 + 2)
  sphinx_2k = {"latent_query_num": 289, "vision": _vision(3, True, 224)}
  assert views.image_slots(sphinx_2k) == 2910  # sphinx_pandagpt.md 1.1: (32 + 257 + 2) x 10
  # A config saved before views existed is one view.
  assert views.image_slots({"latent_query_num": 8, "vision": {"image_size": 32}}) == 8
  with pytest.raises(ValueError, match="grid = 0"):
    views.count(_vision(0))


def test_tiles_are_row_major_crops_after_the_global_view():
  # Quadrants of constant value 1, 2, 3, 4 (sphinx_pandagpt.md 4.2's check).
  picture = np.zeros((1, 32, 32, 3), np.float32)
  for k, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    picture[0, 16 * r : 16 * (r + 1), 16 * c : 16 * (c + 1)] = k + 1
  out = np.asarray(views.split(picture, _vision()))
  assert out.shape == (5, 16, 16, 3)
  np.testing.assert_allclose(out[0].mean(), 2.5, rtol=1e-6)
  for k in range(4):
    np.testing.assert_array_equal(out[1 + k], k + 1)
  # On a real picture: each tile is the crop of the picture resized to 2 x 16.
  rgb = np.asarray(Image.radial_gradient("L").convert("RGB").resize((50, 37)))
  options = images_lib.ImageOptions(size=(32, 32), crop_size=(32, 32))
  pixels = images_lib.preprocess_images([rgb], options).transpose(0, 2, 3, 1)
  out = np.asarray(views.split(pixels, _vision(2, False)))
  np.testing.assert_array_equal(out[1], pixels[0, :16, 16:])
  np.testing.assert_array_equal(out[2], pixels[0, 16:, :16])
  three = np.asarray(views.split(np.tile(pixels, (2, 1, 1, 1))[:, :30, :30], _vision(3, True, 10)))
  assert three.shape == (20, 10, 10, 3)
  np.testing.assert_array_equal(three[10 + 1 + 5], pixels[0, 10:20, 20:30])  # 2nd picture, tile 5
  with pytest.raises(ValueError, match="expects 32x32, 2 x image_size 16"):
    views.split(pixels[:, :16, :16], _vision())


def test_wrap_puts_each_view_between_the_tags():
  embeds = np.arange(2 * 5 * 3 * 4, dtype=np.float32).reshape(10, 3, 4)
  tags = np.array([[-1.0] * 4, [-2.0] * 4], np.float32)
  out = np.asarray(views.wrap(embeds, tags, _vision()))
  assert out.shape == (2, 5 * 5, 4)
  blocks = out.reshape(2, 5, 5, 4)
  np.testing.assert_array_equal(blocks[:, :, 0], -1.0)
  np.testing.assert_array_equal(blocks[:, :, -1], -2.0)
  np.testing.assert_array_equal(blocks[:, :, 1:-1].reshape(10, 3, 4), embeds)


def _outside_images(ids, mask):
  return [int(i) for i, m in zip(ids, mask) if m == 0]


def test_the_processor_gives_a_box_the_same_location_tokens_with_and_without_views(vocab):
  picture = Image.fromarray(np.full((30, 50, 3), 120, np.uint8))
  text = "<grounding><phrase> ba be</phrase> bi"
  box = [(0.1, 0.25, 0.6, 0.9)]
  one = Processor(vocab, images_lib.ImageOptions(size=(16, 16), crop_size=(16, 16)), 4)
  five = Processor(vocab, images_lib.ImageOptions(size=(32, 32), crop_size=(32, 32)), 5 * 6)
  a, b = (p(text=text, images=picture, bboxes=box) for p in (one, five))
  assert a["pixel_values"].shape[-1] == 16 and b["pixel_values"].shape[-1] == 32
  assert int(b["image_embeds_position_mask"].sum()) == 30
  kept = [_outside_images(x["input_ids"][0], x["image_embeds_position_mask"][0]) for x in (a, b)]
  assert kept[0] == kept[1]
  assert vocab.patch_index_id(0) <= max(kept[0])  # the box's tokens are in it


def test_from_pretrained_reads_a_views_models_sizes(tmp_path):
  import json  # pylint: disable=g-import-not-at-top

  directory = spm_util.make_tiny_processor_dir(tmp_path)
  model = {"latent_query_num": 8, "vision": _vision(2, True, 32)}
  with open(f"{directory}/kosmos_config.json", "w") as f:
    json.dump(model, f)
  processor = Processor.from_pretrained(directory)
  assert processor.num_image_tokens == 5 * 10
  assert processor.image_options.size == (64, 64)


def _grit(vocab, image_size, slots):
  buffer = tf.io.encode_png(tf.cast(tf.fill([30, 50, 3], 90), tf.uint8)).numpy()
  record = dict(
    key="k",
    image=buffer,
    caption="ba be bi bo",
    ref_exps=np.array([[0, 5, 0.1, 0.25, 0.6, 0.9, 1.0]], np.float32),
  )
  spec = dict(
    key=tf.TensorSpec([], tf.string),
    image=tf.TensorSpec([], tf.string),
    caption=tf.TensorSpec([], tf.string),
    ref_exps=tf.TensorSpec([None, 7], tf.float32),
  )
  ds = tf.data.Dataset.from_generator(lambda: iter([record]), output_signature=spec)
  with seqio.utils.map_seed_manager(0):
    ds = preprocessors.image_text(
      ds,
      vocab,
      image_size=image_size,
      num_image_tokens=slots,
      use_box_prob=1.0,
      transform="square",
    )
  return next(iter(ds.as_numpy_iterator()))


def test_the_tf_ops_give_a_box_the_same_location_tokens_with_and_without_views(vocab):
  one, five = _grit(vocab, 16, 4), _grit(vocab, 32, 30)
  assert one["images"].shape[-1] == 16 and five["images"].shape[-1] == 32
  assert int((five["image_mask"] == 1).sum()) == 30
  kept = [_outside_images(x["targets"], x["image_mask"]) for x in (one, five)]
  assert kept[0] == kept[1] and vocab.patch_index_id(0) <= max(kept[0])


def test_hugging_face_conversion_refuses_views():
  from kosmos_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top

  config = model_config_lib.model_config(**{"vision.views": SPHINX_1K})
  with pytest.raises(hf.ConversionError, match="model.vision.views=.*only a single view"):
    hf.config_to_hf(config)

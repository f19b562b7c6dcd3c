"""Higher (or lower) input resolution than the checkpoint's: the position table
is resized bicubically as transformers' `interpolate_pos_encoding=True` does."""

import io
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import kosmos_jax
from kosmos_jax.checkpoints import hf as hf_ckpt
from kosmos_jax.models import build, vit
from kosmos_jax.processing.processor import Processor
from tests.helpers import spm as spm_util
from tests.helpers.hf_reference import grounded_batch, random_hf_model

TOL = 1e-4  # as tests/models/test_hf_parity.py: max abs difference over the largest logit


def _torch_resize(table: np.ndarray, src: int, dst: int) -> np.ndarray:
  """transformers' Kosmos2VisionEmbeddings.interpolate_pos_encoding, on a bare table."""
  t = torch.from_numpy(table)
  patches = t[1:].reshape(1, src, src, -1).permute(0, 3, 1, 2)
  patches = torch.nn.functional.interpolate(
    patches, size=(dst, dst), mode="bicubic", align_corners=False
  )
  return torch.cat([t[:1], patches.permute(0, 2, 3, 1).reshape(dst * dst, -1)]).numpy()


@pytest.mark.parametrize("src,dst", [(4, 6), (4, 7), (6, 4), (16, 32), (16, 23), (5, 2), (3, 3)])
def test_bicubic_matrices_equal_torch_interpolate(src, dst):
  table = np.random.default_rng(src * 100 + dst).standard_normal((1 + src * src, 8))
  np.testing.assert_allclose(
    _torch_resize(table, src, dst),
    np.asarray(vit.resize_positions(table, src, dst)),
    atol=1e-5,
    rtol=1e-5,
  )
  # The matrices themselves are exact: float64 agrees to rounding.
  m = vit.bicubic_matrix(src, dst)
  resized = np.einsum("ia,jb,abd->ijd", m, m, table[1:].reshape(src, src, -1))
  np.testing.assert_allclose(
    _torch_resize(table, src, dst)[1:], resized.reshape(dst * dst, -1), atol=1e-12
  )


def _pair(tmp_path_factory, name: str, size: int):
  """A random transformers checkpoint and ours loaded from it at `size` pixels."""
  hf = random_hf_model(name, seed=7)
  path = tmp_path_factory.mktemp(f"hf_{name}")
  hf.save_pretrained(path)
  return hf, kosmos_jax.from_pretrained(str(path), vision={"image_size": size}), path


@pytest.fixture(scope="module")
def up(tmp_path_factory):
  return _pair(tmp_path_factory, "a", 64)  # 32 px / patch 8: 4x4 table run on 8x8


def _pixels(n: int, size: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def test_forward_matches_transformers_interpolate_pos_encoding(up):
  hf, ours, path = up
  batch = grounded_batch(hf.config, lengths=[3, 9], seed=1)
  batch["pixel_values"] = _pixels(2, ours.config.vision.image_size, seed=2)
  # Kosmos2ForConditionalGeneration.forward drops `interpolate_pos_encoding`;
  # Kosmos2Model (same weights) takes it and returns the image embeddings.
  inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
  with torch.no_grad():
    base = transformers.Kosmos2Model.from_pretrained(path).eval()
    ref_embeds = base(**inputs, interpolate_pos_encoding=True).image_embeds
    del inputs["pixel_values"]
    ref = hf(**inputs, image_embeds=ref_embeds).logits.numpy()
  got = np.asarray(ours(**batch).logits)
  mask = batch["attention_mask"].astype(bool)
  scale = max(1.0, float(np.abs(ref[mask]).max()))
  assert scale > 2.0  # the comparison is not between near-zeros
  assert float(np.abs(ref - got)[mask].max()) / scale < TOL
  embeds = np.asarray(ours.encode_images(batch["pixel_values"]))
  np.testing.assert_allclose(embeds, ref_embeds.numpy(), atol=1e-5, rtol=1e-5)


def test_image_embeds_match_transformers_at_a_lower_resolution(tmp_path_factory):
  _, ours, path = _pair(tmp_path_factory, "c", 16)  # 24 px / patch 4: 6x6 table run on 4x4
  pixels = _pixels(2, 16, seed=3)
  base = transformers.Kosmos2Model.from_pretrained(path).eval()
  with torch.no_grad():
    features = base.get_image_features(torch.from_numpy(pixels), interpolate_pos_encoding=True)
  np.testing.assert_allclose(
    np.asarray(ours.encode_images(pixels)),
    features.pooler_output.numpy(),
    atol=1e-5,
    rtol=1e-5,
  )


def test_weights_load_unchanged_and_write_back(up, tmp_path):
  hf, ours, path = up
  vc = hf.config.vision_config
  grid = vc.image_size // vc.patch_size
  assert ours.config.vision.position_grid == grid
  table = np.asarray(build.params_of(ours)["vision_model"]["position_embedding"])
  np.testing.assert_array_equal(
    table, hf.vision_model.model.embeddings.position_embedding.weight.detach().numpy()
  )
  # Dotted keys spell the same override.
  dotted = kosmos_jax.from_pretrained(
    str(path), **{"vision.image_size": ours.config.vision.image_size}
  )
  assert dotted.config.vision.to_dict() == ours.config.vision.to_dict()
  # Written back, the table keeps its size: config.json says the table's image
  # size, and transformers loads it as it was.
  hf_ckpt.write_hf_dir(str(tmp_path), ours.config, build.params_of(ours))
  written = json.loads((tmp_path / "config.json").read_text())["vision_config"]
  assert written["image_size"] == vc.image_size
  reloaded = transformers.Kosmos2ForConditionalGeneration.from_pretrained(tmp_path)
  assert torch.equal(
    reloaded.vision_model.model.embeddings.position_embedding.weight,
    hf.vision_model.model.embeddings.position_embedding.weight,
  )


def test_shape_mismatch_names_the_position_grid(up):
  hf, ours, path = up
  _, tensors = hf_ckpt.read_hf_dir(str(path))
  config = hf_ckpt.config_from_hf(hf.config.to_dict())
  config.vision.image_size = ours.config.vision.image_size  # no position_grid
  with pytest.raises(hf_ckpt.ConversionError, match="vision.position_grid="):
    hf_ckpt.hf_to_params(tensors, config, expected_shapes=build.abstract_params(config))


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
  return spm_util.make_tiny_processor_dir(tmp_path_factory.mktemp("processor"))


def test_processor_resizes_to_the_configured_size(processor_dir):
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 230, 3), np.uint8))
  assert Processor.from_pretrained(processor_dir)(images=image)["pixel_values"].shape == (
    1,
    3,
    224,
    224,
  )
  got = Processor.from_pretrained(processor_dir, image_size=448)(images=image)["pixel_values"]
  # transformers 5 keeps 224 x 224 when `use_square_size` meets a height/width size.
  square = {"height": 448, "width": 448}
  options = dict(spm_util.KOSMOS_IMAGE_PROCESSOR, size=square, crop_size=square)
  del options["use_square_size"]
  reference = transformers.CLIPImageProcessor(**options)
  want = reference(images=image, return_tensors="np")["pixel_values"]
  assert got.shape == want.shape == (1, 3, 448, 448)
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("transform", ["square", "crop"])
def test_tf_image_ops_resize_to_the_configured_size(transform):
  from kosmos_jax.data import tf_image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  Image.new("RGB", (230, 150), (10, 200, 30)).save(buffer, "PNG")
  pixels = tf_image.preprocess(buffer.getvalue(), 448, transform)
  assert tuple(pixels.shape) == (3, 448, 448)

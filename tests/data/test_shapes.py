"""The synthetic shapes dataset: deterministic, tight boxes, learnable REC, fast."""

import io
import os
import subprocess
import sys
import time

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from kosmos_jax.data import shapes


def test_examples_are_deterministic_and_splits_differ():
  a, b = shapes.make_example("train", 7, 64), shapes.make_example("train", 7, 64)
  assert a["image"] == b["image"] and a["caption"] == b["caption"]
  assert shapes.make_example("test", 7, 64)["image"] != a["image"]


def test_boxes_are_tight_and_apart():
  rng = np.random.default_rng(0)
  for _ in range(50):
    objects = shapes.sample_scene(rng, 64)
    pixels = shapes.draw(rng, objects, 64)
    pairs = {(o["colour"], o["shape"]) for o in objects}
    assert len(pairs) == len(objects)  # "the red circle" names one object
    for o in objects:
      x0, y0, x1, y1 = o["box"]
      painted = np.all(pixels == shapes.COLOURS[o["colour"]], axis=-1)
      ys, xs = np.nonzero(painted[y0:y1, x0:x1])
      assert xs.min() <= 1 and xs.max() >= x1 - x0 - 2 and ys.min() <= 1 and ys.max() >= y1 - y0 - 2
    for i, o in enumerate(objects):
      for p in objects[i + 1 :]:
        assert (
          o["box"][2] <= p["box"][0]
          or p["box"][2] <= o["box"][0]
          or o["box"][3] <= p["box"][1]
          or p["box"][3] <= o["box"][1]
        )


def test_grit_schema_spans_point_at_the_words():
  e = shapes.make_example("train", 3, 224)
  for chunk, exp, obj in zip(e["noun_chunks"], e["ref_exps"], e["objects"]["expression"]):
    phrase = e["caption"][int(chunk[0]) : int(chunk[1])]
    assert phrase.startswith("a ") and obj == "the " + phrase[2:]
    assert e["caption"][int(exp[0]) : int(exp[1])].startswith(phrase)
    np.testing.assert_array_equal(chunk[2:], exp[2:])
    assert 0 <= chunk[2] < chunk[4] <= 1 and chunk[6] == 1.0
  assert Image.open(io.BytesIO(e["image"])).size == (224, 224)


def test_generation_speed():
  start = time.perf_counter()
  for i in range(200):
    shapes.make_example("train", i, 224)
  assert (time.perf_counter() - start) / 200 < 0.01  # < 10 ms per 224 x 224 picture


def test_builder_and_vocabulary(tmp_path):
  config = shapes.ShapesConfig(name="tiny", image_size=32, num_train=12, num_test=4)
  builder = shapes.build(str(tmp_path / "tfds"), config)
  assert (
    builder.info.splits["train"].num_examples == 12
    and builder.info.splits["test"].num_examples == 4
  )
  x = next(iter(builder.as_dataset("train", decoders={"image": tfds.decode.SkipDecoding()})))
  assert isinstance(x["image"].numpy(), bytes) and x["noun_chunks"].shape[1] == 7
  v1 = shapes.shapes_vocabulary(directory=str(tmp_path / "a"))
  v2 = shapes.shapes_vocabulary(directory=str(tmp_path / "b"))
  assert [v1.id_to_token(i) for i in range(v1.vocab_size)] == [
    v2.id_to_token(i) for i in range(v2.vocab_size)
  ]
  ids = v1.encode("the red circle is left of the blue square.")
  assert 3 not in ids and v1.decode(ids) == "the red circle is left of the blue square."


def test_processes_preparing_one_config_at_once_all_succeed(tmp_path):
  """Demo runs started together raced on TFDS's final rename (FileExistsError)."""
  code = (
    "import sys\n"
    "from kosmos_jax.data import shapes\n"
    "config = shapes.ShapesConfig(name='race', image_size=32, num_train=1500, num_test=10)\n"
    "builder = shapes.build(sys.argv[1], config)\n"
    "print(builder.info.splits['train'].num_examples)\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )  # fmt: skip
    for _ in range(3)
  ]
  for proc in procs:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert out.split()[-1] == "1500"

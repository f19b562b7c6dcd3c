"""`kosmos-jax data inspect`: decoded examples agree with the records they come from."""

import io
import os

import numpy as np
import pytest
import seqio
from PIL import Image

from kosmos_jax import commands
from kosmos_jax.data import inspect as data_inspect
from kosmos_jax.data import loader, shapes, tasks
from tests.helpers import spm as spm_util

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
P = 32  # location bins per side of the shapes vocabulary used here


@pytest.fixture(scope="module")
def itest(tmp_path_factory):
  """Shapes tasks `itest_*` on 6 training and 3 held-out 32 px pictures."""
  config = shapes.ShapesConfig(name="inspect", image_size=32, num_train=6, num_test=3)
  tasks.register_shapes_tasks(
    prefix="itest",
    image_size=32,
    num_image_tokens=8,
    data_dir=str(tmp_path_factory.mktemp("tfds")),
    config=config,
  )
  return "itest"


def _exit_code(argv) -> int:
  with pytest.raises(SystemExit) as e:
    commands.main(argv)
  return e.value.code


def test_rec_examples_match_their_records(itest):
  found = data_inspect.examples(f"{itest}_rec", "train", 3)
  records = list(loader.source_records(f"{itest}_rec", "train"))
  expected = [
    (r["key"].decode(), expression.decode(), box, r["image"])
    for r in records
    for expression, box in zip(r["expressions"], r["boxes"])
  ][:3]
  assert len(found) == 3
  for example, (key, expression, box, jpeg) in zip(found, expected):
    assert (example.task, example.key) == (f"{itest}_rec", key)
    assert example.text.startswith(
      f"<s><image>[8 slots]</image><grounding><phrase> {expression}</phrase><object>"
    )
    # Only the location answer carries loss (the prompt does not).
    assert example.loss_text.startswith("<object><patch_index_") and example.loss_text.endswith(
      "</object></s>"
    )
    assert example.num_loss_tokens == 5
    [(phrase, _, boxes)] = example.entities
    assert phrase == expression and len(boxes) == 1
    np.testing.assert_allclose(boxes[0], box, atol=1 / P)
    # De-normalised pixels give the source picture back (32 px: resized to itself).
    [picture] = example.images
    source = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), np.int32)
    assert picture.dtype == np.uint8 and picture.shape == (32, 32, 3)
    assert np.abs(picture.astype(np.int32) - source).mean() < 2


def test_mixture_examples_name_their_task_and_mark_images(itest):
  found = data_inspect.examples(f"{itest}_mix", "validation", 6, seed=1)
  names = {t.name for t in seqio.get_mixture_or_task(f"{itest}_mix").tasks}
  assert len(found) == 6 and {e.task for e in found} <= names
  for e in found:
    assert e.text.startswith("<s>")
    assert e.text.count("<image>[8 slots]</image>") == len(e.images)
    assert 0 < e.num_loss_tokens < e.num_tokens
    assert "slots]" not in e.loss_text  # image slots never carry loss
  described = data_inspect.describe(found[0], 0)
  assert (
    described.startswith(f"[0] {found[0].task} key=") and f"  text: {found[0].text}" in described
  )


def test_cli_prints_and_draws(itest, tmp_path, capsys):
  commands.main(
    ["data", "inspect", f"{itest}_rec", "--num", "2", "--out", str(tmp_path / "pictures")]
  )
  out = capsys.readouterr().out
  assert out.count(f"{itest}_rec key=") == 2 and out.count("  entity 'the ") == 2
  files = sorted(os.listdir(tmp_path / "pictures"))
  assert files == [f"00_{itest}_rec_0.png", f"01_{itest}_rec_0.png"]
  for name in files:
    assert f"-> {tmp_path / 'pictures' / name}" in out
    # 32 px pictures are drawn upscaled to 224 px so that labels stay legible.
    assert Image.open(tmp_path / "pictures" / name).size == (224, 224)


@pytest.mark.parametrize(
  "argv,message",
  [
    (["no_such_task"], "argument NAME: 'no_such_task' is not a registered"),
    (["itest_rec", "--split", "dev"], "argument --split: 'dev' is not a split of itest_rec"),
    (["itest_rec", "--num", "0"], "argument --num: must be at least 1"),
    (["itest_rec", "--config.seq_len=8"], "--config.* overrides need --config"),
  ],
)
def test_bad_arguments_exit_2(itest, capsys, argv, message):
  del itest
  assert _exit_code(["data", "inspect", *argv]) == 2
  assert message in capsys.readouterr().err


def test_user_tasks_from_config(tmp_path, capsys):
  spm_file = spm_util.train_tiny_spm(tmp_path / "spm")
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "t.txt").write_text("ba be bi\n")
  try:
    commands.main(
      [
        "data",
        "inspect",
        "kosmos2_text",
        "--num",
        "1",
        "--config",
        os.path.join(ROOT, "configs/tiny.py"),
        f"--config.data.spm_model_file={spm_file}",
        f"--config.data.data_dir={tmp_path}",
      ]
    )
  finally:
    # Others would otherwise find these tasks on files that no longer exist.
    for name in [n for n in seqio.TaskRegistry.names() if n.startswith("kosmos2_")]:
      seqio.TaskRegistry.remove(name)
    seqio.MixtureRegistry.remove("kosmos2_pretrain")
  out = capsys.readouterr().out
  assert "[0] kosmos2_text key=" in out and "  text: <s> ba be bi</s>" in out

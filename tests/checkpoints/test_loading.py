"""from_pretrained: one decision of what a directory is, and a trainer workdir as a checkpoint."""

import os
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import kosmos_jax
from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import loading
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build
from kosmos_jax.train import optim, trainer
from kosmos_jax.train import state as state_lib
from tests.helpers.hf_reference import random_hf_model

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny training run with checkpoints at steps 1 and 2."""
  path = tmp_path_factory.mktemp("run")
  overrides = ["total_steps=2", "checkpoint_every=1", "log_every=1", "batch_size=2"]
  overrides += ["seq_len=64", "mesh.fsdp=1", "optim.warmup_steps=1"]
  config = config_lib.load(str(ROOT / "configs/tiny.py"), overrides)
  trainer.train(config, str(path), devices=jax.devices()[:1])
  return path


def _params(model) -> dict:
  return jax.tree.map(np.asarray, build.params_of(model))


def test_a_workdir_loads_its_latest_step_like_a_full_restore(workdir):
  config = orbax_ckpt.load_workdir_config(workdir)
  tx = optim.optimizer(config.optim, config.total_steps)
  _, abstract = state_lib.abstract(config.model, tx, config.seed)
  # The whole train state, as a resumed run reads it.
  with orbax_ckpt.checkpoint_manager(workdir, read_only=True) as manager:
    full = manager.restore(
      2, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    ).state
  want = jax.tree.map(np.asarray, nnx.to_pure_dict(full.params))
  got = _params(kosmos_jax.from_pretrained(str(workdir)))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  # An earlier step by name.
  first = _params(kosmos_jax.from_pretrained(f"{workdir}@1"))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(got)))


def test_locate_decides_once_and_names_what_is_wrong(workdir, tmp_path):
  assert loading.locate(str(workdir)) == loading.Location(str(workdir), "workdir", None)
  assert loading.locate(f"{workdir}@1") == loading.Location(str(workdir), "workdir", 1)
  hf_dir = tmp_path / "hf"
  random_hf_model("a", seed=0).save_pretrained(hf_dir)
  assert loading.locate(hf_dir).kind == "hf"
  assert loading.model_config(hf_dir).text.depth == loading.model_config(str(hf_dir)).text.depth
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 \(steps: 1, 2\)"):
    kosmos_jax.from_pretrained(f"{workdir}@7")
  with pytest.raises(FileNotFoundError, match="not a trainer workdir"):
    loading.locate(f"{hf_dir}@3")
  with pytest.raises(FileNotFoundError, match="neither a Hugging Face snapshot"):
    loading.locate(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    loading.locate(os.path.join(tmp_path, "missing"))


def test_views_run_a_single_view_snapshot_as_sphinx_1k(tiny_snapshot):
  """SPHINX-1k from a single-view model: every stored weight as it was, the
  view tags added; the processor gives 448 px pictures and 5 x 66 slots."""
  from kosmos_jax.processing.processor import Processor  # pylint: disable=g-import-not-at-top

  snap = tiny_snapshot / "snap"
  sphinx_1k = {"grid": 2, "global": True}
  base = nnx.to_pure_dict(nnx.state(kosmos_jax.from_pretrained(snap), nnx.Param))
  model = kosmos_jax.from_pretrained(snap, vision={"views": sphinx_1k})
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert params.pop("view_tags").shape == (2, 64)
  jax.tree.map(np.testing.assert_array_equal, params, base)
  processor = Processor.from_pretrained(snap, views=sphinx_1k)
  assert processor.num_image_tokens == 330 and processor.image_options.size == (448, 448)
  inputs = processor(text="<grounding>An image of", images=str(tiny_snapshot / "snowman.jpg"))
  out = model.generate(**inputs, max_new_tokens=3)
  assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_generate_reads_a_workdir_through_its_mixtures_vocabulary(workdir, tiny_snapshot, capsys):
  """A trainer workdir has no processor files: `kosmos-jax generate` uses the
  vocabulary of the mixture it trained on, as `kosmos-jax eval` does."""
  import json  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top

  from kosmos_jax import commands  # pylint: disable=g-import-not-at-top
  from kosmos_jax.eval import runner  # pylint: disable=g-import-not-at-top

  image = str(tiny_snapshot / "snowman.jpg")
  argv = ["generate", "--checkpoint", str(workdir), "--image", image, "--max-new-tokens", "4"]
  commands.main([*argv, "--json"])
  result = json.loads(capsys.readouterr().out.splitlines()[-1])
  where = loading.locate(str(workdir))
  processor = runner.processor_for(where, loading.model_config(where))
  inputs = processor(text="<grounding>An image of", images=np.asarray(Image.open(image)))
  ids = kosmos_jax.from_pretrained(str(workdir)).generate(**inputs, max_new_tokens=4)
  assert result["token_ids"] == [t for t in ids[0].tolist() if t != processor.vocab.pad_id]

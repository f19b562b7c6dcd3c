"""A LoRA run's workdir: merged into a plain checkpoint, and exported for PEFT,
both giving the adapted model's logits in transformers."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import peft
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

import kosmos_jax
from kosmos_jax import commands
from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import loading
from kosmos_jax.checkpoints import orbax as orbax_ckpt
from kosmos_jax.models import build, lora
from kosmos_jax.train import optim
from kosmos_jax.train import state as state_lib
from tests.helpers.hf_reference import grounded_batch, random_hf_model

TOL = 1e-4  # max abs difference, relative to the largest logit
TARGETS = [
  *lora.DEFAULT_TARGETS,
  "vision_model/layers/fc1",
  "image_to_text_projection/x_attn/v_proj",
]


def _as_if_trained(model, seed: int) -> None:
  """Random B everywhere and a moved connector Dense, as a run would leave them."""
  key = jax.random.PRNGKey(seed)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, lora.LoraDense):
      key, sub = jax.random.split(key)
      module.lora_b[...] = 0.2 * jax.random.normal(sub, module.lora_b.shape)
  dense = model.image_to_text_projection.dense
  dense.kernel[...] = dense.kernel[...] + 0.05 * jax.random.normal(key, dense.kernel.shape)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(HF snapshot dir, workdir of a LoRA run from it, the adapted model)."""
  root = tmp_path_factory.mktemp("lora_run")
  snap, workdir = root / "snap", root / "run"
  random_hf_model("a", seed=5).save_pretrained(snap)
  config = config_lib.experiment_config(loading.model_config(str(snap)))
  config.init_from = str(snap)
  config.lora.rank, config.lora.alpha, config.lora.targets = 4, 8.0, TARGETS
  config.optim.train_also = ["image_to_text_projection/dense/.*"]
  model = lora.add(
    kosmos_jax.from_pretrained(str(snap)), config.lora, lora.adapter_rngs(config.seed)
  )
  _as_if_trained(model, seed=1)
  tx = optim.optimizer(config.optim, config.total_steps)
  trainable = optim.trainable_patterns(config)
  state = state_lib.create(nnx.state(model, nnx.Param), tx, config.seed, trainable)
  # The trainer's layout: config.json + checkpoints/<step>/state.
  os.makedirs(workdir)
  (workdir / "config.json").write_text(config.to_json(indent=2))
  with orbax_ckpt.checkpoint_manager(workdir) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
  return snap, workdir, model


def _max_rel_err(ref, ours, mask):
  scale = max(1.0, float(np.abs(ref[mask]).max()))
  return float(np.abs(ref - ours)[mask].max()) / scale


def _compare(torch_model, ours, seed=0):
  batch = grounded_batch(torch_model.config, lengths=[4, 9], seed=seed)
  with torch.no_grad():
    ref = torch_model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()
  got = np.asarray(ours(**batch).logits)
  mask = batch["attention_mask"].astype(bool)
  assert np.abs(ref[mask]).max() > 2.0
  return _max_rel_err(ref, got, mask)


def test_peft_loads_the_export_onto_transformers_and_gives_our_logits(run, tmp_path):
  snap, workdir, model = run
  out = tmp_path / "adapter"
  commands.main(["convert", "lora-to-peft", "--checkpoint", str(workdir), "--out", str(out)])
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
  assert config["modules_to_save"] == ["image_to_text_projection.dense"]
  assert len(config["target_modules"]) == 2 * 4 + 2 + 1  # decoder qkvo, ViT fc1, x_attn v
  assert "text_model.model.layers.1.self_attn.out_proj" in config["target_modules"]
  tensors = safetensors.numpy.load_file(out / "adapter_model.safetensors")
  a = tensors["base_model.model.text_model.model.layers.0.self_attn.q_proj.lora_A.weight"]
  b = tensors["base_model.model.vision_model.model.encoder.layers.1.mlp.fc1.lora_B.weight"]
  assert a.shape == (4, 64) and b.shape == (64, 4)  # torch Linear layout: [r, in], [out, r]

  base = transformers.Kosmos2ForConditionalGeneration.from_pretrained(snap).eval()
  untouched = _compare(base, model)
  adapted = peft.PeftModel.from_pretrained(base, out).eval()
  assert untouched > 100 * TOL  # the adapters matter
  assert _compare(adapted, model) < TOL


def test_merge_lora_gives_a_plain_checkpoint_with_the_same_logits(run, tmp_path):
  snap, workdir, model = run
  merged, hf_dir = tmp_path / "merged", tmp_path / "hf"
  commands.main(["convert", "merge-lora", "--checkpoint", f"{workdir}@3", "--out", str(merged)])
  commands.main(["convert", "orbax-to-hf", "--ckpt", str(merged), "--out", str(hf_dir)])
  assert (merged / "tokenizer_config.json").exists() == (snap / "tokenizer_config.json").exists()
  plain = kosmos_jax.from_pretrained(str(merged))
  assert not lora.has_adapters(build.params_of(plain))
  reference = transformers.Kosmos2ForConditionalGeneration.from_pretrained(hf_dir).eval()
  assert _compare(reference, model, seed=1) < TOL
  # from_pretrained of the workdir merges the same way.
  direct = kosmos_jax.from_pretrained(str(workdir))
  jax.tree.map(np.testing.assert_array_equal, build.params_of(direct), build.params_of(plain))


def test_lora_commands_name_what_is_wrong(run, tmp_path):
  snap, _, _ = run
  with pytest.raises(SystemExit, match="LoRA adapters live in a trainer workdir"):
    commands.main(["convert", "merge-lora", "--checkpoint", str(snap), "--out", str(tmp_path)])
  plain = tmp_path / "plain"
  os.makedirs(plain / "checkpoints")
  config = config_lib.experiment_config(loading.model_config(str(snap)))
  (plain / "config.json").write_text(config.to_json())
  with pytest.raises(SystemExit, match="its run has no LoRA adapters"):
    commands.main(["convert", "lora-to-peft", "--checkpoint", str(plain), "--out", str(tmp_path)])

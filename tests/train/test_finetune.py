"""Fine-tuning the way a user does it: configs/finetune*.py from a released
snapshot (random weights here) on conversation files; the held-out loss
falls, the model answers as trained, and (PandaGPT) a frozen decoder with
LoRA and a projection learns to read a new modality."""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from kosmos_jax import config as config_lib
from kosmos_jax.checkpoints import loading
from kosmos_jax.data import shapes, sounds
from kosmos_jax.processing import conversation
from kosmos_jax.processing.processor import Processor
from kosmos_jax.train import trainer
from tests.helpers.spm import make_tiny_snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220)}
QUESTION = "What colour is this picture?"
SMALL = [
  "batch_size=8",
  "seq_len=256",
  "images_per_row=3",
  "log_every=10",
  "mesh.fsdp=1",
  "model.dtype=float32",
  "model.remat=none",
  "optim.warmup_steps=5",
  "data.eval_batches=2",
  "data.autotune=false",
]


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
  return make_tiny_snapshot(tmp_path_factory.mktemp("snapshot"))


def _pictures(directory, split: str, num: int, seed: int) -> str:
  """Noisy single-colour pictures and a conversation per picture (JSON lines)."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory / split, exist_ok=True)
  with open(directory / f"{split}.jsonl", "w") as f:
    for i in range(num):
      colour = list(COLOURS)[i % len(COLOURS)]
      pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, (48, 48, 3)), 0, 255)
      Image.fromarray(pixels.astype(np.uint8)).save(directory / split / f"{i}.png")
      turns = [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": colour}]
      f.write(json.dumps({"image": f"{split}/{i}.png", "conversations": turns}) + "\n")
  return str(directory / f"{split}.jsonl")


def _eval_losses(workdir) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["eval/loss"] for r in map(json.loads, f) if "eval/loss" in r]


def _answer(model, processor, inputs) -> str:
  out = model.generate(**inputs, max_new_tokens=6)
  new = processor.answer(inputs["input_ids"][0], np.asarray(out)[0, inputs["input_ids"].shape[1] :])
  return processor.decode(new["new_ids"], skip_special_tokens=True)


def test_a_fine_tune_from_a_released_snapshot_learns_the_answers(snapshot, tmp_path):
  train = _pictures(tmp_path, "train", 24, seed=0)
  held_out = _pictures(tmp_path, "validation", 6, seed=1)
  config = config_lib.load(
    os.path.join(ROOT, "configs/finetune.py"),
    [
      *SMALL,
      f"init_from={snapshot}",
      f"data.conversations.files={train}",
      f"data.conversations.validation_files={held_out}",
      "total_steps=120",
      "eval_every=30",
      "checkpoint_every=120",
      "optim.learning_rate=3e-3",
    ],
  )
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir, devices=jax.devices()[:1])
  losses = _eval_losses(workdir)
  assert len(losses) == 4 and losses[-1] < 0.5 * losses[0], losses

  model = loading.from_pretrained(workdir)
  processor = Processor.from_pretrained(snapshot)
  prompt = conversation.generation_prompt([], QUESTION)
  with open(held_out) as f:
    rows = [json.loads(line) for line in f]
  for row in rows:
    picture = Image.open(tmp_path / row["image"])
    inputs = processor(text=prompt, images=picture)
    assert _answer(model, processor, inputs).strip() == row["conversations"][1]["value"]


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
  """A tiny model pretrained 200 steps on the shapes mixture: its decoder knows the
  colour words (a random snapshot's frozen std-0.02 tied embeddings cap
  every logit near 1.3, so no adapter could make it say one)."""
  workdir = str(tmp_path_factory.mktemp("shapes_pretrain"))
  config = config_lib.load(
    os.path.join(ROOT, "configs/tiny.py"),
    [
      *SMALL,
      "total_steps=200",
      "checkpoint_every=200",
      "evaluators={}",
      "optim.learning_rate=3e-3",
    ],
  )
  config.model.text.vocab_size = shapes.shapes_vocabulary(32).vocab_size  # tags come last
  trainer.train(config, workdir, devices=jax.devices()[:1])
  return workdir


def test_a_frozen_decoder_with_lora_learns_to_hear_colours(shapes_model, tmp_path):
  """PandaGPT on the shapes world (configs/finetune_modalities.py): the
  pretrained decoder frozen but for LoRA, a new "sound" modality's projection
  trained; the model then names the colour from held-out noise draws."""
  train = sounds.write_conversations(str(tmp_path / "train.jsonl"), 96, draw_seed=0)
  held_out = sounds.write_conversations(str(tmp_path / "validation.jsonl"), 40, draw_seed=1)
  vocab = shapes.shapes_vocabulary(32)
  config = config_lib.load(
    os.path.join(ROOT, "configs/finetune_modalities.py"),
    [
      *SMALL,
      f"init_from={shapes_model}",
      f"data.spm_model_file={vocab.sentencepiece_model_file}",
      f"data.conversations.files={train}",
      f"data.conversations.validation_files={held_out}",
      "images_per_row=0",
      "data.modalities_per_row=12",
      "total_steps=150",
      "eval_every=0",
      "checkpoint_every=150",
      "optim.learning_rate=3e-3",
      "lora.rank=8",
      "lora.alpha=8",
    ],
  )
  config.model.modalities = {"sound": sounds.SOUND_WIDTH}
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir, devices=jax.devices()[:1])

  model = loading.from_pretrained(workdir)
  processor = Processor(
    vocab,
    num_image_tokens=model.config.latent_query_num,
    padding_side="left",
    modalities={"sound": sounds.SOUND_WIDTH},
  )
  with open(held_out) as f:
    rows = [json.loads(line) for line in f]
  prompt = conversation.generation_prompt([], sounds.QUESTION)
  inputs = processor(
    text=[prompt] * len(rows), modalities=[{"sound": [r["sound"]]} for r in rows], padding=True
  )
  out = np.asarray(model.generate(**inputs, max_new_tokens=6))[:, inputs["input_ids"].shape[1] :]
  said = [processor.answer(p, o)["new_ids"] for p, o in zip(inputs["input_ids"], out)]
  said = [processor.decode(ids, skip_special_tokens=True).strip() for ids in said]
  right = [s == r["conversations"][1]["value"] for s, r in zip(said, rows)]
  assert np.mean(right) >= 0.9, list(zip(said, [r["conversations"][1]["value"] for r in rows]))

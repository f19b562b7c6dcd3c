"""`kosmos-jax generate` on a tiny random snapshot: outputs, pictures, and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import kosmos_jax
from kosmos_jax import commands
from kosmos_jax.models import generation
from kosmos_jax.processing import grounding, visualize

NEW = 6


@pytest.fixture(scope="module")
def snapshot(tiny_snapshot):
  return tiny_snapshot


@pytest.fixture(scope="module")
def pair(snapshot):
  snap = str(snapshot / "snap")
  return kosmos_jax.from_pretrained(snap), kosmos_jax.Processor.from_pretrained(snap)


def _generate(capsys, snapshot, *args):
  commands.main(["generate", "--checkpoint", str(snapshot / "snap"), *args])
  return capsys.readouterr().out


def _error(snapshot, *args, checkpoint=None):
  with pytest.raises(SystemExit) as e:
    commands.main(["generate", "--checkpoint", checkpoint or str(snapshot / "snap"), *args])
  return str(e.value)


def test_json_and_text_outputs_match_model_generate(capsys, snapshot, pair):
  model, processor = pair
  images = [str(snapshot / "snowman.jpg"), str(snapshot / "tall.png")]
  out = _generate(
    capsys,
    snapshot,
    "--image",
    images[0],
    "--image",
    images[1],
    "--max-new-tokens",
    str(NEW),
    "--json",
  )
  results = [json.loads(line) for line in out.splitlines()]
  inputs = processor(
    text=["<grounding>An image of"] * 2,
    images=[np.asarray(Image.open(p).convert("RGB")) for p in images],
  )
  want = model.generate(**inputs, max_new_tokens=NEW)
  assert [r["image"] for r in results] == images
  for result, row in zip(results, want.tolist()):
    assert result["token_ids"] == row[: len(result["token_ids"])]
    assert all(t == processor.vocab.pad_id for t in row[len(result["token_ids"]) :])
    text, entities = processor.post_process_generation(
      processor.decode(row, skip_special_tokens=True)
    )
    assert result["text"] == text
    assert result["entities"] == [
      dict(phrase=p, span=list(s), boxes=[list(b) for b in boxes]) for p, s, boxes in entities
    ]
  out = _generate(
    capsys, snapshot, "--image", images[0], "--image", images[1], "--max-new-tokens", str(NEW)
  )
  lines = [line for line in out.splitlines() if not line.startswith("  ")]
  assert lines == [f"{r['image']}: {r['text']}" for r in results]


def test_out_writes_annotated_pictures(capsys, snapshot, tmp_path):
  image = str(snapshot / "snowman.jpg")
  out = _generate(
    capsys,
    snapshot,
    "--image",
    image,
    "--image",
    image,
    "--max-new-tokens",
    str(NEW),
    "--json",
    "--out",
    str(tmp_path / "pics"),
  )
  pictures = [json.loads(line)["picture"] for line in out.splitlines()]
  assert pictures == [str(tmp_path / "pics" / f"snowman-{i}.png") for i in (0, 1)]
  for path in pictures:
    assert Image.open(path).size == (320, 240)


def test_box_builds_the_referring_prompt(capsys, snapshot, pair):
  _, processor = pair
  image = str(snapshot / "snowman.jpg")
  box = (0.25, 0.5, 0.75, 1.0)
  # Two images: the batch shape of the other tests, so nothing recompiles.
  run = lambda *a: [
    json.loads(line)
    for line in _generate(
      capsys,
      snapshot,
      "--image",
      image,
      "--image",
      image,
      "--max-new-tokens",
      str(NEW),
      "--json",
      "--box",
      "0.25,0.5,0.75,1",
      *a,
    ).splitlines()
  ]
  reg, _ = run()
  prompt = processor(text=grounding.reg_prompt(box), images=np.zeros((8, 8, 3), np.uint8))
  width = prompt["input_ids"].shape[1]
  assert reg["token_ids"][:width] == prompt["input_ids"][0].tolist()
  assert reg["entities"][0]["phrase"] == "It"
  assert reg["entities"][0]["boxes"] == [[0.265625, 0.515625, 0.734375, 0.984375]]
  # The same box on the one phrase of a given prompt.
  assert run("--prompt", "<phrase> It</phrase> is")[0] == reg


def test_bad_inputs_are_named(snapshot, tmp_path):
  image = str(snapshot / "snowman.jpg")
  not_image = tmp_path / "notes.jpg"
  not_image.write_text("not a picture")
  assert "notes.jpg: cannot read it as an image" in _error(snapshot, "--image", str(not_image))
  assert "missing.png: cannot read" in _error(snapshot, "--image", str(tmp_path / "missing.png"))
  deep = tmp_path / "deep.png"
  Image.fromarray(np.full((8, 8), 4000, np.uint16)).save(deep)
  assert "deep.png: unsupported mode 'I;16'" in _error(snapshot, "--image", str(deep))
  too_long = "It is a snowman. " * 600  # > 2048 tokens
  assert "(text.max_positions)" in _error(snapshot, "--image", image, "--prompt", too_long)
  assert "with --box: 1 bboxes entries for 0 <phrase>" in _error(
    snapshot, "--image", image, "--box", "0,0,1,1", "--prompt", "An image of"
  )
  # A snapshot without its sentencepiece model.
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors", "processor_config.json"):
    os.symlink(snapshot / "snap" / name, bare / name)
  assert "missing processor file sentencepiece.bpe.model" in _error(
    snapshot, "--image", image, checkpoint=str(bare)
  )


@pytest.mark.parametrize(
  "flag,value",
  [
    ("--box", "0.5,0.5,0.2,0.9"),
    ("--box", "1,2,3"),
    ("--box", "0,0,2,2"),
    ("--box", "a,b,c,d"),
    ("--max-new-tokens", "0"),
    ("--num-beams", "-2"),
    ("--min-new-tokens", "-1"),
    ("--repetition-penalty", "0"),
    ("--repetition-penalty", "x"),
    ("--num-return-sequences", "0"),
  ],
)
def test_bad_options_are_refused(capsys, snapshot, flag, value):
  assert _error(snapshot, "--image", "x.jpg", flag, value) == "2"  # argparse's exit code
  assert f"{flag}: " in capsys.readouterr().err


def test_random_ids_post_process_and_draw_without_raising(pair):
  _, processor = pair
  rng = np.random.default_rng(0)
  for _ in range(200):
    # Markup-heavy id soup: tags and location tokens in random order.
    ids = rng.integers(processor.vocab.vocab_size - 1040, processor.vocab.vocab_size, 30)
    text, entities = processor.post_process_generation(processor.decode(ids))
    assert isinstance(text, str)
    visualize.draw_entities(np.zeros((8, 8, 3), np.uint8), entities)


def test_an_interleaved_prompt_reads_every_image_in_one_text(capsys, snapshot, pair, tmp_path):
  model, processor = pair
  images = [str(snapshot / "snowman.jpg"), str(snapshot / "tall.png")]
  prompt = "<image> A snowman. <image> A"
  out = _generate(
    capsys,
    snapshot,
    *("--image", images[0], "--image", images[1], "--prompt", prompt),
    *("--max-new-tokens", str(NEW), "--json", "--out", str(tmp_path)),
  )
  (result,) = [json.loads(line) for line in out.splitlines()]
  inputs = processor(
    text=[prompt], images=[[np.asarray(Image.open(p).convert("RGB")) for p in images]]
  )
  assert inputs["pixel_values"].shape[:2] == (1, 2)
  want = model.generate(**inputs, max_new_tokens=NEW)[0].tolist()
  assert result["token_ids"] == want[: len(result["token_ids"])]
  assert result["image"] == images[1] and (tmp_path / "tall.png").exists()
  message = _error(snapshot, "--image", images[0], "--prompt", prompt)
  assert "2 <image> placeholders for 1 images" in message


def test_a_prompts_file_is_one_batch_of_mixed_image_counts(capsys, snapshot, pair, tmp_path):
  model, processor = pair
  images = [str(snapshot / "snowman.jpg"), str(snapshot / "tall.png")]
  lines = [
    dict(prompt="<grounding>An image of", images=images[:1]),
    dict(prompt="<image> A snowman. <image> A", images=images),
  ]
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
  out = _generate(
    capsys, snapshot, "--prompts-file", str(path), "--max-new-tokens", str(NEW), "--json"
  )
  results = [json.loads(line) for line in out.splitlines()]
  assert [r["image"] for r in results] == ["line1", "line2"]
  pictures = [[np.asarray(Image.open(p).convert("RGB")) for p in line["images"]] for line in lines]
  inputs = processor(text=[line["prompt"] for line in lines], images=pictures)
  want = model.generate(**inputs, max_new_tokens=NEW).tolist()
  for result, row in zip(results, want):
    assert result["token_ids"] == row[: len(result["token_ids"])]
  path.write_text('{"prompt": "x", "images": ["a.jpg"]}\nnot json\n')
  assert f"{path}:2: not JSON" in _error(snapshot, "--prompts-file", str(path), checkpoint=None)
  message = _error(snapshot, "--prompts-file", str(path), "--image", images[0])
  assert "not both" in message


def test_generation_options_match_generate(capsys, snapshot, pair):
  model, processor = pair
  images = [str(snapshot / "snowman.jpg"), str(snapshot / "tall.png")]
  common = ("--image", images[0], "--image", images[1], "--max-new-tokens", str(NEW), "--json")
  inputs = processor(
    text=["<grounding>An image of"] * 2,
    images=[np.asarray(Image.open(p).convert("RGB")) for p in images],
  )
  width = inputs["input_ids"].shape[1]
  flags = ("--num-beams", "2", "--num-return-sequences", "2", "--min-new-tokens", "2")
  flags += ("--repetition-penalty", "1.3")
  run = lambda *more: [
    json.loads(line) for line in _generate(capsys, snapshot, *common, *flags, *more).splitlines()
  ]
  # The text of the best beam's 3rd and 4th new tokens ends it early.
  best = run()[0]["token_ids"][width + 2 : width + 4]
  stop = "".join(processor.vocab.id_to_token(t) for t in best).replace("\u2581", " ")
  results = run("--stop-string", stop)
  want = generation.generate(
    model,
    **inputs,
    max_new_tokens=NEW,
    num_beams=2,
    num_return_sequences=2,
    min_new_tokens=2,
    repetition_penalty=1.3,
    stop_strings=[stop],
    tokenizer=processor,
  ).tolist()
  assert [(r["image"], r["sequence"]) for r in results] == [
    (images[0], 0),
    (images[0], 1),
    (images[1], 0),
    (images[1], 1),
  ]
  for result, row in zip(results, want):
    assert result["token_ids"] == row[: len(result["token_ids"])]
    assert all(t == processor.vocab.pad_id for t in row[len(result["token_ids"]) :])
  assert len(results[0]["token_ids"]) < width + NEW  # the stop string ended it
  message = _error(snapshot, *common, "--num-beams", "2", "--num-return-sequences", "3")
  assert "num_return_sequences=3 is more than num_beams=2" in message


def test_a_second_process_starts_warm_from_the_compilation_cache(snapshot, tmp_path):
  """The CLI keeps XLA's programs in $XDG_CACHE_HOME/kosmos-jax/xla: a second
  process compiles nothing new (every program is a cache hit)."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  # Every program is kept: a tiny model's compiles are under JAX's 1 s default.
  env.update(
    XDG_CACHE_HOME=str(tmp_path),
    JAX_PLATFORMS="cpu",
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  command = [sys.executable, "-m", "kosmos_jax.commands", "generate"]
  command += ["--checkpoint", str(snapshot / "snap"), "--image", str(snapshot / "snowman.jpg")]
  command += ["--prompt", "<grounding>An image of", "--max-new-tokens", str(NEW)]
  cache = tmp_path / "kosmos-jax" / "xla"
  entries = []
  for _ in range(2):
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    entries.append(sorted(p.name for p in cache.iterdir()))
  assert entries[0] and entries[1] == entries[0]

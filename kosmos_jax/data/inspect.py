"""What a seqio task or mixture feeds the model, decoded for people to read.

`kosmos-jax data inspect NAME` prints `describe(e)` for each of `examples(NAME)`:
the token sequence as text with its tags (image slots collapsed), the part that
carries loss, the grounded phrases with their boxes, and optionally the
pictures with those boxes drawn. Examples are those a task yields before
packing, from the start of its source (unshuffled); a mixture samples its
tasks by their rates.
"""

import dataclasses
import os

import numpy as np
import seqio
import tensorflow as tf

# Registers the built-in tasks and mixtures.
from kosmos_jax.processing import grounding, visualize
from kosmos_jax.processing import images as images_lib

# KOSMOS-2's training length; enough that `trim` leaves examples whole.
DEFAULT_LENGTHS = {"targets": 2048, "images": 16}


@dataclasses.dataclass
class Example:
  """One preprocessed example, decoded."""

  task: str
  key: str
  num_tokens: int
  text: str  # every token, tags included; image slots as "[N slots]"
  loss_text: str  # the tokens with loss, runs separated by " ... "
  num_loss_tokens: int
  entities: list[grounding.Entity]
  images: list[np.ndarray]  # uint8 [H, W, 3]
  pictures: list[str]  # files written, with `out`


def _tasks(name: str) -> list[tuple[seqio.Task, float]]:
  """The tasks of `name` with their mixing rates."""
  if name in seqio.MixtureRegistry.names():
    mixture = seqio.MixtureRegistry.get(name)
    return [(task, mixture.get_rate(task)) for task in mixture.tasks]
  if name in seqio.TaskRegistry.names():
    return [(seqio.TaskRegistry.get(name), 1.0)]
  names = ", ".join(sorted({*seqio.MixtureRegistry.names(), *seqio.TaskRegistry.names()}))
  raise ValueError(f"{name!r} is not a registered seqio task or mixture; registered: {names}")


def splits(name: str) -> list[str]:
  """The splits of a task, or those of any task of a mixture; a ValueError
  names the registered tasks and mixtures when `name` is none of them."""
  return sorted({split for task, _ in _tasks(name) for split in task.splits})


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
  """`[start, end)` of each run of equal values."""
  bounds = [0, *(np.flatnonzero(np.diff(values)) + 1), len(values)]
  return list(zip(bounds[:-1], bounds[1:]))


def _render(vocab, ids: np.ndarray, image_mask: np.ndarray) -> str:
  # Slot ids are placeholders for image embeddings; as text they would read as
  # arbitrary sentencepiece pieces.
  return "".join(
    f"[{end - start} slots]"
    if image_mask[start]
    else vocab.detokenize(ids[start:end], skip_special_tokens=False)
    for start, end in _runs(image_mask)
  )


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
  """CLIP-normalised `[3, S, S]` pixel values back to a uint8 `[S, S, 3]` picture."""
  rgb = pixels.transpose(1, 2, 0) * images_lib.CLIP_STD + images_lib.CLIP_MEAN
  return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def _decode(x: dict, vocab) -> Example:
  ids, mask, weights = x["targets"], x["image_mask"], x["loss_weights"]
  text = _render(vocab, ids, mask)
  loss_runs = [(s, e) for s, e in _runs(weights > 0) if weights[s] > 0]
  return Example(
    task=x["task"].decode(),
    key=x.get("key", b"").decode("utf-8", "replace"),
    num_tokens=len(ids),
    text=text,
    loss_text=" ... ".join(_render(vocab, ids[s:e], mask[s:e]) for s, e in loss_runs),
    num_loss_tokens=int(np.sum(weights > 0)),
    entities=grounding.clean_text_and_extract_entities(text, vocab.num_patches_per_side)[1],
    images=[_to_uint8(p) for p in x["images"]],
    pictures=[],
  )


def _dataset(name: str, split: str, lengths: dict[str, int], seed: int) -> tf.data.Dataset:
  """The examples of `name` with a `task` feature. A mixture is sampled here
  rather than by seqio, which would drop every feature but the declared ones
  (the key) and not say which task an example comes from."""
  chosen = [(t, r) for t, r in _tasks(name) if split in t.splits]
  datasets = [
    task.get_dataset(lengths, split=split, shuffle=False, seed=seed, num_epochs=1).map(
      lambda x, task=task.name: dict(x, task=task)
    )
    for task, _ in chosen
  ]
  if len(datasets) == 1:
    return datasets[0]
  return tf.data.Dataset.sample_from_datasets(datasets, [float(r) for _, r in chosen], seed=seed)


def _draw(example: Example, index: int, out: str) -> None:
  for j, picture in enumerate(example.images):
    path = os.path.join(out, f"{index:02d}_{example.task}_{j}.png")
    visualize.draw_entities(picture, example.entities).save(path)
    example.pictures.append(path)


def examples(
  name: str,
  split: str = "train",
  num: int = 3,
  *,
  lengths: dict[str, int] | None = None,
  seed: int = 0,
  out: str | None = None,
) -> list[Example]:
  """The first `num` examples of task or mixture `name` (fewer if the split
  is shorter), trimmed to `lengths` (default `DEFAULT_LENGTHS`). With `out`,
  each picture is written there as PNG with every entity's boxes drawn."""
  if num < 1:
    raise ValueError(f"num must be at least 1, got {num}")
  known = splits(name)
  if split not in known:
    raise ValueError(f"{split!r} is not a split of {name}; splits: {', '.join(known)}")
  vocab = seqio.get_mixture_or_task(name).output_features["targets"].vocabulary
  ds = _dataset(name, split, lengths or DEFAULT_LENGTHS, seed).take(num)
  result = [_decode(x, vocab) for x in ds.as_numpy_iterator()]
  if out:
    os.makedirs(out, exist_ok=True)
    for index, example in enumerate(result):
      _draw(example, index, out)
  return result


def describe(example: Example, index: int) -> str:
  """`example` as the lines `kosmos-jax data inspect` prints."""
  lines = [
    f"[{index}] {example.task} key={example.key or '-'}: {example.num_tokens} tokens, "
    f"{example.num_loss_tokens} with loss, {len(example.images)} image(s)",
    f"  text: {example.text}",
    f"  loss: {example.loss_text}",
  ]
  for phrase, _, boxes in example.entities:
    coords = " ".join("(" + ", ".join(f"{v:.3f}" for v in box) + ")" for box in boxes)
    lines.append(f"  entity {phrase!r}: {coords}")
  lines += [f"  -> {path}" for path in example.pictures]
  return "\n".join(lines)

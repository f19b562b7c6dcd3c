"""KOSMOS-1's zero-shot and in-context naming on single-shape pictures (`make demo`).

Zero-shot: the picture, then `an image of` (the shapes captions' opening
words), and each of the 12 colour-kind names ("a red circle") scored by the
log-likelihood of its tokens (models/scoring.py: picture and prompt once, the
names against their KV cache); the best is the answer. No `</s>` ends a
name: in the captions the name goes on (" at the top left."), and every name
is three words of one token each, so the sums compare like with like.

Two-shot: `<image> {caption} <image> {caption} <image> an image of`, the
demonstrations two other held-out single-shape pictures with their captions,
of two classes other than the query's (so the answer cannot be copied from
them); the greedy continuation's first colour-kind name is the answer.

Pictures are `shapes.make_example("test", i, size)` for i from `FIRST_INDEX`
on, single-shape ones only: the test split's seed, beyond the indices the
demo's held-out REC split and the exported benchmark files use.
"""

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from kosmos_jax.data import shapes
from kosmos_jax.eval import rec, shapes_captions
from kosmos_jax.models import scoring
from kosmos_jax.processing import processor as processor_lib

PROMPT = "an image of"
NAMES = tuple(f"a {c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES)
FIRST_INDEX = 100_000
SHOTS = 2


def single_shape_pictures(num: int, image_size: int) -> list[tuple[np.ndarray, str, str]]:
  """`num` (picture, name, caption) of held-out pictures with one shape."""
  out, index = [], FIRST_INDEX
  while len(out) < num:
    example = shapes.make_example("test", index, image_size)
    index += 1
    if len(example["objects"]["expression"]) == 1:
      picture = np.asarray(Image.open(io.BytesIO(example["image"])).convert("RGB"))
      name = "a " + example["objects"]["expression"][0].removeprefix("the ")
      out.append((picture, name, example["caption"]))
  return out


def zero_shot(model, processor: processor_lib.Processor, pictures, *, batch_size: int) -> dict:
  """top-1 over `NAMES`, and how often the colour and the kind alone are right."""
  head = processor.vocab.encode(PROMPT)
  candidates = [processor.vocab.encode(f"{PROMPT} {name}")[len(head) :] for name in NAMES]
  answers = []
  for start in range(0, len(pictures), batch_size):
    batch = pictures[start : start + batch_size]
    inputs = processor(text=[PROMPT] * len(batch), images=[p for p, _, _ in batch])
    scores = scoring.score_continuations(
      model,
      inputs["input_ids"],
      inputs["pixel_values"],
      inputs["attention_mask"],
      inputs["image_embeds_position_mask"],
      candidates,
    )
    answers += [NAMES[int(i)] for i in np.argmax(scores, axis=1)]
  return _scores("zero_shot", answers, [name for _, name, _ in pictures])


def two_shot(
  model, processor: processor_lib.Processor, pictures, *, batch_size: int, seed: int = 0
) -> tuple[dict, list[dict]]:
  """The two-shot score and each query's prompt, demonstrations and answer."""
  rng = np.random.default_rng(seed)
  prompts, images, queries = [], [], []
  for i, (picture, name, _) in enumerate(pictures):
    others = [j for j, (_, n, _) in enumerate(pictures) if n != name and j != i]
    demos = []
    for j in rng.permutation(others):
      if all(pictures[j][1] != pictures[d][1] for d in demos):
        demos.append(int(j))
      if len(demos) == SHOTS:
        break
    text, imgs = processor_lib.few_shot_prompt(
      [(pictures[d][0], pictures[d][2]) for d in demos], picture, PROMPT
    )
    prompts.append(text)
    images.append(imgs)
    queries.append(dict(prompt=text, demonstrations=demos, truth=name))
  texts = rec.greedy_decode(
    model, processor, prompts, images, batch_size=batch_size, max_new_tokens=8
  )
  answers = []
  for query, text in zip(queries, texts):
    named = shapes_captions.shape_named(text.rsplit(PROMPT, 1)[-1])
    answers.append(f"a {named[0]} {named[1]}" if named else None)
    query.update(continuation=text.rsplit(PROMPT, 1)[-1].strip(), answer=answers[-1])
  return _scores("two_shot", answers, [q["truth"] for q in queries]), queries


def _scores(prefix: str, answers: Sequence[str | None], truth: Sequence[str]) -> dict:
  def part(name, k):
    return name.split()[k] if name else None

  n = max(len(truth), 1)
  return {
    f"{prefix}_top1": sum(a == t for a, t in zip(answers, truth)) / n,
    f"{prefix}_colour": sum(part(a, 1) == part(t, 1) for a, t in zip(answers, truth)) / n,
    f"{prefix}_kind": sum(part(a, 2) == part(t, 2) for a, t in zip(answers, truth)) / n,
    f"{prefix}_count": len(truth),
  }

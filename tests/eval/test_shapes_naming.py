"""KOSMOS-1's naming on single-shape pictures: the pictures, the two-shot prompts, the scores."""

import numpy as np

from kosmos_jax.eval import rec, shapes_naming


def test_single_shape_pictures_are_held_out_and_named():
  pictures = shapes_naming.single_shape_pictures(6, 32)
  assert len(pictures) == 6
  for picture, name, caption in pictures:
    assert picture.shape == (32, 32, 3) and picture.dtype == np.uint8
    assert name in shapes_naming.NAMES and caption.startswith(f"an image of {name} ")


def test_two_shot_prompts_show_other_classes_and_parse_the_answer(monkeypatch):
  pictures = shapes_naming.single_shape_pictures(12, 32)
  seen = {}

  def fake_decode(model, processor, prompts, images, *, batch_size, max_new_tokens):
    seen.update(prompts=prompts, images=images)
    # Right for the first query, a wrong colour for the second, no shape for the rest.
    answers = [pictures[0][1], "a purple circle"] + ["nothing"] * (len(prompts) - 2)
    return [f"{p} {a} at the top." for p, a in zip(prompts, answers)]

  monkeypatch.setattr(rec, "greedy_decode", fake_decode)
  scores, queries = shapes_naming.two_shot(None, None, pictures, batch_size=4)
  for i, query in enumerate(queries):
    demos = query["demonstrations"]
    assert len(demos) == 2 and i not in demos
    names = {pictures[d][1] for d in demos}
    assert len(names) == 2 and pictures[i][1] not in names
    assert query["prompt"].count("<image>") == 3 and query["prompt"].endswith("an image of")
    assert len(seen["images"][i]) == 3 and seen["images"][i][2] is pictures[i][0]
  assert queries[0]["answer"] == pictures[0][1] and queries[2]["answer"] is None
  assert scores["two_shot_top1"] == 1 / 12 and scores["two_shot_count"] == 12

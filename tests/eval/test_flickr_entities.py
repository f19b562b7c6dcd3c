"""Flickr30k Entities phrase grounding on a hand-made split in the real file formats.

Pictures 100 (320 x 320: a 32-grid cell is 10 px) and 200 (640 x 320: 20 x 10
px). Every expected number below is worked out by hand in the comments.
"""

import json
import os

import pytest

from kosmos_jax import errors
from kosmos_jax.eval import common
from kosmos_jax.eval import flickr_entities as fe

SENTENCES = {
  "100": [
    "[/EN#1/people A man] pets [/EN#2/animals a dog] near [/EN#3/other a tree] .",
    # The same text twice: the scorer takes the first chain's boxes for both.
    "[/EN#4/people a man] greets [/EN#5/people a man] .",
    "[/EN#6/people/clothing A uniformed guard] stands by [/EN#7/other a wall] .",
  ],
  "200": [
    "[/EN#9/animals Two cats] sleep .",
    "[/EN#10/other A ball] and [/EN#11/other a toy] .",
  ],
  "400": ["[/EN#1/people A boy] ."],
}
# chain -> boxes (pixels); chain 3 and 11 have none.
BOXES = {
  "100": {
    "1": [(0, 0, 100, 100), (200, 200, 300, 300)],
    "2": [(100, 0, 200, 10)],
    "4": [(0, 160, 160, 320)],
    "5": [(160, 160, 320, 320)],
    "6": [(10, 10, 50, 50)],
    "7": [(0, 300, 320, 320)],
  },
  "200": {"9": [(40, 10, 100, 50)], "10": [(0, 0, 640, 320)]},
  "400": {"1": [(0, 0, 10, 10)]},
}
SIZES = {"100": (320, 320), "200": (640, 320), "300": (320, 320), "400": (320, 320)}


def _xml(image_id: str) -> str:
  width, height = SIZES[image_id]
  objects = [
    f"<object><name>{chain}</name><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
    f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
    for chain, boxes in BOXES[image_id].items()
    for x1, y1, x2, y2 in boxes
  ]
  objects.append("<object><name>3</name><nobndbox>1</nobndbox><scene>0</scene></object>")
  return (
    f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
    f"<height>{height}</height><depth>3</depth></size>{''.join(objects)}</annotation>"
  )


def _caption(image_id, sentence_id, caption, phrases, **extra):
  """An MDETR `images` entry; `phrases` are looked up in `caption`."""
  width, height = SIZES[image_id]
  spans = [[[caption.index(p), caption.index(p) + len(p)]] for p in phrases]
  return {
    "file_name": f"{image_id}.jpg",
    "height": str(height),
    "width": str(width),
    "id": 0,
    "caption": caption,
    "dataset_name": "flickr",
    "tokens_negative": [[0, len(caption)]],
    "sentence_id": sentence_id,
    "original_img_id": int(image_id),
    "tokens_positive_eval": spans,
    **extra,
  }


CAPTIONS = [
  _caption("100", 0, "A man pets a dog near a tree .", ["A man", "a dog"]),
  _caption("100", 1, "a man greets a man .", []) | {"tokens_positive_eval": [[[0, 5]], [[13, 18]]]},
  _caption("100", 2, "A uniformed guard stands by a wall .", ["A uniformed guard", "a wall"]),
  _caption("300", 0, "A car .", ["A car"]),  # no Annotations/300.xml: skipped
  _caption("200", 0, "Two cats sleep .", ["Two cats"]),
  # "a toy" has no box: that phrase is skipped, "A ball" is kept.
  _caption("200", 1, "A ball and a toy .", ["A ball", "a toy"]),
  _caption("200", 0, "Two cats sleep .", []) | {"tokens_positive_eval": [[5]]},  # bad row
  _caption("400", 0, "A boy .", ["A boy"]),  # not in val.txt
]


def write_split(root, captions=CAPTIONS):
  """The Flickr30k Entities folder and the MDETR file; returns load's arguments."""
  entities = root / "flickr30k_entities"
  (entities / "Sentences").mkdir(parents=True)
  (entities / "Annotations").mkdir()
  (entities / "val.txt").write_text("100\n200\n300\n")
  for image_id, lines in SENTENCES.items():
    (entities / "Sentences" / f"{image_id}.txt").write_text("\n".join(lines) + "\n")
    (entities / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id))
  annotations = root / "final_flickr_separateGT_val.json"
  annotations.write_text(json.dumps({"images": captions, "annotations": [], "categories": []}))
  return dict(
    annotations=str(annotations), flickr_entities_dir=str(entities), image_dir=str(root / "imgs")
  )


# Continuations per query, with what each scores.
CONTINUATIONS = [
  # q0 "A man", chain 1: cells (20, 20)-(29, 29) -> centres (205, 205, 295, 295),
  # IoU 0.81 with the chain's second box (ANY-BOX), 0 with its first.
  "<object><patch_index_0660><patch_index_0957></object> pets a dog",
  # q1 "a dog": cells (10, 0)-(14, 0) share a row -> full cells (100, 0, 150, 10);
  # IoU with (100, 0, 200, 10) is exactly 0.5: a hit. (Centres would give no area.)
  "<object><patch_index_0010><patch_index_0014></object>",
  # q2 "a man" (chain 4 (0, 160, 160, 320)): (0, 16)-(15, 31) -> (5, 165, 155, 315), IoU 0.88.
  "<object><patch_index_0512><patch_index_1007></object>",
  # q3 the second "a man" is scored against chain 4 too: chain 5's box misses.
  "<object><patch_index_0528><patch_index_1023></object>",
  # q4 "A uniformed guard" (people, clothing; (10, 10, 50, 50)): a wrong box first,
  # then (1, 1)-(4, 4) -> (15, 15, 45, 45), IoU 0.5625: R@1 misses, R@5 hits.
  "<object><patch_index_0660><patch_index_0957></delimiter_of_multi_objects/>"
  "<patch_index_0033><patch_index_0132></object>",
  # q5 "a wall": another phrase's box, none for "a wall": a miss.
  "<phrase>the wall</phrase><object><patch_index_0960><patch_index_1023></object>",
  # q6 "Two cats" on 640 x 320: (2, 1)-(4, 4) -> (50, 15, 90, 45), IoU 0.5 with
  # (40, 10, 100, 50); width and height swapped would give 0.03.
  "<object><patch_index_0034><patch_index_0132></object>",
  # q7 "A ball" ((0, 0, 640, 320)): three one-cell boxes, the phrase generated again
  # (with a space: stripped), two more, a reversed box (no area), then the 7th,
  # (0, 0)-(31, 31) -> (10, 5, 630, 315), IoU 0.94: R@5 misses, R@10 hits.
  "<object><patch_index_0000><patch_index_0000></delimiter_of_multi_objects/>"
  "<patch_index_0001><patch_index_0001></delimiter_of_multi_objects/>"
  "<patch_index_0002><patch_index_0002></object> and<phrase> A ball</phrase><object>"
  "<patch_index_0003><patch_index_0003></delimiter_of_multi_objects/>"
  "<patch_index_0004><patch_index_0004></delimiter_of_multi_objects/>"
  "<patch_index_1023><patch_index_0000></delimiter_of_multi_objects/>"
  "<patch_index_0000><patch_index_1023></object>",
]


@pytest.fixture
def dataset(tmp_path):
  return fe.load("val", **write_split(tmp_path))


def _predictions(dataset, skip=()):
  return {
    i: fe.prediction(q, c)
    for i, (q, c) in enumerate(zip(dataset.queries, CONTINUATIONS))
    if i not in skip
  }


def test_load_queries_prompts_and_truth(dataset, tmp_path):
  prompts = [q.prompt for q in dataset.queries]
  assert prompts == [
    "<grounding> <phrase>A man</phrase>",
    "<grounding>A man pets  <phrase>a dog</phrase>",
    "<grounding> <phrase>a man</phrase>",
    "<grounding>a man greets  <phrase>a man</phrase>",
    "<grounding> <phrase>A uniformed guard</phrase>",
    "<grounding>A uniformed guard stands by  <phrase>a wall</phrase>",
    "<grounding> <phrase>Two cats</phrase>",
    "<grounding> <phrase>A ball</phrase>",
  ]
  assert [q.key for q in dataset.queries] == [str(i) for i in range(8)]
  assert dataset.queries[6].image == os.path.join(str(tmp_path / "imgs"), "200.jpg")
  truth = dataset.truth.phrases
  assert truth[0].boxes == ((0, 0, 100, 100), (200, 200, 300, 300))
  assert truth[3].boxes == ((0, 160, 160, 320),)  # the first "a man"'s chain
  assert truth[4].types == ("people", "clothing")
  assert (truth[6].width, truth[6].height) == (640.0, 320.0)
  assert dataset.decoding == common.Decoding(num_beams=1, max_new_tokens=64, no_repeat_ngram_size=3)
  assert dict(dataset.skipped) == {
    "Annotations file missing": 1,
    "phrase not among the sentence's phrases with boxes": 1,
    "caption row does not parse": 1,
    "image not in val.txt": 1,
  }


def test_score(dataset):
  metrics = fe.score(dataset, _predictions(dataset))
  assert metrics == {
    # R@1 hits q0, q1, q2, q6; R@5 adds q4; R@10 and all add q7.
    "R@1": 4 / 8,
    "R@5": 5 / 8,
    "R@10": 6 / 8,
    "upper_bound": 6 / 8,
    # people: q0, q2, q3, q4 (hits q0, q2); animals q1, q6; clothing q4; other q5, q7.
    "R@1/animals": 1.0,
    "R@1/clothing": 0.0,
    "R@1/other": 0.0,
    "R@1/people": 0.5,
    "count": 8.0,
    "skipped/Annotations file missing": 1.0,
    "skipped/caption row does not parse": 1.0,
    "skipped/image not in val.txt": 1.0,
    "skipped/phrase not among the sentence's phrases with boxes": 1.0,
  }


def test_unparsed_answers_are_misses_in_the_denominator(dataset):
  predictions = {i: fe.prediction(q, " a dog") for i, q in enumerate(dataset.queries)}
  metrics = fe.score(dataset, predictions)
  assert (metrics["R@1"], metrics["upper_bound"], metrics["count"]) == (0.0, 0.0, 8.0)


def test_skipped_queries_leave_the_denominator(dataset):
  # q5 (a miss) and q6 (a hit) not answered: R@1 3 of 6.
  metrics = fe.score(dataset, _predictions(dataset, skip=(5, 6)))
  assert (metrics["R@1"], metrics["count"]) == (3 / 6, 6.0)
  assert metrics["skipped/no prediction (input skipped)"] == 2.0
  assert metrics["R@1/animals"] == 1.0  # q1 only


def test_sums_add_over_hosts(dataset):
  predictions = _predictions(dataset)
  halves = [{i: t for i, t in predictions.items() if i % 2 == r} for r in (0, 1)]
  a, b = (fe.sums(dataset, h) for h in halves)
  assert a.keys() == b.keys()
  total = {k: a[k] + b[k] for k in a}
  assert fe.from_sums(dataset, total) == fe.score(dataset, predictions)


def test_prediction_files_round_trip(dataset, tmp_path):
  predictions = _predictions(dataset, skip=(3,))
  path = str(tmp_path / "predictions.txt")
  fe.write_predictions(path, dataset, predictions)
  lines = open(path).read().splitlines()
  assert lines[0] == f"H-0\t0.0\t<grounding> <phrase>A man</phrase>{CONTINUATIONS[0]}"
  assert lines[3] == "H-3\tnan\t"
  read = fe.read_predictions(path, dataset)
  assert read == predictions
  metrics = fe.score(dataset, read)
  assert (metrics["R@1"], metrics["count"]) == (4 / 7, 7.0)
  assert metrics["skipped/no prediction (input skipped)"] == 1.0


def test_short_predictions_file_is_refused(dataset, tmp_path):
  path = tmp_path / "short.txt"
  path.write_text("S-0\tx\nH-0\t0.0\ta\nD-0\t0.0\ta\nH-1\t-0.5\tb\n")
  with pytest.raises(errors.UserError, match="2 H-lines for 8 queries"):
    fe.read_predictions(str(path), dataset)


def test_strict_raises_naming_the_record(tmp_path):
  with pytest.raises(errors.UserError, match=r"images\[3\] \(image 300, sentence 0\): Annot"):
    fe.load("val", strict=True, **write_split(tmp_path))


def test_num_limits_the_captions(tmp_path):
  dataset = fe.load("val", 2, **write_split(tmp_path))
  assert len(dataset.queries) == 4 and not dataset.skipped


def test_bad_files(tmp_path):
  args = write_split(tmp_path)
  sentences = tmp_path / "flickr30k_entities" / "Sentences" / "200.txt"
  sentences.write_text("[/EN#9/animals Two cats sleep .\n")  # never closed
  xml = tmp_path / "flickr30k_entities" / "Annotations" / "100.xml"
  xml.write_text(_xml("100").replace("<xmin>0</xmin>", "<xmin>zero</xmin>", 1))
  dataset = fe.load("val", **args)
  assert dataset.queries == []
  assert dataset.skipped["Annotations file does not parse"] == 3
  assert dataset.skipped["Sentences file does not parse"] == 2


def test_refused_inputs(tmp_path):
  args = write_split(tmp_path)
  with pytest.raises(errors.UserError, match="final_flickr_separateGT_val.json: the file name"):
    fe.load("test", **args)
  with pytest.raises(errors.UserError, match="split 'train'"):
    fe.load("train", **args)
  with open(args["annotations"], "w") as f:
    f.write("[1, 2]")
  with pytest.raises(errors.UserError, match="separateGT_val.json: not an MDETR annotation"):
    fe.load("val", **args)
  with open(args["annotations"], "w") as f:
    json.dump({"images": [dict(CAPTIONS[0], dataset_name="refcoco")]}, f)
  with pytest.raises(errors.UserError, match=r"images\[0\]: dataset_name 'refcoco'"):
    fe.load("val", **args)
  os.remove(os.path.join(args["flickr_entities_dir"], "val.txt"))
  with pytest.raises(errors.UserError, match="val.txt: missing"):
    fe.load("val", **args)


def test_parse_sentence():
  assert fe.parse_sentence("[/EN#6/people/clothing A guard] in [/EN#0/notvisual it] .") == [
    ("A guard", "6", ("people", "clothing")),
    ("it", "0", ("notvisual",)),
  ]
  with pytest.raises(ValueError):
    fe.parse_sentence("[oops a] b")


def test_nothing_answered(dataset):
  metrics = fe.score(dataset, {})
  assert {k: v for k, v in metrics.items() if not k.startswith("skipped/")} == {"count": 0.0}
  assert metrics["skipped/no prediction (input skipped)"] == 8.0

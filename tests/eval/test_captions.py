"""Karpathy-split captioning: loading, results files and COCOEvalCap's scores."""

import json
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from kosmos_jax import errors
from kosmos_jax.eval import captions, common

CAPTIONS = {  # cocoid -> the image's reference captions
  101: ["A man rides a brown horse.", "A person riding a horse on a beach.", "Man on horseback."],
  102: ["Two dogs play in the snow.", "A pair of dogs running in snow!", "Dogs playing outside."],
  103: ["A plate of food with broccoli.", "A plate of food on a table.", "Some food, on a plate."],
}
HYPOTHESES = {0: "a man riding a horse", 1: "two dogs playing in the snow", 2: "a cat"}


def _record(cocoid, split, raws, filepath="val2014"):
  """A `dataset_coco.json` image record (Karpathy's fields)."""
  sentences = [
    {"tokens": raw.lower().split(), "raw": raw, "imgid": cocoid, "sentid": 10 * cocoid + n}
    for n, raw in enumerate(raws)
  ]
  return {
    "filepath": filepath,
    "sentids": [s["sentid"] for s in sentences],
    "filename": f"COCO_{filepath}_{cocoid:012d}.jpg",
    "imgid": cocoid - 100,
    "split": split,
    "sentences": sentences,
    "cocoid": cocoid,
  }


def _write(tmp_path, records, dataset="coco"):
  path = tmp_path / f"dataset_{dataset}.json"
  path.write_text(json.dumps({"images": records, "dataset": dataset}))
  return str(path)


@pytest.fixture
def coco(tmp_path):
  records = [_record(k, "test", v) for k, v in CAPTIONS.items()]
  records += [_record(201, "val", ["A cat."]), _record(301, "restval", ["A bus."], "train2014")]
  path = _write(tmp_path, records)
  return captions.load("test", annotations=path, image_dir="/coco", task="coco_caption")


def test_load_coco(coco, tmp_path):
  assert [q.key for q in coco.queries] == ["101", "102", "103"]
  assert coco.queries[0].image == "/coco/val2014/COCO_val2014_000000000101.jpg"
  assert {q.prompt for q in coco.queries} == {"An image of"}
  assert coco.decoding.num_beams == 5 and coco.decoding.max_new_tokens == 30
  assert coco.truth.references[1] == CAPTIONS[102]
  train = captions.load("train", annotations=coco.source, image_dir="/coco")
  assert [q.key for q in train.queries] == ["301"]  # restval is Karpathy train


def test_load_flickr(tmp_path):
  record = {
    "filename": "1000092795.jpg",
    "imgid": 0,
    "split": "test",
    "sentids": [0],
    "sentences": [{"tokens": ["two", "men"], "raw": "Two men.", "imgid": 0, "sentid": 0}],
  }
  path = _write(tmp_path, [record], "flickr30k")
  data = captions.load(annotations=path, image_dir="/f30k", task="flickr30k_caption")
  assert data.task == "flickr30k_caption" and data.split == "test"
  assert [(q.key, q.image) for q in data.queries] == [("1000092795", "/f30k/1000092795.jpg")]
  with pytest.raises(errors.UserError, match="the flickr30k file, not coco's"):
    captions.load(annotations=path, image_dir="/coco", task="coco_caption")


def test_prediction_drops_markup():
  q = common.Query("1", "x.jpg", captions.PROMPT)
  text = " a<phrase> snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming"
  assert captions.prediction(q, text + "\n") == "a snowman warming"


def _direct(references, hypotheses, tokenize=None):
  """pycocoevalcap's scorers called as COCOEvalCap calls them."""
  gts = {k: [{"caption": c} for c in v] for k, v in references.items()}
  res = {k: [{"caption": v}] for k, v in hypotheses.items()}
  if tokenize is None:
    gts, res = PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res)
  else:
    gts = {k: [tokenize(c["caption"]) for c in v] for k, v in gts.items()}
    res = {k: [tokenize(c["caption"]) for c in v] for k, v in res.items()}
  out = {f"BLEU-{n}": 100 * b for n, b in enumerate(Bleu(4).compute_score(gts, res, 0)[0], 1)}
  if tokenize is None:
    out["METEOR"] = 100 * Meteor().compute_score(gts, res)[0]
  out["ROUGE-L"] = 100 * Rouge().compute_score(gts, res)[0]
  out["CIDEr"] = 100 * Cider().compute_score(gts, res)[0]
  return out


def test_scores_are_pycocoevalcaps(coco):
  metrics = captions.score(coco, HYPOTHESES)
  references = dict(zip(CAPTIONS, CAPTIONS.values()))
  expected = _direct(references, {k: HYPOTHESES[i] for i, k in enumerate(CAPTIONS)})
  assert metrics == pytest.approx(expected | {"count": 3.0})
  assert 0 < metrics["CIDEr"] and 0 < metrics["METEOR"] < 100


def test_without_java_the_other_scores_remain(coco, monkeypatch):
  def no_java(*args, **kwargs):
    raise AssertionError("java was called")

  monkeypatch.setattr(shutil, "which", lambda name: None)
  monkeypatch.setattr(PTBTokenizer, "tokenize", no_java)
  monkeypatch.setattr(Meteor, "__init__", no_java)
  metrics = captions.score(coco, HYPOTHESES)
  assert "METEOR" not in metrics and metrics[captions.NO_JAVA] == 1.0
  references = dict(zip(CAPTIONS, CAPTIONS.values()))
  hypotheses = {k: HYPOTHESES[i] for i, k in enumerate(CAPTIONS)}
  expected = _direct(references, hypotheses, captions.simple_tokenize)
  assert metrics == pytest.approx(expected | {"count": 3.0, captions.NO_JAVA: 1.0})
  # CIDEr's document frequencies are the scored set's: scored alone, an image's
  # n-grams are in every "document", and even one of its references scores 0.
  alone = captions.caption_metrics({0: CAPTIONS[101]}, {0: CAPTIONS[101][0]})
  assert alone["CIDEr"] == 0 and alone["BLEU-4"] == pytest.approx(100)


def test_simple_tokenize_follows_ptb_on_captions():
  texts = [
    "A man's dog isn't running.",
    "Two people -- one in a T-shirt -- stand (near) a [sign].",
    "He said \"hello\" and 'bye' to U.S. officials at 10:30 a.m.",
    "It costs $5.50 & more; 1,000 items!",
    "Can't won't cannot gonna I'm we're they've she'll he'd",
    "a kitchen w/ a stove and/or 50% #1 dogs' toys ...",
    "Mr. Smith's car, etc.",
    "A close-up of a pizza with pepperoni and cheese .",
    "An old 1950's car; a '90s van: black-and-white photo?",
  ]
  ptb = PTBTokenizer().tokenize({n: [{"caption": t}] for n, t in enumerate(texts)})
  assert [captions.simple_tokenize(t) for t in texts] == [ptb[n][0] for n in range(len(texts))]


def test_results_files(coco, tmp_path):
  path = tmp_path / "captions.json"
  captions.write_predictions(str(path), coco, {0: "a horse", 2: "food"})
  rows = json.loads(path.read_text())
  assert rows == [{"image_id": 101, "caption": "a horse"}, {"image_id": 103, "caption": "food"}]
  with pytest.raises(errors.UserError, match="results for 2 of the 3 queries"):
    captions.read_predictions(str(path), coco)
  assert captions.read_predictions(str(path), coco, partial=True) == {0: "a horse", 2: "food"}
  path.write_text(json.dumps(rows + [{"image_id": 201, "caption": "a cat"}]))  # a val image
  with pytest.raises(
    errors.UserError, match="captions.json: row 2: image_id 201 is not in the test"
  ):
    captions.read_predictions(str(path), coco)
  path.write_text(json.dumps(rows + rows[:1]))
  with pytest.raises(errors.UserError, match="image_id 101 appears twice"):
    captions.read_predictions(str(path), coco, partial=True)


def test_bad_records_are_counted_or_raised(tmp_path):
  records = [_record(101, "test", CAPTIONS[101]), _record(102, "test", [])]
  records += [{"filename": "x.jpg", "split": "test", "sentences": []}]  # no cocoid
  records += [_record(101, "test", ["again"])]
  path = _write(tmp_path, records)
  data = captions.load(annotations=path, image_dir="/coco")
  assert [q.key for q in data.queries] == ["101"]
  assert dict(data.skipped) == {
    "no reference captions": 1,
    "record does not parse": 1,
    "image repeated": 1,
  }
  metrics = captions.score(data, {})
  assert metrics["count"] == 0 and metrics["skipped/image repeated"] == 1
  with pytest.raises(errors.UserError, match=r"test image 1 \(COCO_val2014_000000000102.jpg\)"):
    captions.load(annotations=path, image_dir="/coco", strict=True)
  (tmp_path / "bad.json").write_text("[]")
  with pytest.raises(errors.UserError, match="bad.json: not a Karpathy split file"):
    captions.load(annotations=str(tmp_path / "bad.json"), image_dir="/coco")


# --- Few-shot ----------------------------------------------------------------------

TRAIN = {  # cocoid -> captions of Karpathy train (odd ids) and restval (even ids) images
  301: ["  A red bus. ", "A bus."],  # the first reference, stripped, is the demonstration's
  302: ["A boat on a lake."],
  303: ["A kite in the sky.", "Kites."],
  304: ["Two zebras.", "Zebras grazing."],
  305: ["A train at a station."],
}
# What the demonstrations may be: (image, `An image of {first reference}`), the
# reference's first letter lower-cased ("An image of a red bus.").
TRAIN_PAIRS = {
  (
    f"/coco/train2014/COCO_train2014_{k:012d}.jpg",
    f"An image of {v[0].strip()[0].lower()}{v[0].strip()[1:]}",
  )
  for k, v in TRAIN.items()
}


@pytest.fixture
def few_shot_file(tmp_path):
  records = [_record(k, "test", v) for k, v in CAPTIONS.items()]
  records += [_record(k, "restval" if k % 2 else "train", v, "train2014") for k, v in TRAIN.items()]
  records += [_record(306, "train", ["   ", "A blank first reference."], "train2014")]
  records += [_record(201, "val", ["A cat."])]
  return _write(tmp_path, records)


def test_few_shot_demonstrations_are_train_images_drawn_per_query(few_shot_file):
  def load(split="test", num=None, **kwargs):
    return captions.load(split, num, annotations=few_shot_file, image_dir="/coco", **kwargs)

  data = load(shots=2, seed=0)
  assert [q.key for q in data.queries] == ["101", "102", "103"]
  for q in data.queries:
    assert q.prompt == "An image of" and len(q.demonstrations) == 2
    assert len(set(q.demonstrations)) == 2 and set(q.demonstrations) <= TRAIN_PAIRS
  assert load(shots=2, seed=0).queries == data.queries  # deterministic
  assert load(num=1, shots=2, seed=0).queries == data.queries[:1]  # per query, not per run
  assert load(shots=2, seed=1).queries != data.queries
  assert data.truth.references == load().truth.references  # few-shot changes no query


def test_few_shot_never_shows_the_querys_own_image(few_shot_file):
  train = captions.load("train", annotations=few_shot_file, image_dir="/coco", shots=4, seed=0)
  assert [q.key for q in train.queries] == ["301", "302", "303", "304", "305", "306"]
  pool = {image for image, _ in TRAIN_PAIRS}  # 306 is a query, not a demonstration
  for q in train.queries[:5]:  # 5 train images with a caption: the 4 others, in a drawn order
    assert {image for image, _ in q.demonstrations} == pool - {q.image}
  assert len(train.queries[5].demonstrations) == 4
  assert {image for image, _ in train.queries[5].demonstrations} < pool
  with pytest.raises(errors.UserError, match="4 demonstrations other than query 301's image"):
    captions.load("train", annotations=few_shot_file, image_dir="/coco", shots=5)


def test_zero_shots_and_bad_few_shot_arguments(few_shot_file):
  def load(**kwargs):
    return captions.load(annotations=few_shot_file, image_dir="/coco", **kwargs)

  assert all(q.demonstrations == () for q in load().queries)
  assert load(shots=0, seed=5).queries == load().queries
  assert load(shots=5).queries[0].demonstrations  # 306's blank first reference is left out
  with pytest.raises(errors.UserError, match="5 train images with a caption for shots=6"):
    load(shots=6)
  with pytest.raises(errors.UserError, match="shots must be an integer >= 0, got -1"):
    load(shots=-1)
  with pytest.raises(errors.UserError, match="seed must be an integer >= 0, got -2"):
    load(shots=1, seed=-2)

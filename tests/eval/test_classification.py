"""imagenet_zeroshot: reading class folders, the metrics, and `classify` on a tiny model."""

import json

import numpy as np
import pytest
from PIL import Image

from kosmos_jax import errors
from kosmos_jax.eval import classification as cls
from kosmos_jax.eval import rec
from kosmos_jax.processing import vocab as vocab_lib
from tests.helpers import spm
from tests.models.test_scoring import full_forward_scores, tiny_model

# file name -> class folder; the queries are read in file-name order.
PICTURES = {"a.jpg": "hamster", "b.png": "big_cat", "c.jpg": "hamster", "e.png": "zebra_fish"}


def _picture(path, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
  root = tmp_path / "val"
  for seed, (name, folder) in enumerate(PICTURES.items()):
    (root / folder).mkdir(parents=True, exist_ok=True)
    _picture(root / folder / name, seed)
  (root / "hamster" / "bad.jpg").write_bytes(b"not a picture")
  (root / "hamster" / "notes.txt").write_text("hello")
  (root / "hamster" / ".DS_Store").write_bytes(b"")
  (root / "hamster" / "nested").mkdir()
  return root


def test_load_reads_a_folder_per_class(folders):
  data = cls.load("val", image_dir=str(folders))
  assert data.task == "imagenet_zeroshot" and data.decoding.num_beams == 2
  assert data.truth.class_names == ("big cat", "hamster", "zebra fish")
  keys = ["hamster/a.jpg", "big_cat/b.png", "hamster/bad.jpg", "hamster/c.jpg", "zebra_fish/e.png"]
  assert [q.key for q in data.queries] == keys
  assert data.truth.labels == (1, 0, 1, 1, 2)
  assert {q.prompt for q in data.queries} == {"The photo of the"}
  assert data.queries[0].image == str(folders / "hamster" / "a.jpg")
  assert data.skipped == {"not an image file": 1}
  assert len(cls.load(image_dir=str(folders), num=2).queries) == 2
  with pytest.raises(errors.UserError, match="notes.txt: not an image file"):
    cls.load(image_dir=str(folders), strict=True)


def test_class_name_file_names_the_sorted_folders(folders, tmp_path):
  names = tmp_path / "names.txt"
  names.write_text("jaguar\nhamster\nzebrafish\n\n")
  data = cls.load(image_dir=str(folders), class_names=str(names))
  assert data.truth.class_names == ("jaguar", "hamster", "zebrafish")
  names.write_text("jaguar\nhamster\n")
  with pytest.raises(errors.UserError, match="2 names for 3 classes"):
    cls.load(image_dir=str(folders), class_names=str(names))
  names.write_text("jaguar\n\nzebrafish\n")
  with pytest.raises(errors.UserError, match=":2: a class name is empty"):
    cls.load(image_dir=str(folders), class_names=str(names))


def test_imagenet_synset_folders_and_mapping(tmp_path):
  root = tmp_path / "val"
  for seed, (synset, name) in enumerate(
    [
      ("n01440764", "ILSVRC2012_val_00000293.JPEG"),
      ("n01443537", "ILSVRC2012_val_00000236.JPEG"),
      ("n09999999", "ILSVRC2012_val_00000001.JPEG"),
    ]
  ):
    (root / synset).mkdir(parents=True)
    _picture(root / synset / name, seed)
  mapping = tmp_path / "LOC_synset_mapping.txt"
  mapping.write_text(
    "n01440764 tench, Tinca tinca\n"
    "n01443537 goldfish, Carassius auratus\n"
    "n01484850 great white shark, white shark, man-eater, Carcharodon carcharias\n"
  )
  data = cls.load(image_dir=str(root), synset_map=str(mapping))
  # Every line of the map is a candidate, images or not; the map's order is the labels'.
  assert data.truth.class_names == ("tench", "goldfish", "great white shark")
  assert [q.key for q in data.queries] == [
    "n01443537/ILSVRC2012_val_00000236.JPEG",
    "n01440764/ILSVRC2012_val_00000293.JPEG",
  ]
  assert data.truth.labels == (1, 0)
  assert data.skipped == {"class folder not in the synset map": 1}
  names = tmp_path / "clip_names.txt"
  names.write_text("tench\ngoldfish\ngreat white shark fish\n")
  renamed = cls.load(image_dir=str(root), synset_map=str(mapping), class_names=str(names))
  assert renamed.truth.class_names[2] == "great white shark fish"


def test_load_refuses_what_it_cannot_read(tmp_path):
  with pytest.raises(errors.UserError, match="no such image directory"):
    cls.load(image_dir=str(tmp_path / "nowhere"))
  _picture(tmp_path / "ILSVRC2012_val_00000001.JPEG", 0)
  with pytest.raises(errors.UserError, match="no class folders"):
    cls.load(image_dir=str(tmp_path))
  (tmp_path / "n01440764").mkdir()
  mapping = tmp_path / "map.txt"
  mapping.write_text("n01440764 tench\nn01443537\n")
  with pytest.raises(errors.UserError, match="map.txt:2: expected"):
    cls.load(image_dir=str(tmp_path), synset_map=str(mapping))
  mapping.write_text("n01440764 tench\nn01440764 goldfish\n")
  with pytest.raises(errors.UserError, match="listed twice"):
    cls.load(image_dir=str(tmp_path), synset_map=str(mapping))
  with pytest.raises(errors.UserError, match="no such synset-map file"):
    cls.load(image_dir=str(tmp_path), synset_map=str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  # 1029 ids: the tiny model's 1200 cover them.
  model_file = spm.train_tiny_spm(tmp_path_factory.mktemp("spm"))
  return vocab_lib.KosmosVocabulary(model_file, num_patches_per_side=4)


def test_names_continue_the_prompt_and_end(vocab):
  names = ["big cat", "Bahcet", "zebra fish"]
  for name, ids in zip(names, cls.candidate_ids(vocab, names)):
    assert vocab.encode(f"{cls.PROMPT} {name}") == vocab.encode(cls.PROMPT) + ids[:-1]
    assert ids[-1] == vocab.eos_id and vocab.detokenize(ids) == name


def test_metrics_of_hand_made_predictions(folders):
  data = cls.load(image_dir=str(folders))  # labels: hamster, big cat, hamster, hamster, zebra fish
  predictions = {
    0: {"top5": ["hamster", "big cat"], "generation": "hamster"},  # right, right
    1: {"top5": ["hamster", "zebra fish", "big cat"], "generation": " big cat\n"},  # top5; right
    3: {"top5": ["big cat", "zebra fish"], "generation": "a hamster"},  # wrong, wrong
    4: "zebra fish",  # unconstrained only: right
  }
  got = cls.score(data, predictions)
  assert got == {
    "count": 4.0,
    "top1": pytest.approx(1 / 3),
    "top5": pytest.approx(2 / 3),
    "top1_open": 3 / 4,
    "skipped/no prediction (input skipped)": 1.0,
    "skipped/not an image file": 1.0,
  }
  # Hosts add sums: two shares give the score of all.
  shares = [{k: v for k, v in predictions.items() if k % 2 == r} for r in (0, 1)]
  parts = [cls.sums(data, share) for share in shares]
  assert cls.from_sums(data, {k: parts[0][k] + parts[1][k] for k in parts[0]}) == got
  # Nothing scored: accuracies 0, every query skipped.
  empty = cls.score(data, {})
  assert empty["top1"] == 0.0 and empty["count"] == 0.0 and "top1_open" not in empty
  assert empty["skipped/no prediction (input skipped)"] == 5.0


def test_a_repeated_name_is_right_for_either_class(tmp_path):
  root = tmp_path / "val"
  for seed, synset in enumerate(["n02012849", "n03126707"]):
    (root / synset).mkdir(parents=True)
    _picture(root / synset / f"{seed}.jpg", seed)
  mapping = tmp_path / "map.txt"
  mapping.write_text("n02012849 crane\nn03126707 crane\n")
  data = cls.load(image_dir=str(root), synset_map=str(mapping))
  assert cls.score(data, {0: {"top5": ["crane"]}, 1: {"top5": ["crane"]}})["top1"] == 1.0


def test_predictions_file_round_trip(folders, tmp_path):
  data = cls.load(image_dir=str(folders))
  predictions = {0: {"top5": ["hamster", "big cat"], "generation": "hamster"}, 4: "zebra fish"}
  path = tmp_path / "predictions.json"
  cls.write_predictions(str(path), data, predictions)
  rows = json.loads(path.read_text())
  assert rows == [
    {
      "image": "hamster/a.jpg",
      "label": "hamster",
      "prediction": "hamster",
      "top5": ["hamster", "big cat"],
      "generation": "hamster",
    },
    {
      "image": "zebra_fish/e.png",
      "label": "zebra fish",
      "prediction": None,
      "generation": "zebra fish",
    },
  ]
  assert cls.read_predictions(str(path), data) == predictions
  path.write_text(json.dumps(rows + [{"image": "hamster/z.jpg", "top5": []}]))
  with pytest.raises(errors.UserError, match="entry 2: 'image' names no image"):
    cls.read_predictions(str(path), data)
  path.write_text(json.dumps(rows + rows[:1]))
  with pytest.raises(errors.UserError, match="answered twice"):
    cls.read_predictions(str(path), data)


def test_classify_picks_the_best_scored_name(folders, vocab):
  model = tiny_model()
  processor = rec.processor_for(vocab, model.config)
  data = cls.load(image_dir=str(folders))
  predictions, skipped = cls.classify(
    model, processor, data, batch_size=2, candidate_batch_size=2, open_ended=True
  )
  assert skipped == {"image unreadable": 1} and sorted(predictions) == [0, 1, 3, 4]
  names = list(data.truth.class_names)
  rows = sorted(predictions)
  inputs = processor(text=[cls.PROMPT] * len(rows), images=[data.queries[i].image for i in rows])
  want = full_forward_scores(model, inputs, cls.candidate_ids(vocab, names))
  for i, scores in zip(rows, want):
    assert predictions[i]["top5"] == [names[j] for j in np.argsort(-scores)]
    assert isinstance(predictions[i]["generation"], str)
  metrics = cls.score(data, predictions)
  assert {"top1", "top5", "top1_open", "count"} <= set(metrics) and metrics["count"] == 4
  assert metrics["top5"] == 1.0  # three classes: all in the top five

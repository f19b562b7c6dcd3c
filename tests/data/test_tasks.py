"""seqio registrations and the file sources (tar, parquet, jsonl written here)."""

import io
import json
import tarfile

import ml_collections
import numpy as np
import pytest
import seqio
from PIL import Image

from kosmos_jax.data import feature_converter, shapes, sources, tasks
from tests.helpers import spm as spm_util


def _jpeg(colour=(200, 0, 0)):
  buffer = io.BytesIO()
  Image.new("RGB", (40, 30), colour).save(buffer, "JPEG")
  return buffer.getvalue()


META = dict(
  caption="ba be bi",
  noun_chunks=[[0, 2, 0.1, 0.1, 0.5, 0.5, 0.9], [1, "x"]],
  ref_exps=[[0, 5, 0.1, 0.1, 0.5, 0.5, 0.9]],
)


def test_mixture_rates_follow_the_paper():
  mix = seqio.MixtureRegistry.get("shapes_mix")
  rates = {t.name: mix.get_rate(t) for t in mix.tasks}
  assert rates["shapes_caption"] == rates["shapes_grit"] == 1117
  assert rates["shapes_text"] == 93 and rates["shapes_interleaved"] == 47


def test_user_tasks_are_sized_for_the_model(monkeypatch):
  # A 448 px run of the 224 release reads 448 px pictures (models/config.py).
  from kosmos_jax.data import loader  # pylint: disable=g-import-not-at-top
  from kosmos_jax.models.config import model_config  # pylint: disable=g-import-not-at-top

  calls = []
  monkeypatch.setattr(tasks, "register_kosmos2_tasks", lambda *a, **kw: calls.append((a, kw)))
  monkeypatch.setattr(seqio.MixtureRegistry, "names", lambda: [])
  data = dict(spm_model_file="spm.model", data_dir="d")
  loader.register_user_tasks(
    ml_collections.ConfigDict(data), model_config(**{"vision.image_size": 448})
  )
  loader.register_user_tasks(ml_collections.ConfigDict(data))
  assert calls == [
    (("spm.model", "d"), dict(image_size=448, num_image_tokens=64, num_patches_per_side=32)),
    (("spm.model", "d"), {}),
  ]


def test_sources_read_tar_parquet_jsonl(tmp_path):
  with tarfile.open(tmp_path / "000.tar", "w") as tar:
    for key, data in (
      ("a.jpg", _jpeg()),
      ("a.json", json.dumps(META).encode()),
      ("b.png", b""),
      ("b.txt", b"only a caption"),
    ):
      info = tarfile.TarInfo(key)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  records = list(sources.read_webdataset(str(tmp_path / "000.tar")))
  assert [r["key"] for r in records] == [b"a", b"b"] and records[1]["caption"] == b"only a caption"
  assert np.isnan(records[0]["noun_chunks"][1]).all() and records[0]["ref_exps"].shape == (1, 7)
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(
    pa.table({"key": ["p"], "jpg": [_jpeg()], "caption": ["ba"], "ref_exps": [META["ref_exps"]]}),
    tmp_path / "x.parquet",
  )
  (tmp_path / "img.jpg").write_bytes(_jpeg())
  (tmp_path / "x.jsonl").write_text(json.dumps(dict(META, key="j", image="img.jpg")) + "\n")
  ds = sources.file_dataset(
    {"train": str(tmp_path / "*.parquet") + "," + str(tmp_path / "*.jsonl")}, "image_text", "train"
  )
  got = {x["key"]: x for x in ds.as_numpy_iterator()}
  assert (
    set(got) == {b"p", b"j"} and got[b"j"]["image"] == _jpeg() and got[b"p"]["caption"] == b"ba"
  )
  with pytest.raises(FileNotFoundError):
    sources.file_dataset({"train": str(tmp_path / "none/*.tar")}, "text", "train")


def test_kosmos2_tasks_on_user_files(tmp_path):
  spm_file = spm_util.train_tiny_spm(tmp_path / "spm")
  for name in ("grit", "caption"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "img.jpg").write_bytes(_jpeg())
    (tmp_path / name / "a.jsonl").write_text(
      json.dumps(dict(META, key="g", image="img.jpg")) + "\n"
    )
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "t.txt").write_text("ba be\nbi bo\n")
  (tmp_path / "interleaved").mkdir()
  (tmp_path / "interleaved" / "img.jpg").write_bytes(_jpeg())
  (tmp_path / "interleaved" / "d.jsonl").write_text(
    json.dumps(dict(texts=["ba", None], images=[None, "img.jpg"])) + "\n"
  )
  tasks.register_kosmos2_tasks(
    spm_file, str(tmp_path), prefix="ktest", image_size=16, num_image_tokens=4
  )
  converter = feature_converter.MultimodalFeatureConverter()
  for name in ("ktest_grit", "ktest_caption", "ktest_text", "ktest_interleaved"):
    rows = list(
      seqio.get_dataset(name, {"targets": 32, "images": 2}, converter).as_numpy_iterator()
    )
    assert rows and rows[0]["pixel_values"].shape == (2, 3, 16, 16), name
  mix = seqio.get_dataset(
    "ktest_pretrain", {"targets": 32, "images": 2}, converter, seed=0, shuffle=False
  )
  assert next(iter(mix))["input_ids"].shape == (32,)


def test_shapes_tasks(tmp_path):
  config = shapes.ShapesConfig(name="tasks", image_size=32, num_train=9, num_test=3)
  tasks.register_shapes_tasks(
    prefix="stest", image_size=32, num_image_tokens=8, data_dir=str(tmp_path), config=config
  )
  converter = feature_converter.MultimodalFeatureConverter()
  vocab = seqio.get_mixture_or_task("stest_rec").output_features["targets"].vocabulary
  rec = seqio.get_mixture_or_task("stest_rec").get_dataset(
    {"targets": 64, "images": 1}, shuffle=False
  )
  x = next(rec.as_numpy_iterator())
  text = vocab.detokenize(x["targets"], skip_special_tokens=False)
  assert "<grounding><phrase> the " in text and text.endswith("</object></s>")
  assert x["loss_weights"].sum() == 5  # <object> a b </object> </s>
  for name in ("stest_mix", "stest_interleaved", "stest_text"):
    rows = list(
      seqio.get_dataset(
        name, {"targets": 64, "images": 2}, converter, seed=0, dataset_split="validation"
      )
      .take(3)
      .as_numpy_iterator()
    )
    assert rows and rows[0]["pixel_values"].shape == (2, 3, 32, 32)


def test_shapes_tasks_options(tmp_path):
  """`rec_per_image`: one rec example per picture; `use_box_prob=1`: every grit caption grounded."""
  config = shapes.ShapesConfig(name="tasks", image_size=32, num_train=9, num_test=3)
  tasks.register_shapes_tasks(
    prefix="otest",
    image_size=32,
    num_image_tokens=8,
    data_dir=str(tmp_path),
    config=config,
    use_box_prob=1.0,
    rec_per_image=True,
  )
  lengths = {"targets": 128, "images": 1}
  rec = seqio.get_mixture_or_task("otest_rec")
  vocab = rec.output_features["targets"].vocabulary
  examples = list(rec.get_dataset(lengths, shuffle=False).as_numpy_iterator())
  assert len(examples) == 9  # one per picture
  for x in examples:
    record = shapes.make_example("train", int(x["key"].decode().split("-")[1]), 32)
    text = vocab.detokenize(x["targets"], skip_special_tokens=False)
    names = record["objects"]["expression"]
    assert text.count("<grounding>") == 1 and all(f"<phrase> {n}</phrase>" in text for n in names)
    assert x["loss_weights"].sum() == 4 * len(names) + 1
  grit = seqio.get_mixture_or_task("otest_grit").get_dataset(lengths, shuffle=False)
  texts = [
    vocab.detokenize(x["targets"], skip_special_tokens=False) for x in grit.as_numpy_iterator()
  ]
  assert len(texts) == 9 and all("<grounding>" in t and "<object>" in t for t in texts)


def _tar(path, samples):
  with tarfile.open(path, "w") as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(
  "kind", ["image_text_tar", "image_text_parquet", "image_text", "documents", "text"]
)
def test_file_sources_save_their_position(tmp_path, kind):
  """A job's checkpoint holds its data iterator: every file kind resumes
  exactly where it stopped and reads what the generator readers read."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  (tmp_path / "img.jpg").write_bytes(_jpeg())
  for shard in range(2):
    if kind == "image_text_tar":
      samples = [(f"{shard}{i}.jpg", _jpeg((i * 40, 0, 0))) for i in range(4)]
      samples += [(f"{shard}{i}.json", json.dumps(META).encode()) for i in range(4)]
      _tar(tmp_path / f"{shard}.tar", sorted(samples))
      reader, pattern, source_kind = sources.read_webdataset, "*.tar", "image_text"
      continue
    if kind == "image_text_parquet":
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

      keys = [f"{shard}{i}" for i in range(4)]
      table = pa.table({"key": keys, "jpg": [_jpeg()] * 4, "caption": ["ba"] * 4})
      pq.write_table(table, tmp_path / f"{shard}.parquet", row_group_size=3)
      reader, pattern, source_kind = sources.read_parquet, "*.parquet", "image_text"
      continue
    rows = {
      "image_text": [dict(META, key=f"{shard}{i}", image="img.jpg") for i in range(4)],
      "documents": [dict(texts=["ba", None], images=[None, "img.jpg"]) for _ in range(4)],
      "text": [dict(text=f"ba {shard} {i}") for i in range(4)],
    }[kind]
    (tmp_path / f"{shard}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n\n")
    reader = {
      "image_text": sources.read_image_text_jsonl,
      "documents": sources.read_documents,
      "text": sources.read_text,
    }[kind]
    pattern, source_kind = "*.jsonl", kind
  files = sorted(str(p) for p in tmp_path.glob(pattern))
  expected = [r for f in files for r in reader(f)]
  options = tf.data.Options()  # as loader.dataset sets it: the parse functions are Python
  options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
  ds = lambda: sources.file_dataset(
    {"train": str(tmp_path / pattern)}, source_kind, "train", cycle_length=1
  ).with_options(options)
  everything = list(ds().as_numpy_iterator())
  assert len(everything) == len(expected) == 8
  for got, want in zip(everything, expected):
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=name)
  iterator = iter(ds())
  for _ in range(3):
    next(iterator)
  tf.train.Checkpoint(iterator=iterator).write(str(tmp_path / "ckpt"))
  resumed = iter(ds())
  tf.train.Checkpoint(iterator=resumed).read(str(tmp_path / "ckpt")).assert_consumed()
  rest = [x["key"] for x in resumed]
  assert rest == [x["key"] for x in everything[3:]]

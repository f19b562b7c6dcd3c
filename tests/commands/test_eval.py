"""`kosmos-jax eval` and `eval score` end to end: a tiny random snapshot on every task,
read from held-out shapes pictures exported in each benchmark's real files."""

import json
import os
import shutil

import pytest

from kosmos_jax import commands
from kosmos_jax.data import export

NUM = 6  # pictures per exported benchmark


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("exported")
  return {fmt: export.export(fmt, str(root / fmt), NUM, 64) for fmt in export.FORMATS}


def _flags(files: export.Exported) -> list[str]:
  flags = ["--task", files.task, "--split", files.split]
  for key, value in files.args.items():
    flags += ["--" + key.replace("_", "-"), value]
  return flags


def _last_json(capsys) -> dict:
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_eval_then_score_agree_on_every_task(fmt, exported, tiny_snapshot, tmp_path, capsys):
  files = exported[fmt]
  out = tmp_path / "out"
  snap = str(tiny_snapshot / "snap")
  commands.main(
    ["eval", *_flags(files), "--checkpoint", snap, "--out", str(out), "--batch-size", "4", "--json"]
  )
  metrics = _last_json(capsys)
  assert metrics == json.loads((out / "metrics.json").read_text())
  assert metrics["count"] > 0
  if fmt in ("refcoco", "flickr30k_entities"):  # pictures with the true and predicted boxes
    assert len(list((out / "pictures").glob("*.png"))) == min(8, int(metrics["count"]))
  predictions = next(p for p in out.iterdir() if p.name.startswith("predictions."))
  commands.main(["eval", "score", *_flags(files), "--predictions", str(predictions), "--json"])
  rescored = _last_json(capsys)
  assert rescored == pytest.approx(metrics)


def test_score_refuses_predictions_for_another_split(exported, tmp_path):
  wrong = tmp_path / "p.txt"
  wrong.write_text("H-0\t0.0\t<grounding><phrase>x</phrase>\n")
  with pytest.raises(SystemExit, match="1 H-lines for"):
    commands.main(["eval", "score", *_flags(exported["refcoco"]), "--predictions", str(wrong)])


def test_a_data_argument_the_task_does_not_take_is_named(exported, tmp_path):
  flags = _flags(exported["refcoco"]) + ["--questions", exported["vqav2"].args["questions"]]
  predictions = tmp_path / "p.txt"
  predictions.write_text("")
  with pytest.raises(SystemExit, match="refcoco takes no --questions"):
    commands.main(["eval", "score", *flags, "--predictions", str(predictions)])


def test_few_shot_captions_run_interleaved(exported, tiny_snapshot, tmp_path, capsys):
  """--shots 2: two training pictures with their captions before each query."""
  files = exported["coco_caption"]
  out = tmp_path / "out"
  snap = str(tiny_snapshot / "snap")
  flags = [*_flags(files), "--checkpoint", snap, "--out", str(out), "--batch-size", "2"]
  commands.main(["eval", *flags, "--shots", "2", "--json"])
  metrics = _last_json(capsys)
  assert metrics["count"] == NUM and "CIDEr" in metrics
  predictions = json.loads((out / "predictions.json").read_text())
  assert sorted(p["image_id"] for p in predictions) == list(range(NUM))


def _reg_files(exported, tmp_path) -> export.Exported:
  """The exported RefCOCO expressions as MDETR's finetune_refcocog_val.json (REG)."""
  files = exported["refcoco"]
  data = json.loads(open(files.args["annotations"]).read())
  for image in data["images"]:
    image["dataset_name"] = "refcocog"
  path = tmp_path / "finetune_refcocog_val.json"
  path.write_text(json.dumps(data))
  return export.Exported(
    "refcocog_reg", "val", dict(annotations=str(path), image_dir=files.args["image_dir"])
  )


def _flickr_caption_files(exported, tmp_path) -> export.Exported:
  """The exported Karpathy COCO captions as dataset_flickr30k.json (flat image folder)."""
  files = exported["coco_caption"]
  data = json.loads(open(files.args["annotations"]).read())
  folder = tmp_path / "flickr30k-images"
  folder.mkdir()
  for n, record in enumerate(data["images"]):
    source = os.path.join(files.args["image_dir"], record.pop("filepath"), record["filename"])
    record["filename"] = f"{1000 + n}.jpg"
    shutil.copy(source, folder / record["filename"])
    record.pop("cocoid")
  path = tmp_path / "dataset_flickr30k.json"
  path.write_text(json.dumps(dict(images=data["images"], dataset="flickr30k")))
  return export.Exported(
    "flickr30k_caption", "test", dict(annotations=str(path), image_dir=str(folder))
  )


@pytest.mark.parametrize("make", [_reg_files, _flickr_caption_files])
def test_eval_then_score_reg_and_flickr_captions(make, exported, tiny_snapshot, tmp_path, capsys):
  files = make(exported, tmp_path)
  out = tmp_path / "out"
  snap = str(tiny_snapshot / "snap")
  commands.main(["eval", *_flags(files), "--checkpoint", snap, "--out", str(out), "--json"])
  metrics = _last_json(capsys)
  assert metrics["count"] > 0 and {"CIDEr", "METEOR", "BLEU-4", "ROUGE-L"} <= set(metrics)
  predictions = str(out / "predictions.json")
  commands.main(["eval", "score", *_flags(files), "--predictions", predictions, "--json"])
  assert _last_json(capsys) == pytest.approx(metrics)

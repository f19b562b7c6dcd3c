"""Box decoding and matching of the official KOSMOS-2 grounding scorers, on hand-made texts."""

import pytest

from kosmos_jax import errors
from kosmos_jax.eval import official_boxes

C = 1 / 32  # a cell of the 32 x 32 grid


def test_decode_full_cells_when_corners_share_a_row_or_column_else_centres():
  # Cells (10, 0) and (14, 0) share a row: the box spans the whole cells.
  row = "<phrase>a</phrase><object><patch_index_0010><patch_index_0014></object>"
  assert official_boxes.decode(row) == [("a", (10 * C, 0.0, 15 * C, C))]
  # Cells (3, 1) and (3, 5) share a column.
  column = "<phrase>b</phrase><object><patch_index_0035><patch_index_0163></object>"
  assert official_boxes.decode(column) == [("b", (3 * C, C, 4 * C, 6 * C))]
  # One cell: that cell.
  same = "<phrase>c</phrase><object><patch_index_0033><patch_index_0033></object>"
  assert official_boxes.decode(same) == [("c", (C, C, 2 * C, 2 * C))]
  # Cells (1, 1) and (4, 4) share nothing: centre to centre.
  centres = "<phrase>d</phrase><object><patch_index_0033><patch_index_0132></object>"
  assert official_boxes.decode(centres) == [("d", (1.5 * C, 1.5 * C, 4.5 * C, 4.5 * C))]


def test_decode_grid_size_is_a_parameter():
  # On a 16 grid index 17 is cell (1, 1) and 34 is (2, 2).
  text = "<phrase>x</phrase><object><patch_index_0017><patch_index_0034></object>"
  assert official_boxes.decode(text, 16) == [("x", (1.5 / 16, 1.5 / 16, 2.5 / 16, 2.5 / 16))]
  # On the 32 grid they are cells (17, 0) and (2, 1): a reversed box, as the scorer gets it.
  assert official_boxes.decode(text) == [("x", (17.5 * C, 0.5 * C, 2.5 * C, 1.5 * C))]


def test_decode_every_pair_in_order_and_phraseless_names():
  text = (
    "<grounding><phrase> a dog</phrase><object><patch_index_0000><patch_index_0000>"
    "</delimiter_of_multi_objects/><patch_index_0001><patch_index_0001></object> and"
    "<object><patch_index_0044><patch_index_0863></object>"
    # A phrase not right before <object> is not its phrase.
    "<phrase>cat</phrase> <object><patch_index_0002><patch_index_0002></object>"
  )
  names = [name for name, _ in official_boxes.decode(text)]
  assert names == [" a dog", " a dog", "<44><863>", "<2><2>"]


@pytest.mark.parametrize(
  "text, names",
  [
    ("<phrase>a</phrase><object><patch_index_0010></object>", []),  # a lone index
    ("<phrase>a</phrase><object><patch_index_0010><patch_index_0011>", []),  # no </object>
    ("<phrase>a</phrase><object></object>", []),
    # A phrase cannot hold "<": the object stays, without the phrase.
    ("<phrase>a <b></phrase><object><patch_index_0010><patch_index_0011></object>", ["<10><11>"]),
  ],
)
def test_decode_malformed(text, names):
  assert [n for n, _ in official_boxes.decode(text)] == names


def test_matching_boxes_strip_scale_and_miss():
  text = (
    "<phrase> a dog </phrase><object><patch_index_0010><patch_index_0014></object>"
    "<phrase>a cat</phrase><object><patch_index_0033><patch_index_0132></object>"
  )
  # Width 640 and height 320: x scales by 640, y by 320.
  assert official_boxes.matching_boxes(text, "a dog", 640, 320) == [(200.0, 0.0, 300.0, 10.0)]
  assert official_boxes.matching_boxes(text, "a cat ", 640, 320) == [(30.0, 15.0, 90.0, 45.0)]
  assert official_boxes.matching_boxes(text, "a bird", 640, 320) == [(0.0, 0.0, 0.0, 0.0)]


def test_hit_at_exactly_half_and_any_box():
  truth = [(0, 0, 10, 10), (100, 0, 200, 10)]
  assert official_boxes.hit([(100, 0, 150, 10)], truth)  # IoU exactly 0.5 counts
  assert not official_boxes.hit([(100, 0, 149, 10)], truth)
  assert not official_boxes.hit([(0.0, 0.0, 0.0, 0.0)], truth)
  assert official_boxes.best_iou([(0, 0, 10, 10), (500, 0, 600, 10)], truth) == 1.0


def test_hypothesis_keeps_the_prompt_on_one_line():
  assert official_boxes.hypothesis("<grounding><phrase>a</phrase>", "<object>\nx\ty\r") == (
    "<grounding><phrase>a</phrase><object> x y "
  )


def test_read_mdetr_json_refuses_other_files(tmp_path):
  path = tmp_path / "a.json"
  path.write_text("not json")
  with pytest.raises(errors.UserError, match="a.json: not a JSON file"):
    official_boxes.read_mdetr_json(str(path), ("images",))
  path.write_text('{"images": [], "annotations": {}}')
  with pytest.raises(errors.UserError, match="a.json: not an MDETR annotation file: no 'annot"):
    official_boxes.read_mdetr_json(str(path), ("images", "annotations"))
  assert official_boxes.read_mdetr_json(str(path), ("images",)) == {
    "images": [],
    "annotations": {},
  }
  with pytest.raises(errors.UserError, match="missing.json: cannot read"):
    official_boxes.read_mdetr_json(str(tmp_path / "missing.json"), ("images",))


def test_check_file_name():
  pattern = r"finetune_(refcoco\+?|refcocog)_(\w+)\.json"
  official_boxes.check_file_name("/d/finetune_refcocog_val.json", pattern, ("refcocog", "val"))
  official_boxes.check_file_name("/d/renamed.json", pattern, ("refcocog", "val"))
  with pytest.raises(errors.UserError, match="says refcoco\\+/testA, not refcoco/testA"):
    official_boxes.check_file_name("/d/finetune_refcoco+_testA.json", pattern, ("refcoco", "testA"))

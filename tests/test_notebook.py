"""The Colab notebook runs top to bottom on CPU, on a tiny random local checkpoint.

As papermill does, a cell after the one tagged "parameters" overrides them:
a local checkpoint (so nothing is downloaded) and no install.
"""

import os

import nbclient
import nbformat

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "kosmos2_colab_tpu.ipynb")


def test_notebook_runs_on_a_tiny_checkpoint(tiny_snapshot):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  cells = notebook.cells
  index = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", ()))
  cells.insert(
    index + 1,
    nbformat.v4.new_code_cell(
      f"CHECKPOINT = {str(tiny_snapshot / 'snap')!r}\n"
      f"IMAGE = {str(tiny_snapshot / 'snowman.jpg')!r}\n"
      "INSTALL = False\nDTYPE = 'float32'\nMAX_NEW_TOKENS = 8"
    ),
  )
  # The kernel inherits this process's environment: CPU, 8 host devices.
  nbclient.NotebookClient(
    notebook,
    timeout=300,
    kernel_name="python3",
    resources={"metadata": {"path": str(tiny_snapshot)}},
  ).execute()
  outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs)
  assert "{'data': 1, 'fsdp': 1, 'tensor': 8}" in text
  # The three pictures with boxes: captioning, phrase grounding, referring expression.
  assert sum("image/png" in o.get("data", {}) for o in outputs) == 3

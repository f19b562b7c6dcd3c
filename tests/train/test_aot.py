"""`kosmos-jax aot` compiles the real train step for a TPU topology on this CPU host."""

import json

import pytest

from kosmos_jax import commands


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_tiny_train_step_compiles_for_v5e(capsys, attention):
  commands.main(
    [
      "aot",
      "--config",
      "configs/tiny.py",
      "--topology",
      "v5e:2x2",
      "--config.mesh.data=2",
      "--config.mesh.fsdp=2",
      "--config.batch_size=8",
      "--config.seq_len=64",
      f"--config.attention={attention}",
      "--config.model.text.attention_dropout=0.0",
    ]
  )
  report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["fits"] and 0 < report["total_gib"] < report["hbm_gib"]
  assert report["argument_gib"] > 0 and report["tokens_per_step"] == 8 * 64


def test_a_plan_that_does_not_fit_fails_loudly(capsys):
  with pytest.raises(SystemExit, match="GiB per chip"):
    commands.main(
      [
        "aot",
        "--config",
        "configs/tiny.py",
        "--topology",
        "v5e:2x2",
        "--config.mesh.data=4",
        "--config.batch_size=16384",
        "--config.seq_len=256",
        "--config.images_per_row=0",
      ]
    )

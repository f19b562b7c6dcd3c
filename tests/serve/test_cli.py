"""`kosmos-jax serve`'s argument errors: one line naming the problem, before any serving."""

import socket

import pytest

from kosmos_jax import commands


def _error(*args) -> str:
  with pytest.raises(SystemExit) as e:
    commands.main(["serve", *args])
  return str(e.value)


def test_errors_name_the_argument(tmp_path, tiny_snapshot):
  assert "not a directory" in _error("--checkpoint", str(tmp_path / "nothing"))
  assert "--batch-window-ms -1: must be >= 0" in _error(
    "--checkpoint", str(tmp_path), "--batch-window-ms", "-1"
  )
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    message = _error("--checkpoint", str(tiny_snapshot / "snap"), "--port", port, "--no-warmup")
  assert f"--port {port}: cannot bind" in message

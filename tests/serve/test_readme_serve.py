"""README.md's Serving examples: the `kosmos-jax serve` line parses, and the curl
line runs against a live server (the README's port swapped for the test's)."""

import json
import os
import re
import shlex
import shutil
import subprocess

from kosmos_jax import commands

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = open(os.path.join(ROOT, "README.md")).read()


def _lines(language: str, start: str) -> list[str]:
  blocks = re.findall(rf"```{language}\n(.*?)```", README, re.S)
  return [line for block in blocks for line in block.splitlines() if line.startswith(start)]


def test_the_serve_command_parses():
  (line,) = _lines("console", "$ kosmos-jax serve ")
  args = commands.build_parser().parse_args(shlex.split(line)[2:])
  assert args.command == "serve" and args.host == "127.0.0.1" and args.port == 8080


def test_the_curl_example_answers(served, tmp_path):
  (line,) = _lines("sh", "curl ")
  assert "localhost:8080" in line
  shutil.copyfile(served.snowman, tmp_path / "snowman.jpg")
  line = line.replace("localhost:8080", served.url.removeprefix("http://"))
  proc = subprocess.run(
    ["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=60
  )
  answer = json.loads(proc.stdout)
  assert answer["prompt"] == "<grounding>An image of" and "text" in answer, answer
  assert set(answer) == {"text", "entities", "token_ids", "prompt", "timings"}

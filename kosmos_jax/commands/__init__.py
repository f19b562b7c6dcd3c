"""The `kosmos-jax` command line: one module per subcommand, each with
`add_parser(subparsers)` and `run(args, overrides)`; `kosmos-jax SUBCOMMAND
--help` for each.

A subcommand's module imports only argparse-level code at the top: JAX,
TensorFlow and the model load inside `run`, so `--help` and argument errors
answer at once.
"""

import argparse
import sys

from kosmos_jax import heap
from kosmos_jax.commands import aot, convert, data, demo, generate, summary, train

# In the order `kosmos-jax --help` lists them.
COMMANDS = {
  "convert": convert,
  "summary": summary,
  "aot": aot,
  "train": train,
  "demo": demo,
  "data": data,
  "generate": generate,
}


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.key=value` items from the ordinary arguments."""
  rest, overrides = [], []
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config.") :].partition("=")
      if not sep:
        value = next(it, None)
        if value is None:
          raise SystemExit(f"{arg}: missing value")
      overrides.append(f"{key}={value}")
    else:
      rest.append(arg)
  return rest, overrides


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="kosmos-jax", description="KOSMOS-2 in JAX: convert, inspect, train, generate."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for module in COMMANDS.values():
    module.add_parser(sub)
  return parser


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  argv, overrides = _split_config_overrides(argv)
  args = build_parser().parse_args(argv)
  module = COMMANDS[args.command]
  if overrides and not getattr(module, "TAKES_CONFIG", False):
    raise SystemExit(f"kosmos-jax {args.command} takes no --config.* overrides: {overrides}")
  if getattr(module, "KEEPS_FREED_MEMORY", False):
    heap.keep_freed_memory()  # before jax or tf.data start a thread
  module.run(args, overrides)


if __name__ == "__main__":
  main()

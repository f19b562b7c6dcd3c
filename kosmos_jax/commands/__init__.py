"""The `kosmos-jax` command line: one module per subcommand, each with
`add_parser(subparsers)` and `run(args, overrides)`; `kosmos-jax SUBCOMMAND
--help` for each.

A subcommand's module imports only argparse-level code at the top: JAX,
TensorFlow and the model load inside `run`, so `--help` and argument errors
answer at once.
"""

import argparse
import os
import sys

from kosmos_jax import errors, heap
from kosmos_jax.commands import (
  aot,
  convert,
  data,
  demo,
  evaluate,
  generate,
  mix,
  serve,
  summary,
  train,
)

# In the order `kosmos-jax --help` lists them.
COMMANDS = {
  "convert": convert,
  "mix": mix,
  "summary": summary,
  "aot": aot,
  "train": train,
  "demo": demo,
  "data": data,
  "generate": generate,
  "serve": serve,
  "eval": evaluate,
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
          raise SystemExit(f"argument {arg}: expected a value ({arg}=VALUE)")
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


def _import_tensorflow_quietly() -> None:
  """Imports TensorFlow with the process's stderr closed, and hides GPUs from it.

  Its native libraries log while they load ("Could not find cuda drivers on
  your machine" on every CPU host, oneDNN notes), before absl logging is set
  up, so TF_CPP_MIN_LOG_LEVEL does not reach them; looking for GPUs logs a
  failed cuInit. TensorFlow only runs the input pipeline, which must leave
  the accelerators to JAX (big_vision does the same), so its device list is
  settled here too. A failed import still raises after stderr is back.
  """
  if "tensorflow" in sys.modules:
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")
  except ImportError:
    pass  # machines without TensorFlow run what does not need it
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def _use_compilation_cache() -> None:
  """Keeps XLA's compiled programs on disk (JAX's persistent compilation
  cache), so that a second `kosmos-jax generate` or `serve` starts warm: in
  `$XDG_CACHE_HOME/kosmos-jax/xla` (~/.cache/kosmos-jax/xla), unless
  JAX_COMPILATION_CACHE_DIR names another directory, or is empty to turn it
  off. Only programs that took over a second to compile are kept (JAX's
  jax_persistent_cache_min_compile_time_secs). Set here, before the command
  imports JAX, which reads the variable once; a caller that imported JAX
  already keeps its own setting."""
  cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  default = os.path.expanduser(os.path.join(cache_home, "kosmos-jax", "xla"))
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", default)


def _fail(command: str, message: str):
  """One line on stderr, exit status 2 (argparse's convention for usage errors)."""
  prog = f"kosmos-jax {command}" if command else "kosmos-jax"
  print(f"{prog}: error: {message}", file=sys.stderr)
  error = SystemExit(message)  # str(error) is the message, for callers of main()
  error.code = 2
  raise error from None


def main(argv: list[str] | None = None) -> None:
  """Runs one command. Errors in what the user gave (a missing file, a bad
  argument, config key or value, a refused checkpoint) end in one line naming
  it and exit status 2; anything else is a bug and keeps its traceback."""
  argv = sys.argv[1:] if argv is None else argv
  command = next((a for a in argv if a in COMMANDS), "")
  try:
    argv, overrides = _split_config_overrides(argv)
  except SystemExit as e:
    _fail(command, str(e.code))
  args = build_parser().parse_args(argv)
  module = COMMANDS[args.command]
  if overrides and not getattr(module, "TAKES_CONFIG", False):
    _fail(args.command, f"takes no --config.* overrides, got {overrides}")
  if getattr(module, "KEEPS_FREED_MEMORY", False):
    heap.keep_freed_memory()  # before jax or tf.data start a thread
  if "jax" not in sys.modules:  # TensorFlow's import below imports it
    _use_compilation_cache()
  if getattr(module, "USES_TENSORFLOW", False):
    _import_tensorflow_quietly()
  try:
    module.run(args, overrides)
  except SystemExit as e:
    if isinstance(e.code, str):
      _fail(args.command, e.code)
    raise
  except (errors.UserError, FileNotFoundError, NotADirectoryError) as e:
    _fail(args.command, str(e))


if __name__ == "__main__":
  main()

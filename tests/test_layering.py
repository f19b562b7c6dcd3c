"""The package's layers: a module imports only from its own package and from lower layers.

Read from the source (ast), function-local imports included: a lazy import
dodges the import-time cost, not the dependency.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kosmos_jax"

# Bottom to top; units on one level do not import each other. The trainer runs
# the evaluators, so train sits above eval; `config` (the keys every experiment
# config has) gathers the defaults of train and sharding, so it sits above
# train, beside the demo and the server (serve/: the page and API over a
# model); the commands use them all.
LAYERS = (
  ("errors", "heap", "kernels", "sharding", "search", "processing"),
  ("models",),
  ("checkpoints", "data"),
  ("eval",),
  ("train",),
  ("config", "demo", "serve"),
  ("commands",),
)
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str | None:
  """The layer unit of `kosmos_jax.X...` (None for the package root)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def imports(path: pathlib.Path):
  """(line, imported kosmos_jax module, is function-local, lines before it) per import."""
  source = path.read_text()
  lines = source.splitlines()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from kosmos_jax import sharding` imports the module kosmos_jax.sharding.
      names = (
        [f"{node.module}.{a.name}" for a in node.names]
        if node.module == "kosmos_jax"
        else [node.module]
      )
    else:
      continue
    for name in names:
      if name == "kosmos_jax" or name.startswith("kosmos_jax."):
        yield node.lineno, name, node.col_offset > 0, lines[max(0, node.lineno - 4) : node.lineno]


def edges():
  for path in sorted(PACKAGE.rglob("*.py")):
    for line, name, local, before in imports(path):
      yield _module_name(path), line, name, local, before


def test_every_unit_has_a_layer():
  units = {_unit(_module_name(p)) for p in PACKAGE.rglob("*.py")} - {None, "__main__"}
  assert units <= set(LEVEL), f"add {sorted(units - set(LEVEL))} to LAYERS"


def test_nothing_imports_upward():
  upward = []
  for module, line, name, _, _ in edges():
    unit, target = _unit(module), _unit(name)
    if unit is None or target is None or unit == target:
      continue  # the package root is the public face; a package may import itself
    if LEVEL[target] >= LEVEL[unit]:
      upward.append(f"{module}:{line} imports {name} ({unit} -> {target})")
  assert not upward, "\n".join(upward)


def test_lazy_imports_say_why():
  """Function-local imports of our modules are for start-up cost only: in the
  commands (whose `--help` must not load JAX), the package root, or with a
  `Lazy:` comment just above."""
  silent = [
    f"{module}:{line} imports {name}"
    for module, line, name, local, before in edges()
    if local
    and _unit(module) not in (None, "commands")
    and not any("Lazy" in text for text in before)
  ]
  assert not silent, "\n".join(silent)

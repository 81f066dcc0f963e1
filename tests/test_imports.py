"""The dependency rule of the code base (docs/architecture.md), checked on the source.

Layers, lowest first; a module may import only from its own layer or lower ones:

  0  vita_jax.errors, vita_jax.cli          plumbing, no JAX
  1  vita_jax.spec                          facts both frameworks share, no JAX
  2  vita_jax.data, vita_jax.parallel       input pipeline (no JAX import) / mesh and sharding
  3  vita_jax.ops                           pure array functions
  4  vita_jax.models                        Flax modules and their decoding steps
  5  vita_jax.training, vita_jax.checkpoints
  6  vita_jax (top level): the public API and the commands
  7  vita_jax.eval

vita_torch may import vita_jax's framework-free layers only (errors, cli, spec, data); no
library module imports the experiment files under configs/; there are no import cycles.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("vita_jax", "vita_torch", "configs")
FRAMEWORKS = ("jax", "jaxlib", "flax", "optax", "orbax", "torch")
JAX_FREE_PREFIXES = ("vita_jax.errors", "vita_jax.cli", "vita_jax.spec", "vita_jax.data")
LAYERS = {"vita_jax.errors": 0, "vita_jax.cli": 0, "vita_jax.spec": 1, "vita_jax.data": 2,
          "vita_jax.parallel": 2, "vita_jax.ops": 3, "vita_jax.models": 4,
          "vita_jax.training": 5, "vita_jax.checkpoints": 5, "vita_jax.eval": 7,
          "vita_jax.serving": 7, "vita_jax.serve": 8}
TOP_LEVEL = 6


def _modules() -> dict[str, str]:
  """{dotted module name: path} for every source file of our packages."""
  out = {}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith(".py"):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
          out[dotted.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The module of ours that `import name` / `from name import x` loads (longest match)."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(module: str) -> list[tuple[str, int]]:
  """(imported dotted name, line) for every import in the module, top level or nested."""
  tree = ast.parse(open(MODULES[module]).read())
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from vita_jax.training import step` imports the submodule vita_jax.training.step
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.append((sub if sub in MODULES else node.module, node.lineno))
  return found


def _layer(module: str) -> int | None:
  if not module.startswith("vita_jax"):
    return None
  for prefix, rank in LAYERS.items():
    if module == prefix or module.startswith(prefix + "."):
      return rank
  return TOP_LEVEL


def _graph() -> dict[str, set[str]]:
  graph = defaultdict(set)
  for module in MODULES:
    for name, _ in _imports(module):
      target = _resolve(name)
      if target and target != module and not module.startswith(target + "."):
        graph[module].add(target)
  return graph


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = "done"

  for module in sorted(MODULES):
    if module not in state:
      visit(module, [module])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_only_import_downwards():
  bad = []
  for module in MODULES:
    rank = _layer(module)
    for name, line in _imports(module):
      target = _resolve(name)
      if rank is None or target is None or _layer(target) is None:
        continue
      if _layer(target) > rank:
        bad.append(f"{module}:{line} (layer {rank}) imports {target} (layer {_layer(target)})")
  assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_framework_free_layers_import_no_framework():
  bad = [f"{module}:{line} imports {name}"
         for module in MODULES if module.startswith(JAX_FREE_PREFIXES)
         for name, line in _imports(module) if name.split(".")[0] in FRAMEWORKS]
  assert not bad, "\n".join(bad)


def test_library_code_does_not_import_the_experiment_configs():
  bad = [f"{module}:{line} imports {name}"
         for module in MODULES if module.startswith(("vita_jax", "vita_torch"))
         for name, line in _imports(module) if name.split(".")[0] == "configs"]
  assert not bad, "\n".join(bad)


def test_torch_mirror_uses_only_the_framework_free_layers():
  bad = [f"{module}:{line} imports {name}"
         for module in MODULES if module.startswith("vita_torch")
         for name, line in _imports(module)
         if name.startswith("vita_jax") and not name.startswith(JAX_FREE_PREFIXES)]
  assert not bad, "\n".join(bad)
  back = [f"{module}:{line} imports {name}"
          for module in MODULES if module.startswith("vita_jax") and module != "vita_jax.verify"
          for name, line in _imports(module) if name.startswith("vita_torch")]
  assert not back, "only the vita_jax.verify command may use vita_torch:\n" + "\n".join(back)


def _loads_jax(code: list[str]) -> list[str]:
  """Modules of JAX/Flax that running `python code...` imports (via -X importtime)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, "-X", "importtime", *code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  names = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
           if line.startswith("import time:")]
  return [n for n in names if n.split(".")[0] in ("jax", "jaxlib", "flax")]


@pytest.mark.parametrize("module", ["vita_jax.data.tokenizer", "vita_jax.data.prompt",
                                    "vita_jax.spec.hf_config", "vita_torch.io"])
def test_framework_free_modules_load_no_jax(module):
  assert _loads_jax(["-c", f"import {module}"]) == []


def test_torch_generate_help_loads_no_jax():
  pytest.importorskip("torch")
  assert _loads_jax(["-m", "vita_torch.generate", "--help"]) == []

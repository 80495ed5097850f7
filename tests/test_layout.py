"""The house's layout rules, checked on the source (issue 24): the folder tree is the
architecture, every import arrow points down, and files and functions stay short.

- no import cycles between fnf_jax's modules (imports inside functions count too: a cycle
  hidden in a function is still a cycle);
- only the entry points (fnf_jax/main.py, fnf_jax/jobs/, the toy world's demo and checks, which
  run jobs) import a job;
- fnf_jax/config imports neither jax nor numpy (a bad config fails before they load);
- no module over 400 lines, no function over 80.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "fnf_jax"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Modules that may run jobs: the entry point, the jobs themselves and the toy world's drivers.
JOB_USERS = ("fnf_jax.main", "fnf_jax.jobs", "fnf_jax.toy.demo", "fnf_jax.toy.checks")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(ROOT.rglob("*.py")):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """The fnf_jax modules `name` imports (anywhere in the file)."""
  found = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
               for a in node.names]
    else:
      continue
    for n in names:
      while n and n not in MODULES:  # a name inside a module: the module
        n = n.rpartition(".")[0]
      if n and n != name:
        found.add(n)
  return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
  """The graph's strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in GRAPH[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in GRAPH:
    if v not in index:
      visit(v)
  return out


def _is_package_parent(a: str, b: str) -> bool:
  # A package's __init__ may import its own modules (a package re-exporting its parts).
  return b.startswith(a + ".")


def test_no_import_cycles():
  cycles = [c for c in _cycles()
            if not all(_is_package_parent(c[0], m) for m in c[1:])]
  assert not cycles, f"import cycles: {cycles}"


def test_the_check_finds_a_cycle():
  # The checker itself: a made-up cycle is found.
  GRAPH["fnf_jax.config.choices"].add("fnf_jax.config.validate")
  try:
    assert any("fnf_jax.config.choices" in c for c in _cycles())
  finally:
    GRAPH["fnf_jax.config.choices"].discard("fnf_jax.config.validate")


def test_only_entry_points_import_jobs():
  wrong = {name: sorted(m for m in deps if m.startswith("fnf_jax.jobs."))
           for name, deps in GRAPH.items()
           if not name.startswith(JOB_USERS)}
  assert not {k: v for k, v in wrong.items() if v}


def test_config_imports_no_jax():
  for name, path in MODULES.items():
    if name.startswith("fnf_jax.config"):
      tree = ast.parse(path.read_text())
      roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
               for a in n.names}
      roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and not n.level}
      assert not roots & {"jax", "numpy", "flax"}, (name, roots)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_short_modules_and_functions(name):
  path = MODULES[name]
  source = path.read_text()
  assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path}: over {MAX_MODULE_LINES} lines"
  long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})"
          for n in ast.walk(ast.parse(source))
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
          and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f"{path}: functions over {MAX_FUNCTION_LINES} lines: {long}"

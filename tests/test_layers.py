"""Imports point down the layers of CONTRIBUTING.md, and no modules import each other.

Read from the source (ast), not by importing: every `import` statement counts,
inside functions too, as do `importlib.import_module('vitjax...')` and the
'module:attribute' strings of lazy name tables (vitjax.lazy). A submodule's
import of its parent package, which Python runs first, is not counted: a package
whose `__init__.py` imports its modules is no cycle.
"""

import ast
import collections
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def layers():
  """{package: rank}, from the numbered list of CONTRIBUTING.md's 'Layers' section."""
  text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
  section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
  ranks = {}
  for line in section.splitlines():
    match = re.match(r"(\d+)\. (.*?):", line)
    if match:
      for package in re.findall(r"`(vitjax[\w.]*)`", match[2]):
        ranks[package] = int(match[1])
  return ranks


def modules():
  """{'vitjax.convert.files': path} of every module; a package is its __init__.py."""
  found = {}
  for path in sorted((ROOT / "vitjax").rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    found[".".join(parts)] = path
  return found


def _resolve(name, known):
  """The module that importing `name` runs: itself, or the package above an attribute."""
  while name not in known and "." in name:
    name = name.rpartition(".")[0]
  return name if name in known else None


def imports(module, path, known):
  """[(line, imported module)] of `module`, for the vitjax modules it imports."""
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # Relative: from the package, up level - 1.
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # `from vitjax.convert import mismatch` imports the module; `... import load_weights`
      # the package.
      names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
               for alias in node.names]
    elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
          and node.args and isinstance(node.args[0], ast.Constant)):
      names = [node.args[0].value]
    elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
          and re.fullmatch(r"vitjax(\.\w+)*:\w+", node.value)):
      names = [node.value.split(":")[0]]
    for name in names:
      if isinstance(name, str) and (name == "vitjax" or name.startswith("vitjax.")):
        target = _resolve(name, known)
        if target and target != module:
          found.append((node.lineno, target))
  return found


def import_graph():
  """{module: {imported module: first line}} of every module under vitjax/."""
  known = modules()
  graph = {}
  for module, path in known.items():
    graph[module] = {}
    for line, target in sorted(imports(module, path, known)):
      graph[module].setdefault(target, line)
  return graph


def _layer_of(module, ranks):
  """The package of `ranks` that `module` belongs to (the longest that holds it), or None."""
  holders = [p for p in ranks if module == p or (p != "vitjax" and module.startswith(p + "."))]
  return max(holders, key=len) if holders else None


def _where(module, line):
  return f"{modules()[module].relative_to(ROOT)}:{line}"


def test_the_graph_sees_imports_inside_functions_and_lazy_tables():
  graph = import_graph()
  assert "vitjax.models" in graph["vitjax.data.pipeline"]  # Inside a function.
  assert "vitjax.evaluate.fewshot" in graph["vitjax.evaluate"]  # 'module:attribute'.
  assert "vitjax.convert.mismatch" in graph["vitjax.convert.checkpoint"]


def test_every_package_is_in_a_layer():
  ranks = layers()
  assert len(ranks) >= 10 and "vitjax.models" in ranks, ranks
  unplaced = sorted(m for m in import_graph() if _layer_of(m, ranks) is None)
  assert not unplaced, ("Modules in no layer of CONTRIBUTING.md's 'Layers' list: "
                        f"{', '.join(unplaced)}. Add their package to the list.")


def test_no_module_imports_from_a_higher_layer_or_a_sibling():
  ranks = layers()
  problems = []
  for module, targets in import_graph().items():
    own = _layer_of(module, ranks)
    for target, line in targets.items():
      other = _layer_of(target, ranks)
      if own is None or other is None or own == other or ranks[other] < ranks[own]:
        continue
      relation = "its own layer" if ranks[other] == ranks[own] else "a higher layer"
      problems.append(f"{_where(module, line)}: {module} (layer {ranks[own]}, {own}) imports "
                      f"{target}, of {relation} ({ranks[other]}, {other})")
  assert not problems, "Imports against the layers of CONTRIBUTING.md:\n  " + "\n  ".join(
      problems)


def _cycles(graph):
  """The strongly connected components of more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in graph.get(node, ()):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return components


def _one_cycle(graph, component):
  """A shortest path from the component's first module back to itself, inside it."""
  start, members = component[0], set(component)
  previous = {}
  queue = collections.deque([start])
  while queue:
    node = queue.popleft()
    for target in sorted(graph[node]):
      if target not in members:
        continue
      if target == start:
        path = [node]
        while path[-1] != start:
          path.append(previous[path[-1]])
        return [start] + path[::-1][1:] + [start]
      if target not in previous:
        previous[target] = node
        queue.append(target)
  return component


def test_no_import_cycles():
  graph = import_graph()
  problems = []
  for component in _cycles(graph):
    cycle = _one_cycle(graph, component)
    steps = [f"{_where(a, graph[a][b])} imports {b}" for a, b in zip(cycle, cycle[1:])]
    problems.append(f"{', '.join(component)}; e.g. {' -> '.join(cycle)}\n      "
                    + "\n      ".join(steps))
  assert not problems, "Modules that import each other:\n  " + "\n  ".join(problems)


def test_the_cycle_finder_finds_cycles():
  graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
  assert _cycles(graph) == [["a", "b", "c"]]
  assert _one_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]

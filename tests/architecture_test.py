"""The layout's rules (docs/architecture.md), checked on the source so they cannot rot:

* stages are layered: a module imports only its own stage and the stages below it
  (core < modeling, data_prep < train < evaluate < serving < jobs, cli); data preparation
  imports only core;
* no import cycles between modules (function-level imports included);
* no module over 450 lines;
* no binary edits sys.path (they import the installed package);
* ``dataset_info.json`` and ``predictions_info.json`` are spelled in one module.
"""

import ast
import glob
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("av_sound_tf", "data_prep")
# The stage of each subpackage, lowest first; a module may import equal or lower levels.
LEVELS = {"av_sound_tf.core": 0, "av_sound_tf.modeling": 1, "data_prep": 1,
          "av_sound_tf.train": 2, "av_sound_tf.evaluate": 3, "av_sound_tf.serving": 4,
          "av_sound_tf.jobs": 5, "av_sound_tf.cli": 5}
MAX_LINES = 450


def _modules():
  """{dotted module name: path} for every project module."""
  found = {}
  for package in PACKAGES:
    for path in glob.glob(os.path.join(REPO, package, "**", "*.py"), recursive=True):
      rel = os.path.relpath(path, REPO)[:-len(".py")].replace(os.sep, ".")
      found[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return found


def _imports(path, modules):
  """Project modules that `path` imports anywhere (top level or inside functions)."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
    else:
      continue
    for name in names:
      if name in modules:
        out.add(name)
  return out


def _level(module):
  for prefix, level in sorted(LEVELS.items(), key=lambda kv: -len(kv[0])):
    if module == prefix or module.startswith(prefix + "."):
      return prefix, level
  return None, None


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_module_belongs_to_a_stage(graph):
  unplaced = [m for m in graph if _level(m)[0] is None and m not in PACKAGES and
              m != "av_sound_tf.__init__"]
  assert unplaced == []


def test_stages_import_only_themselves_and_lower_stages(graph):
  upward = []
  for module, imported in graph.items():
    stage, level = _level(module)
    if stage is None:
      continue
    for other in imported:
      other_stage, other_level = _level(other)
      if other_stage is None:
        continue
      if other_level > level or (stage == "data_prep" and other_stage not in (
          "data_prep", "av_sound_tf.core")) or (stage == "av_sound_tf.modeling" and
                                                other_stage == "data_prep"):
        upward.append(f"{module} -> {other}")
  assert upward == []


def test_no_import_cycles(graph):
  cycles, state = [], {}

  def visit(m, stack):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == "open":
        cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
      elif n not in state:
        visit(n, stack)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [])
  assert cycles == []


def test_no_module_over_the_line_limit():
  long = {m: n for m, p in _modules().items()
          if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
  assert long == {}


def test_binaries_do_not_touch_sys_path():
  binaries = sorted(glob.glob(os.path.join(REPO, "bin", "*")))
  assert len(binaries) >= 10
  assert [b for b in binaries if "sys.path" in open(b, encoding="utf-8").read()] == []


def _string_constants(path):
  """String literals of a file, docstrings excluded."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  docstrings = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        docstrings.add(id(body[0].value))
  return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and
          isinstance(n.value, str) and id(n) not in docstrings]


@pytest.mark.parametrize("name", ["dataset_info.json", "predictions_info.json"])
def test_folder_info_files_are_named_in_one_module(name):
  sources = list(_modules().values()) + sorted(glob.glob(os.path.join(REPO, "bin", "*")))
  spelled = sorted(os.path.relpath(p, REPO) for p in sources
                   if any(name in s for s in _string_constants(p)))
  assert spelled == [os.path.join("av_sound_tf", "core", "dataset_info.py")]

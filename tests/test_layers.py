"""The package's layers, as the README's "Where things are" lays them out: a module imports only from its own
layer or the layers below, and no modules import each other in a circle.

Every import counts: at module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "verispec"

# Low to high. A module belongs to the first layer with an entry equal to its dotted name or a package above it.
# The server (serve) stands on the engine beside the Python API (api), without it: it is ranked below so that
# it cannot reach for the user-facing API.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "ema", "text", "token_tree", "llama_lib", "huge_pages", "models", "prompts"),
    ("runners", "heads"),
    ("sampling", "sampling_device", "cost_model"),
    ("drafters",),
    ("verify",),
    ("engine", "draft_gate", "draft_length", "stepper", "loaded"),
    ("serve",),
    ("api", ""),  # "": verispec/__init__.py, the public names
    ("cli", "bench"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that module `name` (dotted, without "verispec.") imports anywhere in its file."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {inside(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = (_join(*package[: len(package) - node.level + 1], node.module or "") if node.level
                      else inside(node.module or ""))
            if module is None:
                continue
            # `from x import y` names module x.y where there is one, else something x defines.
            found |= {_join(module, alias.name) if _join(module, alias.name) in known else module
                      for alias in node.names}
    return {target for target in found if target in known and target != name}


def inside(absolute: str) -> str | None:
    """An absolute module name as a name inside the package ("" for the package), None for other packages."""
    if absolute == "verispec" or absolute.startswith("verispec."):
        return absolute.removeprefix("verispec").lstrip(".")
    return None


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def import_graph() -> dict[str, set[str]]:
    files = modules()
    return {name: imported(name, path, set(files)) for name, path in files.items()}


def layer_of(name: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(name == m or (m and name.startswith(m + ".")) for m in members):
            return rank
    raise AssertionError(f"verispec.{name or '__init__'} is in no layer: add it to LAYERS in tests/test_layers.py")


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_no_module_imports_from_a_higher_layer():
    upward = [f"verispec.{name} -> verispec.{target}"
              for name, targets in import_graph().items() for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles, graph = [], import_graph()
    while True:
        try:
            graphlib.TopologicalSorter(graph).prepare()
            break
        except graphlib.CycleError as exc:
            cycle = exc.args[1]
            cycles.append(" -> ".join(reversed(cycle)))  # graphlib lists it from imported to importer
            for a, b in zip(cycle, cycle[1:]):  # cut one of its edges, then look for the next circle
                for importer, target in ((a, b), (b, a)):
                    if target in graph[importer]:
                        graph[importer].discard(target)
                        break
                else:
                    continue
                break
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_kind_of_import_is_seen(tmp_path):
    """The parser itself, on a module of the package's runners: imports at module level, in a function, under
    TYPE_CHECKING, relative and absolute, of a module and of a name a package defines."""
    known = {"", "engine", "sampling", "runners", "runners.base", "runners.pool", "drafters.base", "verify.tree"}
    source = tmp_path / "pool.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import numpy as np\n"
        "from .base import Runner\n"
        "from .. import sampling\n"
        "if TYPE_CHECKING:\n"
        "    from ..engine import Forward\n"
        "def f():\n"
        "    import verispec.verify.tree\n"
        "    from verispec import load\n"
        "    from ..drafters.base import DraftPass\n")
    assert imported("runners.pool", source, known) == {"runners.base", "sampling", "engine", "verify.tree", "",
                                                       "drafters.base"}

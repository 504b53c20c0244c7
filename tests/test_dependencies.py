"""Every module verispec imports, at the top of a file or inside a function, comes with pyproject.toml's base
dependencies, so that every base command runs after a plain `pip install verispec`. Ray, the [cluster] extra,
is the one exception: imported only inside functions, behind a guard that names the extra."""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "verispec"
GUARDED_EXTRAS = {"ray": "cluster"}  # top-level module -> the extra that installs it
CLUSTER_HINT = "pip install 'verispec[cluster]'"


def imported_modules(tree: ast.Module) -> list[tuple[str, bool]]:
    """(top-level module, imported at module level) for every absolute import in a file, nested ones included."""
    found = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], top_level) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], top_level))
            inside_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, top_level and not inside_function)

    visit(tree, True)
    return found


@cache
def third_party_imports() -> dict[str, list[tuple[str, bool]]]:
    """module -> [(file, at module level)] over every .py file of the package."""
    out: dict[str, list[tuple[str, bool]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, top_level in imported_modules(ast.parse(path.read_text(), str(path))):
            if module not in sys.stdlib_module_names and module != "verispec":
                out.setdefault(module, []).append((str(path.relative_to(ROOT)), top_level))
    return out


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def closure(requirements: list[str]) -> tuple[set[str], set[str]]:
    """(the distributions these requirements install, transitively, with the extras they ask for; those of them
    not installed here, whose own requirements could not be read)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    missing: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            missing.add(key[0])
            continue
        for text in requires:
            sub = Requirement(text)
            environments = [{"extra": extra} for extra in ("", *req.extras)]
            if sub.marker is None or any(sub.marker.evaluate(env) for env in environments):
                sub.marker = None
                todo.append(sub)
    return {name for name, _ in seen}, missing


@cache
def installed_packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    return {canonicalize_name(d) for d in installed_packages().get(module, [])}


def test_the_import_scan_sees_nested_imports_and_where_they_are():
    tree = ast.parse("import a.b\nfrom c import d\nfrom . import e\ndef f():\n    import g\n"
                     "class K:\n    from h import i\n    def m(self):\n        from j.k import l\n")
    assert imported_modules(tree) == [("a", True), ("c", True), ("g", False), ("h", True), ("j", False)]


def test_the_closure_follows_requirements_and_only_the_extras_asked_for():
    installed, _ = closure(["fastapi"])
    assert {"fastapi", "starlette", "pydantic"} <= installed
    assert "httpx" not in installed  # only under fastapi's [standard] and [all] extras


def test_every_runtime_import_is_a_base_dependency():
    base, not_installed = closure(project()["dependencies"])
    unlisted = [f"{name} (a base dependency not installed here: its modules and requirements are unknown)"
                for name in sorted(not_installed)]
    for module, sites in third_party_imports().items():
        if module in GUARDED_EXTRAS:
            continue
        dists = distributions_of(module)
        if not dists & base:
            files = sorted({f for f, _ in sites})
            unlisted.append(f"{module} ({', '.join(sorted(dists)) or 'no installed distribution'}) in {', '.join(files)}")
    assert not unlisted, "not provided by pyproject.toml's base dependencies:\n" + "\n".join(unlisted)


@pytest.mark.parametrize("module", sorted(GUARDED_EXTRAS))
def test_an_extra_is_imported_only_inside_functions(module):
    extra = GUARDED_EXTRAS[module]
    installs, _ = closure(project()["optional-dependencies"][extra])
    assert distributions_of(module) & installs, f"{module} is not what the [{extra}] extra installs"
    sites = third_party_imports().get(module, [])
    assert sites, f"nothing imports {module}: drop it from GUARDED_EXTRAS"
    at_import = [f for f, top_level in sites if top_level]
    assert not at_import, f"{module} imported when these modules load, not lazily: {at_import}"


def test_serve_ray_without_ray_says_which_extra_to_install(monkeypatch):
    from typer.testing import CliRunner

    from verispec.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(app, ["serve", "--ray", "--model", "smollm2-135m"])
    assert result.exit_code == 2, result.output
    assert CLUSTER_HINT in result.output and "Traceback" not in result.output


def test_the_ray_bench_without_ray_says_which_extra_to_install_before_loading_a_model(monkeypatch):
    from verispec.bench import ray_load
    from verispec.serve.cluster import ClusterError

    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(ray_load, "direct_server", lambda *a: pytest.fail("loaded a model before checking for Ray"))
    with pytest.raises(ClusterError, match=re.escape(CLUSTER_HINT)):
        ray_load.main([])

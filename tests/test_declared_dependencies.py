"""pyproject.toml's dependencies are what the package imports, no more and no less.

A module imported only because another dependency happens to bring it (starlette
through fastapi) breaks the day that one stops; a declared one nothing imports is
installed for nothing. The import graph is read from the source (every ``import``
of every module, those under ``TYPE_CHECKING`` and in functions included), and each
module named there is traced to the distribution whose files hold it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "branchyard"


def canonical(name: str) -> str:
    """A distribution's name as the packaging spec compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    """The distributions ``[project] dependencies`` names."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        canonical(re.split(r"[<>=!~;\[ ]", entry, maxsplit=1)[0])
        for entry in project["dependencies"]
    }


def imported_modules() -> dict[str, Path]:
    """Each module the package imports from outside itself and the standard library,
    with one file that imports it."""
    found: dict[str, Path] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".", 1)[0]
                if top != PACKAGE.name and top not in sys.stdlib_module_names:
                    found.setdefault(name, path.relative_to(ROOT))
    return found


def distribution_of(module: str) -> str:
    """The distribution whose files hold ``module`` (``lightkube.models.apps_v1`` is
    lightkube-models', ``lightkube`` lightkube's)."""
    candidates = importlib.metadata.packages_distributions().get(module.split(".", 1)[0], [])
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{module} is not installed"
    where = Path(spec.origin or next(iter(spec.submodule_search_locations or []))).resolve()
    for name in candidates:
        distribution = importlib.metadata.distribution(name)
        for file in distribution.files or []:
            held = Path(str(distribution.locate_file(file))).resolve()
            if held == where or where in held.parents:
                return canonical(name)
    raise AssertionError(f"no distribution holds {module} ({where}); candidates {candidates}")


def test_every_module_the_package_imports_is_a_declared_dependency_and_every_one_is_imported() -> (
    None
):
    modules = imported_modules()
    needed: dict[str, str] = {}
    for module, path in modules.items():
        needed.setdefault(distribution_of(module), f"{module} in {path}")
    wanted = declared()
    assert {name: why for name, why in needed.items() if name not in wanted} == {}
    assert wanted - set(needed) == set(), "declared, imported nowhere"

"""Each image installs pyproject.toml's core dependencies and its role's extra only
(deploy/*.Dockerfile). These tests read every import in the role's code and check that the
role's requirement set, with everything those packages require in turn, provides it; and that
the client's code never imports what only the dashboard needs."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OWN = {"fedrot", "fedrot_client", "fedrot_server", "fedrot_proto"}
# Imported lazily behind their own extras, with an error naming the extra when missing:
# plots (experiments), the Ray backend (ray), 4-bit weights (qlora).
OPTIONAL = {"matplotlib", "ray", "bitsandbytes"}
# The dashboard's packages: never imported by the client's code.
SERVER_ONLY = {"fastapi", "uvicorn", "plotly", "prometheus_client", "starlette", "fedrot_server"}
ROLE_CODE = {
    "client": ["client", "fedrot", "protos/fedrot_proto/v1"],
    "server": ["server", "fedrot", "protos/fedrot_proto/v1"],
}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def role_closure(role: str) -> set[str]:
    """The distributions an image of ``role`` installs: core plus the role's extra, transitively."""
    return requirement_closure([*PROJECT["dependencies"], *PROJECT["optional-dependencies"][role]])


def imported_modules(folders: Iterable[str]) -> dict[str, str]:
    """Top-level module -> first file importing it (absolute imports, lazy ones included)."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(REPO)))
    return found


def requirement_closure(requirements: Iterable[str]) -> set[str]:
    """Normalised names of the distributions ``requirements`` install, transitively (markers
    evaluated here, no extras of the dependencies)."""
    seen: set[str] = set()
    pending = [Requirement(r) for r in requirements]
    while pending:
        requirement = pending.pop()
        name = normal(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.distribution(requirement.name).requires or []:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                pending.append(child)
    return seen


@pytest.mark.parametrize("role", ["client", "server"])
def test_the_role_requirements_provide_every_import_of_its_code(role: str) -> None:
    installed = role_closure(role)
    providers = metadata.packages_distributions()
    missing = {}
    for module, where in imported_modules(ROLE_CODE[role]).items():
        if module in sys.stdlib_module_names or module in OWN | OPTIONAL or module == "__future__":
            continue
        if not {normal(d) for d in providers.get(module, [])} & installed:
            missing[module] = where
    assert not missing, f"the {role} image would lack: {missing}"


def test_the_client_code_never_imports_the_dashboard() -> None:
    imports = imported_modules(ROLE_CODE["client"])
    assert not {m: imports[m] for m in imports.keys() & SERVER_ONLY}


def test_the_client_image_carries_no_dashboard_package() -> None:
    dashboard = {"fastapi", "uvicorn", "plotly", "prometheus-client", "starlette"}
    assert not role_closure("client") & dashboard
    assert not role_closure("server") & {"trl", "datasets", "pyarrow"}

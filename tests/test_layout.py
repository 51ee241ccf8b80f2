"""Each package is readable from its front door: its ``__init__.py`` docstring names
every module of the package (in the order to read them), and every module opens with
a docstring that says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dropserver", "realtime", "drops", "checkout", "streaming", "loadtest",
            "benchmarks")


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text(), filename=str(path))) or ""


def _members(package: str) -> list[str]:
    """The package's own modules and subpackages (not their contents)."""
    here = ROOT / package
    names = [p.stem for p in here.glob("*.py") if p.stem != "__init__"]
    names += [p.name for p in here.iterdir() if (p / "__init__.py").is_file()]
    return sorted(names)


@pytest.mark.parametrize("package", PACKAGES)
def test_the_package_docstring_introduces_every_module(package):
    doc = _docstring(ROOT / package / "__init__.py")
    missing = [name for name in _members(package)
               if f"``{name}``" not in doc and f":mod:`{package}.{name}`" not in doc]
    assert not missing, (f"{package}/__init__.py should say what these modules own, in "
                         f"the order to read them: {', '.join(missing)}")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_opens_with_what_it_owns(package):
    bare = [str(path.relative_to(ROOT)) for path in sorted((ROOT / package).rglob("*.py"))
            if len(_docstring(path).split()) < 4]
    assert not bare, f"modules without an opening docstring: {', '.join(bare)}"

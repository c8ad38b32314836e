"""The declared dependencies against what is installed and what the code imports.

pyproject.toml's ranges, constraints/cluster.txt's pins (what every cluster node installs and CI
tests) and the README's list of tested versions must agree; every third-party module the
installed packages import must be declared; and `albumentations` must come from the MIT-licensed
distribution of that name, not from AlbumentationsX (AGPL-3.0), which installs the same module.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
OWN_PACKAGES = ("marsseg", "search", "spaces")
"""What pyproject.toml installs (`[tool.setuptools.packages.find]`)."""


def requirements() -> dict[str, Requirement]:
    declared = [Requirement(line) for line in PROJECT["dependencies"]]
    return {canonicalize_name(req.name): req for req in declared}


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints" / "cluster.txt").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints/cluster.txt: {line!r} is not a pin"
            found[canonicalize_name(req.name)] = spec.version
    return found


def test_installed_versions_satisfy_pyproject():
    wrong = []
    for name, req in requirements().items():
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wrong.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            wrong.append(f"{req}: {installed} installed")
    assert not wrong, "reinstall the project (pip install -e .): " + "; ".join(wrong)


def test_pins_are_declared_and_within_pyproject_ranges():
    declared = requirements()
    assert set(pins()) >= {"ray", "torch", "optuna", "albumentations"}
    for name, version in pins().items():
        assert name in declared, f"constraints/cluster.txt pins {name}, which is not a dependency"
        assert declared[name].specifier.contains(version, prereleases=True), (
            f"constraints/cluster.txt pins {name}=={version}, outside {declared[name]}"
        )


def test_readme_names_the_versions_ci_tests():
    readme = (REPO / "README.md").read_text()
    development = readme.split("\n## Development\n", 1)[1].split("\n## ", 1)[0]
    development = " ".join(development.split())  # as rendered: line breaks are spaces
    for name, version in pins().items():
        assert f"{name} {version}" in development, f"README's Development lacks {name} {version}"


def test_albumentations_is_the_mit_distribution():
    providers = importlib.metadata.packages_distributions().get("albumentations", [])
    assert providers == ["albumentations"], (
        f"the albumentations module comes from {providers}: AlbumentationsX (AGPL-3.0) installs "
        "the same module; pip uninstall albumentationsx albumentations, then reinstall the project"
    )
    meta = importlib.metadata.metadata("albumentations")
    assert "License :: OSI Approved :: MIT License" in meta.get_all("Classifier", [])
    assert meta["Version"] == pins()["albumentations"]


def third_party_imports(package: Path) -> dict[str, str]:
    """Top-level module -> the first file that imports it, for every import in the package that
    is neither the standard library nor one of this project's packages."""
    found: dict[str, str] = {}
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in OWN_PACKAGES or top == "__future__":
                    continue
                found.setdefault(top, str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("package", OWN_PACKAGES)
def test_every_imported_module_is_declared(package):
    """Imported directly, declared directly: a dependency that only arrives through another
    one's requirements can disappear with that one's next release."""
    declared = set(requirements())
    providers = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in third_party_imports(REPO / package).items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        if not dists & declared:
            undeclared.append(f"{module} ({where}; installed by {sorted(dists) or 'nothing'})")
    assert not undeclared, "imported but not in pyproject.toml's dependencies: " + ", ".join(
        undeclared
    )

"""pixi.toml declares the environment pyproject.toml does (the README says so): same packages, same bounds."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_requirements(requirements: list[str]) -> dict[str, str]:
    """{name: specifier} from PEP 508 strings such as "numpy>=1.26,<3"."""
    parsed = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", requirement.split(";")[0].strip())
        parsed[normalise(match.group(1))] = match.group(2).replace(" ", "")
    return parsed


def pixi_requirements(*tables: dict[str, object]) -> dict[str, str]:
    """{name: specifier} from pixi tables; a conda spec "26.7.*" is pip's "==26.7.*"."""
    parsed = {}
    for table in tables:
        for name, spec in table.items():
            if isinstance(spec, dict):  # a path dependency: the project itself
                continue
            spec = str(spec).replace(" ", "")
            parsed[normalise(name)] = spec if spec[0] in "<>=!~" else f"=={spec}"
    return parsed


def test_pixi_declares_pyprojects_environment():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pixi = tomllib.loads((ROOT / "pixi.toml").read_text())
    runtime = pixi_requirements(pixi["dependencies"], pixi["pypi-dependencies"])
    runtime.pop("python")
    assert runtime == pyproject_requirements(pyproject["project"]["dependencies"])
    test = pixi["feature"]["test"]
    assert pixi_requirements(test["dependencies"], test["pypi-dependencies"]) == pyproject_requirements(
        pyproject["project"]["optional-dependencies"]["test"])

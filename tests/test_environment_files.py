"""environment.yml mirrors pyproject.toml, so conda users get the same stack."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml

REPO = Path(__file__).resolve().parent.parent


def requirement_names(requirements) -> dict[str, str]:
    return {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in requirements}


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"])
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    have = requirement_names(pip_section)
    have["torch"] = next(d for d in conda if d.startswith("pytorch")).replace("pytorch", "torch")
    assert have == wanted

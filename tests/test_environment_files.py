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


def test_a_machine_without_a_gpu_got_no_cuda_wheels():
    """scripts/setup.sh pins torch before anything else; a bare `torch` requirement would pull GBs of CUDA."""
    from importlib import metadata

    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the CUDA wheels are wanted
    cuda = sorted(d.metadata["Name"] for d in metadata.distributions() if (d.metadata["Name"] or "").startswith("nvidia-"))
    assert cuda == [] and "+cpu" in torch.__version__


def test_the_build_requirement_reads_pyprojects_license_string():
    """setuptools before 77 refuses `license = "Apache-2.0"` (PEP 639) with "`project.license` must be valid exactly by
    one definition", so `pip wheel --no-build-isolation` or a build with an older setuptools failed."""
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    (setuptools,) = [Requirement(r) for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    if isinstance(pyproject["project"]["license"], str):
        assert not setuptools.specifier.contains("76.1.0") and setuptools.specifier.contains("77.0.3"), setuptools

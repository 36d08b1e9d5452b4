"""environment.yml mirrors pyproject.toml, so conda users get the same stack."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def requirement_names(requirements) -> dict[str, str]:
    return {re.split(r"[<>=!~ ]", r, maxsplit=1)[0].lower(): r.replace(" ", "") for r in requirements}


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = requirement_names(project["dependencies"] + project["optional-dependencies"]["dev"])
    environment = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    conda = [d for d in environment["dependencies"] if isinstance(d, str)]
    have = requirement_names(r for r in pip_section if not r.startswith("-"))
    # torch is pinned, as scripts/setup.sh pins it, where pyproject gives the range the pin lies in.
    torch_pin = re.search(r"TORCH_VERSION:-([\d.]+)", (REPO / "scripts" / "setup.sh").read_text()).group(1)
    assert have.pop("torch") == f"torch=={torch_pin}"
    assert SpecifierSet(wanted.pop("torch").removeprefix("torch")).contains(torch_pin)
    assert have == wanted
    # Not conda's pytorch: the pytorch channel ends at 2.5.1, and pip replaced it (accelerate wants torch>=2.6).
    assert not [d for d in conda if re.match(r"(pytorch|cpuonly)\b", d)] and "pytorch" not in environment["channels"]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in pip_section
    assert pip_section.index("--extra-index-url https://download.pytorch.org/whl/cpu") == 0


def test_pyprojects_torch_floor_is_no_lower_than_its_dependencies():
    """A torch below a dependency's floor is not kept: pip replaces it with PyPI's default build (CUDA's, GBs), so
    the kit's own range must not promise it (accelerate 1.16 asks torch>=2.6)."""
    from importlib import metadata

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    ours = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    our_floor = max(Version(s.version) for s in ours.specifier if s.operator == ">=")
    too_low = {}
    for dependency in project["dependencies"]:
        name = Requirement(dependency).name
        for text in metadata.requires(name) or [] if name != "torch" else []:
            requirement = Requirement(text)
            if requirement.name == "torch" and (requirement.marker is None or requirement.marker.evaluate({"extra": ""})):
                floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==", "~=")]
                if floors and max(floors) > our_floor:
                    too_low[name] = str(requirement.specifier)
    assert not too_low, f"pyproject's {ours} lets in a torch that {too_low} refuse"


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

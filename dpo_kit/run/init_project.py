"""`dpo-kit init DIR`: a project folder of one's own, holding copies of the kit's notebooks and params.

A checkout has them at its root (notebooks/, params/). An installed wheel carries the same files inside the
package, as `dpo_kit/template/notebooks` and `dpo_kit/template/params` (setup.py maps the root folders there
when it builds), so that `dpo-kit run` works and `dpo-kit init` has something to copy outside a checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

TEMPLATE_PARTS = ("notebooks", "params")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # dpo_kit/
CHECKOUT_DIR = PACKAGE_DIR.parent  # the repository root in a checkout or an editable install


class InitError(RuntimeError):
    """The project folder cannot be made; the message names the folder and what to do instead."""


def kit_dirs(part: str) -> list[Path]:
    """Where the kit's own copy of `part` (notebooks or params) may be, the installed package's first.

    A wheel has only the packaged copy; an editable install or a checkout has only the root folder.
    """
    if part not in TEMPLATE_PARTS:
        raise ValueError(f"unknown template part {part!r}; valid: {', '.join(TEMPLATE_PARTS)}")
    return [PACKAGE_DIR / "template" / part, CHECKOUT_DIR / part]


def kit_dir(part: str) -> Path:
    """The kit's copy of `part` that exists (it holds at least one file)."""
    for candidate in kit_dirs(part):
        if candidate.is_dir() and any(p.is_file() for p in candidate.iterdir()):
            return candidate
    tried = " or ".join(str(c) for c in kit_dirs(part))
    raise InitError(f"the kit's {part} were not found (looked in {tried}); reinstall dpo-kit")


def init_project(directory: str | Path) -> Path:
    """Copy the kit's notebooks/ and params/ into `directory`, a new or empty folder; returns it.

    An existing folder with anything in it is refused: init never overwrites, so edited notebooks or params,
    and runs, are never lost to a second `dpo-kit init`.
    """
    target = Path(directory).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise InitError(f"{target} exists and is a file; give a new folder (or an empty one) to dpo-kit init")
    if target.is_dir() and any(target.iterdir()):
        raise InitError(f"{target} already exists and is not empty; dpo-kit init never overwrites."
                        " Give a new folder, or an empty one")
    sources = {part: kit_dir(part) for part in TEMPLATE_PARTS}  # all found before anything is written
    target.mkdir(parents=True, exist_ok=True)
    for part, source in sources.items():
        # Only the notebooks and params themselves: no __pycache__, checkpoints or files an editor left.
        shutil.copytree(source, target / part, ignore=_not_template_files)
    return target


def _not_template_files(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if not name.endswith((".ipynb", ".yaml", ".yml"))]

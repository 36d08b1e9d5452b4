"""manifest.json: what ran, when, on what, and with which result, next to the run's outputs.

Both the runner (from outside the kernels) and each stage notebook (from inside) update it, one
at a time, so every write re-reads the file and replaces it atomically.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

STAGES = ("format", "train", "merge", "generate", "evaluate")
TRACKED_PACKAGES = (
    "dpo-kit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
    "tokenizers", "papermill", "wandb",
)  # fmt: skip


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: str | Path) -> dict[str, Any]:
    """Commit and dirtiness of the repo holding `directory`; None fields outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "manifest.json"


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = manifest_path(run_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    path = manifest_path(run_dir)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(temporary, path)


def new_manifest(run_name: str, seed: int, project_dir: str | Path, hardware: dict) -> dict[str, Any]:
    return {
        "run": run_name,
        "status": "created",
        "created": now_iso(),
        "seed": seed,
        "command": " ".join(sys.argv),
        "git": git_state(project_dir),
        "packages": package_versions(),
        "hardware": hardware,
        "data": {},
        "stages": {},
    }


def update_manifest(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    manifest.update(fields)
    write_manifest(run_dir, manifest)
    return manifest


def update_stage(run_dir: str | Path, stage: str, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    entry = manifest.setdefault("stages", {}).setdefault(stage, {})
    entry.update(fields)
    write_manifest(run_dir, manifest)
    return manifest


def new_previous_dir(parent: str | Path, label: str = "") -> Path:
    """Create and return <parent>/previous/<time>[-label], a fresh folder for earlier outputs moved aside
    (a -2, -3, ... suffix when two moves fall within one second)."""
    stem = datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
    target, suffix = Path(parent) / "previous" / stem, 1
    while target.exists():
        suffix += 1
        target = Path(parent) / "previous" / f"{stem}-{suffix}"
    target.mkdir(parents=True)
    return target


class StageTimer:
    """Wall time of a stage, measured from inside its notebook."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

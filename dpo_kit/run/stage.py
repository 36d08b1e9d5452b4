"""What every stage notebook does first and last: resolve the run, guard it, and record the result.

A notebook's parameters cell holds four literals (params_path, overrides, project_dir, run_dir);
`open_stage` turns them into a `Stage`. It refuses to redo a stage that already completed in that
run directory, so an earlier result is never overwritten, and it refuses params that differ from
the ones the run started with, so the stages of one run always share one configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_kit import manifest as mf
from dpo_kit.params import (
    Params,
    check_local_files,
    load_params,
    params_to_dict,
    run_directory,
    save_or_check_params,
)


class StageError(RuntimeError):
    """A stage cannot start: the message says why and what to change."""


@dataclass
class Stage:
    name: str
    params: Params
    run_dir: Path
    project_dir: Path
    hardware: Any
    timer: mf.StageTimer = field(default_factory=mf.StageTimer)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def record(self, **fields: Any) -> None:
        """Add run-level facts (e.g. the data fingerprint) to manifest.json."""
        mf.update_manifest(self.run_dir, **fields)

    def complete(self, **summary: Any) -> dict[str, Any]:
        """Mark the stage completed in manifest.json with its wall time and a JSON-able summary."""
        manifest = mf.update_stage(
            self.run_dir, self.name, status="completed", finished=mf.now_iso(), seconds=self.timer.seconds, **summary
        )
        if all(manifest["stages"].get(s, {}).get("status") == "completed" for s in mf.STAGES):
            mf.update_manifest(self.run_dir, status="completed", finished=mf.now_iso())
        return manifest["stages"][self.name]


def run_dir_for(params: Params, project_dir: str | Path) -> Path:
    return run_directory(project_dir, params.run.output_dir, params.run.name)


def open_stage(
    name: str,
    params_path: str,
    overrides: list[str] | tuple[str, ...] = (),
    project_dir: str = ".",
    run_dir: str = "",
) -> Stage:
    """Load params, resolve and guard the run directory, and mark the stage running in the manifest."""
    from dpo_kit.hardware import choose_hardware

    if name not in mf.STAGES:
        raise StageError(f"unknown stage '{name}'; valid stages: {', '.join(mf.STAGES)}")
    # Relative paths resolve against the project, not the kernel's working directory, so the same
    # defaults work in JupyterLab (cwd notebooks/) and under papermill started from the repo root.
    project = Path(project_dir).resolve()
    params_file = project / params_path
    params = load_params(params_file, overrides)
    check_local_files(params, project)
    run_path = (project / run_dir).resolve() if run_dir else run_dir_for(params, project)
    run_path.mkdir(parents=True, exist_ok=True)

    save_or_check_params(params_to_dict(params), run_path / "params.yaml", f"{params_file} + overrides")

    hardware = choose_hardware()
    manifest = mf.read_manifest(run_path)
    if not manifest:
        manifest = mf.new_manifest(params.run.name, params.run.seed, project, hardware.to_dict())
        mf.write_manifest(run_path, manifest)
    previous = manifest.get("stages", {}).get(name, {})
    if previous.get("status") == "completed":
        raise StageError(
            f"stage '{name}' of run '{params.run.name}' already completed in {run_path} at {previous.get('finished')};"
            " an earlier result is never overwritten. Choose a new run.name (e.g. overrides=['run.name=...'])."
        )
    mf.update_stage(run_path, name, status="running", started=mf.now_iso())
    mf.update_manifest(run_path, status="running")
    return Stage(name=name, params=params, run_dir=run_path, project_dir=project, hardware=hardware)

"""What every stage notebook does first and last: resolve the run, guard it, and record the result.

A notebook's parameters cell holds five literals (params_path, overrides, project_dir, run_dir, on_rerun);
`open_stage` turns them into a `Stage`. People run notebooks again, with the same params (Run All a second
time) or with one changed (β in 02), so a stage that finds its own earlier result does one of three things:

- on_rerun="show" (the notebooks' default): the stage completed with the same params, so its stored result is
  shown and nothing is recomputed;
- on_rerun="recompute": the stored result is moved to <run_dir>/previous/ and the stage runs again;
- on_rerun="refuse" (what `dpo-kit run` passes): a completed stage raises, as a batch run should;
- on_rerun="resume" (what `dpo-kit run --resume` passes): as "refuse", but an unfinished train stage continues.

A train stage that did not finish (interrupted by SIGINT or SIGTERM, failed, or found running in a process that
is gone) continues from its newest verified checkpoint under "show" and "resume", through the Trainer's
resume_from_checkpoint (dpo_kit.training.checkpoints says which checkpoints are trusted). Under "refuse" and
"recompute", and for the other stages, which keep no checkpoints, the unfinished attempt moves aside and the
stage computes from the start.

When the params changed, "show" and "recompute" both move the stage's old output and that of every later
stage (made from it) to <run_dir>/previous/<time>-<stage>/ with their manifest entries and params: nothing
is destroyed. A stage never reads an earlier stage's output that other params made: 03 refuses to merge an
adapter trained with another β than the one it was given. Each stage's manifest entry names the parameter
set that produced it (<run_dir>/param_sets/<id>.yaml).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_kit import manifest as mf
from dpo_kit.params import (
    DEFAULT_TOP_K,
    SENTIMENT_MIN_WORDS,
    Params,
    check_local_files,
    load_params,
    params_differences,
    params_to_dict,
    run_directory,
    save_or_check_params,
    save_params,
)

ON_RERUN = ("show", "recompute", "refuse", "resume")
RESUMES = ("show", "resume")  # the on_rerun values under which an unfinished train stage continues
# The params each stage's output depends on, beyond those of the stages before it (a stage depends on all of
# its predecessors' too). run.name and run.output_dir only name the place. tests/test_stage_rerun.py checks
# that every key of Params is listed here, so a new section cannot slip past the check.
STAGE_INPUTS = {
    "format": ("run.seed", "model", "data", "dpo.max_length"),
    "train": ("dpo", "lora", "quantization", "tracking", "launch.num_processes", "launch.num_machines",
              "launch.config_file"),
    "merge": ("merge",),
    "generate": ("generate",),
    "evaluate": ("evaluate",),
}
# What each stage writes into the run directory (the executed notebook is the runner's copy); moved aside
# together when the stage runs again. tests/test_stage_rerun.py checks that a finished run holds nothing else.
# tracking/ goes with the train stage: a new training starts new tracker files (the evaluate stage, which adds
# its summary there, runs again after it). The evaluate stage's TensorBoard summary is a folder of its own
# (dpo_kit.tracking.TENSORBOARD_EVALUATION), moved aside with that stage.
STAGE_OUTPUTS = {
    "format": ("data", "token_lengths.png", "notebooks/01_format_data.ipynb"),
    "train": ("checkpoints", "adapter", "trained", "train_log.jsonl", "training_curves.png", "tracking",
              "train_result.json", "notebooks/02_train_dpo.ipynb"),
    "merge": ("merged", "notebooks/03_merge.ipynb"),
    "generate": ("generations.jsonl", "reference_samples.jsonl", "notebooks/04_generate.ipynb"),
    "evaluate": ("metrics.json", "evaluation.png", "tracking/tensorboard/evaluate", "notebooks/05_evaluate.ipynb"),
}  # fmt: skip
# The heartbeat file is there while a stage runs, and stays where one did not complete.
RUN_FILES = ("manifest.json", "params.yaml", "param_sets", "previous", "notebooks", mf.HEARTBEAT_FILE)
PARAM_SETS = "param_sets"
PREVIOUS = "previous"


class StageError(RuntimeError):
    """A stage cannot start: the message says why and what to change."""


class StageBusy(StageError):
    """The stage runs now in another live process: refused, and that process's entry is left as it is."""


class StageEntry(dict):
    """A stage's manifest entry, as `Stage.complete` returns it: a plain dict to code, one line in a notebook.

    It is each stage notebook's last output. Shown whole, it was a dump of the kit's bookkeeping (the pid, boot id
    and process start ticks that find a dead stage, the heartbeat, every metric at full precision) that a reader
    has no use for there; the line says what happened and where the entry is kept."""

    def __init__(self, entry: dict[str, Any], stage: str, manifest: Path, shown: bool) -> None:
        super().__init__(entry)
        self.stage, self.manifest, self.shown = stage, manifest, shown

    def summary(self) -> str:
        params = f" (parameter set {self['params_id']})" if self.get("params_id") else ""
        where = f"its entry{params} is under stages.{self.stage} in {self.manifest}"
        if self.shown:
            finished = f", completed {self['finished']}" if self.get("finished") else ""
            return f"{self.stage} stage: the stored result shown above{finished}, nothing recomputed; {where}"
        seconds = f" in {self['seconds']:.1f} s" if isinstance(self.get("seconds"), (int, float)) else ""
        return f"{self.stage} stage completed{seconds}; {where}"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython's display hook; repr() stays a dict's
        printer.text(self.summary())


@dataclass
class Stage:
    name: str
    params: Params
    run_dir: Path
    project_dir: Path
    hardware: Any
    reused: bool = False  # True: the stage completed earlier with these params; show its stored result
    resume_from: Path | None = None  # train: the verified checkpoint an unfinished attempt continues from
    timer: mf.StageTimer = field(default_factory=mf.StageTimer)

    def __post_init__(self) -> None:
        if not self.reused:  # it computes: say it lives, however long it takes (a runner on another host reads it)
            mf.StageHeartbeat.start(self.run_dir, self.name)

    def path(self, *parts: str) -> Path:
        return self.run_dir.joinpath(*parts)

    def record(self, **fields: Any) -> None:
        """Add run-level facts (e.g. the data fingerprint) to manifest.json; a shown stored result adds nothing."""
        if not self.reused:
            mf.update_manifest(self.run_dir, **fields)

    stored: Any = field(default=None, repr=False)  # the stored result, read back when `reused`

    def stored_result(self) -> Any:
        """What the stage's compute function returned when it ran, read back from the files it wrote."""
        if not self.reused:
            raise StageError(f"stage '{self.name}' has no stored result to show in {self.run_dir}; compute it")
        return self.stored

    def complete(self, **summary: Any) -> StageEntry:
        """Mark the stage completed in manifest.json with its wall time and a JSON-able summary.

        For a shown stored result the manifest stays as it was: the entry returned is the stored one. The entry is
        a dict, which a notebook shows as one line saying so (StageEntry)."""
        manifest_path = mf.manifest_path(self.run_dir)
        if self.reused:
            return StageEntry(mf.read_manifest(self.run_dir)["stages"][self.name], self.name, manifest_path, shown=True)
        if mf.StageHeartbeat.current is not None and mf.StageHeartbeat.current.run_dir == self.run_dir:
            mf.StageHeartbeat.current.stop()  # before the entry says completed: a late beat must not follow it
        manifest = mf.update_stage(
            self.run_dir, self.name, status="completed", finished=mf.now_iso(), seconds=self.timer.seconds, **summary
        )
        if manifest.get("interrupted_stage") == self.name:
            # Finished since: the run is no longer interrupted there (a resumed training says so in its entry,
            # `resumed_from`), and the run's status below must not sit beside a stale interrupted_stage.
            manifest.pop("interrupted_stage")
            mf.write_manifest(self.run_dir, manifest)
        if all(manifest["stages"].get(s, {}).get("status") == "completed" for s in mf.STAGES):
            mf.update_manifest(self.run_dir, status="completed", finished=mf.now_iso())
        else:  # no stage runs now: the rest are still to come, or were not asked for (--stages), so not "running"
            mf.update_manifest(self.run_dir, status="partial")
        return StageEntry(manifest["stages"][self.name], self.name, manifest_path, shown=False)


def _load_data_report(stage: Stage):
    from dpo_kit.data.pipeline import load_data_report

    return load_data_report(stage.run_dir)


def _load_train_result(stage: Stage):
    from dpo_kit.training.train import load_train_result

    return load_train_result(stage.run_dir, _stored_entry(stage))


def _load_merge_result(stage: Stage):
    from dpo_kit.training.merge import MergeResult

    entry = _stored_entry(stage)
    # Where the run is now (a run moved or copied elsewhere), not the path the entry recorded (load_train_result).
    merged_dir = stage.path(Path(entry["merged_dir"]).name)
    if not merged_dir.is_dir():
        raise FileNotFoundError(f"the merged model {merged_dir} is gone")
    return MergeResult(**{**{key: entry[key] for key in MergeResult.__dataclass_fields__}, "merged_dir": str(merged_dir)})


def _load_comparisons(stage: Stage):
    from dpo_kit.evaluation.generate import GENERATIONS_FILE, comparisons_frame, read_jsonl

    return comparisons_frame(read_jsonl(stage.path(GENERATIONS_FILE)))


def _load_metrics(stage: Stage):
    from dpo_kit.evaluation.evaluate import METRICS_FILE

    return json.loads(stage.path(METRICS_FILE).read_text())


def _stored_entry(stage: Stage) -> dict[str, Any]:
    return mf.read_manifest(stage.run_dir)["stages"][stage.name]


STORED_RESULT_LOADERS = {
    "format": _load_data_report,
    "train": _load_train_result,
    "merge": _load_merge_result,
    "generate": _load_comparisons,
    "evaluate": _load_metrics,
}


def run_dir_for(params: Params, project_dir: str | Path) -> Path:
    return run_directory(project_dir, params.run.output_dir, params.run.name)


def refuse_sweep_directory(run_dir: Path) -> None:
    """A run never goes into a sweep's directory (run.name equal to a sweep's name): its manifest.json would make
    the sweep read as one run (`dpo-kit report` would show it alone, not the trials), and --overwrite would archive
    every trial with it."""
    if (run_dir / "sweep.json").is_file():
        raise StageError(f"{run_dir} is the directory of a sweep (it holds sweep.json), not a run: a run there would"
                         " hide the sweep's trials. Choose another run.name (or run.output_dir).")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Parameter sets


def _lookup(resolved: dict, dotted: str) -> Any:
    value: Any = resolved
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def stage_inputs(stage: str) -> list[str]:
    """The params keys that `stage`'s output depends on: its own and those of every stage before it."""
    return [key for name in mf.STAGES[: mf.STAGES.index(stage) + 1] for key in STAGE_INPUTS[name]]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Inputs added after runs were recorded, with the value every earlier run had: left at it, they stay out of the
# fingerprint, so a run made before them still shows its stored result instead of counting as changed.
# A key inside an input section (generate.best_of_n in the section generate, data.generate.sentiment_min_words in
# the section data) is left out of that section's value.
INPUTS_ADDED_LATER = {"launch.num_processes": 1, "launch.num_machines": 1, "launch.config_file": None,
                      "generate.best_of_n": 0, "evaluate.sentiment_min_words": SENTIMENT_MIN_WORDS,
                      "data.generate.sentiment_min_words": SENTIMENT_MIN_WORDS,
                      "evaluate.judge_trust_remote_code": False, "data.generate.judge_trust_remote_code": False,
                      "generate.top_k": DEFAULT_TOP_K, "data.generate.top_k": DEFAULT_TOP_K,
                      "data.config": None, "data.data_dir": None, "data.eval_split": None}


def params_fingerprint(resolved: dict, stage: str) -> str:
    """sha256 (16 hex digits) of the params that `stage`'s output depends on: equal means reusable."""
    values = {key: _lookup(resolved, key) for key in stage_inputs(stage)}
    for dotted, default in INPUTS_ADDED_LATER.items():
        if dotted in values:
            if values[dotted] == default:
                del values[dotted]
            continue
        input_key = next((key for key in values if dotted.startswith(f"{key}.")), None)
        if input_key is None:
            continue
        *path, key = dotted[len(input_key) + 1 :].split(".")
        section = _lookup(values[input_key], ".".join(path)) if path else values[input_key]
        if isinstance(section, dict) and key in section and section[key] == default:
            values[input_key] = _without(values[input_key], [*path, key])
    return _digest(values)


def _without(tree: dict, path: list[str]) -> dict:
    """A copy of the nested dict `tree` without the key at `path`; `tree` itself is left as it was."""
    head, *rest = path
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    return {**tree, head: _without(tree[head], rest)}


def params_set_id(resolved: dict) -> str:
    """sha256 (12 hex digits) of a whole resolved params dict: the name of its file under param_sets/."""
    return _digest(resolved)[:12]


def stage_differences(old: dict, new: dict, stage: str) -> list[str]:
    """'key: old -> new' for the params that `stage` depends on."""
    keys = stage_inputs(stage)
    return [d for d in params_differences(old, new) if any(d == k or d.startswith((f"{k}:", f"{k}.")) for k in keys)]


def _entry_params(run_dir: Path, entry: dict[str, Any]) -> dict:
    """The params a stage entry was made with: its parameter set, or params.yaml for runs older than param sets."""
    path = run_dir / entry["params_file"] if entry.get("params_file") else run_dir / "params.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


def _entry_fingerprint(run_dir: Path, stage: str, entry: dict[str, Any]) -> str:
    return entry.get("params_fingerprint") or params_fingerprint(_entry_params(run_dir, entry), stage)


# ---------------------------------------------------------------------------------------------
# Moving earlier results aside


def move_stages_aside(run_dir: Path, stages: list[str], reason: str) -> Path:
    """Move the outputs of `stages` to <run_dir>/previous/<time>-<first stage>/, with a manifest of their own.

    The folder reads on its own: manifest.json holds the moved stages' entries (and why they were moved),
    params.yaml the params that made the first of them. The run's manifest lists it under `previous`."""
    manifest = mf.read_manifest(run_dir)
    target = mf.new_previous_dir(run_dir, stages[0])
    moved = []
    for stage in stages:
        for relative in STAGE_OUTPUTS[stage]:
            source = run_dir / relative
            if source.exists():
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), target / relative)
                moved.append(relative)
    entries = {s: manifest.get("stages", {})[s] for s in stages if s in manifest.get("stages", {})}
    first = next(iter(entries.values()), {})
    if _entry_params(run_dir, first):
        save_params(_entry_params(run_dir, first), target / "params.yaml")
    archived = {**manifest, "stages": entries, "moved_from": str(run_dir), "moved": mf.now_iso(), "reason": reason,
                "files": moved}  # fmt: skip
    archived.pop(PREVIOUS, None)
    mf.write_manifest(target, archived)
    for stage in entries:
        manifest["stages"].pop(stage)
    manifest.setdefault(PREVIOUS, []).append(
        {"path": str(target.relative_to(run_dir)), "stages": list(entries), "reason": reason, "moved": mf.now_iso()}
    )
    if manifest.get("status") == "completed":
        manifest["status"] = "running"
        manifest.pop("finished", None)
    mf.write_manifest(run_dir, manifest)
    return target


def _check_earlier_stages(run_dir: Path, name: str, resolved: dict, manifest: dict, notebook_hint: str) -> None:
    """Refuse to build on an earlier stage's output that other params made."""
    for earlier in mf.STAGES[: mf.STAGES.index(name)]:
        entry = manifest.get("stages", {}).get(earlier)
        if not entry or _entry_fingerprint(run_dir, earlier, entry) == params_fingerprint(resolved, earlier):
            continue
        differences = stage_differences(_entry_params(run_dir, entry), resolved, earlier) or ["(params not recorded)"]
        raise StageError(
            f"stage '{earlier}' in {run_dir} was made with other params than this '{name}' stage was given"
            f" ({'; '.join(differences)}; left: the {earlier} stage's, right: this notebook's). A stage never"
            f" builds on another parameter set's output: give this notebook the same params as the {earlier}"
            f" stage, or run the {earlier} stage again with these params first{notebook_hint}."
        )


def _save_parameter_set(run_dir: Path, resolved: dict) -> Path:
    """Keep `resolved` as param_sets/<id>.yaml (once); returns that path relative to the run."""
    relative = Path(PARAM_SETS) / f"{params_set_id(resolved)}.yaml"
    if not (run_dir / relative).exists():
        (run_dir / PARAM_SETS).mkdir(exist_ok=True)
        save_params(resolved, run_dir / relative)
    return relative


def _name_parameter_sets(run_dir: Path, manifest: dict) -> dict:
    """Stage entries written before parameter sets were kept point at params.yaml: name its set in them, so
    replacing params.yaml later cannot change what they say they were made with."""
    unnamed = [s for s, entry in manifest.get("stages", {}).items() if not entry.get("params_file")]
    if not unnamed or not (run_dir / "params.yaml").exists():
        return manifest
    resolved = yaml.safe_load((run_dir / "params.yaml").read_text()) or {}
    relative = _save_parameter_set(run_dir, resolved)
    for stage in unnamed:
        manifest = mf.update_stage(
            run_dir, stage, params_id=relative.stem, params_file=str(relative),
            params_fingerprint=params_fingerprint(resolved, stage),
        )
    return manifest


def directory_stamp(path: Path) -> str:
    """sha256 of a directory's file names, sizes and modification times. A sampler's model directory is too large
    to hash at every check; a model written again (round 1 run again, or its merge stage) has new times."""
    entries = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                     for f in path.rglob("*") if f.is_file())  # fmt: skip
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def format_input_files(data: dict[str, Any], project: Path) -> dict[str, dict[str, str]]:
    """The local files the format stage reads with the data params `data` (a resolved params dict's "data"), by
    params key: their path and sha256. A file's name is in the params, its content is not: the format stage records
    these so that an edited file is not shown stale. A sampler directory (data.generate.sampler: round 1's
    merged/) is recorded by its directory_stamp: the pairs of round 2 are samples of that policy, and a round 1 run
    again after them writes another."""
    files = {}
    for key, path in _named_inputs(data, project).items():
        if key == "data.generate.sampler":
            if path.is_dir():
                files[key] = {"path": str(path), "directory_stamp": directory_stamp(path)}
        elif path.is_file():
            files[key] = {"path": str(path), "sha256": mf.sha256_of(path)}
    return files


def _named_inputs(data: dict[str, Any], project: Path) -> dict[str, Path]:
    """The paths in `project` that the format stage's input keys name (a file, a directory, or neither: a hub id)."""
    generate = data.get("generate") or {}
    named = {"data.source": data.get("source"), "data.generate.prompts": generate.get("prompts"),
             "data.generate.sampler": generate.get("sampler")}  # fmt: skip
    return {key: (project / name).resolve() for key, name in named.items() if name}


def changed_input_files(entry: dict[str, Any], data: dict[str, Any], project: Path) -> list[str]:
    """The input files recorded in a format stage's entry whose content differs from the files the stage would
    read now (with the data params `data`, in `project`), or which are gone. Compared by params key and content,
    not by path: a project moved or cloned to another folder reads the same files there."""
    current, looked_for = format_input_files(data, project), _named_inputs(data, project)
    changed = []
    for key, recorded in (entry.get("input_files") or {}).items():
        now = current.get(key)
        if now is None:
            changed.append(f"{key} {looked_for.get(key, recorded['path'])} is gone")
        elif "directory_stamp" in recorded:
            if now.get("directory_stamp") != recorded["directory_stamp"]:
                changed.append(f"{key} {now['path']} was written again since the stage ran (its pairs were sampled"
                               " from the model that was there before)")  # fmt: skip
        elif now.get("sha256") != recorded["sha256"]:
            changed.append(f"{key} {now['path']} changed since the stage ran")
    return changed


def has_completed_format(run_dir: Path, resolved: dict, project: Path) -> bool:
    """Whether `run_dir` holds a completed format stage made with the data params of `resolved`, from input files
    whose content is the same as those of `project` now."""
    return not format_stage_differences(run_dir, resolved, project)


def why_not_completed(run_dir: Path, stage: str, resolved: dict, manifest: dict | None = None) -> str | None:
    """None when `run_dir` holds `stage` completed with the params of `resolved` that it depends on (a later stage
    may build on it); else why not, as 'which has not run', its status, or the params that differ. A data file
    edited since the format stage does not count here: the run's later stages build on the pairs it stored."""
    manifest = mf.read_manifest(run_dir) if manifest is None else manifest
    entry = manifest.get("stages", {}).get(stage)
    if not entry:
        return "which has not run"
    if entry.get("status") != "completed":
        return f"which is {entry.get('status', 'unfinished')}"
    if _entry_fingerprint(run_dir, stage, entry) == params_fingerprint(resolved, stage):
        return None
    differences = stage_differences(_entry_params(run_dir, entry), resolved, stage) or ["params not recorded"]
    return f"which completed with other params ({'; '.join(differences)})"


def format_stage_differences(run_dir: Path, resolved: dict, project: Path) -> list[str]:
    """Why `run_dir`'s format stage cannot stand for one made with `resolved`: its status, or the data params that
    differ ('key: old -> new'); empty when it can (has_completed_format)."""
    entry = mf.read_manifest(run_dir).get("stages", {}).get("format")
    if not entry or entry.get("status") != "completed":
        return [f"its format stage is {entry.get('status') if entry else 'absent'}, not completed"]
    if _entry_fingerprint(run_dir, "format", entry) == params_fingerprint(resolved, "format"):
        return changed_input_files(entry, resolved["data"], project)
    return stage_differences(_entry_params(run_dir, entry), resolved, "format") or ["its data params differ"]


def adopt_format_stage(run_dir: Path, source_run_dir: Path, resolved: dict, project: Path, hardware: dict) -> dict:
    """Start the new run `run_dir` from the format stage that `source_run_dir` completed with the same data params.

    A sweep's trials that differ only in later params (beta, the learning rate) need the same pairs: their files
    are copied, not formatted again (with data.source: generate that is minutes of sampling), and the entry says
    where they came from and their fingerprint. Returns the new run's format entry."""
    if not has_completed_format(source_run_dir, resolved, project):
        raise StageError(f"{source_run_dir} holds no completed format stage made with these data params")
    if mf.read_manifest(run_dir):
        raise StageError(f"{run_dir} already holds a run: a format stage is only adopted by a new run")
    source = mf.read_manifest(source_run_dir)
    for relative in STAGE_OUTPUTS["format"]:
        origin, target = source_run_dir / relative, run_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, target)
        elif origin.exists():
            shutil.copy2(origin, target)
    manifest = mf.new_manifest(resolved["run"]["name"], resolved["run"]["seed"], project, hardware)
    data = json.loads(json.dumps(source.get("data", {})))
    data["files"] = {k: str(run_dir / Path(v).relative_to(source_run_dir)) if Path(v).is_relative_to(source_run_dir)
                     else v for k, v in data.get("files", {}).items()}  # fmt: skip
    manifest.update(data=data, **({"model": source["model"]} if "model" in source else {}))
    entry = {k: v for k, v in source["stages"]["format"].items() if k not in mf.PROCESS_KEYS}
    mf.write_manifest(run_dir, manifest)
    set_file = _save_parameter_set(run_dir, resolved)
    save_params(resolved, run_dir / "params.yaml")
    entry.update(
        params_id=set_file.stem, params_file=str(set_file), params_fingerprint=params_fingerprint(resolved, "format"),
        notebook=str(run_dir / STAGE_OUTPUTS["format"][-1]), reused_from=str(source_run_dir),
        data_fingerprint=data.get("fingerprint"),
    )
    return mf.update_stage(run_dir, "format", **entry)["stages"]["format"]


def _later_stages_present(manifest: dict, name: str) -> list[str]:
    later = mf.STAGES[mf.STAGES.index(name) + 1:]
    return [s for s in later if s in manifest.get("stages", {})]


def open_stage(
    name: str,
    params_path: str,
    overrides: list[str] | tuple[str, ...] = (),
    project_dir: str = ".",
    run_dir: str = "",
    on_rerun: str = "refuse",
) -> Stage:
    """Load params, resolve and guard the run directory, and mark the stage running in the manifest.

    Returns a Stage with `reused` True when the stage already completed here with the same params and
    `on_rerun` is "show": the notebook then shows `stage.stored_result()` instead of computing. The
    notebooks pass "show"; code that calls this directly gets the batch behaviour unless it asks."""
    from dpo_kit.hardware import choose_hardware

    if name not in mf.STAGES:
        raise StageError(f"unknown stage '{name}'; valid stages: {', '.join(mf.STAGES)}")
    if on_rerun not in ON_RERUN:
        raise StageError(f"on_rerun: {on_rerun!r} is not one of {', '.join(map(repr, ON_RERUN))}")
    # Relative paths resolve against the project, not the kernel's working directory, so the same
    # defaults work in JupyterLab (cwd notebooks/) and under papermill started from the repo root.
    project = Path(project_dir).resolve()
    params_file = project / params_path
    params = load_params(params_file, overrides)
    check_local_files(params, project)
    run_path = (project / run_dir).resolve() if run_dir else run_dir_for(params, project)
    refuse_sweep_directory(run_path)
    if run_path.is_dir() and not (run_path / "manifest.json").is_file() and any(
            p.name != "params.yaml" for p in run_path.iterdir()):  # params.yaml alone: a start cut short before it
        # A folder of the user's that run.name happens to name (dpo-kit run refuses it the same way).
        raise StageError(
            f"run directory {run_path} exists and already holds files but no dpo-kit run (no manifest.json): it is not"
            " taken over. Choose a new run.name or another run.output_dir."
        )
    try:
        mf.ensure_writable_dir(run_path)
    except mf.OutputNotWritable as error:
        raise StageError(str(error)) from None
    # From the first read of the manifest to the stage claimed as running (or shown), one process at a time: two
    # started together would otherwise both find the stage free and both run it (two trainings resumed into one
    # checkpoints/ folder). The second then finds the first's live process and is refused (StageBusy).
    with mf.run_lock(run_path):
        resolved = params_to_dict(params)
        source = f"{params_file} + overrides"
        if on_rerun in ("refuse", "resume"):
            save_or_check_params(resolved, run_path / "params.yaml", source)

        hardware = choose_hardware()
        manifest = mf.read_manifest(run_path)
        if not manifest:
            manifest = mf.new_manifest(params.run.name, params.run.seed, project, hardware.to_dict())
            mf.write_manifest(run_path, manifest)
        manifest = _name_parameter_sets(run_path, manifest)
        batch = on_rerun in ("refuse", "resume")
        _check_earlier_stages(run_path, name, resolved, manifest, "" if batch else " (its notebook)")
        if mf.mark_dead_stages_interrupted(run_path):
            manifest = mf.read_manifest(run_path)

        previous = manifest.get("stages", {}).get(name, {})
        refuse_if_running_elsewhere(run_path, name, previous)
        same_params = bool(previous) and _entry_fingerprint(run_path, name, previous) == params_fingerprint(resolved, name)
        # The same params over an edited data file are another input: computed again, not shown stale.
        changed_files = (
            changed_input_files(previous, resolved["data"], project)
            if same_params and name == "format" else []
        )
        if previous.get("status") == "completed" and batch:
            raise StageError(
                f"stage '{name}' of run '{params.run.name}' already completed in {run_path} at {previous.get('finished')};"
                " an earlier result is never overwritten. Choose a new run.name (e.g. overrides=['run.name=...'])."
            )
        unreadable = None
        if previous.get("status") == "completed" and same_params and not changed_files and on_rerun == "show":
            stage = Stage(name=name, params=params, run_dir=run_path, project_dir=project, hardware=hardware, reused=True)
            try:
                stage.stored = STORED_RESULT_LOADERS[name](stage)
            except (OSError, KeyError, TypeError, ValueError) as error:  # e.g. written by an older dpo-kit
                unreadable = f"its stored result could not be read ({type(error).__name__}: {error})"
            else:
                print(
                    f"stage '{name}' already completed in {run_path} at {previous.get('finished')} with these params:"
                    " showing its stored result, nothing is recomputed. Set on_rerun = \"recompute\" to compute it"
                    f" again (the stored result is then moved to {run_path / PREVIOUS})."
                )
                return stage

        if name == "train" and previous.get("status") in mf.UNFINISHED and same_params and on_rerun in RESUMES:
            resumed = _resume_train(run_path, resolved, previous, project, params, hardware)
            if resumed is not None:
                return resumed

        # From here on the stage computes. Whatever an earlier attempt or another parameter set left of this
        # stage, and everything later stages made from it, moves aside first: it is kept, never mixed in.
        if unreadable:
            reason = f"{unreadable}: computed again with the same params"
        elif changed_files and previous.get("status") == "completed":
            reason = f"{'; '.join(changed_files)}: computed again with the same params"
        elif previous.get("status") == "completed" and same_params:
            reason = "on_rerun='recompute': computed again with the same params"
        elif previous and not same_params:
            old = _entry_params(run_path, previous)
            reason = f"params changed: {'; '.join(stage_differences(old, resolved, name)) or 'not recorded before'}"
        elif previous:
            reason = f"an unfinished earlier attempt (status {previous.get('status')!r}), started {previous.get('started')}"
        else:
            reason = f"made from an earlier '{name}' stage"
        stale = ([name] if previous else []) + _later_stages_present(manifest, name)
        if stale:
            target = move_stages_aside(run_path, stale, reason)
            print(f"moved the earlier output of stage(s) {', '.join(stale)} to {target} ({reason})")

        set_file = _save_parameter_set(run_path, resolved)
        if on_rerun != "refuse":
            save_params(resolved, run_path / "params.yaml")  # the params of the newest stage; earlier sets stay
        inputs = {"input_files": format_input_files(resolved["data"], project)} if name == "format" else {}
        mf.update_stage(
            run_path, name, status="running", started=mf.now_iso(), params_id=set_file.stem, params_file=str(set_file),
            params_fingerprint=params_fingerprint(resolved, name), **inputs, **mf.this_process(),
        )
        mf.update_manifest(run_path, status="running")
        return Stage(name=name, params=params, run_dir=run_path, project_dir=project, hardware=hardware)


def refuse_if_running_elsewhere(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    """Two processes never write one stage: a stage still running in another live process is refused."""
    import os
    import socket

    # This process itself (a notebook's kernel running the cell again) is told by its pid on this host: a pid alone
    # is another host's too (containers started alike give their kernels the same pids), whose live stage was taken.
    ours = entry.get("pid") == os.getpid() and entry.get("host") == socket.gethostname()
    if entry.get("status") != "running" or mf.running_state(entry, run_dir, name) != "alive" or ours:
        return
    if mf.process_alive(entry):
        raise StageBusy(
            f"stage '{name}' in {run_dir} is running in process {entry['pid']} on this host (started"
            f" {entry.get('started')}). Wait for it to finish, or stop it; a notebook kernel whose cell failed"
            " holds the stage until it is shut down or restarted."
        )
    raise StageBusy(
        f"stage '{name}' in {run_dir} is running in process {entry['pid']} on host {entry['host']} (last heartbeat"
        f" {mf.last_heartbeat(entry, run_dir, name)}); this host cannot see that process. If that machine is"
        f" gone, the stage counts as interrupted once its heartbeat is {mf.STALE_AFTER_SECONDS // 60} minutes old."
    )


def _resume_train(run_dir: Path, resolved: dict, previous: dict, project: Path, params: Params, hardware) -> Stage | None:
    """Continue an unfinished train stage from its newest verified checkpoint; None when it has none."""
    from dpo_kit.training.checkpoints import (
        CheckpointRefused,
        RunIdentity,
        find_resume_point,
        older_verified_checkpoint,
        recorded_checkpoints,
    )

    manifest = mf.read_manifest(run_dir)
    identity = RunIdentity(
        run_id=mf.run_id(manifest),
        params_fingerprint=params_fingerprint(resolved, "train"),
        data_fingerprint=manifest.get("data", {}).get("fingerprint", ""),
    )
    recorded = recorded_checkpoints(previous)
    try:
        point = find_resume_point(run_dir / "checkpoints", identity, recorded)
    except CheckpointRefused as error:
        # `dpo-kit run` without --resume refuses a run whose format stage completed: --stages says what to run again.
        advice = (f"cannot resume stage 'train' in {run_dir}: {error}. To train from the start, moving the earlier"
                  " attempt aside: set on_rerun = \"recompute\" in notebook 02, or run `dpo-kit run` without --resume"
                  " on the stages to run again (--stages train, and any later ones).")  # fmt: skip
        older, also_refused = older_verified_checkpoint(run_dir / "checkpoints", identity, recorded,
                                                        error.checkpoint) if error.checkpoint else (None, [])
        if older is not None:
            moved = " and ".join(str(folder) for folder in [error.checkpoint, *also_refused])
            advice += (f" Or, to resume from {older.name} (it verifies), move {moved} out of"
                       f" {error.checkpoint.parent} and resume again"
                       f"{' (those between are refused too)' if also_refused else ''}.")  # fmt: skip
        raise StageError(advice) from None
    for note in point.skipped:
        print(f"not resuming from {note}")
    if point.checkpoint is None:
        return None
    if point.skipped_folders:
        # The resumed Trainer saves into checkpoint-N again when it reaches step N, beside whatever such a folder
        # still holds (the rest of a cut-short save, or files copied in): moved aside first, kept, never mixed in.
        target = mf.new_previous_dir(run_dir, "train-checkpoints-not-resumed") / "checkpoints"
        target.mkdir()
        for folder in point.skipped_folders:
            shutil.move(str(folder), target / folder.name)
        print(f"moved {', '.join(f.name for f in point.skipped_folders)} to {target}: the resumed training writes"
              " its own")
        manifest.setdefault(PREVIOUS, []).append({
            "path": str(target.parent.relative_to(run_dir)), "stages": [], "moved": mf.now_iso(),
            "reason": f"checkpoints the run did not record, newer than {point.checkpoint.name} it resumed from",
        })
    # The entry starts over as a running attempt; how the earlier attempt ended is kept under `attempts`.
    ended = ("status", "started", "interrupted", "reason", "error", "pid", "host", "pid_started", "boot_id",
             "pid_start_ticks", "wall_seconds")
    manifest["stages"]["train"] = {
        **{key: value for key, value in previous.items() if key not in ended and key != "attempts"},
        "attempts": [*previous.get("attempts", []), {key: previous[key] for key in ended if key in previous}],
        "status": "running", "started": mf.now_iso(), "resumed_from": point.checkpoint.name, **mf.this_process(),
    }  # fmt: skip
    manifest["status"] = "running"
    mf.write_manifest(run_dir, manifest)
    print(
        f"stage 'train' did not finish earlier ({previous.get('status')}, {previous.get('reason') or previous.get('error')}):"
        f" resuming from {point.checkpoint} (step {point.step})"
    )
    return Stage(name="train", params=params, run_dir=run_dir, project_dir=project, hardware=hardware,
                 resume_from=point.checkpoint)

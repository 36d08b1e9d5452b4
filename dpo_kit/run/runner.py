"""`dpo-kit run`: execute the stage notebooks with papermill into one run directory.

The notebooks are the program; the runner only resolves the run, guards it against overwriting,
injects four path parameters (never values, never secrets: papermill writes parameters into the
output notebook in plain text, papermill#416) and on_rerun="refuse", and records status and timings in
manifest.json. A batch run is explicit where a notebook is forgiving: it refuses to redo a completed stage
(or, with --overwrite, archives the whole run), where a notebook run again shows its stored result.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from dpo_kit import manifest as mf
from dpo_kit.models.hub_cache import check_offline_cache, datasets_offline_variable, models_offline_variable
from dpo_kit.params import (
    ParamsError,
    check_local_files,
    load_params,
    params_to_dict,
    parse_params,
    run_directory,
    save_or_check_params,
    secret_values,
)
from dpo_kit.progress import BATCH_KERNEL_ENV
from dpo_kit.run.stage import (
    StageError,
    adopt_format_stage,
    format_stage_differences,
    refuse_if_running_elsewhere,
    why_not_completed,
)
from dpo_kit.tracking import TrackerError, pin_wandb_mode, wandb_key_for_online
from dpo_kit.training.merge import hub_token_for_push

# nbformat validates notebooks with jsonschema, which compiles rfc3987_syntax's lark grammars when it
# is importable (~1.3 s of every `dpo-kit run`) for IRI formats that the notebook schema never uses.
sys.modules.setdefault("rfc3987_syntax", None)

STAGE_NOTEBOOKS = {
    "format": "01_format_data.ipynb",
    "train": "02_train_dpo.ipynb",
    "merge": "03_merge.ipynb",
    "generate": "04_generate.ipynb",
    "evaluate": "05_evaluate.ipynb",
}
# Run between stages in the shared kernel: a fresh namespace, so no notebook can lean on another's variables
# (each must still run alone), and displayed values (Out) no longer keep models and figures alive. It is not
# IPython's %reset, whose gc.collect() costs ~1 s per stage; a full collection runs only where a GPU's memory
# has to be handed back.
RESET_NAMESPACE = (
    "get_ipython().user_ns['Out'].clear()\n"
    "for _name in [n for n in list(get_ipython().user_ns) if n not in get_ipython().user_ns_hidden]:\n"
    "    get_ipython().user_ns.pop(_name, None)\n"
    "import sys\n"
    "if 'matplotlib.pyplot' in sys.modules: sys.modules['matplotlib.pyplot'].close('all')\n"
    "if 'torch' in sys.modules and sys.modules['torch'].cuda.is_available():\n"
    "    import gc; gc.collect(); sys.modules['torch'].cuda.empty_cache()\n"
    "del sys\n"
)

# The stages whose output each stage reads: format's pairs, train's adapter, the merged model. The evaluate stage
# reads generate's generations.jsonl where there is one, and is evaluated without KL and win-rate where there is not.
STAGE_PREREQUISITES = {
    "format": (),
    "train": ("format",),
    "merge": ("train",),
    "generate": ("merge",),
    "evaluate": ("merge",),
}

KERNEL_TMPDIR_PREFIX = "dpo-kit-kernel-"
KERNEL_TMPDIR_OWNER = "dpo-kit-runner.json"


def remove_abandoned_kernel_tmpdirs(parent: Path) -> list[Path]:
    """Remove the kernel temporary directories under `parent` whose runner has ended without removing them (it
    was killed with kill -9, or the machine lost power); returns them. A directory whose owner file cannot be
    read (another user's, or one being made right now) or whose runner lives, or ran on another host sharing
    this directory, is left alone."""
    removed = []
    for directory in sorted(parent.glob(KERNEL_TMPDIR_PREFIX + "*")):
        try:
            owner = json.loads((directory / KERNEL_TMPDIR_OWNER).read_text())
        except (OSError, ValueError):
            continue
        if mf.process_alive(owner) is False:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


# ipykernel's command-line options for the runner's kernels: IPython keeps no history of what they execute.
KERNEL_ARGUMENTS = ["--HistoryManager.enabled=False"]


def kernel_environment(tmpdir: str) -> dict[str, str]:
    """The environment a batch kernel starts with: the runner's, text progress bars, its own $TMPDIR, and a
    relative DPO_KIT_CACHE made absolute. The kernel runs in notebooks/, so `DPO_KIT_CACHE=cache dpo-kit run ...`
    would otherwise put the converted models and reference log-probs under notebooks/cache, not ./cache."""
    env = {**os.environ, **BATCH_KERNEL_ENV, "TMPDIR": tmpdir}
    if env.get("DPO_KIT_CACHE"):
        env["DPO_KIT_CACHE"] = os.path.abspath(os.path.expanduser(env["DPO_KIT_CACHE"]))
    return env


class SharedKernel:
    """One kernel for all stages: torch, transformers, TRL and peft are imported once, not five times.

    Imports dominate a tiny run (~7 s per fresh kernel against ~1-5 s of work per stage). The
    namespace is reset between stages, so each notebook still starts from nothing but imported modules.
    """

    def __init__(self, cwd: Path) -> None:
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import ensure_async, run_sync

        class OneClientKernelManager(AsyncKernelManager):
            # nbclient asks for a new client per notebook, and connecting one costs ~0.5-1.5 s of
            # kernel_info polling (jupyter_client's wait_for_ready). Replies are matched by message id,
            # so one connected client serves every notebook.
            _client = None

            def client(self, **kwargs):
                if self._client is None:
                    self._client = client = super().client(**kwargs)
                    client.start_channels()
                    client.start_channels = lambda *args, **kwargs: None  # already connected
                    wait_for_ready = client.wait_for_ready

                    async def ready(timeout=None):
                        # nbclient also waits for every notebook it runs (each stage, each reset and call): a
                        # kernel_info round trip, then 0.2 s of silence on iopub (jupyter_client's wait_for_ready),
                        # ~0.25 s idle each, 14 times a run. Once the kernel has answered, only whether it lives.
                        if client.ready_seen:
                            if not await ensure_async(client.is_alive()):
                                raise RuntimeError("Kernel died before replying to kernel_info")
                            return
                        await ensure_async(wait_for_ready(timeout=timeout))
                        client.ready_seen = True

                    client.ready_seen = False
                    client.wait_for_ready = ready
                return self._client

        import zmq

        self._run_sync = run_sync
        # The kernel's own $TMPDIR, removed once the kernel is stopped: libraries clean their temporary files up
        # in exit handlers that a killed kernel never runs (`import wandb` alone makes two directories), and
        # letting the kernel exit by itself instead costs ~1.8 s of interpreter teardown per run.
        remove_abandoned_kernel_tmpdirs(Path(tempfile.gettempdir()))
        self.tmpdir = tempfile.mkdtemp(prefix=KERNEL_TMPDIR_PREFIX)
        # CurveZMQ keys for the kernel's sockets where pyzmq has Curve and the kernelspec declares it (ipykernel
        # 7 does): ipykernel otherwise opens every run with "Kernel is running over TCP without encryption".
        encryption = "auto" if zmq.has("curve") else "disabled"
        # The connection file (the kernel's ports, HMAC key and Curve secret key) goes in that directory too, not
        # loose in $TMPDIR (jupyter_client's default), so that a runner killed with kill -9 leaves nothing outside it.
        self.manager = OneClientKernelManager(kernel_name="python3", transport_encryption=encryption,
                                              connection_file=os.path.join(self.tmpdir, "kernel.json"))  # fmt: skip
        try:
            # Who owns it, so that the next runner removes it if this one is killed with kill -9 (no shutdown()).
            (Path(self.tmpdir) / KERNEL_TMPDIR_OWNER).write_text(json.dumps(mf.this_process()))
            # Batch kernels draw text progress bars (dpo_kit/progress.py): nobody renders widgets here. No IPython
            # history: IPython writes every executed cell to ~/.ipython/profile_default/history.sqlite, and `call`
            # executes the --set/--grid values as code, so a secret that params then refused stayed there on disk.
            run_sync(self.manager.start_kernel)(cwd=str(cwd), env=kernel_environment(self.tmpdir),
                                                extra_arguments=KERNEL_ARGUMENTS)  # fmt: skip
        except BaseException:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            raise

    def run_cell(self, code: str):
        """Execute one cell in the kernel; returns the executed cell (outputs included)."""
        from nbclient import NotebookClient
        from nbformat.v4 import new_code_cell, new_notebook

        notebook = new_notebook(cells=[new_code_cell(code)])
        NotebookClient(notebook, km=self.manager).execute()
        return notebook.cells[0]

    def reset(self) -> None:
        self.run_cell(RESET_NAMESPACE)

    def resolve_run(self, params_path: Path, overrides: list[str], project: Path,
                    stages: list[str] | None = None) -> dict[str, Any]:
        """`resolve_run` executed in the kernel."""
        return self.call("resolve_run", str(params_path), list(overrides), str(project), stages)

    def call(self, function: str, *args) -> Any:
        """`function(*args)`, a function of this module, executed in the kernel, which imports TRL anyway: params
        are validated against TRL's DPOConfig, and torch, transformers and TRL would hold ~0.4 GiB more in the
        runner process while the kernel trains. `args` and the result are JSON; a ParamsError or RunError raised
        there is raised here as itself."""
        from nbclient.exceptions import CellExecutionError

        code = f"import json\nfrom dpo_kit.run.runner import {function}\nprint(json.dumps({function}(*{list(args)!r})))"
        try:
            cell = self.run_cell(code)
        except CellExecutionError as error:
            refused = {"ParamsError": ParamsError, "RunError": RunError}.get(error.ename)
            if refused is not None:
                raise refused(error.evalue) from None
            raise
        finally:
            self.reset()
        stdout = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
        return json.loads(stdout.strip().splitlines()[-1])  # libraries may print above it

    def abandon_cell(self) -> None:
        """Cancel the cell execution a signal cut short: left pending, it would end in a DeadKernelError that
        asyncio prints as "Task exception was never retrieved" once the kernel is stopped."""
        import asyncio

        from jupyter_core.utils import ensure_event_loop

        loop = ensure_event_loop()
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def shutdown(self) -> None:
        """Stop the kernel at once (it may still be mid-stage when a signal interrupted the run) and remove its
        temporary directory with whatever the kernel left there; a second call does nothing."""
        if self.manager._client is not None:
            self.manager._client.stop_channels()
            self.manager._client = None
        if self._run_sync(self.manager.is_alive)():
            self._run_sync(self.manager.shutdown_kernel)(now=True)
        shutil.rmtree(self.tmpdir, ignore_errors=True)  # nothing in it is the run's: results live in the run directory


class RunError(RuntimeError):
    """The run cannot start or a stage failed; the message names the stage and the notebook to read."""


class RunInterrupted(RunError):
    """A stage was interrupted (a signal, or its kernel died); recorded so, and `--resume` continues it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(BaseException):
    """SIGTERM, raised where the runner is, so that it records the stage and stops its kernel before exiting."""


def resolve_run(params_path: str | Path, overrides: list[str], project_dir: str | Path,
                stages: list[str] | None = None) -> dict[str, Any]:
    """Validated params (as a dict) and the hardware found: everything the runner needs to start a run. With the
    train stage among `stages` (None: all), a precision or launch this machine cannot give is refused here, before
    any stage."""
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.training.train import refuse_training_this_machine_cannot_do

    params = load_params(params_path, overrides)
    check_local_files(params, project_dir)
    hardware = choose_hardware()
    if stages is None or "train" in stages:
        refuse_training_this_machine_cannot_do(params, project_dir, hardware)
    return {"params": params_to_dict(params), "hardware": hardware.to_dict()}


def refuse_hub_ids_not_cached(params: dict[str, Any], project_dir: str, stages: list[str]) -> None:
    """check_offline_cache for resolved params (resolve_run's dict), in the kernel when there is one: parse_params
    checks the dpo section against TRL's DPOConfig, and TRL is kept out of the runner process."""
    check_offline_cache(parse_params(params), project_dir, stages)


def refuse_what_the_environment_lacks(params: dict[str, Any], project: Path, to_run: list[str],
                                      outcome: str = "Nothing was run", kernel: SharedKernel | None = None) -> None:
    """What `dpo-kit run` refuses before its first stage, for the stages still to run (`to_run`), and `dpo-kit validate`
    for a fresh run (every stage), about what the environment must give them: HF_TOKEN, and a hub not offline, for
    merge.push_to_hub (the merge stage pushes after training); WANDB_API_KEY for wandb online (the train stage logs,
    and the evaluate stage's summary); and, offline, every hub model and dataset the stages load, in the local cache.
    Each was found missing only by the stage that needs it, after the format stage (minutes of sampling) or after
    training. `params` are resolved params (resolve_run's dict); the cache is looked in in `kernel` when there is one.
    Raises RunError, the problem followed by `outcome`; a secret's value is never read into it, only its variable's
    name."""
    if "merge" in to_run:
        try:
            hub_token_for_push(params["merge"]["push_to_hub"])
            offline = models_offline_variable()
            if params["merge"]["push_to_hub"] and offline:  # the push would meet OfflineModeIsEnabled
                raise RuntimeError(
                    f"merge.push_to_hub is true, and {offline} is set, so the push to"
                    f" {params['merge']['hub_model_id']} would fail. Unset {offline}, or set merge.push_to_hub:"
                    " false and upload the run's merged/ later (`hf upload`)"
                )
        except RuntimeError as error:
            raise RunError(f"{error}. {outcome}: the merge stage pushes after training") from None
    # wandb logs from the train stage on (and the evaluate stage's summary): its key is asked for before the format
    # stage, which may sample for minutes, not found missing after it.
    if "train" in to_run or "evaluate" in to_run:
        try:
            wandb_key_for_online(params["tracking"]["report_to"])
        except TrackerError as error:
            raise RunError(f"{error}. {outcome}") from None
    # Offline, a hub id missing from the cache failed the first stage that loaded it, after the format stage had
    # worked for a while.
    if models_offline_variable() or datasets_offline_variable():
        try:
            if kernel:
                kernel.call("refuse_hub_ids_not_cached", params, str(project), to_run)
            else:
                refuse_hub_ids_not_cached(params, str(project), to_run)
        except ParamsError as error:
            raise RunError(f"{error}. {outcome}") from None


def notebooks_dir(project_dir: Path) -> Path:
    """The stage notebooks: the project's own copy if it has one, else the kit's: the copy packaged in an
    installed wheel, or the checkout's notebooks/ (a checkout or an editable install)."""
    from dpo_kit.run.init_project import kit_dirs

    for candidate in (project_dir / "notebooks", *kit_dirs("notebooks")):
        if (candidate / STAGE_NOTEBOOKS["format"]).exists():
            return candidate
    raise RunError(f"stage notebooks not found under {project_dir / 'notebooks'} nor in the installed kit"
                   f" ({' or '.join(str(c) for c in kit_dirs('notebooks'))}); make a project with `dpo-kit init DIR`"
                   " or run from a dpo-kit checkout")


def parse_stages(text: str | None) -> list[str]:
    """--stages in pipeline order; not given (None): all five."""
    if text is None:
        return list(mf.STAGES)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:  # `--stages ""` or `--stages ,`: running all five is not what an empty list asks for
        raise RunError(f"--stages {text!r} names no stage; give some of {','.join(mf.STAGES)}, or leave --stages out")
    unknown = [s for s in stages if s not in mf.STAGES]
    if unknown:
        raise RunError(f"unknown stage(s) {', '.join(unknown)}; valid stages: {','.join(mf.STAGES)}")
    return [s for s in mf.STAGES if s in stages]  # always pipeline order


def archive_run(run_dir: Path) -> Path:
    """Move a run aside instead of deleting it: an earlier run is never lost."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    archived, suffix = run_dir.with_name(f"{run_dir.name}.archived-{stamp}"), 1
    # Two --overwrite runs within one second: shutil.move into an existing directory moves the run *inside* the
    # first archive, so the second archive gets a -2, -3, ... suffix instead (as manifest.new_previous_dir does).
    while archived.exists():
        suffix += 1
        archived = run_dir.with_name(f"{run_dir.name}.archived-{stamp}-{suffix}")
    shutil.move(str(run_dir), archived)
    return archived


def completed_stages(run_dir: Path, stages: list[str]) -> list[str]:
    manifest = mf.read_manifest(run_dir)
    return [s for s in stages if manifest.get("stages", {}).get(s, {}).get("status") == "completed"]


def guard_existing_run(run_dir: Path, stages: list[str], overwrite: bool, resume: bool = False,
                       start_if_missing: bool = False) -> str | None:
    """Refuse to redo completed work; with `overwrite`, archive the old run first; with `resume`, skip the
    completed stages and continue the others, and refuse when there is no run to resume (a mistyped run.name
    would otherwise start a fresh run) unless `start_if_missing` (a sweep's trial: resumed, or started). Returns
    a note or None."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume and not start_if_missing:
            raise RunError(
                f"--resume: nothing to resume at {run_dir} ({'an empty directory' if run_dir.exists() else 'no such'}"
                f" run directory; check run.name and run.output_dir). Run without --resume to start it."
            )
        return None
    manifest = mf.read_manifest(run_dir)
    if not manifest:
        # Checked before --overwrite: it archives an earlier run, never a folder of the user's that a run.name
        # happens to name (run.output_dir "." and run.name "params" would otherwise move the project's params away).
        raise RunError(f"run directory {run_dir} exists and already holds files but no dpo-kit run (no manifest.json):"
                       " it is not taken over, with --overwrite either (which archives only an earlier run)."
                       " Choose a new name (--set run.name=...) or another run.output_dir.")
    if overwrite:
        return f"archived the earlier run to {archive_run(run_dir)}"
    done = completed_stages(run_dir, stages)
    if resume:
        entries = manifest.get("stages", {})
        reused = entries.get("format", {}).get("reused_from")
        if start_if_missing and reused and set(entries) == {"format"} and done == ["format"]:
            # A sweep's trial that has just copied a sibling's pairs (sweep.share_format_stage) starts here; it was
            # never run before, so "resuming" would misread it. Said as --reuse-format says it.
            return f"the pairs of {reused} are copied into {run_dir}; the format stage is not run again"
        train = entries.get("train", {}).get("status")
        # Only a train stage that started and did not finish has a checkpoint to continue from (a sweep's trial
        # that adopted a format stage resumes with no train stage at all).
        if len(done) == len(stages):
            rest = "nothing is left to run"
        elif train not in (None, "completed") and "train" in stages:
            rest = "an unfinished train stage continues from its newest verified checkpoint"
        else:
            rest = "the other stages run"
        return f"resuming {run_dir}: completed stages are skipped ({', '.join(done) or 'none'}), {rest}"
    if manifest.get("status") == "completed" or done:
        what = f"stages {', '.join(done)} already completed" if done else "it already holds a completed run"
        raise RunError(
            f"run directory {run_dir} exists and {what}. An earlier run is never overwritten: choose a new"
            " name (--set run.name=...), finish an interrupted run with --resume, run only the missing stages"
            " (--stages ...), or pass --overwrite to archive the old run and start again."
        )
    return "continuing an unfinished run; its unfinished stages start over (--resume continues training from a checkpoint)"


def refuse_if_running(run_dir: Path) -> None:
    """Refuse a run one of whose stages runs now in another live process (another `dpo-kit run`, a notebook's
    kernel, a machine whose heartbeat is fresh), before anything in it is touched: a second runner would otherwise
    record that live stage as failed (and a third resume it alongside), rename its executed notebook, or with
    --overwrite move the run away from under it."""
    for name, entry in mf.read_manifest(run_dir).get("stages", {}).items():
        try:
            refuse_if_running_elsewhere(run_dir, name, entry)
        except StageError as error:
            raise RunError(f"{error} Nothing was run, and nothing in the run was changed.") from None


def check_prerequisites(run_dir: Path, stages: list[str], resolved: dict, provided: tuple[str, ...] = (),
                        fresh: bool = False) -> None:
    """Refuse, before any stage runs, stages whose prerequisite stages (STAGE_PREREQUISITES, and theirs) are neither
    among `stages` (or `provided`, e.g. a format stage --reuse-format copies in) nor completed in the run with the
    params they depend on; names them and the --stages value that would run them too. `fresh`: the run starts
    anew (--overwrite), so nothing it holds now counts."""
    manifest = {} if fresh else mf.read_manifest(run_dir)
    missing: dict[str, str] = {}

    def visit(stage: str) -> None:
        for needed in STAGE_PREREQUISITES[stage]:
            if needed in provided or needed in missing:
                continue
            if needed in stages:
                visit(needed)
                continue
            reason = why_not_completed(run_dir, needed, resolved, manifest)
            if reason is not None:
                missing[needed] = f"stage '{stage}' needs stage '{needed}', {reason}"
                visit(needed)

    for stage in stages:
        visit(stage)
    if missing:
        names = [s for s in mf.STAGES if s in missing]
        problems = f"--stages {','.join(stages)} in {run_dir}: {'; '.join(missing[s] for s in reversed(names))}"
        if any(manifest.get("stages", {}).get(s, {}).get("status") == "completed" for s in names):
            # Completed with other params (a notebook run again with another parameter set): not redone in batch.
            raise RunError(f"{problems}. Nothing was run. A stage never builds on another parameter set's output:"
                           " give the run the params its stages were made with, or start a new run"
                           " (--set run.name=...)")  # fmt: skip
        would_work = ",".join(s for s in mf.STAGES if s in stages or s in missing)
        raise RunError(f"{problems}. Nothing was run. Run the missing stage{'s' if len(names) > 1 else ''}"
                       f" ({', '.join(names)}) too: --stages {would_work}")


def find_secrets(run_dir: Path) -> list[str]:
    """Files in the run that contain a secret: the value of a secret environment variable, or a stored login's."""
    secrets = secret_values()
    if not secrets:
        return []
    leaks = []
    for path in run_dir.rglob("*"):
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            # Tensors after a JSON header: the header (names, shapes and the free-text metadata) is the only
            # place a string can be, and reading it alone keeps a 7B model's GBs unread.
            data = _safetensors_header(path)
        elif path.stat().st_size < 256 * 2**20:
            data = path.read_bytes()
        else:  # optimizer states and pickled weights of a large model: tensors, GBs each
            continue
        leaks += [str(path) for secret in secrets if secret.encode() in data]
    return leaks


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (an 8-byte little-endian length, then the header); the whole file
    when it is not a well-formed one, so nothing passes unread."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if 0 < length <= 100 * 2**20:  # safetensors caps its header at 100 MB
            return file.read(length)
    return path.read_bytes() if path.stat().st_size < 256 * 2**20 else b""


def run_pipeline(
    params_path: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    stages: list[str] | None = None,
    overwrite: bool = False,
    project_dir: str | Path = ".",
    progress: bool = True,
    isolate_stages: bool = False,
    resume: bool = False,
    kernel: SharedKernel | None = None,
    bar_position: int = 0,
    reuse_format: str | Path | None = None,
    start_if_missing: bool = False,
) -> Path:
    """Run the stages in order into <run.output_dir>/<run.name>; returns the run directory.

    By default the stages share one kernel (namespace reset in between); `isolate_stages` gives each
    its own kernel, which costs the imports again but returns all memory to the OS between stages.
    `resume` finishes an unfinished run: completed stages are skipped, an interrupted train stage continues
    from its newest verified checkpoint, and the params must equal the run's; a run that is not there is refused,
    unless `start_if_missing` (a sweep's trial) starts it.
    A `kernel` passed in (a sweep runs its trials in one) is used for every stage and left running.
    `bar_position` puts the progress bars below those of a caller (the sweep's bar over trials).
    `reuse_format` starts a new run from the format stage of an earlier run made with the same data params: its
    pairs are copied, not formatted again, and the new run's manifest records where they came from.
    """
    project = Path(project_dir).resolve()
    source_notebooks = notebooks_dir(project)
    own_kernel = kernel is None and not isolate_stages
    if own_kernel:
        kernel = SharedKernel(source_notebooks)
    try:
        resolved = (
            kernel.resolve_run(Path(params_path).resolve(), list(overrides), project, stages)
            if kernel
            else resolve_run(params_path, list(overrides), project, stages)
        )
        params, hardware = resolved["params"], resolved["hardware"]
        stages = stages or list(mf.STAGES)
        run_dir = run_directory(project, params["run"]["output_dir"], params["run"]["name"])
        refuse_if_running(run_dir)
        if reuse_format and mf.read_manifest(run_dir) and not overwrite:
            raise RunError(f"--reuse-format starts a new run, and {run_dir} already holds one: choose a new name"
                           " (--set run.name=...), or pass --overwrite to archive the old run")  # fmt: skip
        if reuse_format and not Path(reuse_format).is_dir():
            # Before anything changes (--overwrite archives the old run below): a mistyped path is named as one,
            # not as a directory without a manifest.json
            what = "is not a directory" if Path(reuse_format).exists() else "does not exist"
            raise RunError(f"--reuse-format {reuse_format}: {Path(reuse_format).resolve()} {what}; give the"
                           " directory of an earlier run")  # fmt: skip
        provided = ("format",) if reuse_format else ()
        if overwrite:  # the run starts afresh: refused before the old one is moved aside, not after
            check_prerequisites(run_dir, stages, params, provided, fresh=True)
        # What the checks below ask for is what the stages still to run need: a resumed run's completed stages have
        # run (its merge has pushed), and --reuse-format's format stage reads no dataset.
        done = completed_stages(run_dir, stages) if resume else []
        to_run = [s for s in stages if s not in done and not (reuse_format and s == "format")]
        refuse_what_the_environment_lacks(params, project, to_run, kernel=kernel)
        if "train" in to_run or "evaluate" in to_run:  # the mode a wandb settings file names, for every stage
            pin_wandb_mode(params["tracking"]["report_to"])
        note = guard_existing_run(run_dir, stages, overwrite, resume, start_if_missing)
        if note and overwrite:  # the old run has been moved aside: said whatever follows
            print(f"dpo-kit: {note}")
        check_prerequisites(run_dir, stages, params, provided)
        if reuse_format:
            source = Path(reuse_format).resolve()
            if not (source / "manifest.json").is_file():
                raise RunError(f"--reuse-format {reuse_format}: not a run directory (no manifest.json)")
            differences = format_stage_differences(source, params, project)
            if differences:
                raise RunError(f"--reuse-format {reuse_format}: its pairs cannot stand for this run's: "
                               f"{'; '.join(differences)}. Give a run formatted with these data params, or leave"
                               " --reuse-format out to format anew")  # fmt: skip
            adopt_format_stage(run_dir, source, params, project, hardware)
            stages = [s for s in stages if s != "format"]
            print(f"dpo-kit: the pairs of {source} are copied into {run_dir}; the format stage is not run again")
        try:
            mf.ensure_writable_dir(run_dir / "notebooks")
        except mf.OutputNotWritable as error:
            raise RunError(str(error)) from None
        params_file = run_dir / "params.yaml"
        save_or_check_params(params, params_file, f"{params_path} + --set")
        # "continuing ..." or "resuming ...": said only once it is so, after the last refusal (params that differ from
        # the run's params.yaml were refused after it had said "continuing an unfinished run"), not before
        if note and not overwrite:
            print(f"dpo-kit: {note}")
        if not mf.read_manifest(run_dir):
            mf.write_manifest(run_dir, mf.new_manifest(params["run"]["name"], params["run"]["seed"], project, hardware))
        mf.mark_dead_stages_interrupted(run_dir)
        if resume:
            skipped = completed_stages(run_dir, stages)
            stages = [s for s in stages if s not in skipped]
        try:
            _execute_stages(stages, run_dir, params_file, project, source_notebooks, kernel, progress,
                            "resume" if resume else "refuse", bar_position)
        finally:  # a failed run is scanned too: its notebooks hold tracebacks and outputs
            leaks = find_secrets(run_dir)
            if leaks:
                mf.update_manifest(run_dir, status="failed", error="secret found in run files")
                raise RunError(f"a secret from the environment was written into: {', '.join(sorted(set(leaks)))}")
    finally:
        if own_kernel:
            kernel.shutdown()
    return run_dir


@contextlib.contextmanager
def terminate_as_exception():
    """SIGTERM raises Terminated in the runner while stages run, so the stage is recorded and its kernel stopped."""
    def on_sigterm(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class ProgressRelay:
    """A file for papermill's stdout_file and stderr_file: shows the newest line a stage prints (tqdm bars of
    sampling and tokenizing, the train stage's step lines) after the stage's name on the runner's bar, so a
    stage that spends minutes in one cell still shows where it is. Nothing else reaches the terminal."""

    def __init__(self, bar, stage: str, width: int = 90) -> None:
        self.bar, self.stage, self.width = bar, stage, width

    def write(self, text: str) -> None:
        lines = [line.strip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
        if lines:
            self.bar.set_postfix_str(f"{self.stage}: {self.shortened(lines[-1])}")

    def shortened(self, line: str) -> str:
        """At most `width` characters, cut after a whole word and marked: a line cut mid-word read as broken output
        ("...; KL(policy ]" on the bar the run ends with)."""
        if len(line) <= self.width:
            return line
        head = line[: self.width - 2]
        return (head.rsplit(" ", 1)[0] if " " in head else head).rstrip(" ;,:") + " …"

    def flush(self) -> None:
        pass


def failure_reason(error: Exception, run_dir: Path) -> str:
    """What a failed stage's error says, for the manifest and the runner's message: a PapermillExecutionError's
    exception name and value (the notebook's), or the error itself (papermill's own, e.g. writing the executed
    notebook). A failed write (full disk, quota, read-only) also names the run directory and the space left: most
    such errors name no path ("[Errno 28] No space left on device", safetensors' "(os error 28)")."""
    reason = f"{getattr(error, 'ename', type(error).__name__)}: {getattr(error, 'evalue', error)}"
    said = getattr(error, "ename", None) == "CheckpointWriteError"  # the train stage's names its folder and space
    failed = reason if hasattr(error, "ename") else error
    # A full disk wherever it is said; a permission error only where it names the run directory (one reading a data
    # file or the hub's cache is about that path, and the run directory is not to blame).
    if not said and (mf.is_write_failure(failed, mf.SPACE_ERRNOS)
                     or (mf.is_write_failure(failed) and str(run_dir) in reason)):  # fmt: skip
        reason += (f"; {run_dir} could not be written ({mf.free_space(run_dir)} on its filesystem). Free space (or"
                   " fix its permissions), then continue with --resume: completed stages are kept and skipped")
    return reason


def _record_stage_end(run_dir: Path, stage: str, run_fields: dict[str, Any], **stage_fields: Any) -> str:
    """Record how a stage ended in manifest.json; returns what to tell about that. On a full disk the manifest cannot
    be written either: it stays as it was (the stage `running`, which the next start finds with its process gone)."""
    try:
        mf.update_stage(run_dir, stage, **stage_fields)
        mf.update_manifest(run_dir, **run_fields)
    except OSError as error:
        return (f"{mf.manifest_path(run_dir)} could not record that ({error.strerror or error}; it is left as it was,"
                " and the next start finds the stage unfinished)")
    return f"recorded in {mf.manifest_path(run_dir)}"


def refuse_prompts_generate_would_refuse(run_dir: str | Path, params_file: str | Path, stage: str) -> None:
    """The generate stage refuses a generate.num_prompts above the held-out prompts the format stage left (or none
    held out); that count is known once the pairs are split, so a run that goes on to generate is stopped before
    `stage` (train, or merge), not after it. Reading the params imports TRL: the runner calls it in its kernel."""
    from dpo_kit.evaluation.generate import comparison_prompts

    run_dir = Path(run_dir)
    try:
        comparison_prompts(load_params(params_file), run_dir)
    except FileNotFoundError:  # no held-out file to count: the stages that need one say so themselves
        return
    except ValueError as error:
        raise RunError(
            f"{error}. Stopped before the {stage} stage, since the generate stage would refuse it. The pairs are kept:"
            f" a new run can take them with --reuse-format {run_dir} --set run.name=NEW --set generate.num_prompts=N"
        ) from None


def _execute_stages(stages, run_dir, params_file, project, source_notebooks, kernel, progress, on_rerun,
                    bar_position: int = 0) -> None:
    import papermill
    from nbclient.exceptions import DeadKernelError
    from tqdm.auto import tqdm

    bar = tqdm(stages, desc="stages", unit="stage", disable=not progress, position=bar_position,
               leave=bar_position == 0)
    # Checked once, before the first of train and merge: the format stage has split the pairs by then.
    first_after_format = next((s for s in stages if s in ("train", "merge")), None) if "generate" in stages else None
    for stage in bar:
        if stage == first_after_format:
            if kernel is not None:
                kernel.call("refuse_prompts_generate_would_refuse", str(run_dir), str(params_file), stage)
            else:  # isolated stages: the runner validated the params itself already
                refuse_prompts_generate_would_refuse(run_dir, params_file, stage)
        bar.set_postfix_str(stage)
        notebook = STAGE_NOTEBOOKS[stage]
        executed = run_dir / "notebooks" / notebook
        if executed.exists():  # an earlier attempt that failed or was interrupted: keep its traceback
            ended = mf.read_manifest(run_dir).get("stages", {}).get(stage, {}).get("status", "failed")
            executed.rename(executed.with_name(f"{executed.stem}.{ended}-{int(time.time())}.ipynb"))
        started = time.perf_counter()
        stage_kernel = kernel or SharedKernel(source_notebooks)  # isolated stages: a fresh kernel each
        try:
            with terminate_as_exception():  # set per stage: nbclient resets SIGTERM after each cell it runs itself
                papermill.execute_notebook(
                    str(source_notebooks / notebook),
                    str(executed),
                    parameters={
                        "params_path": str(params_file),
                        "overrides": [],
                        "project_dir": str(project),
                        "run_dir": str(run_dir),
                        "on_rerun": on_rerun,
                    },
                    kernel_name="python3",
                    cwd=str(source_notebooks),
                    progress_bar={"desc": f"  {stage} cells", "leave": False, "position": bar_position + 1}
                    if progress else False,
                    stdout_file=ProgressRelay(bar, stage) if progress else None,
                    stderr_file=ProgressRelay(bar, stage) if progress else None,
                    km=stage_kernel.manager,
                )
        except (KeyboardInterrupt, Terminated, DeadKernelError) as error:
            # Stop the kernel first (it may still be training), then record: nothing writes the manifest after us.
            stage_kernel.abandon_cell()
            stage_kernel.shutdown()
            signal_name = {KeyboardInterrupt: "SIGINT", Terminated: "SIGTERM"}.get(type(error))
            reason = signal_name or "the kernel died (killed, or out of memory)"
            recorded = _record_stage_end(run_dir, stage, {"status": "interrupted", "interrupted_stage": stage},
                                         status="interrupted", interrupted=mf.now_iso(), reason=reason,
                                         notebook=str(executed), wall_seconds=round(time.perf_counter() - started, 3))
            raise RunInterrupted(
                # From the project folder: params.yaml's relative paths (run.output_dir, the model, the data) resolve
                # from where dpo-kit starts, so the same command elsewhere answered "nothing to resume".
                f"stage '{stage}' interrupted ({reason}); {recorded}. Continue with"
                f" `dpo-kit run {shlex.quote(str(params_file))} --resume`, started in {project}: completed stages are"
                " skipped and training continues from its newest checkpoint.",
                exit_code=143 if signal_name == "SIGTERM" else 130,
            ) from None
        except Exception as error:  # papermill raises PapermillExecutionError; kernel deaths raise others
            if getattr(error, "ename", None) == "StageBusy":  # another live process runs it: its entry is not ours
                raise RunError(f"stage '{stage}' was not run: {error.evalue}") from None
            reason = failure_reason(error, run_dir)
            recorded = _record_stage_end(run_dir, stage, {"status": "failed", "failed_stage": stage}, status="failed",
                                         error=reason, notebook=str(executed),
                                         wall_seconds=round(time.perf_counter() - started, 3))  # fmt: skip
            if not recorded.startswith("recorded"):
                raise RunError(f"stage '{stage}' failed ({reason}); {recorded}. The traceback is in {executed}") from None
            raise RunError(f"stage '{stage}' failed ({reason}); the traceback is in {executed}") from None
        finally:
            if kernel is None:
                stage_kernel.shutdown()
        if kernel is not None:
            kernel.reset()
        mf.update_stage(run_dir, stage, notebook=str(executed), wall_seconds=round(time.perf_counter() - started, 3))
    bar.close()

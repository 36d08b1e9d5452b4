"""Experiment trackers (`tracking.report_to`): Weights & Biases, trackio and TensorBoard, each writing inside the run.

The Trainer's own callbacks log the training curves under TRL's metric names; this module only points them at
the run directory, so that a run's tracker files sit next to its manifest (and inside the runner's secret scan),
and adds what the callbacks do not log: the run's resolved params (params_callback) and the evaluate stage's summary
(win-rate, KL, implicit-reward accuracy).

Where each tracker writes, under <run>/tracking/:
- wandb/: wandb's run folder. Online it also streams to wandb.ai (WANDB_API_KEY from the environment); with
  WANDB_MODE=offline it stays local, for `wandb sync` later. The wandb run id comes from the kit's run id and
  the train stage's params (wandb_run_id), so the evaluate stage and a resumed train stage add to the same wandb
  run, and a training with other params starts another. wandb's own debug logs go to wandb/logs/ (WANDB_CACHE_DIR,
  unless the environment sets it).
- trackio/: trackio's local SQLite store (TRACKIO_DIR); `TRACKIO_DIR=<run>/tracking/trackio trackio show`.
  A resumed training first deletes the run's rows past its checkpoint there (rewind_trackio_after).
- tensorboard/: event files; `tensorboard --logdir <run>/tracking/tensorboard`.

Secrets are never passed here: wandb reads WANDB_API_KEY itself, and the kit writes no environment value.
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

TRACKING_DIR = "tracking"

# The evaluate stage's headline numbers, as the tracker shows them; the keys are metrics.json's (TRL's names
# where TRL has one), under eval/ like the Trainer's evaluation metrics.
SUMMARY_METRICS = (
    "rewards/accuracies", "rewards/margins", "win_rate", "win_rate/ci_low", "win_rate/ci_high", "kl",
    "judge/policy_score", "judge/reference_score", "text/policy_distinct_2", "text/policy_repeated_3grams",
)  # fmt: skip


def trackers(params) -> list[str]:
    return [name for name in params.tracking.report_to if name != "none"]


# The evaluate stage's TensorBoard summary: a folder of its own (a run of its own in TensorBoard), which goes with that
# stage, so that an evaluation run again with other params moves the old summary aside instead of adding a second
# value under the same tag and step. (wandb's summary is replaced; trackio's store keeps each summary logged.)
TENSORBOARD_EVALUATION = "evaluate"


def tracker_dir(run_dir: str | Path, tracker: str) -> Path:
    return Path(run_dir) / TRACKING_DIR / tracker


def wandb_run_id(run_dir: Path) -> str:
    """The wandb run of this run's training: the same for the train stage, its resumption and the evaluate stage
    (which read the train stage's params_id from the manifest), a new one when the train stage runs again with
    other params. A hash, so that any run id (older runs are named `name@created`) makes a valid wandb id."""
    from dpo_kit import manifest as mf

    manifest = mf.read_manifest(run_dir)
    train = manifest.get("stages", {}).get("train", {}).get("params_id", "")
    return hashlib.sha256(f"{mf.run_id(manifest)}/{train}".encode()).hexdigest()[:32]


class TrackerError(RuntimeError):
    """A tracker cannot write where this run's files go; the message says why and what to do."""


# WANDB_MODE's values as wandb 0.2x-0.3x takes them: "dryrun" is offline's old name, "run" online's; "shared" logs
# online from several processes.
WANDB_LOCAL_MODES = ("offline", "dryrun", "disabled")
WANDB_ONLINE_MODES = ("online", "run", "shared")


def wandb_mode() -> tuple[str, str]:
    """The mode wandb logs in, and where that was set, read in wandb's order: WANDB_MODE in the environment, else
    the settings file that `wandb offline`, `wandb disabled` and `wandb online` write in the folder the process runs
    in (./wandb/settings, or ./.wandb/settings where that folder exists), else the global one (WANDB_CONFIG_DIR, or
    ~/.config/wandb). A user who ran `wandb offline`, as wandb's docs tell, was refused for want of WANDB_API_KEY."""
    if "WANDB_MODE" in os.environ:
        return os.environ["WANDB_MODE"], "WANDB_MODE in the environment"
    workspace = Path(".wandb" if Path(".wandb").is_dir() else "wandb", "settings")
    global_settings = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser() / "settings"
    for settings in (workspace, global_settings):
        parser = configparser.ConfigParser()
        try:
            parser.read(settings)
        except (OSError, configparser.Error):  # wandb warns and goes on without it
            continue
        if mode := parser.get("default", "mode", fallback=None):
            return mode, f"mode = {mode} in {settings}"
    return "online", "wandb's default"


def pin_wandb_mode(report_to) -> None:
    """Put a mode that only a wandb settings file names into WANDB_MODE, for every process of the run: each reads the
    settings file of the folder it runs in, and the stages' kernels run in notebooks/ and launched workers in the
    project folder, so `wandb offline` in the folder `dpo-kit run` started in would have reached some and not
    others. `dpo-kit run` and `dpo-kit sweep` call it after wandb_key_for_online has accepted the mode, in the folder
    the user started in."""
    mode, source = wandb_mode()
    if "wandb" in report_to and source.startswith("mode = "):
        os.environ["WANDB_MODE"] = mode


def wandb_key_for_online(report_to) -> None:
    """Refuse wandb online without WANDB_API_KEY in the environment. `dpo-kit run` asks before its first stage, and
    the train and evaluate stages before they load a model: wandb.init() found the key missing only when the train
    stage started, after the format stage (minutes of sampling for an on-policy run). The key comes from the
    environment only, as every secret of the kit's: a `wandb login` entry in ~/.netrc, which wandb would fall back
    to, is not read here and does not count. Offline (or dryrun) and disabled need no key, whether WANDB_MODE or a
    settings file (`wandb offline`) says so."""
    if "wandb" not in report_to:
        return
    mode, source = wandb_mode()  # wandb refuses an empty WANDB_MODE too
    if mode in WANDB_LOCAL_MODES:
        return
    named = f"WANDB_MODE={mode!r} in the environment" if source.startswith("WANDB_MODE") else source
    if mode not in WANDB_ONLINE_MODES:
        raise TrackerError(f"{named} is not a mode wandb takes: set it to one of"
                           f" {', '.join(WANDB_ONLINE_MODES + WANDB_LOCAL_MODES)}, or unset it (online)")
    if not os.environ.get("WANDB_API_KEY"):
        # Where online came from: the variable's value, the settings file's line, or neither (the message said
        # WANDB_MODE='online' to a user who had set no WANDB_MODE at all).
        how = {"WANDB_MODE in the environment": f"WANDB_MODE={mode!r}",
               "wandb's default": "WANDB_MODE unset: wandb's default"}.get(source, source)  # fmt: skip
        raise TrackerError(
            f"tracking.report_to names wandb, which logs online ({how}), but WANDB_API_KEY is not set"
            " in the environment (the kit reads it from there only, not from a `wandb login` entry in ~/.netrc):"
            " set WANDB_API_KEY, or set WANDB_MODE=offline (or run `wandb offline`) to keep the run local (`wandb"
            " sync` it later) or WANDB_MODE=disabled, or take wandb out of tracking.report_to"
        )


def _point_trackio_at(folder: Path) -> None:
    # trackio reads TRACKIO_DIR once, when it is first imported, and keeps it: in a process that already logged
    # another run, this run's curves would go to that run's store. The sweep gives each trial a fresh kernel.
    module = sys.modules.get("trackio.utils")
    if module is not None and Path(module.TRACKIO_DIR).resolve() != folder.resolve():
        raise TrackerError(
            f"trackio was imported in this process with its store at {module.TRACKIO_DIR}, and reads its folder only"
            f" once; this run's store is {folder}. Restart the kernel (a fresh `dpo-kit run` does) to log this run"
            " to trackio."
        )
    os.environ["TRACKIO_DIR"] = str(folder)


# What configure_trackers sets; tracker_environment restores them, so that nothing of this run's trackers is left
# in a kernel that goes on (the user's own wandb.init() would otherwise resume the kit's run).
TRACKER_ENV = ("WANDB_PROJECT", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "TRACKIO_DIR",
               "TENSORBOARD_LOGGING_DIR")  # fmt: skip


@contextlib.contextmanager
def tracker_environment(params, run_dir: str | Path):
    """configure_trackers for the duration of a training; the environment is restored afterwards."""
    before = {name: os.environ.get(name) for name in TRACKER_ENV}
    try:
        yield configure_trackers(params, run_dir)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if "wandb" in trackers(params) and "wandb" in sys.modules:
            # wandb copies the WANDB_* variables once per process, at its first init, and keeps them: without a
            # teardown the user's own wandb.init() in this kernel would still resume the kit's run in the kit's
            # folder, and the evaluate stage's init would warn that the environment changed.
            sys.modules["wandb"].teardown()


@contextlib.contextmanager
def offline_wandb_run_hidden():
    """TRL writes a model card at every checkpoint and asks it for `wandb.run.url`; an offline run has no URL, and
    wandb says so each time ("wandb: WARNING URL not available in offline run"). The card gets no URL either way, so
    for that one synchronous call an offline run is not shown to it; an online run, or none, is left as it is."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None)
    if run is None or not getattr(run, "offline", False):
        yield
        return
    wandb.run = None
    try:
        yield
    finally:
        wandb.run = run


def configure_trackers(params, run_dir: str | Path) -> dict[str, Any]:
    """Point the Trainer's tracker callbacks at <run>/tracking/ (through the environment variables each one
    reads) and return where each writes, for the manifest. Called in the process that trains (and in every
    launched worker), before the Trainer is built; params are the truth, so these override the environment."""
    run_dir = Path(run_dir)
    record: dict[str, Any] = {}
    for name in trackers(params):
        folder = tracker_dir(run_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        if name == "wandb":
            # WANDB_DIR is the folder wandb makes its wandb/ folder in; the id and resume=allow make the train
            # stage, its resumption and the evaluate stage one wandb run.
            os.environ.update(WANDB_PROJECT=params.tracking.project, WANDB_DIR=str(folder.parent),
                              WANDB_RUN_ID=wandb_run_id(run_dir), WANDB_RESUME="allow")  # fmt: skip
            # wandb's service writes a debug log per process (core-debug-*.log, symon-debug-*.log) into its cache
            # folder, ~/.cache/wandb/logs by default, outside the run and its secret scan: with the run's folder it
            # lands in tracking/wandb/logs/. A WANDB_CACHE_DIR of the user's own (say, a larger disk for
            # artifacts) is left as it is.
            os.environ.setdefault("WANDB_CACHE_DIR", str(folder.parent))
            record[name] = {"project": params.tracking.project, "run_id": os.environ["WANDB_RUN_ID"],
                            "mode": wandb_mode()[0], "dir": str(folder)}  # fmt: skip
        elif name == "trackio":
            _point_trackio_at(folder)
            record[name] = {"project": params.tracking.project, "run": params.run.name, "dir": str(folder)}
        elif name == "tensorboard":
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder)
            record[name] = {"log_dir": str(folder)}
    return record


def purge_tensorboard_after(trainer_callbacks, checkpoint_step: int) -> None:
    """A training resumed from checkpoint-N logs steps N+1... again, which the killed one may have logged already:
    TensorBoard showed both curves over those steps (its event files are only appended to). The resumed writer is
    opened with purge_step N+1, which writes TensorBoard's restart marker (SessionLog START): the reader drops the
    earlier files' events from that step on, so each step shows once, the resumed run's value. Called before
    trainer.train(), in the main process only (the one TensorBoard's callback writes from); the callback keeps a
    writer it is given. wandb has no such marker; trackio's local store is rewound instead (rewind_trackio_after)."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    for callback in trainer_callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.tb_writer is None:
            callback.tb_writer = SummaryWriter(log_dir=callback.logging_dir, purge_step=checkpoint_step + 1)


# The Trainer's step in each row the Trainer's trackio callback logs (trackio numbers its rows itself).
TRACKIO_TRAINER_STEP = "train/global_step"


def rewind_trackio_after(params, config, checkpoint_step: int) -> int:
    """A training resumed from checkpoint-N adds to the same trackio run (resume="allow", by name), which holds the
    rows the interrupted training logged after step N: those steps showed twice, and trackio's own step (one per
    logging call, continued from the run's highest) ran on from the discarded rows. This deletes this run's rows
    from the first one whose Trainer step is beyond N on, so each step shows once (the resumed run's value) and
    trackio's step continues from the checkpoint's, numbered as in a training never interrupted. Local stores only:
    with a Space or a self-hosted server (`trackio_space_id`, TRACKIO_SPACE_ID, TRACKIO_SERVER_URL) the rows are
    not this file's to change, and are left. Called before trainer.train() (whose callback resumes the run), in the
    main process only. Returns the number of rows deleted."""
    if config.trackio_space_id or os.environ.get("TRACKIO_SPACE_ID") or os.environ.get("TRACKIO_SERVER_URL"):
        return 0
    import sqlite3

    from trackio.sqlite_storage import SQLiteStorage

    project, name = params.tracking.project, params.run.name
    store = SQLiteStorage.get_project_db_path(project)  # in the run's folder: configure_trackers pointed trackio there
    # The run trackio's init will resume: the newest of that name.
    record = SQLiteStorage.get_latest_run_record_by_name(project, name) if store.exists() else None
    if record is None:
        return 0  # nothing logged yet: the resumed training starts the run
    with contextlib.closing(sqlite3.connect(store, timeout=30)) as db, db:
        # Runs are keyed by run_id; in a store from before trackio had one, the name is the key (record["id"] is it).
        column = "run_id" if "run_id" in {row[1] for row in db.execute("PRAGMA table_info(metrics)")} else "run_name"
        # From the first row past the checkpoint on, not only the rows with a later Trainer step: rows logged after
        # it without one (a predict's metrics) belong to the discarded stretch too, and would hold trackio's step up.
        deleted = db.execute(
            f"DELETE FROM metrics WHERE {column} = ?1 AND step >= (SELECT MIN(step) FROM metrics WHERE {column} = ?1"
            f" AND CAST(json_extract(metrics, '$.\"{TRACKIO_TRAINER_STEP}\"') AS INTEGER) > ?2)",
            (record["id"], checkpoint_step),
        ).rowcount
    run_id = record["id"] if column == "run_id" else None
    if deleted and SQLiteStorage.get_max_step_for_run(project, name, run_id=run_id) is None:
        # Every row was past the checkpoint (a logging interval longer than the saving one): trackio would find no
        # run by that name and start another, beside this one's config and system metrics. Deleted whole (trackio's
        # own call), it is started afresh by the resumed training, which logs every step from N+1 on.
        SQLiteStorage.delete_run(project, name, run_id=run_id)
    return deleted


# The key the run's resolved params (params.yaml) take in each tracker's config, beside the Trainer's own.
PARAMS_KEY = "dpo_kit"


def params_callback(params, trainer_callbacks=None):
    """A TrainerCallback that adds the run's resolved params to each tracker's record of the run. The Trainer's
    tracker callbacks record the DPOConfig and the model's config only, so the data (source, split, rows), the
    model's name, quantization, generation and evaluation settings of a run were nowhere in wandb, trackio or
    TensorBoard, and runs could not be told apart or compared there by them. Params hold no secret (they are
    refused there). Registered after the tracker callbacks (the Trainer adds those first), so at train begin the
    wandb and trackio runs are started and TensorBoard's writer is open; `trainer_callbacks` is the Trainer's
    callback list, where TensorBoard's writer is found."""
    from transformers import TrainerCallback

    from dpo_kit.params import params_to_dict

    names = trackers(params)
    resolved = params_to_dict(params)

    class TrackerParams(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if not names or not state.is_world_process_zero:  # the tracker callbacks log from the main process
                return
            wandb = sys.modules.get("wandb")
            if "wandb" in names and getattr(wandb, "run", None) is not None:
                wandb.run.config.update({PARAMS_KEY: resolved}, allow_val_change=True)
            trackio = sys.modules.get("trackio")
            if "trackio" in names and trackio is not None:
                # Stored with the rest of the config at the run's next log (trackio writes it then).
                trackio.config.update({PARAMS_KEY: resolved})
            for callback in trainer_callbacks or ():
                writer = getattr(callback, "tb_writer", None)
                if "tensorboard" in names and writer is not None:
                    writer.add_text(PARAMS_KEY, "```yaml\n" + _yaml(resolved) + "```")

    return TrackerParams()


def _yaml(resolved: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(resolved, sort_keys=False)


def summary_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{key}": float(metrics[key]) for key in SUMMARY_METRICS if isinstance(metrics.get(key), (int, float))}


def log_summary(params, run_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Send the evaluate stage's summary metrics to each tracker of the run, into the same tracker run as the
    training curves, at the last training step. Returns what was sent where (for the manifest)."""
    run_dir = Path(run_dir)
    names = trackers(params)
    summary = summary_metrics(metrics)
    if not names or not summary:
        return {}
    step = _last_train_step(run_dir)
    sent: dict[str, Any] = {}
    for name in names:
        folder = tracker_dir(run_dir, name)
        folder.mkdir(parents=True, exist_ok=True)
        if name == "wandb":
            sent[name] = _wandb_summary(params, run_dir, folder, summary)
        elif name == "trackio":
            sent[name] = _trackio_summary(params, folder, summary, step)
        elif name == "tensorboard":
            sent[name] = _tensorboard_summary(folder / TENSORBOARD_EVALUATION, summary, step)
    return sent


def _last_train_step(run_dir: Path) -> int:
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return 0
    return max((json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line.strip()), default=0)


def _wandb_summary(params, run_dir: Path, folder: Path, summary: dict[str, float]) -> dict[str, Any]:
    import wandb

    # The train stage's environment (its cache folder in the run, for wandb's debug logs), torn down afterwards
    # like the training's, so that the user's own wandb.init() in this kernel is not given the kit's.
    with tracker_environment(params, run_dir):
        # The train stage's wandb run, resumed: the summary sits beside its curves. wandb reads the key itself.
        run = wandb.init(project=params.tracking.project, id=wandb_run_id(run_dir), resume="allow",
                         dir=str(folder.parent), name=params.run.name)  # fmt: skip
        try:
            run.summary.update(summary)
            return {"run_id": run.id, "url": None if run.offline else run.url, "metrics": sorted(summary)}
        finally:
            run.finish()


def _trackio_summary(params, folder: Path, summary: dict[str, float], step: int) -> dict[str, Any]:
    _point_trackio_at(folder)  # before trackio's first import in this process, which reads TRACKIO_DIR
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    # trackio stores a run's config at the first log after each init, replacing the stored one: resumed without
    # it, the training's hyperparameters (stored by the Trainer's callback) would give way to trackio's own three
    # keys. The stored config goes back in as it is (through config.update, as the callback puts it: init refuses
    # the model config's `_name_or_path`, a key starting with "_").
    stored = SQLiteStorage.get_run_config(params.tracking.project, params.run.name) or {}
    trackio.init(project=params.tracking.project, name=params.run.name, resume="allow")
    trackio.config.update(stored)
    try:
        # trackio numbers its own steps (one per logging call of the Trainer); the Trainer's step rides along
        # under the name its callback uses.
        trackio.log({**summary, "train/global_step": step})
    finally:
        trackio.finish()
    return {"project": params.tracking.project, "run": params.run.name, "step": step, "metrics": sorted(summary)}


def _tensorboard_summary(folder: Path, summary: dict[str, float], step: int) -> dict[str, Any]:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(folder)) as writer:
        for key, value in summary.items():
            writer.add_scalar(key, value, global_step=step)
    return {"log_dir": str(folder), "step": step, "metrics": sorted(summary)}


def finish_trackers(record: dict[str, Any]) -> dict[str, Any]:
    """After training: add the wandb run's URL to `record` and close the run. The Trainer's callback leaves it
    open, and in the runner's shared kernel the next stage (or run) would otherwise log into it."""
    if "wandb" in record:
        import wandb

        if wandb.run is not None:
            # Offline there is no URL (and asking makes wandb warn): `wandb sync <dir>` uploads the run later.
            record["wandb"].update(name=wandb.run.name, url=None if wandb.run.offline else wandb.run.url)
            wandb.finish()
    return record


def record_summary(run_dir: str | Path, sent: dict[str, Any]) -> None:
    """Add what log_summary sent to the manifest's `tracking` entry, beside what the train stage recorded."""
    if not sent:
        return
    from dpo_kit import manifest as mf

    tracking = mf.read_manifest(run_dir).get("tracking", {})
    for name, entry in sent.items():
        tracking.setdefault(name, {})["summary"] = entry
    mf.update_manifest(run_dir, tracking=tracking)

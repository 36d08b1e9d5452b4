"""`dpo-kit sweep`: one normal run per point of a search space, driven by Optuna.

Optuna is the engine: its GridSampler walks a grid, its random and TPE samplers search ranges, and its
study storage (SQLite in the sweep directory by default, or a shared PostgreSQL / MySQL URL, or a journal
file on NFS) is what lets a killed sweep continue and several workers share one sweep. The kit adds only
what Optuna cannot know:

- each trial is a run directory <output_dir>/<sweep>/<trial name>, named by its params, executed by the runner
  with `resume` (completed stages skipped, an interrupted train stage continued from its checkpoint);
- a claim file per trial name, taken with O_EXCL, so two workers never run one point: GridSampler hands a
  point that is still running to a second worker once every point has started (its docs say so);
- a trial whose worker process died on this host (kill -9, a closed laptop) is failed and re-queued through
  Optuna's RetryHeartbeatStaleTrialCallback at the next start; on other hosts Optuna's heartbeat does the same;
- trials whose data params are equal share one format stage (copied from the first, recorded as reused).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpo_kit import manifest as mf
from dpo_kit.evaluation.report import TRIAL_NOTES
from dpo_kit.params import (
    PLACE_ONLY_KEYS,
    ParamsError,
    is_directory_name,
    load_params,
    params_to_dict,
    read_yaml,
    redact_secrets,
    run_directory,
    sections_of_bare_key,
)
from dpo_kit.run.stage import adopt_format_stage, has_completed_format, params_fingerprint
from dpo_kit.tracking import pin_wandb_mode

SWEEP_FILE = "sweep.json"
CLAIMS = ".claims"
SAMPLERS = ("grid", "random", "tpe")
DEFAULT_OBJECTIVE = "rewards/accuracies"  # held-out implicit-reward accuracy, from the evaluate stage
# The numbers the evaluate stage writes to metrics.json (dpo_kit.evaluation.evaluate: TRL's names where TRL has one),
# which --objective may name; listed here so that a sweep checks its objective without importing torch and TRL.
# tests/test_evaluate.py checks the list against a metrics.json the evaluate stage wrote.
OBJECTIVE_METRICS = (
    "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "loss/sigmoid",
    "logps/chosen", "logps/rejected", "logps_per_token/chosen", "logps_per_token/rejected",
    "ref_logps/chosen", "ref_logps/rejected", "ref_logps_per_token/chosen", "ref_logps_per_token/rejected",
    "ref_logps/accuracies", "rewards/accuracies/ref_prefers_chosen", "rewards/accuracies/ref_prefers_rejected",
    "num_pairs/ref_prefers_chosen", "num_pairs/ref_prefers_rejected", "beta", "num_pairs", "num_pairs_dropped",
    # From the generations (the generate stage's generations.jsonl):
    "win_rate", "win_rate/ci_low", "win_rate/ci_high", "win_rate/ci_level", "win_rate/wins", "win_rate/ties",
    "win_rate/losses", "win_rate/n", "judge/policy_score", "judge/reference_score", "kl", "kl/token",
    "num_generations", "generate/policy_tokens", "generate/reference_tokens", "text/policy_words",
    "text/reference_words", "text/policy_distinct_2", "text/reference_distinct_2", "text/policy_repeated_3grams",
    "text/reference_repeated_3grams",
)  # fmt: skip
HEARTBEAT_SECONDS = 60  # Optuna's heartbeat: a trial silent for GRACE_SECONDS on another host is failed and retried
GRACE_SECONDS = 600
# A file name has 255 bytes at most; a trial's claim (<name>.json.stale-<pid>-<ns>) and an archived run
# (<name>.archived-<time>) add up to about 40 to its run directory's name.
MAX_TRIAL_NAME_BYTES = 200
OWNED_KEYS = ("run.name", "run.output_dir") + PLACE_ONLY_KEYS  # the sweep names and places its trials


class SweepError(RuntimeError):
    """A sweep cannot run as asked. A secret the message would quote (a --grid value the params refused) is ***."""

    def __init__(self, message: str = "") -> None:
        super().__init__(redact_secrets(str(message)))


class TrialFailed(SweepError):
    """A trial's run failed (its stage error is recorded on the trial); the sweep goes on with the others."""


def _scalar(text: str, item: str = "", flag: str = "--grid") -> Any:
    """A grid value as a --set value is read (params.read_yaml: `no` is text), with '1e-5' a float (PyYAML reads
    exponents without a dot as strings)."""
    try:
        value = read_yaml(text) if text.strip() else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        example = f"{flag} \"{item.split('=', 1)[0]}='{text.strip()}',...\""
        message = (f"{flag} {item}: the value {text.strip()!r} is not valid YAML ({problem}); to pass it as text, put"
                   f" it in single quotes inside the shell's double quotes, e.g. {example}")
        raise SweepError(message) from None
    if isinstance(value, str) and EXPONENT.fullmatch(value.strip()):
        return float(value)
    return value


# A number with an exponent and no dot, which PyYAML reads as text. Only this: float() of any text made the revision
# 0123 (text to read_yaml, as YAML 1.2 reads it) the number 123.0, and 'nan' a number.
EXPONENT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")


def grid_values(text: str) -> list[str]:
    """The values of `--grid KEY=V1,V2,...`, split at the commas outside brackets, braces and quotes: a list value
    (`dpo.loss_type=[sigmoid,sft],ipo`) was cut at its own comma, and no quoting could pass it."""
    values, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and not text[start:i].strip():  # a quote opens only a value, not "don't"
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [*values, text[start:]]


def optuna_choice(value: Any) -> Any:
    """A grid value as Optuna stores it: a list or mapping (dpo.loss_type [sigmoid, sft]) as its YAML text, since
    Optuna's storage and GridSampler take only None, bool, int, float and str (and warn at every trial otherwise)."""
    return yaml_text(value) if isinstance(value, (list, dict)) else value


def yaml_text(value: Any) -> str:
    """`value` written so that an override (parsed as YAML) reads it back equal: 1e-05 -> '1.0e-05'."""
    # On one line whatever its length: PyYAML folds a long value at 80 characters, and the first line alone was
    # taken, so a trial of a value longer than that trained with it cut short (or failed as unclosed YAML).
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).removesuffix("\n").removesuffix("\n...")
    # A value with a line break still takes two lines in YAML's quotes; JSON escapes it, and YAML reads JSON.
    return json.dumps(value, ensure_ascii=False) if "\n" in text else text


@dataclass
class SearchSpace:
    grid: dict[str, list[Any]] = field(default_factory=dict)  # key -> the values to try
    ranges: dict[str, list[Any]] = field(default_factory=dict)  # key -> [low, high, "log" | "linear"]

    @classmethod
    def parse(cls, grid: list[str], ranges: list[str]) -> SearchSpace:
        space = cls()
        for item in grid:
            key, values = _split(item, "--grid", "dpo.beta=0.05,0.1,0.5")
            if key in space.grid:  # the second --grid replaced the first without a word
                raise SweepError(f"{key} is given twice with --grid; give all its values in one: --grid {key}=V1,V2,...")
            space.grid[key] = [_scalar(v, item) for v in grid_values(values)]
            if len(set(map(repr, space.grid[key]))) != len(space.grid[key]):
                raise SweepError(f"--grid {item}: a value appears twice")
        for item in ranges:
            key, text = _split(item, "--range", "dpo.learning_rate=1e-5:1e-3:log")
            parts = text.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
                raise SweepError(f"--range {item}: expected KEY=LOW:HIGH or KEY=LOW:HIGH:log, e.g. "
                                 "dpo.learning_rate=1e-5:1e-3:log")
            low, high = _scalar(parts[0], item, "--range"), _scalar(parts[1], item, "--range")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or low >= high:
                raise SweepError(f"--range {item}: LOW and HIGH must be numbers with LOW < HIGH")
            # Optuna refuses these only when the first trial asks for a value, after the sweep has recorded its
            # space: the sweep ended in a traceback and the corrected command was refused as another sweep.
            if not all(math.isfinite(v) for v in (low, high)):
                raise SweepError(f"--range {item}: LOW and HIGH must be finite numbers")
            if len(parts) == 3 and parts[2] == "log" and low <= 0:
                raise SweepError(f"--range {item}: a log range needs LOW above 0 (its logarithm is searched),"
                                 f" e.g. {key}=1e-6:{parts[1]}:log, or a linear range {key}={parts[0]}:{parts[1]}")
            if key in space.grid:
                raise SweepError(f"{key} is given both as --grid and as --range; give it once")
            if key in space.ranges:
                raise SweepError(f"{key} is given twice with --range; give it once")
            space.ranges[key] = [low, high, parts[2] if len(parts) == 3 else "linear"]
        for key in [*space.grid, *space.ranges]:
            if key in OWNED_KEYS:
                raise SweepError(f"{key} cannot be swept: the sweep names and places its trials itself")
        if not space.grid and not space.ranges:
            raise SweepError("nothing to sweep: give --grid KEY=V1,V2,... and/or --range KEY=LOW:HIGH[:log]")
        return space

    def grid_size(self) -> int:
        size = 1
        for values in self.grid.values():
            size *= len(values)
        return size



def _split(item: str, flag: str, example: str) -> tuple[str, str]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise SweepError(f"{flag} {item!r}: expected SECTION.KEY=..., e.g. {flag} {example}{sections_of_bare_key(item)}")
    key, values = item.split("=", 1)
    return key.strip(), values


def trial_name(values: dict[str, Any]) -> str:
    """The run directory of a point: 'beta=0.1,loss_type=ipo' (the last part of each key, unless two collide)."""
    last = [k.split(".")[-1] for k in values]
    names = [short if last.count(short) == 1 else key for key, short in zip(values, last, strict=True)]
    text = ",".join(f"{name}={yaml_text(value)}" for name, value in zip(names, values.values(), strict=True))
    return text.replace("/", "_").lstrip(".") or "trial"


def trial_overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={yaml_text(value)}" for key, value in values.items()]


# ---------------------------------------------------------------------------------------------
# The sweep's own record and its storage


@dataclass
class SweepSpec:
    """What makes a sweep: written to <sweep>/sweep.json and compared when the same sweep is started again."""

    params: str
    overrides: list[str]
    space: dict[str, Any]
    sampler: str
    samples: int | None
    objective: str
    direction: str
    seed: int


def storage_url(sweep_dir: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{sweep_dir / 'optuna.db'}"


def redacted(url: str) -> str:
    """A storage URL for the record: a password (better kept in the environment, e.g. PGPASSWORD) is hidden."""
    if "://" not in url or url.startswith(("sqlite", "journal")):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def storage_lock(url: str):
    """Workers on one machine open an RDB storage one at a time. RDBStorage creates its tables and records its
    schema version when it opens a new database, and two processes doing that at once fail ("table studies
    already exists"): two workers started together on a fresh sweep did. A SQLite database is guarded by a lock
    on the folder that holds it (a lock on a folder leaves no file behind); a database server's URL by a file in
    this machine's temporary directory, one per URL. Workers on other machines are not serialized: on a fresh
    shared database, start one worker first and the others once it runs."""
    import fcntl

    descriptor = _lock_descriptor(url)
    if descriptor is None:  # nothing another worker could race over
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _lock_descriptor(url: str) -> int | None:
    """What storage_lock locks, opened: the SQLite file's folder, or a file per URL in the temporary directory.
    None for an in-memory SQLite database (one process's own) or a folder that is not there (RDBStorage cannot
    create the file, and says so)."""
    import hashlib
    import tempfile

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # not a URL at all: RDBStorage refuses it, and open_storage says what would be valid
        parsed = None
    if parsed is not None and parsed.get_backend_name() == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return None
        folder = Path(parsed.database).expanduser().absolute().parent
        return os.open(folder, os.O_RDONLY) if folder.is_dir() else None
    path = Path(tempfile.gettempdir()) / f"dpo-kit-optuna-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"
    return os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)


def open_storage(url: str):
    """An Optuna storage: an RDB URL (heartbeat on, stale trials retried), or journal:PATH (a file, for NFS)."""
    import warnings

    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if url.startswith("journal:"):
        path = url.removeprefix("journal:").removeprefix("//")
        return JournalStorage(JournalFileBackend(path))
    try:
        with warnings.catch_warnings(), storage_lock(url):
            # Heartbeats are marked experimental since Optuna 2.8 and are how it finds dead workers; we rely on them
            # knowingly, so only that notice is muted, only here.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=retry_callback())
    except (optuna.exceptions.StorageInternalError, ImportError, ValueError) as error:
        raise SweepError(f"--storage {redacted(url)}: cannot open it ({error}). Valid: sqlite:///PATH.db,"
                         " postgresql://USER@HOST/DB, mysql://USER@HOST/DB, or journal:PATH") from None


def retry_callback():
    """Optuna's re-queue of a dead trial: same params and grid point, a new trial number, no retry limit."""
    import warnings

    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=None)


def make_sampler(spec: SweepSpec):
    import optuna

    if spec.sampler == "grid":
        grid = {key: [optuna_choice(value) for value in values] for key, values in spec.space["grid"].items()}
        return optuna.samplers.GridSampler(grid, seed=spec.seed)
    if spec.sampler == "random":
        return per_trial_seed(optuna.samplers.RandomSampler, spec.seed)
    return per_trial_seed(optuna.samplers.TPESampler, spec.seed)


def per_trial_seed(sampler_class, seed: int):
    """`sampler_class` whose random numbers for a trial come from (seed, trial number) alone.

    Optuna's RandomSampler and TPESampler draw from one generator per process, seeded once. A restarted sweep or a
    second worker started with the same command began that sequence again, so its first new trial drew the first
    trial's point: its run directory was found complete, and the trial counted as one of --samples without a new
    point being tried. Trial numbers are unique in a study, so a trial's draws are too, whichever worker makes them
    and however often the sweep is started. (GridSampler is left as it is: it draws among the points not yet tried.)"""
    import numpy as np

    class Sampler(sampler_class):
        def before_trial(self, study, trial) -> None:
            # Seeded from an array (MT19937's init_by_array), which mixes the seed better than one 32-bit number.
            self._rng.rng.seed(np.random.SeedSequence([seed, trial.number, 0]).generate_state(4))
            if hasattr(self, "_random_sampler"):  # TPESampler's startup trials are drawn by its own RandomSampler
                self._random_sampler._rng.rng.seed(np.random.SeedSequence([seed, trial.number, 1]).generate_state(4))
            super().before_trial(study, trial)

    Sampler.__name__ = Sampler.__qualname__ = sampler_class.__name__
    return Sampler(seed=seed)


# ---------------------------------------------------------------------------------------------
# Claims: one worker per trial name


def _claim_path(sweep_dir: Path, name: str) -> Path:
    return sweep_dir / CLAIMS / f"{name}.json"


def take_claim(sweep_dir: Path, name: str, trial_number: int, holder_running=lambda record: None) -> bool:
    """Claim the trial `name` for this process; False when a live process holds it.

    O_EXCL makes the claim atomic. A claim whose process is gone (on this host) or whose trial is no longer
    running (`holder_running` asks the study) is taken over: renamed aside first, which only one taker wins."""
    path = _claim_path(sweep_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"trial": trial_number, **mf.this_process()}
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            alive = mf.process_alive(holder) if holder.get("pid") else False
            if alive is None:  # another host: ask the study whether its trial still runs
                alive = holder_running(holder)
            if alive:
                return False
            try:
                path.rename(path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}"))
            except FileNotFoundError:
                pass  # another worker moved it first; try again
            continue
        with os.fdopen(descriptor, "w") as handle:
            json.dump(record, handle)
        return True
    return False


def release_claim(sweep_dir: Path, name: str) -> None:
    path = _claim_path(sweep_dir, name)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------------------------------------
# Recovering trials that a dead worker left


def recover_interrupted_trials(study) -> list[int]:
    """Fail the trials whose worker on this host is gone, and queue each interrupted trial again (once).

    Optuna's heartbeat finds dead workers too, but only after its grace period; here the worker's pid tells at
    once. The retry is Optuna's own RetryFailedTrialCallback: same params, same grid point, a new trial number."""
    import copy

    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    to_retry = []
    for trial in trials:
        worker = trial.user_attrs.get("worker", {})
        if trial.state == TrialState.RUNNING and worker and mf.process_alive(worker) is False:
            try:  # the note first: a finished trial takes no more attributes
                storage.set_trial_user_attr(trial._trial_id, "interrupted", "its worker process ended (killed?)")
                storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker got there first
            to_retry.append(trial.number)
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in retried:
            to_retry.append(trial.number)
    for number in to_retry:
        retry_callback()(study, copy.deepcopy(study.trials[number]))
    return to_retry


# ---------------------------------------------------------------------------------------------
# One trial


def check_objective(objective: str) -> None:
    """Refuse an --objective that the evaluate stage never writes, before any trial runs (and before the sweep
    records it: a sweep keeps its objective)."""
    if objective in OBJECTIVE_METRICS:
        return
    import difflib

    close = difflib.get_close_matches(objective, OBJECTIVE_METRICS, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise SweepError(f"--objective {objective!r} is not a number the evaluate stage writes to metrics.json"
                     f"{hint or '.'} Valid objectives: {', '.join(OBJECTIVE_METRICS)}")


def read_objective(run_dir: Path, key: str) -> float:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise SweepError(f"{path} not found: the evaluate stage writes the objective {key!r}")
    metrics = json.loads(path.read_text())
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise SweepError(f"objective {key!r} is not a number in {path}; valid: {', '.join(numeric)}")
    if not math.isfinite(value):
        # Optuna fails a trial whose objective is NaN (and would rank an infinity first); the reason is kept here.
        raise SweepError(f"objective {key!r} is {value} in {path}: a trial needs a finite value to be compared")
    return float(value)


def share_format_stage(sweep_dir: Path, run_dir: Path, resolved: dict, project: Path, hardware: dict,
                       trial_number: int, holder_running=lambda record: None,
                       wait_seconds: float = 1.0) -> tuple[Path | None, str | None]:
    """Give a new trial the format stage of a sibling made with equal data params; else claim the formatting.

    Returns (the sibling copied from, None) or (None, the claim this trial now holds and must release). While
    another live trial holds the claim for these data params, this one waits and then copies its pairs, so two
    workers never sample the same pairs twice; a holder that fails or dies frees the claim for the next."""
    if mf.read_manifest(run_dir):
        return None, None  # a trial continued: its own format stage stands
    claim = f"format-{params_fingerprint(resolved, 'format')}"
    while True:
        for sibling in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p != run_dir):
            if (sibling / "manifest.json").is_file() and has_completed_format(sibling, resolved, project):
                adopt_format_stage(run_dir, sibling, resolved, project, hardware)
                return sibling, None
        if take_claim(sweep_dir, claim, trial_number, holder_running):
            return None, claim
        time.sleep(wait_seconds)


TRIAL_OUTCOME_NOTES = ("interrupted", "error", "duplicate")  # how a trial's attempt ended; each attempt sets its own


@dataclass
class Sweep:
    spec: SweepSpec
    sweep_dir: Path
    project: Path
    progress: bool = True
    study: Any = None
    kernel: Any = None
    bar: Any = None

    def objective(self, trial) -> float:
        from dpo_kit.run.runner import RunInterrupted

        # A retry is created with the user attributes of the trial it retries (Optuna copies them all), and these
        # say how that attempt ended, not this one: with 'interrupted' left on, a retry that failed with an error
        # was queued again at every start and not counted against --samples, and a completed one showed the note
        # that says to resume it. Optuna cannot delete an attribute; None reads as absent everywhere here.
        for note in TRIAL_OUTCOME_NOTES:
            if trial.user_attrs.get(note) is not None:
                trial.set_user_attr(note, None)
        try:
            return self.run_trial(trial)
        except (RunInterrupted, KeyboardInterrupt) as error:
            # Recorded wherever it struck (choosing the point, claiming it, waiting for a sibling's format stage, in
            # the run), so that the next start queues the trial again (recover_interrupted_trials) and it does not
            # count against --samples: without the note the point stayed failed, and a grid never ran it again.
            trial.set_user_attr("interrupted", str(error) or type(error).__name__)
            raise

    def run_trial(self, trial) -> float:
        from dpo_kit.run.runner import RunError, RunInterrupted, SharedKernel, notebooks_dir, resolve_run, run_pipeline

        values = self.suggest(trial)
        name = trial_name(values)
        trial.set_user_attr("run_dir", name)
        trial.set_user_attr("worker", mf.this_process())
        if self.bar is not None:
            self.bar.set_postfix_str(name)
        if not take_claim(self.sweep_dir, name, trial.number, self.holder_running):
            import optuna

            trial.set_user_attr("duplicate", "the same point runs in another worker")
            raise optuna.TrialPruned(f"{name} runs in another worker")
        format_claim = None
        try:
            overrides = [*self.spec.overrides, *trial_overrides(values), f"run.name={name}",
                         f"run.output_dir={self.output_dir()}"]
            run_dir = self.sweep_dir / name
            try:
                resolved = resolve_run(self.spec.params, overrides, self.project)
            except (RunError, ParamsError) as error:
                if isinstance(error, RunInterrupted):
                    raise
                # A grid's points were all read before the sweep started (refuse_bad_combinations); a point that a
                # random or TPE search draws is read first here, and a combination (dpo.max_steps=6 with
                # dpo.logging_steps=30) is this point's failure, recorded on the trial, and the other points still
                # run. Raised as itself, it ended the sweep with a traceback and a failed trial that gave no reason.
                self.record_error(trial, name, str(error))
                raise TrialFailed(f"trial {trial.number} ({name}): {error}") from None
            shared, format_claim = share_format_stage(self.sweep_dir, run_dir, resolved["params"], self.project,
                                                      resolved["hardware"], trial.number, self.holder_running)
            if shared is not None:
                trial.set_user_attr("format_reused_from", shared.name)
            if self.kernel is None:
                self.kernel = SharedKernel(notebooks_dir(self.project))
            try:
                run_pipeline(self.spec.params, overrides, project_dir=self.project, progress=self.progress,
                             resume=True, start_if_missing=True, kernel=self.kernel, bar_position=1)
            except BaseException as error:
                self.kernel.shutdown()  # its namespace may hold a half-run stage: the next trial gets a fresh one
                self.kernel = None
                if isinstance(error, (RunError, ParamsError)) and not isinstance(error, RunInterrupted):
                    self.record_error(trial, name, str(error))
                    raise TrialFailed(f"trial {trial.number} ({name}): {error}") from None
                raise
            if "trackio" in resolved["params"]["tracking"]["report_to"]:
                # trackio reads its folder once per process (tracking.py): the next trial's store is its own.
                self.kernel.shutdown()
                self.kernel = None
            try:
                return read_objective(run_dir, self.spec.objective)
            except SweepError as error:
                self.record_error(trial, name, str(error))
                raise
        finally:
            release_claim(self.sweep_dir, name)
            if format_claim:
                release_claim(self.sweep_dir, format_claim)

    def record_error(self, trial, name: str, note: str) -> None:
        """A trial's error: on the trial in the study, and in full in <sweep>/trial_notes/ (trial_note_path). Both lie
        outside the run directories the runner's secret scan reads, and an error may quote a library's message with
        a token in it (a URL's credentials, a header): kept with secrets' values replaced."""
        note = redact_secrets(note)
        trial.set_user_attr("error", note)
        path = trial_note_path(self.sweep_dir, name, trial.number)
        path.parent.mkdir(exist_ok=True)
        path.write_text(note + "\n", encoding="utf-8")

    def suggest(self, trial) -> dict[str, Any]:
        values = {}
        for key, choices in self.spec.space["grid"].items():
            stored = [optuna_choice(choice) for choice in choices]
            values[key] = choices[stored.index(trial.suggest_categorical(key, stored))]
        for key, (low, high, scale) in self.spec.space["ranges"].items():
            if isinstance(low, int) and isinstance(high, int):
                values[key] = trial.suggest_int(key, low, high, log=scale == "log")
            else:
                values[key] = trial.suggest_float(key, float(low), float(high), log=scale == "log")
        return values

    def holder_running(self, holder: dict) -> bool:
        """A claim from another host: alive while its trial still runs in the study (Optuna's heartbeat ends it)."""
        from optuna.trial import TrialState

        number = holder.get("trial")
        trials = self.study.get_trials(deepcopy=False) if self.study is not None else []
        return isinstance(number, int) and number < len(trials) and trials[number].state == TrialState.RUNNING

    def output_dir(self) -> str:
        return str(self.sweep_dir)


def check_spec(sweep_dir: Path, spec: SweepSpec, base_params: dict | None = None) -> None:
    """The same sweep started again must be the same sweep: a changed search space or base params is refused."""
    from dpo_kit.params import params_differences

    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    changed = [k for k, v in asdict(spec).items() if recorded.get("spec", {}).get(k) != json.loads(json.dumps(v))]
    if base_params is not None and "base_params" in recorded:
        edited = params_differences(recorded["base_params"], json.loads(json.dumps(base_params)))
        changed += [f"the params file's {d}" for d in edited]
    if changed:
        raise SweepError(
            f"sweep {sweep_dir} was started with other settings ({', '.join(changed)} differ from {path}). A sweep"
            " is never mixed with another: give this one a new --name, or repeat the recorded command."
        )


STUDY_SPEC = "dpo_kit_sweep"  # the study's user attribute holding what made the sweep


def check_study_spec(study, spec: SweepSpec, base_params: dict, url: str) -> None:
    """A study in a shared --storage is found by the sweep's name alone: another sweep of that name (another
    project, another search space, in another output directory) would add its trials to this one's. The study
    keeps what made it, and a sweep that differs is refused. The params file's path is left out (a worker on another
    machine may have its checkout elsewhere); its content is compared."""
    from dpo_kit.params import params_differences

    mine = {"spec": {k: v for k, v in json.loads(json.dumps(asdict(spec))).items() if k != "params"},
            "base_params": json.loads(json.dumps(base_params))}  # fmt: skip
    recorded = study.user_attrs.get(STUDY_SPEC)
    if recorded is None:
        study.set_user_attr(STUDY_SPEC, mine)
        return
    changed = [k for k, v in mine["spec"].items() if recorded.get("spec", {}).get(k) != v]
    changed += [f"the params file's {d}" for d in params_differences(recorded.get("base_params", {}), mine["base_params"])]
    if changed:
        raise SweepError(
            f"the study '{study.study_name}' in {url} belongs to another sweep of that name ({', '.join(changed)}"
            " differ). A sweep is never mixed with another: give this one a new --name, or repeat that sweep's command."
        )


def validate_points(spec: SweepSpec, space: SearchSpace, project: Path) -> None:
    """Load the params at every grid value (and both ends of every range) before any trial runs.

    A range takes the type of its key: `--range dpo.beta=1:5` searches the floats from 1 to 5 (beta is a float),
    not the integers 1 to 5 that its bounds read as; an integer key (dpo.max_steps) is searched in integers."""
    path = project / spec.params if not Path(spec.params).is_absolute() else spec.params
    for key, values in space.grid.items():  # a point's run directory is named by its values, '/' written as '_'
        named: dict[str, Any] = {}
        for value in values:
            other = named.setdefault(trial_name({key: value}), value)
            if other != value:
                raise SweepError(f"--grid {key}: the values {yaml_text(other)} and {yaml_text(value)} would share the"
                                 f" run directory '{trial_name({key: value})}' ('/' is written as '_' in its name);"
                                 " sweep one of them, then the other with another --name")  # fmt: skip
    # The longest point's name (a range's value at its longest, as a float's text may be): a trial directory is
    # one file name, with its claim's and an archived copy's suffixes. Past that, the first trial ended in
    # "OSError: File name too long" and a traceback.
    longest = {key: max(values, key=lambda v: len(yaml_text(v))) for key, values in space.grid.items()}
    name = trial_name({**longest, **{key: -1.2345678901234567e-05 for key in space.ranges}})
    if len(name.encode()) > MAX_TRIAL_NAME_BYTES:
        raise SweepError(f"a trial's run directory would be named '{name[:80]}...', {len(name.encode())} bytes, above"
                         f" the {MAX_TRIAL_NAME_BYTES} a file name leaves room for: sweep shorter values (a long text"
                         " from a file the params name, such as data.generate.prompts) or fewer keys at once")
    probes = [(k, v, [*spec.overrides, f"{k}={yaml_text(v)}"]) for k, values in space.grid.items() for v in values]
    probes += [(k, None, [*spec.overrides, f"{k}={yaml_text(v)}"]) for k, (lo, hi, _) in space.ranges.items() for v in (lo, hi)]
    read: dict[str, list[Any]] = {}
    for key, swept, overrides in probes:
        try:
            params = load_params(path, overrides)
        except ParamsError as error:
            # A grid's trials never run a value beside the params file's value of another swept key: one refused so
            # (dpo.max_steps=2 beside the file's dpo.logging_steps 5) is read within a point of the grid that holds
            # it, and only a value no point takes is refused here (the others' points, by refuse_bad_combinations).
            within = _within_a_point(path, spec.overrides, space.grid, key, swept) if spec.sampler == "grid" else None
            if within is None:
                raise SweepError(f"{error} (from the sweep's {overrides[-1]})") from None
            params = within
        if params.merge.push_to_hub and "merge.hub_model_id" not in space.grid:
            # Every trial's merge stage would push to the one repo, leaving it with whichever trial merged last.
            raise SweepError(f"merge.push_to_hub: every trial of the sweep would push its merged model to"
                             f" {params.merge.hub_model_id}, which would end up holding whichever trial merged last."
                             " Sweep with merge.push_to_hub=false, then push the trial you choose (its merged/ folder)")
        value: Any = params_to_dict(params)
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        read.setdefault(key, []).append(value)
    if spec.sampler == "grid":
        refuse_bad_combinations(path, spec.overrides, space.grid)
    for key, values in space.grid.items():  # 1 and 1.0 for a float key: two run directories, one point trained twice
        seen: dict[str, Any] = {}
        for value, resolved in zip(values, read[key], strict=True):
            text = json.dumps(resolved, sort_keys=True, default=str)
            if text in seen:
                raise SweepError(f"--grid {key}: the values {yaml_text(seen[text])} and {yaml_text(value)} are one value"
                                 f" of {key} ({yaml_text(resolved)}), which would be trained twice; give it once")
            seen[text] = value
    for key, (low, high, scale) in list(space.ranges.items()):
        if all(isinstance(v, float) for v in read[key]):
            space.ranges[key] = [float(low), float(high), scale]
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in read[key]):
            space.ranges[key] = [int(low), int(high), scale]


def grid_points(grid: dict[str, list[Any]]) -> Iterator[dict[str, Any]]:
    """Every point of a grid, in the order its values are listed ({} for a grid of no keys)."""
    for combination in itertools.product(*grid.values()):
        yield dict(zip(grid, combination, strict=True))


def _within_a_point(path: str | Path, overrides: list[str], grid: dict[str, list[Any]], key: str, value: Any):
    """The params at the first point of the grid that holds `key`=`value` and that the params take; None if none does
    (or `key` is the grid's only key)."""
    others = {k: values for k, values in grid.items() if k != key}
    if not others:
        return None
    for point in grid_points(others):
        try:
            return load_params(path, [*overrides, *trial_overrides({key: value, **point})])
        except ParamsError:
            continue
    return None


def refuse_what_the_trials_lack(spec: SweepSpec, space: SearchSpace, project: Path) -> None:
    """What each trial's `dpo-kit run` would refuse before its first stage about the environment (HF_TOKEN and a hub
    not offline for merge.push_to_hub, WANDB_API_KEY for wandb online, the offline cache: the runner's own
    refuse_what_the_environment_lacks, for every stage), refused before the first trial: the sweep started trial
    after trial, a kernel each, only to record each as failed for the same reason.

    Checked at every point of the grid, with the values a trial has: a swept key's value in the params file is no
    trial's (`--grid tracking.report_to=none,tensorboard` over a file naming wandb needs no key), and two swept keys
    may be needed together (merge.push_to_hub with merge.hub_model_id, model.name_or_path with model.revision).
    A --range key keeps the params file's value here: ranges are numbers, which none of these checks reads. A point
    the params refuse is skipped: a grid's were refused already (refuse_bad_combinations), and a random or TPE
    search's is that trial's own failure. The wandb mode a settings file names is then pinned for the trials."""
    from dpo_kit.run.runner import RunError, refuse_what_the_environment_lacks

    path = project / spec.params if not Path(spec.params).is_absolute() else spec.params
    for values in grid_points(space.grid):
        try:
            params = load_params(path, [*spec.overrides, *trial_overrides(values)])
        except ParamsError:
            continue
        who = f"The sweep's trial {trial_name(values)}" if values else "Every trial of the sweep"
        try:  # every stage: a trial starts as a fresh run (a continued one's completed stages aside)
            refuse_what_the_environment_lacks(params_to_dict(params), project, list(mf.STAGES),
                                              outcome=f"{who} would refuse it before its first stage, so nothing was run")
        except RunError as error:
            raise SweepError(str(error)) from None
        # After the check, as `dpo-kit run` does: the mode a `wandb offline` settings file in the folder the sweep
        # started in names, for every trial's stages (their kernels run in notebooks/, where wandb reads other files).
        pin_wandb_mode(params.tracking.report_to)


def refuse_bad_combinations(path: str | Path, overrides: list[str], grid: dict[str, list[Any]]) -> None:
    """Load the params at every point of a grid; refuse the sweep, naming each point the params refuse and why.

    Each value alone was read already; a combination (dpo.max_steps=6 with dpo.logging_steps=30) was found only when
    its trial ran, as a failed trial, maybe hours into the sweep. A grid's points are all known before the first
    trial, so they are all read here (a few milliseconds each). Random and TPE searches draw their points as they go:
    there such a point is still its trial's failure, with the reason."""
    if len(grid) < 2:
        return
    refused = []
    for values in grid_points(grid):
        try:
            load_params(path, [*overrides, *trial_overrides(values)])
        except ParamsError as error:
            reason = str(error).removeprefix(f"{path}: ")
            refused.append(f"- {trial_name(values)}: {reason}")
    if refused:
        total = math.prod(len(values) for values in grid.values())
        raise SweepError(
            f"{len(refused)} of the grid's {total} points are refused by the params (each value is valid alone, not"
            " together with the others):\n" + "\n".join(refused) + "\nNothing was run. A grid runs every combination"
            " of its values: sweep the points that go together as separate sweeps (each with its own --name) and"
            " compare them with `dpo-kit report DIR1 DIR2`, or change a --set value so that every point is valid."
        )


def run_sweep(
    params_path: str | Path,
    grid: list[str] = (),
    ranges: list[str] = (),
    overrides: list[str] = (),
    name: str | None = None,
    sampler: str | None = None,
    samples: int | None = None,
    storage: str | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    direction: str = "maximize",
    project_dir: str | Path = ".",
    progress: bool = True,
) -> Path:
    """Run (or continue) a sweep; returns its directory. Finished trials are never run again."""
    import optuna
    from optuna.trial import TrialState
    from tqdm.auto import tqdm

    project = Path(project_dir).resolve()
    space = SearchSpace.parse(list(grid), list(ranges))
    sampler = sampler or ("grid" if not space.ranges and samples is None else "tpe")
    if sampler not in SAMPLERS:
        raise SweepError(f"--sampler {sampler}: valid samplers are {', '.join(SAMPLERS)}")
    if sampler == "grid" and space.ranges:
        raise SweepError("a grid sweep takes --grid only; search --range with --sampler random or tpe and --samples N")
    if sampler != "grid" and not samples:
        raise SweepError(f"--sampler {sampler} needs --samples N, the number of trials to run")
    if samples is not None and samples < 1:  # --samples -3 ran one trial: the budget was reached at the first
        raise SweepError(f"--samples {samples}: the number of trials to run must be at least 1")
    if sampler == "grid" and samples is not None:  # it was dropped without a word: the grid ran every point
        raise SweepError(f"--samples {samples} is for --sampler random or tpe; a grid sweep runs each of its"
                         f" {space.grid_size()} points once. Leave --samples out, or choose --sampler random or tpe")
    if direction not in ("maximize", "minimize"):
        raise SweepError(f"--direction {direction}: valid are maximize, minimize")
    check_objective(objective)
    if name is not None and not is_directory_name(name):
        # As run.name: `--name ..` put the sweep's database, records and trials in the project folder itself, and
        # `--name .` among the runs of run.output_dir.
        raise SweepError(f"--name {name!r}: the sweep's directory under run.output_dir must be a non-empty directory"
                         " name without '/' and not starting with '.'")
    fixed = {item.split("=", 1)[0].strip() for item in overrides}
    both = [key for key in [*space.grid, *space.ranges] if key in fixed]
    if both:  # each trial's own value would silently replace the --set one
        raise SweepError(f"{', '.join(both)} is given both with --set and as a swept key; give it once (--set fixes"
                         " a key for every trial, --grid and --range vary it)")
    base = load_params(params_path, list(overrides))
    spec = SweepSpec(params=str(Path(params_path).resolve()), overrides=list(overrides), space=asdict(space),
                     sampler=sampler, samples=samples if sampler != "grid" else None, objective=objective,
                     direction=direction, seed=base.run.seed)
    validate_points(spec, space, project)
    refuse_what_the_trials_lack(spec, space, project)
    spec.space = asdict(space)  # the ranges as the types of their keys
    sweep_name = name or f"{base.run.name}-sweep"
    sweep_dir = run_directory(project, base.run.output_dir, sweep_name)
    if (sweep_dir / "manifest.json").is_file():
        raise SweepError(f"{sweep_dir} holds a run (manifest.json), not a sweep: the sweep's trials there would be hidden"
                         " by it (dpo-kit report reads the directory as that one run). Give the sweep another --name.")
    created = not sweep_dir.exists()
    try:
        mf.ensure_writable_dir(sweep_dir)
    except mf.OutputNotWritable as error:
        raise SweepError(str(error)) from None
    check_spec(sweep_dir, spec, params_to_dict(base))
    url = storage_url(sweep_dir, storage)
    record = {"spec": asdict(spec), "name": sweep_name, "storage": redacted(url), "created": mf.now_iso(),
              "command": mf.recorded_command(["dpo-kit", *sys.argv[1:]]) if sys.argv else None,
              "base_params": params_to_dict(base)}
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the bar and the summary say what its INFO lines say
    try:
        study = optuna.create_study(study_name=sweep_name, storage=open_storage(url), sampler=make_sampler(spec),
                                    direction=direction, load_if_exists=True)
        check_study_spec(study, spec, params_to_dict(base), redacted(url))
    except BaseException:
        if created and not any(sweep_dir.iterdir()):  # refused, or its storage did not open: nothing is left behind
            sweep_dir.rmdir()
        raise
    if not (sweep_dir / SWEEP_FILE).is_file():
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
    retried = recover_interrupted_trials(study)
    if retried:
        print(f"dpo-kit sweep: trial(s) {', '.join(map(str, retried))} were interrupted; each runs again and"
              " continues its run directory (completed stages kept, training from its newest checkpoint)")
    total = space.grid_size() if sampler == "grid" else samples
    done = samples_spent(study)
    sweep = Sweep(spec=spec, sweep_dir=sweep_dir, project=project, progress=progress, study=study)
    # A failed trial uses up a sample too: otherwise params that fail every trial would sample forever.
    callbacks = [] if sampler == "grid" else [stop_at_budget(samples)]
    with tqdm(total=total, initial=min(done, total), desc=f"sweep {sweep_name}", unit="trial",
              disable=not progress, position=0) as bar:
        sweep.bar = bar

        def advance(study, trial):
            if trial.state in (TrialState.COMPLETE, TrialState.FAIL) and bar.n < total:
                bar.update(1)

        # GridSampler stops the study once every point has finished; stop_at_budget stops the others.
        # A retried trial waits in the queue even when every point has been tried once: it still runs.
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        finished = not waiting and (study.sampler.is_exhausted(study) if sampler == "grid" else done >= total)
        try:
            if not finished:
                study.optimize(sweep.objective, callbacks=[*callbacks, advance], catch=(SweepError,))
        finally:
            if sweep.kernel is not None:
                sweep.kernel.shutdown()
    return sweep_dir


def samples_spent(study) -> int:
    """The trials that used up one of --samples: completed, or failed with an error. An interrupted trial (or one whose
    worker died) does not: it is queued again and runs to its end as another trial, so counting it too ended the
    sweep a point short."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    # Every trial that was retried, by us or by Optuna's heartbeat: a retry's history lists its whole chain, while
    # its 'failed_trial' names only the first, so a retry that failed and was retried again counted as spent.
    retried = {number for trial in trials for number in trial.system_attrs.get("retry_history", [])}
    return sum(trial.state == TrialState.COMPLETE
               or (trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted")
                   and trial.number not in retried) for trial in trials)  # fmt: skip


def stop_at_budget(samples: int):
    """Optuna's MaxTrialsCallback, counting the trials that samples_spent counts."""

    def callback(study, trial) -> None:
        if samples_spent(study) >= samples:
            study.stop()

    return callback


def trial_rows(sweep_dir: Path, storage: str | None = None) -> list[dict[str, Any]]:
    """One row per trial of the sweep, newest attempt of each run directory last."""
    import optuna

    recorded = json.loads((sweep_dir / SWEEP_FILE).read_text())
    study = optuna.load_study(study_name=recorded["name"], storage=open_storage(storage_url(sweep_dir, storage)))
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append({
            "trial": trial.number, "state": trial.state.name, "run_dir": trial.user_attrs.get("run_dir"),
            **trial.params, "objective": trial.value,
            "format_reused_from": trial.user_attrs.get("format_reused_from"),
            "retry_of": trial.system_attrs.get("failed_trial"),
            "note": trial.user_attrs.get("error") or trial.user_attrs.get("interrupted")
            or trial.user_attrs.get("duplicate"),
        })
    return rows


def trial_note_path(sweep_dir: Path, run_dir: str, number: int) -> Path:
    """Where a failed trial's error is kept in full: <sweep>/trial_notes/<run dir>.trial-<number>.txt (the study keeps
    it too, on the trial). The sweep's table shows its first line with a pointer here; `dpo-kit report` reads them for
    the trials that failed before their run directory was made, which it would otherwise not know of."""
    return sweep_dir / TRIAL_NOTES / f"{run_dir}.trial-{number}.txt"


def _cell(row: dict[str, Any], column: str, sweep_dir: Path) -> str:
    """A table cell on one line: a note of several lines (an error quoting a file, a traceback) is its first line
    and where the rest is; any other text with a line break (a chat template swept) shows it as \\n."""
    value = row.get(column)
    if value is None:
        return ""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = text.splitlines() or [""]
    if len(lines) == 1:
        return lines[0]
    if column != "note":
        return "\\n".join(lines)
    path = trial_note_path(sweep_dir, str(row.get("run_dir")), row["trial"])
    where = f"full note: {path.relative_to(sweep_dir)}" if path.is_file() else "on the trial in the study"
    return f"{lines[0]} [{len(lines) - 1} more line{'s' if len(lines) > 2 else ''}, {where}]"


def summary(sweep_dir: Path, storage: str | None = None) -> tuple[str, bool]:
    """A plain table of the trials, one line per trial, and whether a point ended failed (with no later completed
    attempt)."""
    rows = trial_rows(sweep_dir, storage)
    objective = json.loads((sweep_dir / SWEEP_FILE).read_text())["spec"]["objective"]
    columns = [c for c in rows[0] if any(r.get(c) is not None for r in rows)] if rows else []
    cells = [[objective if c == "objective" else c for c in columns]]
    cells += [[_cell(r, c, sweep_dir) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    completed = {r["run_dir"] for r in rows if r["state"] == "COMPLETE"}
    failed = any(r["state"] == "FAIL" and r["run_dir"] not in completed for r in rows)
    return "\n".join(lines), failed

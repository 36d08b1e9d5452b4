"""`dpo-kit sweep`: Optuna walks the points, each trial is a normal run, nothing runs twice.

Unit tests first (seconds): parsing the search space, trial names, claims, the recorded spec, and the recovery of
trials whose worker died. Then sweeps of the tiny model (the notebook tier): a grid whose trials share one format
stage, a sweep killed with kill -9 and started again, and two workers on one study.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpo_kit import manifest as mf
from dpo_kit.run.sweep import (
    SearchSpace,
    SweepError,
    SweepSpec,
    check_spec,
    recover_interrupted_trials,
    refuse_what_the_trials_lack,
    release_claim,
    run_sweep,
    storage_lock,
    take_claim,
    trial_name,
    trial_overrides,
    trial_rows,
    validate_points,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------------------------------------
# Unit


def test_grid_values_parse_as_the_params_file_would_read_them():
    space = SearchSpace.parse(["dpo.beta=0.05,1e-1", "dpo.loss_type=sigmoid,ipo"], [])
    assert space.grid == {"dpo.beta": [0.05, 0.1], "dpo.loss_type": ["sigmoid", "ipo"]}
    assert space.grid_size() == 4
    space = SearchSpace.parse([], ["dpo.learning_rate=1e-5:1e-3:log", "lora.r=4:32"])
    assert space.ranges == {"dpo.learning_rate": [1e-5, 1e-3, "log"], "lora.r": [4, 32, "linear"]}
    # The override a trial gets reads back as the same number (PyYAML reads '1e-05' as a string).
    assert trial_overrides({"dpo.learning_rate": 1e-5}) == ["dpo.learning_rate=1.0e-05"]
    # A strategy of "no" is text, as with --set (YAML 1.1 read it as False, which no strategy field takes).
    space = SearchSpace.parse(["dpo.save_strategy=no,steps"], [])
    assert space.grid == {"dpo.save_strategy": ["no", "steps"]}
    assert trial_overrides({"dpo.save_strategy": "no"}) == ["dpo.save_strategy='no'"]
    # A value past 80 characters, or with a line break, reaches the trial whole: PyYAML folded it, and the trial got
    # its first line only (a prompt cut short, a chat template cut at its first line).
    from dpo_kit.params import read_yaml

    long_prompt = "Write a long review of a film that you saw last week, and say what you liked about it most of all"
    template = "{% for m in messages %}{{ m.content }}\n{% endfor %}"
    for value in (long_prompt, [long_prompt, "hi"], template):
        (override,) = trial_overrides({"generate.prompts": value})
        assert read_yaml(override.split("=", 1)[1]) == value
    # A revision with a leading zero is text, as the params read it (float() of every text made it 123.0).
    space = SearchSpace.parse(["model.revision=0123,main", "dpo.learning_rate=2e-5,1E3"], [])
    assert space.grid == {"model.revision": ["0123", "main"], "dpo.learning_rate": [2e-5, 1000.0]}
    assert trial_overrides({"model.revision": "0123"}) == ["model.revision='0123'"]


@pytest.mark.parametrize(
    ("grid", "ranges", "message"),
    [
        (["beta=0.1"], [], r"expected SECTION.KEY=\.\.\., e.g. --grid dpo.beta=0.05,0.1,0.5; 'beta' is a key of dpo: dpo.beta="),
        ([], ["learning_rate=1e-5:1e-3"], r"'learning_rate' is a key of dpo: dpo.learning_rate="),
        (["dpo.beta=0.1,0.1"], [], "appears twice"),
        (["run.name=a,b"], [], "cannot be swept"),
        (["run.output_dir=a,b"], [], "cannot be swept"),
        ([], ["dpo.learning_rate=1e-3:1e-5"], "LOW < HIGH"),
        ([], ["dpo.learning_rate=1e-5:1e-3:cubic"], "LOW:HIGH:log"),
        (["dpo.beta=0.1,0.2"], ["dpo.beta=0.1:0.2"], "both as --grid and as --range"),
        ([], [], "nothing to sweep"),
        (["dpo.loss_type=@a,ipo"], [], r"--grid dpo.loss_type=@a,ipo: the value '@a' is not valid YAML.*"
                                       r"--grid \"dpo.loss_type='@a',...\""),
        ([], ["dpo.beta=%:1"], r"--range dpo.beta=%:1: the value '%' is not valid YAML"),
        # Optuna refused these only at the first trial, after the sweep had recorded them (next test).
        ([], ["dpo.learning_rate=0:1e-3:log"], r"dpo.learning_rate=0:1e-3:log: a log range needs LOW above 0.*"
                                               r"dpo.learning_rate=1e-6:1e-3:log"),
        ([], ["dpo.beta=.nan:1"], "finite"),
        # The second --grid (or --range) of a key replaced the first without a word.
        (["dpo.beta=0.1,0.5", "dpo.beta=0.2,0.3"], [], r"dpo.beta is given twice with --grid; give all its values in one"),
        ([], ["dpo.beta=0.1:0.5", "dpo.beta=0.2:0.3"], r"dpo.beta is given twice with --range"),
        ([], ["dpo.beta=0.1:.inf"], "finite"),
    ],
)
def test_a_bad_search_space_is_refused_with_what_would_be_valid(grid, ranges, message):
    with pytest.raises(SweepError, match=message):
        SearchSpace.parse(grid, ranges)


def test_a_log_range_from_zero_is_refused_before_the_sweep_is_recorded(tmp_path, capsys):
    """It ended in Optuna's ValueError traceback at the first trial, leaving sweep.json and optuna.db behind, so the
    corrected command was refused as another sweep of the same name."""
    from dpo_kit.run.cli import main

    command = ["sweep", str(TINY), "--range", "dpo.learning_rate=0:1e-3:log", "--samples", "2", "--quiet",
               "--set", f"run.output_dir={tmp_path}"]  # fmt: skip
    assert main(command) == 1
    assert "a log range needs LOW above 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing is written for a refused sweep"


def test_bad_keys_and_values_are_refused_before_any_trial_runs(tmp_path):
    common = {"overrides": [f"run.output_dir={tmp_path}"], "project_dir": REPO, "progress": False}
    with pytest.raises(SweepError, match="did you mean 'dpo.beta'"):
        run_sweep(TINY, grid=["dpo.betta=0.1,0.2"], **common)
    with pytest.raises(SweepError, match="dpo.beta.*expected float.*dpo.beta=x"):
        run_sweep(TINY, grid=["dpo.beta=0.1,x"], **common)
    with pytest.raises(SweepError, match="needs --samples"):
        run_sweep(TINY, ranges=["dpo.beta=0.1:0.5"], **common)
    with pytest.raises(SweepError, match="--samples -3: the number of trials to run must be at least 1"):
        run_sweep(TINY, ranges=["dpo.beta=0.1:0.5"], samples=-3, **common)  # it ran one trial
    with pytest.raises(SweepError, match="--samples 1 is for --sampler random or tpe; a grid sweep runs each of its 3"):
        run_sweep(TINY, grid=["dpo.beta=0.1,0.2,0.5"], sampler="grid", samples=1, **common)  # it ran all 3
    # A key fixed with --set and swept too: each trial's value replaced the --set one without a word.
    with pytest.raises(SweepError, match=r"dpo.beta is given both with --set and as a swept key"):
        run_sweep(TINY, grid=["dpo.beta=0.1,0.2"], **{**common, "overrides": [*common["overrides"], "dpo.beta=0.3"]})
    # Two values whose run directories would be one ('/' is written as '_'): the second trial resumed the first's run.
    with pytest.raises(SweepError, match=r"--grid model.revision: the values org/main and org_main would share the run"
                                         r" directory 'revision=org_main'"):
        run_sweep(TINY, grid=["model.revision=org/main,org_main"], **common)
    # A run directory's name past what a file name can hold ended the first trial in an OSError traceback.
    long_prompt = "Write a long review of a film that you saw last week, " * 5
    with pytest.raises(SweepError, match=r"a trial's run directory would be named 'prompts=\[.*\.\.\.', 2\d\d bytes, above"):
        run_sweep(TINY, grid=[f"generate.prompts=['{long_prompt}'],[hi]"], **common)
    for name in ("..", ".", "a/b", ""):  # `--name ..` wrote the sweep into the project folder itself
        with pytest.raises(SweepError, match=f"--name '{name}': the sweep's directory under run.output_dir must be"):
            run_sweep(TINY, grid=["dpo.beta=0.1,0.2"], **{**common, "name": name})
    # Two values the params read as one (beta is a float; a loss is a list of one): one point trained twice.
    with pytest.raises(SweepError, match=r"--grid dpo.beta: the values 1 and 1.0 are one value of dpo.beta \(1.0\)"):
        run_sweep(TINY, grid=["dpo.beta=0.5,1,1.0"], **common)
    with pytest.raises(SweepError, match=r"--grid dpo.loss_type: the values sigmoid and \[sigmoid\] are one value"):
        run_sweep(TINY, grid=["dpo.loss_type=sigmoid,[sigmoid]"], **common)
    assert not any(tmp_path.iterdir()), "nothing is written for a refused sweep"


def test_a_range_is_searched_in_the_type_of_its_key(tmp_path, fake_trials):
    """`--range dpo.beta=1:5` read its bounds as integers and Optuna searched beta in 1, 2, 3, 4, 5 only."""
    common = {"sampler": "random", "samples": 3, "overrides": [f"run.output_dir={tmp_path}"], "project_dir": REPO,
              "progress": False}  # fmt: skip
    run_sweep(TINY, ranges=["dpo.beta=1:5"], name="float-key", **common)
    betas = [row["dpo.beta"] for row in trial_rows(tmp_path / "float-key")]
    assert len(betas) == 3 and all(1 <= b <= 5 for b in betas)
    assert any(b != int(b) for b in betas), f"beta searched in integers: {betas}"
    spec = json.loads((tmp_path / "float-key" / "sweep.json").read_text())["spec"]
    assert spec["space"]["ranges"] == {"dpo.beta": [1.0, 5.0, "linear"]}
    run_sweep(TINY, ranges=["dpo.max_steps=10.0:20.0"], name="int-key", **common)  # an integer key: integers
    assert all(isinstance(row["dpo.max_steps"], int) for row in trial_rows(tmp_path / "int-key"))


def test_an_objective_the_evaluate_stage_never_writes_is_refused_before_any_trial(tmp_path, capsys):
    from dpo_kit.run.cli import main

    args = ["sweep", str(TINY), "--set", f"run.output_dir={tmp_path}", "--grid", "dpo.beta=0.1,0.2", "--objective",
            "rewards/acuracies", "--name", "objtypo", "--quiet"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--objective 'rewards/acuracies' is not a number the evaluate stage writes to metrics.json; did you mean"\
           " 'rewards/accuracies'" in err, err
    assert "Valid objectives: rewards/accuracies, " in err and "win_rate, " in err and "kl, " in err
    assert not any(tmp_path.iterdir()), "no trial ran and nothing was recorded, so the corrected command starts afresh"
    with pytest.raises(SweepError, match=r"'no/such/metric' is not a number.*metrics.json\. Valid objectives: "):
        run_sweep(TINY, grid=["dpo.beta=0.1"], overrides=[f"run.output_dir={tmp_path}"], objective="no/such/metric",
                  project_dir=REPO, progress=False)


def test_the_recorded_command_keeps_no_storage_password_and_a_refused_secret_is_not_quoted(tmp_path, monkeypatch,
                                                                                            capsys):
    """sweep.json records the --storage URL without its password, and so must the command line beside it (and the
    manifest of every trial, which records the same command line)."""
    from dpo_kit.run.cli import main

    password = "hunter2-storage-password"
    storage = f"postgresql://alice:{password}@127.0.0.1:1/optuna"  # no server: opening it fails
    args = ["sweep", str(TINY), "--set", f"run.output_dir={tmp_path}", "--grid", "dpo.beta=0.1", "--name", "pw",
            "--storage", storage, "--quiet"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["dpo-kit", *args])
    monkeypatch.chdir(REPO)
    assert main(args) == 1
    assert password not in capsys.readouterr().err
    for written in tmp_path.rglob("*"):  # sweep.json is written once the storage opens: not here
        assert not written.is_file() or password.encode() not in written.read_bytes(), written
    # What sweep.json and every trial's manifest record as the command line (both through recorded_command).
    assert "--storage postgresql://alice:***@127.0.0.1:1/optuna" in mf.recorded_command(["dpo-kit", *args])
    assert password not in mf.new_manifest("trial", 0, tmp_path, {})["command"]
    # A grid value that the params refuse as a secret is named by its key, not quoted in the refusal.
    monkeypatch.setenv("HF_TOKEN", "hf_FAKESECRET123456789")
    with pytest.raises(SweepError, match=r"model.revision holds a secret") as refused:
        run_sweep(TINY, grid=["model.revision=main,hf_FAKESECRET123456789"], overrides=[f"run.output_dir={tmp_path}"],
                  project_dir=REPO, progress=False)
    assert "hf_FAKESECRET123456789" not in str(refused.value)


def test_trial_names_are_readable_and_distinct():
    assert trial_name({"dpo.beta": 0.1, "dpo.loss_type": "ipo"}) == "beta=0.1,loss_type=ipo"
    # Two keys ending alike keep their sections, so the names stay distinct.
    assert trial_name({"lora.dropout": 0.1, "dpo.dropout": 0.0}) == "lora.dropout=0.1,dpo.dropout=0.0"
    assert trial_name({"dpo.learning_rate": 1e-5}) == "learning_rate=1.0e-05"


def test_a_claim_held_by_a_live_process_is_refused_and_a_dead_ones_is_taken_over(tmp_path):
    assert take_claim(tmp_path, "beta=0.1", 0)
    assert not take_claim(tmp_path, "beta=0.1", 1), "this (live) process holds it"
    release_claim(tmp_path, "beta=0.1")
    assert take_claim(tmp_path, "beta=0.1", 2)

    claim = tmp_path / ".claims" / "beta=0.5.json"
    claim.write_text(json.dumps({"trial": 0, **mf.this_process(), "pid": dead_pid()}))
    assert take_claim(tmp_path, "beta=0.5", 3)
    assert json.loads(claim.read_text())["trial"] == 3
    # A claim from another host is alive while the study says its trial runs.
    claim.write_text(json.dumps({"trial": 0, "pid": 1, "host": "elsewhere"}))
    assert not take_claim(tmp_path, "beta=0.5", 4, holder_running=lambda holder: True)
    assert take_claim(tmp_path, "beta=0.5", 5, holder_running=lambda holder: False)


def test_opening_a_sqlite_storage_is_one_worker_at_a_time_and_leaves_no_lock_file(tmp_path):
    import fcntl
    import glob
    import tempfile

    def try_lock(folder: Path) -> bool:
        descriptor = os.open(folder, os.O_RDONLY)  # another open of the folder, as another worker's would be
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(descriptor)

    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "dpo-kit-optuna-*.lock")))
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    with storage_lock(f"sqlite:///{sweep_dir / 'optuna.db'}"):
        assert not try_lock(sweep_dir), "a second worker would open the fresh database at the same time"
    assert try_lock(sweep_dir), "the lock is released"
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "dpo-kit-optuna-*.lock"))) == before
    assert sorted(sweep_dir.iterdir()) == [], "nothing is written beside the database either"
    with storage_lock(f"sqlite:///{tmp_path / 'missing' / 'optuna.db'}"), storage_lock("sqlite://"):
        pass  # a folder that is not there (RDBStorage says so) or an in-memory database: nothing to guard


def test_a_sweep_started_again_with_other_settings_is_refused(tmp_path):
    spec = SweepSpec(params="p.yaml", overrides=[], space={"grid": {"dpo.beta": [0.1]}, "ranges": {}},
                     sampler="grid", samples=None, objective="rewards/accuracies", direction="maximize", seed=0)
    check_spec(tmp_path, spec)  # a new sweep
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": spec.__dict__}))
    check_spec(tmp_path, spec)  # the same sweep again
    other = SweepSpec(**{**spec.__dict__, "space": {"grid": {"dpo.beta": [0.1, 0.5]}, "ranges": {}}})
    with pytest.raises(SweepError, match="space differ.*new --name"):
        check_spec(tmp_path, other)
    # The params file edited since: named, key by key.
    (tmp_path / "sweep.json").write_text(json.dumps({"spec": spec.__dict__, "base_params": {"dpo": {"beta": 0.1}}}))
    check_spec(tmp_path, spec, {"dpo": {"beta": 0.1}})
    with pytest.raises(SweepError, match=r"the params file's dpo.beta: 0.1 -> 0.2"):
        check_spec(tmp_path, spec, {"dpo": {"beta": 0.2}})


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() here
def test_a_trial_whose_worker_died_is_failed_and_queued_again_once(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from dpo_kit.run.sweep import open_storage

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), study_name="s",
                                sampler=optuna.samplers.GridSampler({"dpo.beta": [0.1, 0.5]}))
    done = study.ask()
    done.suggest_categorical("dpo.beta", [0.1, 0.5])
    study.tell(done, 1.0)
    orphan = study.ask()
    beta = orphan.suggest_categorical("dpo.beta", [0.1, 0.5])
    orphan.set_user_attr("worker", {**mf.this_process(), "pid": dead_pid()})
    alive = study.ask()
    alive.suggest_categorical("dpo.beta", [0.1, 0.5])
    alive.set_user_attr("worker", mf.this_process())

    assert recover_interrupted_trials(study) == [orphan.number]
    trials = study.get_trials()
    assert trials[orphan.number].state == TrialState.FAIL
    assert trials[alive.number].state == TrialState.RUNNING, "a trial whose worker lives is left alone"
    (waiting,) = [t for t in trials if t.state == TrialState.WAITING]
    assert waiting.params == {"dpo.beta": beta} and waiting.system_attrs["failed_trial"] == orphan.number
    assert recover_interrupted_trials(study) == [], "queued once, not at every start"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() here
def test_a_retry_that_was_itself_retried_does_not_use_up_a_sample(tmp_path):
    """Optuna's heartbeat fails a trial whose worker on another host went silent and queues a retry; a retry failed
    so is retried again. Every retry's 'failed_trial' names the first trial of the chain, so the middle one (failed,
    then retried) was counted as a spent sample, and the sweep ended a point short."""
    import copy

    import optuna
    from optuna.trial import TrialState

    from dpo_kit.run.sweep import open_storage, retry_callback, samples_spent

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'o.db'}"), study_name="s",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    first = study.ask()
    first.suggest_float("dpo.beta", 0.05, 0.5)
    for _ in range(2):  # the heartbeat fails the running trial (no note of ours) and queues its retry
        running = study.get_trials(deepcopy=False)[-1]
        study._storage.set_trial_state_values(running._trial_id, state=TrialState.FAIL)
        retry_callback()(study, copy.deepcopy(study.get_trials()[running.number]))
        study.ask()  # the retry starts
    study.tell(study.get_trials(deepcopy=False)[-1].number, 1.0)
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert samples_spent(study) == 1


@pytest.fixture
def fake_trials(monkeypatch):
    """A sweep whose trials run no notebook: the pipeline writes metrics.json (accuracy = beta), and each call of
    `interrupt_at` (share_format_stage or run_pipeline) in `interrupts` raises KeyboardInterrupt once, as Ctrl-C."""
    import dpo_kit.run.runner as runner
    import dpo_kit.run.sweep as sweep_module

    interrupts: list[str] = []
    calls: list[str] = []

    class NoKernel:
        def __init__(self, *args, **kwargs):
            pass

        def shutdown(self):
            pass

    def fake_pipeline(params, overrides, **kwargs):
        calls.append("run_pipeline")
        if "run_pipeline" in interrupts:
            interrupts.remove("run_pipeline")
            raise KeyboardInterrupt
        values = dict(o.split("=", 1) for o in overrides)
        run_dir = Path(values["run.output_dir"]) / values["run.name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"rewards/accuracies": float(values.get("dpo.beta", 0.1))}))
        return run_dir

    real_share = sweep_module.share_format_stage

    def share(*args, **kwargs):
        if "share_format_stage" in interrupts:
            interrupts.remove("share_format_stage")
            raise KeyboardInterrupt  # Ctrl-C while the trial waits for a sibling's format stage
        return real_share(*args, **kwargs)

    real_claim = sweep_module.take_claim

    def claim(*args, **kwargs):
        if "take_claim" in interrupts:
            interrupts.remove("take_claim")
            raise KeyboardInterrupt  # Ctrl-C while the trial claims its point
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(runner, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(runner, "SharedKernel", NoKernel)
    monkeypatch.setattr(sweep_module, "share_format_stage", share)
    monkeypatch.setattr(sweep_module, "take_claim", claim)
    return interrupts, calls


@pytest.mark.filterwarnings("ignore:Trial 0 failed")
@pytest.mark.parametrize("where", ["take_claim", "share_format_stage"])
def test_a_trial_interrupted_before_its_run_starts_is_run_again_when_the_sweep_is(tmp_path, fake_trials, where):
    """Ctrl-C while a trial claimed its point or waited for a sibling's format stage failed the trial without the note
    that queues it again: the grid counted its point as tried, and the sweep never ran it."""
    from dpo_kit.run.sweep import summary

    interrupts, _ = fake_trials
    interrupts.append(where)
    common = {"grid": ["dpo.beta=0.1,0.5"], "overrides": [f"run.output_dir={tmp_path}"], "project_dir": REPO,
              "progress": False}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TINY, **common)
    (first,) = trial_rows(tmp_path / "tiny-sweep")
    assert first["state"] == "FAIL" and first["note"] == "KeyboardInterrupt"
    run_sweep(TINY, **common)
    rows = trial_rows(tmp_path / "tiny-sweep")
    completed = sorted(r["run_dir"] for r in rows if r["state"] == "COMPLETE")
    assert completed == ["beta=0.1", "beta=0.5"], rows
    assert [r["retry_of"] for r in rows if r["run_dir"] == first["run_dir"] and r["state"] == "COMPLETE"] == [0]
    assert summary(tmp_path / "tiny-sweep")[1] is False, "no point is left failed"


def test_a_shared_storage_refuses_another_sweep_of_the_same_name(tmp_path, fake_trials):
    """--storage is shared, and Optuna finds a study by name: a second project's `tiny-sweep` (another grid, in
    another output directory) added its trials to the first's study, whose table and sampler then mixed both."""
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    common = {"storage": storage, "project_dir": REPO, "progress": False}
    run_sweep(TINY, grid=["dpo.beta=0.1,0.5"], overrides=[f"run.output_dir={tmp_path / 'a'}"], **common)
    with pytest.raises(SweepError, match=r"study 'tiny-sweep' in sqlite:///.*shared.db belongs to another sweep of"
                                         r" that name \(overrides, space, the params file's run.output_dir.*new --name"):
        run_sweep(TINY, grid=["dpo.beta=0.2"], overrides=[f"run.output_dir={tmp_path / 'b'}"], **common)
    with pytest.raises(SweepError, match=r"the params file's dpo.learning_rate: 0.005 -> 0.1"):
        run_sweep(TINY, grid=["dpo.beta=0.1,0.5"], overrides=[f"run.output_dir={tmp_path / 'c'}",
                                                             "dpo.learning_rate=0.1"], **common)  # fmt: skip
    assert not (tmp_path / "b" / "tiny-sweep").exists(), "a refused sweep records nothing, not even its folder"
    assert len(trial_rows(tmp_path / "a" / "tiny-sweep", storage)) == 2
    # The same sweep again (a second worker, here once the first is done) joins the study: every point is done.
    _, calls = fake_trials
    run_sweep(TINY, grid=["dpo.beta=0.1,0.5"], overrides=[f"run.output_dir={tmp_path / 'a'}"], **common)
    assert len(calls) == 2 and len(trial_rows(tmp_path / "a" / "tiny-sweep", storage)) == 2


def test_a_sweep_and_a_run_never_share_a_directory(tmp_path):
    """A run named as a sweep wrote its manifest.json into the sweep's directory, after which `dpo-kit report` read
    the directory as that one run and hid every trial (and --overwrite would archive them with it); a sweep named as
    a run put its trials inside the run."""
    from dpo_kit.run.runner import RunError, run_pipeline
    from dpo_kit.run.stage import StageError, open_stage

    sweep_dir = tmp_path / "tiny-sweep"  # as `dpo-kit sweep params/tiny.yaml` leaves it, trials aside
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "tiny-sweep", "spec": {}}))
    with pytest.raises(StageError, match=rf"{sweep_dir} is the directory of a sweep.*Choose another run.name"):
        open_stage("format", str(TINY), [f"run.output_dir={tmp_path}", "run.name=tiny-sweep"], str(REPO))  # notebook 01
    with pytest.raises(RunError, match="already holds files but no dpo-kit run"):  # dpo-kit run refused it already
        run_pipeline(TINY, [f"run.output_dir={tmp_path}", "run.name=tiny-sweep"], project_dir=REPO, progress=False,
                     isolate_stages=True)  # fmt: skip
    assert not (sweep_dir / "manifest.json").exists()

    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"status": "completed", "stages": {}}))
    with pytest.raises(SweepError, match=rf"{run_dir} holds a run \(manifest.json\), not a sweep.*another --name"):
        run_sweep(TINY, grid=["dpo.beta=0.1"], overrides=[f"run.output_dir={tmp_path}"], name="a-run",
                  project_dir=REPO, progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["manifest.json"]


@pytest.mark.filterwarnings("ignore:Trial 0 failed")
def test_an_interrupted_trial_does_not_use_up_one_of_the_samples(tmp_path, fake_trials):
    """--samples 2, the first trial interrupted: the sweep started again runs its retry and one more point, two
    completed trials in all (the interrupted one was counted against the budget, and the sweep ended with one)."""
    interrupts, calls = fake_trials
    interrupts.append("run_pipeline")
    common = {"ranges": ["dpo.beta=0.05:0.5:log"], "sampler": "random", "samples": 2,
              "overrides": [f"run.output_dir={tmp_path}"], "project_dir": REPO, "progress": False}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TINY, **common)
    run_sweep(TINY, **common)
    states = [r["state"] for r in trial_rows(tmp_path / "tiny-sweep")]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"], states
    run_sweep(TINY, **common)
    assert len(calls) == 3, "the finished sweep started again runs nothing"


def test_a_grid_whose_points_the_params_refuse_together_is_refused_before_any_trial_naming_each(tmp_path, fake_trials,
                                                                                                 capsys):
    """Each swept value is valid alone (validate_points reads them one at a time), but dpo.logging_steps=30 with
    dpo.max_steps=6 (or 10) is refused by the params. A grid's points are all known before it starts, yet such a
    point was found only when its trial ran, as a failed trial, maybe hours into the sweep."""
    from dpo_kit.run.cli import main

    _, calls = fake_trials
    with pytest.raises(SweepError) as refused:
        run_sweep(TINY, grid=["dpo.max_steps=6,10,40", "dpo.logging_steps=5,30"],
                  overrides=[f"run.output_dir={tmp_path}"], project_dir=REPO, progress=False)
    message = str(refused.value)
    assert message.startswith("2 of the grid's 6 points are refused by the params"), message
    assert "- max_steps=6,logging_steps=30: dpo.logging_steps 30 > dpo.max_steps 6" in message, message
    assert "- max_steps=10,logging_steps=30: dpo.logging_steps 30 > dpo.max_steps 10" in message, message
    assert "logging_steps=5" not in message and "Nothing was run" in message, message
    assert calls == [] and not any(tmp_path.iterdir()), "nothing is run or written"
    command = ["sweep", str(TINY), "--grid", "dpo.max_steps=6,40", "--grid", "dpo.logging_steps=30", "--quiet",
               "--set", f"run.output_dir={tmp_path}"]  # fmt: skip
    assert main(command) == 1
    assert "max_steps=6,logging_steps=30: dpo.logging_steps 30 > dpo.max_steps 6" in capsys.readouterr().err
    assert calls == [] and not any(tmp_path.iterdir())


def test_a_grid_whose_every_point_is_valid_runs_though_a_value_is_refused_beside_the_files_others(tmp_path, fake_trials):
    """tiny.yaml logs every 5 steps: dpo.max_steps=2 beside that is refused, but no trial has it, every point of this
    grid logs every step or two. validate_points read each swept value with the file's other values and refused the
    sweep for a point no trial would run; a grid's points are each read whole (refuse_bad_combinations)."""
    _, calls = fake_trials
    sweep_dir = run_sweep(TINY, grid=["dpo.max_steps=2,4", "dpo.logging_steps=1,2"],
                          overrides=[f"run.output_dir={tmp_path}"], project_dir=REPO, progress=False)
    rows = trial_rows(sweep_dir)
    assert calls.count("run_pipeline") == 4 and {r["state"] for r in rows} == {"COMPLETE"}, rows
    assert {(r["dpo.max_steps"], r["dpo.logging_steps"]) for r in rows} == {(2, 1), (2, 2), (4, 1), (4, 2)}, rows
    with pytest.raises(SweepError, match=r"dpo.logging_steps 5 > dpo.max_steps 2"):  # alone, it is still refused
        run_sweep(TINY, grid=["dpo.max_steps=2,4"], overrides=[f"run.output_dir={tmp_path / 'alone'}"],
                  project_dir=REPO, progress=False)


@pytest.mark.filterwarnings("ignore:Trial")
def test_a_drawn_point_whose_values_the_params_refuse_together_fails_with_its_reason_and_the_others_run(
        tmp_path, fake_trials):
    """A random or TPE search draws its points as it goes: a point the params refuse (dpo.logging_steps=30 with
    dpo.max_steps below 30) is that trial's failure, with its reason in the table, and the other trials run. The
    refusal ended the sweep with a traceback (the points after it did not run) and left its trial FAIL with no reason."""
    from dpo_kit.run.sweep import summary

    sweep_dir = run_sweep(TINY, grid=["dpo.logging_steps=5,30"], ranges=["dpo.max_steps=6:40"], sampler="random",
                          samples=8, overrides=[f"run.output_dir={tmp_path}"], project_dir=REPO, progress=False)
    rows = trial_rows(sweep_dir)
    assert len(rows) == 8, rows
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert failed and all(r["dpo.logging_steps"] == 30 and r["dpo.max_steps"] < 30 for r in failed), rows
    assert all("dpo.logging_steps 30 > dpo.max_steps" in r["note"] for r in failed), failed
    assert {r["state"] for r in rows if r not in failed} == {"COMPLETE"}, rows
    table, any_failed = summary(sweep_dir)
    assert any_failed and "dpo.logging_steps 30 > dpo.max_steps" in table


MULTI_LINE_ERROR = ("the train stage failed: CUDA out of memory (see notebooks/02_train.ipynb)\nTraceback (most recent"
                    " call last):\n  File \"train.py\", line 1\ntorch.OutOfMemoryError: CUDA out of memory")


def fail_before_the_run_directory(monkeypatch, beta: str = "0.5"):
    """run_pipeline that refuses the point dpo.beta=`beta` with MULTI_LINE_ERROR before it makes a run directory."""
    import dpo_kit.run.runner as runner

    real = runner.run_pipeline

    def pipeline(params, overrides, **kwargs):
        if f"dpo.beta={beta}" in overrides:
            raise runner.RunError(MULTI_LINE_ERROR)
        return real(params, overrides, **kwargs)

    monkeypatch.setattr(runner, "run_pipeline", pipeline)


@pytest.mark.filterwarnings("ignore:Trial")
def test_a_failed_trials_note_of_several_lines_keeps_the_table_one_line_per_trial(tmp_path, fake_trials, monkeypatch):
    """A note of several lines (an error quoting a traceback) was written into the table as it was: its other lines
    came out under the row, in the first column, and the table no longer read one row per trial."""
    from dpo_kit.run.sweep import summary

    fail_before_the_run_directory(monkeypatch)
    sweep_dir = run_sweep(TINY, grid=["dpo.beta=0.1,0.5,0.9"], overrides=[f"run.output_dir={tmp_path}"],
                          project_dir=REPO, progress=False)
    table, failed = summary(sweep_dir)
    lines = table.splitlines()
    assert failed and len(lines) == 4, table  # the header and one line per trial
    (row,) = [line for line in lines if "FAIL" in line]
    (trial,) = [r["trial"] for r in trial_rows(sweep_dir) if r["state"] == "FAIL"]
    note = f"trial_notes/beta=0.5.trial-{trial}.txt"
    assert row.endswith(f"the train stage failed: CUDA out of memory (see notebooks/02_train.ipynb) [3 more lines, full"
                        f" note: {note}]"), row
    assert (sweep_dir / note).read_text() == MULTI_LINE_ERROR + "\n", "the note is kept in full"
    assert [r["note"] for r in trial_rows(sweep_dir) if r["state"] == "FAIL"] == [MULTI_LINE_ERROR], "and on the trial"


@pytest.mark.filterwarnings("ignore:Trial")
def test_a_failed_trials_note_keeps_no_secret_that_its_error_quoted(tmp_path, fake_trials, monkeypatch):
    """A failed trial's error is kept in full in <sweep>/trial_notes/ and on the trial in the study, outside the run
    directories that the runner's secret scan reads: an error quoting a library's message with a token in it (a URL
    with credentials, a header) put the secret there. It is kept with the secret's value replaced."""
    import dpo_kit.run.runner as runner

    token = "hf_" + "Zq3" * 11
    monkeypatch.setenv("HF_TOKEN", token)
    quoted = f"the merge stage failed: 401 Client Error for url https://user:{token}@huggingface.co/api (Bearer {token})"

    def pipeline(params, overrides, **kwargs):
        raise runner.RunError(quoted)

    monkeypatch.setattr(runner, "run_pipeline", pipeline)
    sweep_dir = run_sweep(TINY, grid=["dpo.beta=0.1"], overrides=[f"run.output_dir={tmp_path}"], project_dir=REPO,
                          progress=False)  # fmt: skip
    (note,) = (sweep_dir / "trial_notes").iterdir()
    assert "401 Client Error" in note.read_text() and token not in note.read_text()
    assert [token in r["note"] for r in trial_rows(sweep_dir)] == [False]
    assert not [path for path in sweep_dir.rglob("*") if path.is_file() and token.encode() in path.read_bytes()]


@pytest.mark.filterwarnings("ignore:Trial")
def test_the_report_over_a_sweep_lists_a_trial_that_failed_before_its_run_was_made(tmp_path, fake_trials, monkeypatch):
    """A trial refused before its run started has no run directory: the sweep's table listed it as FAIL with its
    reason, and `dpo-kit report` over the sweep compared the other trials and said nothing of it."""
    import yaml

    import dpo_kit.run.runner as runner
    from dpo_kit.evaluation.report import ReportError, incomplete_table, load_runs

    fake = runner.run_pipeline

    def pipeline(params, overrides, **kwargs):  # a run as the report reads it: manifest, params and metrics
        run_dir = fake(params, overrides, **kwargs)
        values = dict(o.split("=", 1) for o in overrides)
        (run_dir / "manifest.json").write_text(json.dumps({"status": "completed", "stages": {}}))
        (run_dir / "params.yaml").write_text(yaml.safe_dump({"run": {"name": run_dir.name},
                                                             "dpo": {"beta": float(values["dpo.beta"])}}))
        return run_dir

    monkeypatch.setattr(runner, "run_pipeline", pipeline)
    fail_before_the_run_directory(monkeypatch)
    sweep_dir = run_sweep(TINY, grid=["dpo.beta=0.1,0.5,0.9"], overrides=[f"run.output_dir={tmp_path}"],
                          project_dir=REPO, progress=False)
    assert not (sweep_dir / "beta=0.5").exists()
    comparison = load_runs([sweep_dir])
    assert [run.name for run in comparison.runs] == ["beta=0.1", "beta=0.9"]
    (failed,) = comparison.incomplete
    (number,) = [r["trial"] for r in trial_rows(sweep_dir) if r["state"] == "FAIL"]
    assert failed.name == "beta=0.5", failed
    assert failed.incomplete.startswith(f"trial {number} of the sweep failed before its run was made (no run"
                                        f" directory): {MULTI_LINE_ERROR}"), failed.incomplete
    assert str(sweep_dir / "trial_notes" / f"beta=0.5.trial-{number}.txt") in failed.incomplete
    assert "1 incomplete, left out" in comparison.summary()
    assert "CUDA out of memory" in incomplete_table(comparison).to_html()
    # Every trial failed so: the report names them, not "no runs in it".
    fail_before_the_run_directory(monkeypatch, beta="0.2")
    sweep_dir = run_sweep(TINY, grid=["dpo.beta=0.2"], overrides=[f"run.output_dir={tmp_path}"], name="all-failed",
                          project_dir=REPO, progress=False)
    with pytest.raises(ReportError, match=r"no complete run to compare.*beta=0.2: trial 0 of the sweep failed before"):
        load_runs([sweep_dir])


@pytest.mark.filterwarnings("ignore:Trial 0 failed")
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_restarted_random_search_draws_new_points_not_the_first_ones_again(tmp_path, fake_trials, sampler):
    """Optuna's samplers draw from one generator per process, seeded with run.seed: the sweep started again after
    an interruption drew its first trial's point once more, found that run directory complete, and counted it as one
    of --samples, so two samples tried one point."""
    interrupts, _ = fake_trials
    interrupts.append("run_pipeline")
    common = {"ranges": ["dpo.beta=0.05:0.5"], "sampler": sampler, "samples": 2,
              "overrides": [f"run.output_dir={tmp_path}"], "project_dir": REPO, "progress": False}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TINY, **common)
    run_sweep(TINY, **common)
    completed = [r["run_dir"] for r in trial_rows(tmp_path / "tiny-sweep") if r["state"] == "COMPLETE"]
    assert len(completed) == 2 and len(set(completed)) == 2, completed


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # ask() here
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_two_workers_of_a_random_search_draw_different_points(tmp_path, sampler):
    """A second worker started with the same command (the same seed) drew the very points of the first, one trial
    behind it: each of its trials was refused as running elsewhere or found complete and counted again."""
    import optuna

    from dpo_kit.run.sweep import make_sampler, open_storage

    spec = SweepSpec(params=str(TINY), overrides=[], space={"grid": {}, "ranges": {"dpo.beta": [0.05, 0.5, "linear"]}},
                     sampler=sampler, samples=4, objective="rewards/accuracies", direction="maximize", seed=0)
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    workers = [optuna.create_study(study_name="s", storage=storage, sampler=make_sampler(spec), load_if_exists=True)
               for _ in range(2)]  # fmt: skip
    drawn = [worker.ask().suggest_float("dpo.beta", 0.05, 0.5) for worker in workers]
    assert drawn[0] != drawn[1], drawn
    # The same trial number draws the same point, whichever process draws it: the sweep stays seeded by run.seed.
    again = optuna.create_study(study_name="t", storage=storage, sampler=make_sampler(spec))
    assert again.ask().suggest_float("dpo.beta", 0.05, 0.5) == drawn[0]


@pytest.mark.filterwarnings("ignore:Trial")
def test_a_retried_trial_that_fails_with_an_error_is_not_retried_again_and_a_completed_one_keeps_no_old_note(
        tmp_path, fake_trials, monkeypatch):
    """Optuna's retry copies the interrupted trial's user attributes, its 'interrupted' note too. A retry that then
    failed with an error still read as interrupted: every start of the sweep queued it once more (a trial that failed
    with an error is not run again), --samples did not count it, and a retry that completed showed the interruption's
    note, which says to resume it."""
    import dpo_kit.run.runner as runner
    from dpo_kit.run.sweep import summary

    interrupts, calls = fake_trials
    interrupts.append("run_pipeline")
    common = {"grid": ["dpo.beta=0.1,0.5"], "overrides": [f"run.output_dir={tmp_path}"], "project_dir": REPO,
              "progress": False}  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TINY, **common)
    (interrupted,) = trial_rows(tmp_path / "tiny-sweep")
    completing = runner.run_pipeline

    def failing_once_more(params, overrides, **kwargs):
        if f"run.name={interrupted['run_dir']}" in overrides:
            calls.append("failed")
            raise runner.RunError("stage 'train' failed: a checkpoint could not be read")
        return completing(params, overrides, **kwargs)

    monkeypatch.setattr(runner, "run_pipeline", failing_once_more)
    run_sweep(TINY, **common)
    assert calls.count("failed") == 1
    run_sweep(TINY, **common)
    assert calls.count("failed") == 1, "a trial that failed with an error is not run again"
    rows = trial_rows(tmp_path / "tiny-sweep")
    assert [r["state"] for r in rows if r["run_dir"] == interrupted["run_dir"]] == ["FAIL", "FAIL"], rows
    (retry,) = [r for r in rows if r["retry_of"] == interrupted["trial"]]
    assert "checkpoint could not be read" in retry["note"], retry
    assert summary(tmp_path / "tiny-sweep")[1] is True

    # A retry that completes shows no note: the interruption's says to resume a run that is complete.
    interrupts.append("run_pipeline")
    monkeypatch.setattr(runner, "run_pipeline", completing)
    other = {**common, "name": "second"}
    with pytest.raises(KeyboardInterrupt):
        run_sweep(TINY, **other)
    run_sweep(TINY, **other)
    done = [r for r in trial_rows(tmp_path / "second") if r["state"] == "COMPLETE"]
    assert len(done) == 2 and [r["note"] for r in done] == [None, None], done


@pytest.mark.filterwarnings("ignore:Trial")
def test_an_objective_that_is_not_finite_fails_its_trial_with_the_reason(tmp_path, fake_trials, monkeypatch):
    """A NaN objective (a judge whose scores overflowed) was handed to Optuna, which failed the trial with no note of
    ours: the sweep's table showed FAIL and nothing else."""
    import dpo_kit.run.runner as runner
    from dpo_kit.run.sweep import summary

    def nan_metrics(params, overrides, **kwargs):
        values = dict(o.split("=", 1) for o in overrides)
        run_dir = Path(values["run.output_dir"]) / values["run.name"]
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.json").write_text(json.dumps({"rewards/accuracies": 0.5, "judge/policy_score": math.nan}))
        return run_dir

    monkeypatch.setattr(runner, "run_pipeline", nan_metrics)
    sweep_dir = run_sweep(TINY, grid=["dpo.beta=0.1"], objective="judge/policy_score",
                          overrides=[f"run.output_dir={tmp_path}"], project_dir=REPO, progress=False)
    (row,) = trial_rows(sweep_dir)
    assert row["state"] == "FAIL" and "'judge/policy_score' is nan" in row["note"], row
    assert summary(sweep_dir)[1] is True


# ---------------------------------------------------------------------------------------------
# Sweeps of the tiny model


def sweep_args(runs: Path, model: Path, *extra: str, steps: int = 6) -> list[str]:
    settings = [f"run.output_dir={runs}", f"model.name_or_path={model}", f"dpo.max_steps={steps}",
                "dpo.save_steps=4", "dpo.logging_steps=1", "generate.num_prompts=4"]  # fmt: skip
    return ["sweep", str(TINY), *[a for s in settings for a in ("--set", s)], "--quiet", *extra]


def stage_runs(run_dir: Path) -> dict[str, int]:
    """How many times each stage notebook was executed in `run_dir` (earlier attempts are kept, renamed)."""
    notebooks = list((run_dir / "notebooks").glob("*.ipynb"))
    return {stage: sum(n.name.startswith(prefix) for n in notebooks)
            for stage, prefix in [("format", "01_"), ("train", "02_"), ("evaluate", "05_")]}  # fmt: skip


@pytest.mark.notebook
def test_a_grid_sweep_runs_each_point_once_and_shares_the_format_stage(tmp_path, tiny_model_dir, capsys):
    from dpo_kit.run.cli import main

    args = sweep_args(tmp_path, tiny_model_dir, "--grid", "dpo.beta=0.1,0.5", "--grid", "dpo.loss_type=sigmoid,ipo")
    assert main(args) == 0
    sweep_dir = tmp_path / "tiny-sweep"
    names = {f"beta={b},loss_type={t}" for b in (0.1, 0.5) for t in ("sigmoid", "ipo")}
    assert {p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".")} == names
    formats = {}
    for name in names:
        manifest = mf.read_manifest(sweep_dir / name)
        assert manifest["status"] == "completed"
        assert json.loads((sweep_dir / name / "metrics.json").read_text())["rewards/accuracies"] is not None
        formats[name] = manifest["stages"]["format"]
        params = (sweep_dir / name / "params.yaml").read_text()
        assert f"beta: {name.split(',')[0].split('=')[1]}" in params
    formatted = [n for n, entry in formats.items() if "reused_from" not in entry]
    assert len(formatted) == 1, "the data is formatted once"
    fingerprint = mf.read_manifest(sweep_dir / formatted[0])["data"]["fingerprint"]
    for name, entry in formats.items():
        if name != formatted[0]:
            assert entry["reused_from"] == str(sweep_dir / formatted[0]) and entry["data_fingerprint"] == fingerprint
            assert (sweep_dir / name / "data" / "train.jsonl").read_bytes() == (
                sweep_dir / formatted[0] / "data" / "train.jsonl").read_bytes()
    rows = trial_rows(sweep_dir)
    assert sorted(r["run_dir"] for r in rows) == sorted(names) and {r["state"] for r in rows} == {"COMPLETE"}
    out = capsys.readouterr().out
    assert "rewards/accuracies" in out and "beta=0.5,loss_type=ipo" in out

    # The same command again finds every point done: no trial runs, nothing is rewritten.
    before = {n: mf.read_manifest(sweep_dir / n) for n in names}
    assert main(args) == 0
    assert {n: mf.read_manifest(sweep_dir / n) for n in names} == before
    assert len(trial_rows(sweep_dir)) == 4


@pytest.mark.notebook
def test_a_sweep_reporting_to_trackio_gives_each_trial_its_own_store(tmp_path, tiny_model_dir):
    """trackio reads its folder once per process (dpo_kit.tracking), so a trial in the kernel of the one before
    would be refused; the sweep starts a fresh kernel after each trial that reported to trackio."""
    import sqlite3

    from dpo_kit.run.cli import main

    args = sweep_args(tmp_path, tiny_model_dir, "--grid", "dpo.beta=0.1,0.5", steps=4)
    args[2:2] = ["--set", "tracking.report_to=[trackio]", "--set", "tracking.project=sweep-tests"]
    assert main(args) == 0
    sweep_dir = tmp_path / "tiny-sweep"
    stores = {}
    for name in ("beta=0.1", "beta=0.5"):
        assert mf.read_manifest(sweep_dir / name)["status"] == "completed", name
        entry = mf.read_manifest(sweep_dir / name)["tracking"]["trackio"]
        store = sweep_dir / name / "tracking" / "trackio" / "sweep-tests.db"
        assert entry["dir"] == str(store.parent)
        with sqlite3.connect(store) as db:
            rows = db.execute("select run_name, metrics from metrics").fetchall()
        assert {run for run, _ in rows} == {entry["run"]}, f"{name}: one run per store"
        keys = set().union(*(json.loads(metrics) for _, metrics in rows))
        assert "train/rewards/accuracies" in keys and "eval/win_rate" in keys, (name, sorted(keys))
        stores[name] = store
    assert stores["beta=0.1"] != stores["beta=0.5"]


@pytest.mark.notebook
def test_a_killed_sweep_started_again_keeps_finished_trials_and_resumes_the_interrupted_one(tmp_path, tiny_model_dir):
    args = sweep_args(tmp_path, tiny_model_dir, "--grid", "dpo.beta=0.1,0.5", steps=40)
    sweep_dir = tmp_path / "tiny-sweep"
    process = subprocess.Popen([sys.executable, "-m", "dpo_kit.run.cli", *args], cwd=REPO, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, finished, training = time.monotonic() + 600, None, None
    while time.monotonic() < deadline and not (finished and training):
        assert process.poll() is None, f"the sweep ended before it was killed:\n{process.stdout.read()}"
        finished = training = None  # as of this look: one point done while the other trains
        for run_dir in [p for p in sweep_dir.glob("beta=*") if (p / "manifest.json").is_file()]:
            try:
                manifest = mf.read_manifest(run_dir)
            except json.JSONDecodeError:
                continue
            if manifest.get("status") == "completed":
                finished = run_dir
            elif manifest.get("stages", {}).get("train", {}).get("checkpoints"):
                training = run_dir
        time.sleep(0.05)
    assert finished and training, "no point finished while the other trained"
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and the kernel that trains: nothing records anything
    process.wait(timeout=60)
    finished_before = mf.read_manifest(finished)

    from dpo_kit.run.cli import main

    assert main(args) == 0
    assert mf.read_manifest(finished) == finished_before, "a finished trial is never run again"
    resumed = mf.read_manifest(training)
    assert resumed["status"] == "completed"
    assert resumed["stages"]["train"]["resumed_from"].startswith("checkpoint-")
    assert resumed["stages"]["train"]["attempts"][0]["status"] == "interrupted"
    assert stage_runs(training)["format"] == 1, "the interrupted trial kept its completed stages"
    rows = {(r["run_dir"], r["state"]) for r in trial_rows(tmp_path / "tiny-sweep")}
    assert (training.name, "FAIL") in rows and (training.name, "COMPLETE") in rows
    assert (finished.name, "COMPLETE") in rows and len(rows) == 3


@pytest.mark.notebook
def test_two_workers_on_one_study_split_the_points_and_run_none_twice(tmp_path, tiny_model_dir):
    args = sweep_args(tmp_path, tiny_model_dir, "--grid", "dpo.beta=0.05,0.1,0.2,0.5")
    workers = [subprocess.Popen([sys.executable, "-m", "dpo_kit.run.cli", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=900)[0] for w in workers]
    sweep_dir = tmp_path / "tiny-sweep"
    # The trials first, then each worker's last lines: a long assertion message is cut in the middle.
    assert [w.returncode for w in workers] == [0, 0], (trial_rows(sweep_dir), [o[-2000:] for o in outputs])
    names = {f"beta={b}" for b in ("0.05", "0.1", "0.2", "0.5")}
    for name in names:
        run_dir = sweep_dir / name
        assert mf.read_manifest(run_dir)["status"] == "completed"
        assert stage_runs(run_dir) == {"format": 1, "train": 1, "evaluate": 1}, f"{name} ran a stage twice"
        assert not (run_dir / "previous").exists()
    assert sum("reused_from" not in mf.read_manifest(sweep_dir / n)["stages"]["format"] for n in names) == 1
    rows = trial_rows(sweep_dir)
    completed = [r for r in rows if r["state"] == "COMPLETE"]
    assert {r["run_dir"] for r in completed} == names
    assert all(r["state"] in ("COMPLETE", "PRUNED") for r in rows), rows
    workers_seen = {json.loads((sweep_dir / n / "manifest.json").read_text())["stages"]["train"]["pid"] for n in names}
    assert len(workers_seen) >= 2, "both workers trained"


@pytest.mark.notebook
def test_a_random_search_stops_at_its_budget_even_when_every_trial_fails(tmp_path, tiny_model_dir, capsys):
    from dpo_kit.run.cli import main

    args = sweep_args(tmp_path, tiny_model_dir, "--range", "dpo.beta=0.05:0.5:log", "--sampler", "random",
                      "--samples", "2")
    # A judge that cannot score: every trial fails at its generate stage. The tiny chat model is a model directory,
    # so the params pass (a missing one would be refused before any trial), but it is no one-label reward model.
    judge = tiny_model_dir
    args[2:2] = ["--set", f"evaluate.judge={judge}"]
    assert main(args) == 1
    rows = trial_rows(tmp_path / "tiny-sweep")
    assert [r["state"] for r in rows] == ["FAIL", "FAIL"], "a failed trial counts against --samples"
    assert all(0.05 <= r["dpo.beta"] <= 0.5 for r in rows)
    assert "stage 'generate' failed" in rows[0]["note"] and str(judge) in rows[0]["note"], rows[0]["note"]
    assert "FAIL" in capsys.readouterr().out



def test_a_grid_of_lists_is_split_at_its_top_level_commas_and_runs_each_list_as_one_point(tmp_path, fake_trials):
    """--grid dpo.loss_type=[sigmoid,sft],ipo was cut at every comma ('[sigmoid' is not valid YAML), and no quoting
    could pass a list; Optuna, which stores only scalars, gets the list as its YAML text and warns of nothing."""
    import warnings

    space = SearchSpace.parse(["dpo.loss_type=[sigmoid,sft],ipo", "lora.target_modules='q,k',{a: [1, 2]},x"], [])
    assert space.grid == {"dpo.loss_type": [["sigmoid", "sft"], "ipo"], "lora.target_modules": ["q,k", {"a": [1, 2]}, "x"]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", module="optuna")
        run_sweep(TINY, grid=["dpo.loss_type=[sigmoid,sft],ipo"], overrides=[f"run.output_dir={tmp_path}"],
                  project_dir=REPO, progress=False, name="losses")  # fmt: skip
    rows = trial_rows(tmp_path / "losses")
    assert sorted((row["run_dir"], row["state"]) for row in rows) == [("loss_type=[sigmoid, sft]", "COMPLETE"),
                                                                      ("loss_type=ipo", "COMPLETE")]  # fmt: skip


def test_a_sweep_over_a_key_its_params_switch_off_is_refused_before_anything_is_written(tmp_path):
    """Every trial of `--grid lora.r=8,16` on a full fine-tuning recipe would train the same model; a sweep that
    switches the section itself (lora.enabled swept, lora.r fixed) is a choice and runs."""
    full = REPO / "params" / "phi-2-truthy-dpo-full.yaml"
    with pytest.raises(SweepError, match=r"override 'lora.r=8' would change nothing: lora.enabled is false .*"
                                         r"\(from the sweep's lora.r=8\)"):
        run_sweep(full, grid=["lora.r=8,16"], project_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())
    space = SearchSpace.parse(["lora.enabled=true,false"], [])
    validate_points(SweepSpec(params=str(TINY), overrides=["lora.r=4"], space={}, sampler="grid", samples=None,
                              objective="x", direction="maximize", seed=0), space, REPO)  # fmt: skip


def test_a_sweep_that_would_push_every_trial_to_one_hub_repo_is_refused_before_anything_is_written(tmp_path):
    """merge.push_to_hub in a sweep: each trial's merge stage pushed to the one merge.hub_model_id, and the repo
    held whichever trial merged last, not the one the sweep found best."""
    pushing = ["merge.push_to_hub=true", "merge.hub_model_id=someone/tiny-dpo"]
    with pytest.raises(SweepError, match=r"merge.push_to_hub: every trial of the sweep would push .* someone/tiny-dpo"):
        run_sweep(TINY, grid=["dpo.beta=0.1,0.2"], overrides=pushing, project_dir=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_a_sweep_logging_to_wandb_online_without_a_key_is_refused_before_its_first_trial(tmp_path, monkeypatch):
    """Each trial's `dpo-kit run` refused wandb online without WANDB_API_KEY before its first stage, so the sweep
    started trial after trial (a kernel each) only to record each as failed. It is refused before any trial."""
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SweepError, match=r"WANDB_API_KEY is not set in the environment .*set WANDB_MODE=offline.*"
                                         r"The sweep's trial beta=0.1 would refuse it before its first stage, so"
                                         r" nothing was run"):
        run_sweep(TINY, grid=["dpo.beta=0.1,0.2"], overrides=["tracking.report_to=[wandb]"], project_dir=tmp_path,
                  progress=False)  # fmt: skip
    assert not list(tmp_path.iterdir())


def params_file(tmp_path: Path, **sections: dict) -> Path:
    """tiny.yaml with some of its sections' keys changed, in a file of its own."""
    import yaml

    params = yaml.safe_load(TINY.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_a_sweep_pushing_each_trial_to_its_own_repo_without_hf_token_is_refused_before_its_first_trial(
        tmp_path, monkeypatch):
    """merge.push_to_hub with merge.hub_model_id swept: each trial's `dpo-kit run` refused it before its first stage
    for want of HF_TOKEN (or with the hub offline), and the sweep ran trial after trial, a kernel each, only to record
    each as failed. The sweep makes the runner's own checks before its first trial."""
    import dpo_kit.run.runner as runner

    def no_trial(*args, **kwargs):
        raise AssertionError("a trial started")

    monkeypatch.setattr(runner, "SharedKernel", no_trial)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    path = params_file(tmp_path, merge={"push_to_hub": True, "hub_model_id": "someone/tiny-dpo"})
    project = tmp_path / "project"
    project.mkdir()
    sweep = dict(grid=["merge.hub_model_id=someone/tiny-a,someone/tiny-b"], project_dir=project, progress=False)
    with pytest.raises(SweepError, match=r"merge.push_to_hub is true but HF_TOKEN is not set.*The sweep's trial"
                                         r" hub_model_id=someone_tiny-a would refuse it before its first stage, so"
                                         r" nothing was run: the merge stage pushes after training"):
        run_sweep(path, **sweep)
    monkeypatch.setenv("HF_TOKEN", "hf_FAKESECRET123456789")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SweepError, match=r"merge.push_to_hub is true, and HF_HUB_OFFLINE is set, so the push to"
                                         r" someone/tiny-a would fail"):
        run_sweep(path, **sweep)
    assert not list(project.iterdir())


def test_the_sweeps_environment_checks_read_each_point_of_the_grid(tmp_path, monkeypatch):
    """A trial has each swept key's grid value, never the params file's: a grid of trackers over a file naming wandb
    needs no WANDB_API_KEY, and a grid that puts wandb in one point does. A `wandb offline` settings file in the
    folder the sweep started in is pinned for the trials after the check, as `dpo-kit run` does."""
    monkeypatch.setenv("WANDB_MODE", "online")  # recorded, so that what the sweep pins is taken away afterwards
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # no global settings file
    monkeypatch.chdir(tmp_path)

    def check(path, grid):
        spec = SweepSpec(params=str(path), overrides=[], space={}, sampler="grid", samples=None, objective="x",
                         direction="maximize", seed=0)  # fmt: skip
        refuse_what_the_trials_lack(spec, SearchSpace.parse(grid, []), tmp_path)

    check(params_file(tmp_path, tracking={"report_to": ["wandb"]}), ["tracking.report_to=none,tensorboard"])
    tiny_grid = ["dpo.beta=0.1,0.2", "tracking.report_to=none,wandb"]
    with pytest.raises(SweepError, match=r"WANDB_API_KEY is not set.*The sweep's trial beta=0.1,report_to=wandb"
                                         r" would refuse it before its first stage, so nothing was run"):
        check(TINY, tiny_grid)
    assert "WANDB_MODE" not in os.environ
    (tmp_path / "wandb").mkdir()
    (tmp_path / "wandb" / "settings").write_text("[default]\nmode = offline\n")
    check(TINY, tiny_grid)
    assert os.environ["WANDB_MODE"] == "offline"

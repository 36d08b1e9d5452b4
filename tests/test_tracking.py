"""Experiment trackers, offline: one tiny run reports to wandb (offline mode), trackio (its local store) and
TensorBoard (event files) at once, and each tracker's own files are read back for TRL's metric names, the
evaluate stage's summary, and the absence of every secret in the environment."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import struct
from pathlib import Path

import pytest

from dpo_kit.params import load_params
from dpo_kit.run.runner import find_secrets, run_pipeline
from dpo_kit.tracking import (
    TRACKER_ENV,
    configure_trackers,
    log_summary,
    summary_metrics,
    tracker_environment,
    wandb_run_id,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"
# Canaries, one per secret the kit knows; long enough for the runner's scan (8+ characters).
CANARIES = {"HF_TOKEN": "hf_canaryTrackerToken0123456789", "WANDB_API_KEY": "canary0wandb1key2never3in4a5file6789abcd"}
# TRL's metric names as the Trainer's callbacks send them (prefixed train/), and the evaluate stage's summary.
TRAIN_METRICS = {"train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen"}
SUMMARY = {"eval/win_rate", "eval/kl", "eval/rewards/accuracies"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    runs = tmp_path_factory.mktemp("runs")
    overrides = [f"run.output_dir={runs}", f"model.name_or_path={tiny_model_dir}", "run.name=tracked",
                 "tracking.report_to=[wandb,trackio,tensorboard]", "tracking.project=dpo-kit-tests"]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        for name, value in CANARIES.items():
            patch.setenv(name, value)
        patch.setenv("WANDB_MODE", "offline")
        run_dir = run_pipeline(TINY, overrides, project_dir=REPO, progress=False)
    return run_dir


def wandb_records(path: Path):
    """The protobuf records of a .wandb file. wandb 0.31 has no Python reader (its Go core writes the file): the
    container is LevelDB's log format, 32 KiB blocks of chunks with a 7-byte header (crc, length, type), after
    a 7-byte file header (':W&B', magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        position += 7
        pending += data[position : position + length]
        position += length
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE/LAST chain
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_keys(tracking_dir: Path) -> tuple[set[str], set[str]]:
    history, summary = set(), set()
    for path in tracking_dir.glob("wandb/offline-run-*/run-*.wandb"):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
            elif kind == "summary":
                summary |= {item.key or "/".join(item.nested_key) for item in record.summary.update}
    return history, summary


@pytest.mark.notebook
def test_wandb_offline_files_hold_trl_metric_names_and_the_summary_in_one_run(tracked_run):
    history, summary = wandb_keys(tracked_run / "tracking")
    assert TRAIN_METRICS <= history, f"missing from wandb's history: {TRAIN_METRICS - history}"
    assert SUMMARY <= summary, f"missing from wandb's summary: {SUMMARY - summary}"
    # The evaluate stage resumed the train stage's wandb run (its id is the kit's run id), not a new one.
    manifest = json.loads((tracked_run / "manifest.json").read_text())
    ids = [path.name.rsplit("-", 1)[-1] for path in (tracked_run / "tracking" / "wandb").glob("offline-run-*")]
    entry = manifest["tracking"]["wandb"]
    assert len(ids) == 2 and set(ids) == {entry["run_id"]} == {wandb_run_id(tracked_run)}
    assert entry["mode"] == "offline" and entry["name"] == "tracked"
    assert entry["summary"]["run_id"] == entry["run_id"] and set(entry["summary"]["metrics"]) >= SUMMARY


@pytest.mark.notebook
def test_the_tracked_runs_notebooks_show_no_warning(tracked_run):
    """With wandb offline, TRL's model card at each checkpoint used to make wandb warn that an offline run has no
    URL; the kit's trainer writes the card without asking (tracking.offline_wandb_run_hidden)."""
    import nbformat

    from tests.notebook_warnings import warning_lines

    notebooks = sorted((tracked_run / "notebooks").glob("*.ipynb"))
    assert len(notebooks) == 5
    flagged = {path.name: lines for path in notebooks
               for lines in [[line for cell in nbformat.read(path, as_version=4).cells
                              for line in warning_lines(cell.get("outputs", []))]] if lines}  # fmt: skip
    assert not flagged, flagged
    assert (tracked_run / "checkpoints" / "README.md").is_file(), "TRL still writes its model card"


def test_an_offline_wandb_run_is_hidden_from_the_model_card_only(monkeypatch):
    import wandb

    from dpo_kit.tracking import offline_wandb_run_hidden

    class Run:
        def __init__(self, offline):
            self.offline = offline

    for offline, seen in ((True, None), (False, "run")):
        run = Run(offline)
        monkeypatch.setattr(wandb, "run", run)
        with offline_wandb_run_hidden():
            assert wandb.run is (None if seen is None else run)
        assert wandb.run is run
    monkeypatch.setattr(wandb, "run", None)
    with offline_wandb_run_hidden():
        assert wandb.run is None


@pytest.mark.notebook
def test_trackio_store_holds_trl_metric_names_and_the_summary(tracked_run):
    store = tracked_run / "tracking" / "trackio" / "dpo-kit-tests.db"
    with sqlite3.connect(store) as db:
        rows = db.execute("select run_name, metrics from metrics").fetchall()
    assert {name for name, _ in rows} == {"tracked"}
    logged = [json.loads(metrics) for _, metrics in rows]
    keys = set().union(*logged)
    assert TRAIN_METRICS <= keys and SUMMARY <= keys
    summary_row = next(row for row in logged if "eval/win_rate" in row)
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert summary_row["eval/win_rate"] == pytest.approx(metrics["win_rate"])
    assert summary_row["train/global_step"] == max(row.get("train/global_step", 0) for row in logged)
    entry = json.loads((tracked_run / "manifest.json").read_text())["tracking"]["trackio"]
    assert entry["project"] == "dpo-kit-tests" and entry["run"] == "tracked" and entry["dir"] == str(store.parent)
    # The run's config, as the train stage stored it (the DPOConfig, and the kit's resolved params), outlives the
    # evaluate stage's summary.
    with sqlite3.connect(store) as db:
        (config,) = db.execute("select config from configs where run_name = 'tracked'").fetchone()
    config = json.loads(config)
    assert config["beta"] == 0.1 and config["dpo_kit"]["run"]["name"] == "tracked"


@pytest.mark.notebook
def test_tensorboard_event_files_hold_trl_metric_names_and_the_summary(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set[str]] = {}
    values: dict[str, float] = {}
    for events in (tracked_run / "tracking" / "tensorboard").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags.setdefault(events.parent.name, set()).update(accumulator.Tags()["scalars"])
        values.update({tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]})
    # The training curves in the tracker's folder; the evaluate stage's summary in a folder of its own, which goes
    # with that stage when it runs again.
    assert TRAIN_METRICS <= tags["tensorboard"] and SUMMARY <= tags["evaluate"]
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert values["eval/kl"] == pytest.approx(metrics["kl"], rel=1e-6)
    manifest = json.loads((tracked_run / "manifest.json").read_text())
    assert manifest["tracking"]["tensorboard"]["log_dir"] == str(tracked_run / "tracking" / "tensorboard")


@pytest.mark.notebook
def test_no_secret_reaches_any_tracker_file_and_the_runner_scan_reads_them(tracked_run):
    files = [path for path in (tracked_run / "tracking").rglob("*") if path.is_file()]
    assert len(files) >= 5, files  # all three trackers wrote
    for path in files:
        data = path.read_bytes()
        for name, canary in CANARIES.items():
            assert canary.encode() not in data, f"{name} leaked into {path}"
    # The runner's scan covers those files: a canary planted in wandb's folder is found there.
    planted = next(tracked_run.glob("tracking/wandb/offline-run-*/logs")) / "planted.log"
    planted.write_text(f"key={CANARIES['WANDB_API_KEY']}\n")
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("WANDB_API_KEY", CANARIES["WANDB_API_KEY"])
            assert find_secrets(tracked_run) == [str(planted)]
    finally:
        planted.unlink()


def test_without_trackers_nothing_is_configured_and_the_summary_keeps_only_numbers(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    assert configure_trackers(load_params(TINY), tmp_path) == {}
    assert not (tmp_path / "tracking").exists() and "TENSORBOARD_LOGGING_DIR" not in os.environ
    summary = summary_metrics({"win_rate": 0.75, "kl": 1.5, "judge": "rule", "rewards/accuracies": 1, "beta": 0.1})
    assert summary == {"eval/win_rate": 0.75, "eval/kl": 1.5, "eval/rewards/accuracies": 1.0}


def test_report_to_names_the_trackers_it_accepts():
    with pytest.raises(ValueError, match="tracking.report_to") as error:
        load_params(TINY, ["tracking.report_to=[mlflow]"])
    assert all(name in str(error.value) for name in ("wandb", "trackio", "tensorboard"))
    # 'none' beside a tracker read as either; a tracker twice, as two runs of one tracker.
    with pytest.raises(ValueError, match="'none' means no tracker, so it stands alone"):
        load_params(TINY, ["tracking.report_to=[none,wandb]"])
    with pytest.raises(ValueError, match="names a tracker twice"):
        load_params(TINY, ["tracking.report_to=[tensorboard,tensorboard]"])
    assert load_params(TINY, ["tracking.report_to=none"]).tracking.report_to == ["none"]


@pytest.mark.parametrize("project", ["my-team/dpo", "dpo:v2", "", "x" * 129])
def test_a_project_name_wandb_refuses_is_refused_when_the_params_are_read(project):
    # wandb.init() refused it (UsageError "Invalid project name") in the train stage, after the format stage had run.
    with pytest.raises(ValueError, match=r"tracking.project .*wandb takes a project name of 1 to 128 characters") as error:
        load_params(TINY, ["tracking.report_to=[wandb]", f"tracking.project='{project}'"])
    assert ("WANDB_ENTITY" in str(error.value)) == ("/" in project)
    # Without wandb it is not refused: trackio takes "my-team/dpo" (its store is my-teamdpo.db).
    assert load_params(TINY, ["tracking.report_to=[trackio,tensorboard]", f"tracking.project='{project}'"])


@pytest.mark.notebook
def test_tracker_files_belong_to_the_train_stage_so_a_rerun_moves_them_aside(tracked_run):
    from dpo_kit.run.stage import RUN_FILES, STAGE_OUTPUTS

    owned = {path for paths in STAGE_OUTPUTS.values() for path in paths} | set(RUN_FILES)
    assert {path.name for path in tracked_run.iterdir()} <= owned
    assert "tracking" in STAGE_OUTPUTS["train"]


def test_the_wandb_run_id_follows_the_run_and_the_train_stages_params(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "abc", "stages": {"train": {"params_id": "p1"}}}))
    first = wandb_run_id(tmp_path)
    assert first == wandb_run_id(tmp_path) and re.fullmatch(r"[0-9a-f]{32}", first)
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "abc", "stages": {"train": {"params_id": "p2"}}}))
    assert wandb_run_id(tmp_path) != first  # the train stage run again with other params: another wandb run
    # A run made before run ids were kept is named by name and creation time, which is no valid wandb id.
    (tmp_path / "manifest.json").write_text(json.dumps({"run": "old", "created": "2026-01-01T00:00:00+00:00"}))
    assert re.fullmatch(r"[0-9a-f]{32}", wandb_run_id(tmp_path))


def test_the_trackers_environment_holds_for_the_training_only(tmp_path, monkeypatch):
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "the-users-own")
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "abc"}))
    params = load_params(TINY, ["tracking.report_to=[wandb,tensorboard]"])
    with tracker_environment(params, tmp_path) as record:
        assert os.environ["WANDB_RUN_ID"] == record["wandb"]["run_id"]
        assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tracking" / "tensorboard")
    assert os.environ["WANDB_PROJECT"] == "the-users-own"
    assert not {"WANDB_RUN_ID", "WANDB_RESUME", "WANDB_DIR", "TENSORBOARD_LOGGING_DIR"} & set(os.environ)


def test_after_training_the_users_own_wandb_init_is_a_run_of_its_own(tmp_path):
    """wandb keeps the WANDB_* variables it saw at its first init in the process; restoring the environment is not
    enough, so the kit tears wandb's session down after training (in a subprocess: wandb's state is per process)."""
    import subprocess
    import sys

    code = (
        "import json, os, pathlib, wandb\n"
        "from dpo_kit.params import load_params\n"
        "from dpo_kit.tracking import tracker_environment\n"
        "run_dir = pathlib.Path(os.environ['RUN_DIR'])\n"
        "params = load_params(os.environ['TINY'], ['tracking.report_to=[wandb]'])\n"
        "with tracker_environment(params, run_dir) as record:\n"
        "    kit = wandb.init()  # as the Trainer's callback starts it\n"
        "    kit_id, kit_dir = kit.id, kit.dir\n"
        "    kit.finish()\n"
        "own = wandb.init(project='the-users-own', dir=os.environ['OWN_DIR'])\n"
        "print(json.dumps({'kit': kit_id, 'expected': record['wandb']['run_id'], 'kit_dir': kit_dir,\n"
        "                  'own': own.id, 'own_dir': own.dir, 'project': own.project}))\n"
        "own.finish()\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": "abc"}))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_MODE": "offline",
           "RUN_DIR": str(run_dir), "TINY": str(TINY), "OWN_DIR": str(tmp_path / "own")}  # fmt: skip
    (tmp_path / "own").mkdir()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["kit"] == seen["expected"] and seen["kit_dir"].startswith(str(run_dir / "tracking"))
    assert seen["own"] != seen["kit"] and seen["own_dir"].startswith(str(tmp_path / "own"))
    assert seen["project"] == "the-users-own"
    assert "Changes to your `wandb` environment variables" not in done.stderr + done.stdout


def test_trackio_already_pointed_at_another_store_in_this_process_is_refused_by_name(tmp_path):
    import subprocess
    import sys

    code = (
        "import os, pathlib; os.environ['TRACKIO_DIR'] = os.environ['FIRST']\n"
        "import trackio.utils\n"
        "from dpo_kit.tracking import TrackerError, _point_trackio_at\n"
        "_point_trackio_at(pathlib.Path(os.environ['FIRST']))  # the same store: fine\n"
        "try:\n    _point_trackio_at(pathlib.Path(os.environ['SECOND']))\n"
        "except TrackerError as error:\n    print(error)\n"
    )
    env = {**os.environ, "FIRST": str(tmp_path / "first"), "SECOND": str(tmp_path / "second")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(tmp_path / "first") in done.stdout and str(tmp_path / "second") in done.stdout, done.stdout
    assert "Restart the kernel" in done.stdout


def test_an_evaluation_run_again_moves_its_tensorboard_summary_aside_with_its_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dpo_kit.run.stage import move_stages_aside

    params = load_params(TINY, ["tracking.report_to=[tensorboard]"])
    (tmp_path / "manifest.json").write_text(json.dumps({"run": "tb", "stages": {"evaluate": {"status": "completed"}}}))

    def summaries(folder):
        found = []
        for events in sorted(folder.rglob("events.out.tfevents.*")):
            accumulator = EventAccumulator(str(events))
            accumulator.Reload()
            found += [event.value for event in accumulator.Scalars("eval/win_rate")]
        return found

    log_summary(params, tmp_path, {"win_rate": 0.25})
    (tmp_path / "metrics.json").write_text("{}")
    moved = move_stages_aside(tmp_path, ["evaluate"], "other params")
    log_summary(params, tmp_path, {"win_rate": 0.75})
    assert summaries(tmp_path / "tracking") == [0.75]  # the new evaluation's value alone, not two at one step
    assert summaries(moved) == [0.25] and (moved / "metrics.json").is_file()


def test_the_evaluate_stages_trackio_summary_keeps_the_training_runs_config(tmp_path):
    """trackio stores a run's config at the first log after each init (INSERT OR REPLACE by run id): the evaluate
    stage's init, resuming the training's run without a config, replaced the hyperparameters the Trainer's callback
    had stored with trackio's three bookkeeping keys."""
    import subprocess
    import sys

    code = (
        "import json, os, pathlib\n"
        "os.environ['TRACKIO_DIR'] = str(pathlib.Path(os.environ['RUN_DIR']) / 'tracking' / 'trackio')\n"
        "import trackio\n"
        "from dpo_kit.params import load_params\n"
        "from dpo_kit.tracking import log_summary\n"
        "params = load_params(os.environ['TINY'], ['tracking.report_to=[trackio]', 'run.name=cfg'])\n"
        "# As transformers' TrackioCallback starts the training's run: init, then the config (model config keys\n"
        "# such as _name_or_path included), then the curves.\n"
        "trackio.init(project=params.tracking.project, name='cfg', resume='allow')\n"
        "trackio.config.update({'beta': 0.1, 'learning_rate': 0.005, '_name_or_path': 'tiny'})\n"
        "trackio.log({'train/loss': 0.5, 'train/global_step': 5})\n"
        "trackio.finish()\n"
        "log_summary(params, pathlib.Path(os.environ['RUN_DIR']), {'win_rate': 0.75})\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "RUN_DIR": str(run_dir), "TINY": str(TINY)}
    env.pop("TRACKIO_DIR", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(run_dir / "tracking" / "trackio" / "dpo-kit.db") as db:
        configs = [json.loads(row[0]) for row in db.execute("select config from configs where run_name = 'cfg'")]
        logged = [json.loads(row[0]) for row in db.execute("select metrics from metrics where run_name = 'cfg'")]
    assert [row.get("eval/win_rate") for row in logged] == [None, 0.75]  # the summary went to the same run
    assert len(configs) == 1, configs
    assert {"beta": 0.1, "learning_rate": 0.005, "_name_or_path": "tiny"}.items() <= configs[0].items(), configs[0]


def test_wandbs_own_logs_stay_inside_the_run(tmp_path):
    """wandb's service writes a debug log of its own per process (core-debug-*.log, symon-debug-*.log) into its
    cache folder, ~/.cache/wandb/logs by default: outside the run, and outside the runner's secret scan. The train
    and evaluate stages give it the run's tracking folder, unless WANDB_CACHE_DIR is set (then it is the user's)."""
    import subprocess
    import sys

    code = (
        "import os, pathlib, wandb\n"
        "from dpo_kit.params import load_params\n"
        "from dpo_kit.tracking import log_summary, tracker_environment\n"
        "run_dir = pathlib.Path(os.environ['RUN_DIR'])\n"
        "params = load_params(os.environ['TINY'], ['tracking.report_to=[wandb]'])\n"
        "with tracker_environment(params, run_dir):\n"
        "    wandb.init().finish()  # as the Trainer's callback starts it\n"
        "log_summary(params, run_dir, {'win_rate': 0.75})\n"
        "print(os.environ.get('WANDB_CACHE_DIR'))\n"
    )
    home, run_dir = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": "abc"}))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))}, "WANDB_MODE": "offline",
           "HOME": str(home), "RUN_DIR": str(run_dir), "TINY": str(TINY)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "None"  # the environment is the user's again afterwards
    assert not [path for path in home.rglob("*") if "wandb" in str(path.relative_to(home))], sorted(home.rglob("*"))
    logs = sorted(path.name for path in (run_dir / "tracking" / "wandb" / "logs").glob("core-debug-*.log"))
    assert logs, sorted(run_dir.rglob("*"))


def test_each_tracker_records_the_runs_resolved_params(tmp_path):
    """The Trainer's tracker callbacks record the DPOConfig and the model's config only: the data, the model's
    name, generation and evaluation settings of a run were in no tracker. The kit's callback adds params.yaml's
    content under `dpo_kit` to the wandb and trackio runs' configs and as a TensorBoard text."""
    import subprocess
    import sys

    code = (
        "import os, pathlib, types, wandb\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from transformers import TrainerState\n"
        "from dpo_kit.params import load_params\n"
        "from dpo_kit.tracking import params_callback, tracker_environment\n"
        "run_dir = pathlib.Path(os.environ['RUN_DIR'])\n"
        "params = load_params(os.environ['TINY'], ['tracking.report_to=[wandb,trackio,tensorboard]',\n"
        "                                          'run.name=recorded', 'data.max_rows=123'])\n"
        "with tracker_environment(params, run_dir):\n"
        "    import trackio\n"
        "    run = wandb.init()  # as the Trainer's callbacks start the runs, before the kit's callback\n"
        "    trackio.init(project=params.tracking.project, name='recorded', resume='allow')\n"
        "    tensorboard = types.SimpleNamespace(tb_writer=SummaryWriter(os.environ['TENSORBOARD_LOGGING_DIR']))\n"
        "    params_callback(params, [tensorboard]).on_train_begin(None, TrainerState(), None)\n"
        "    run.log({'train/loss': 0.5}); trackio.log({'train/loss': 0.5})\n"
        "    run.finish(); trackio.finish(); tensorboard.tb_writer.close()\n"
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"run_id": "abc"}))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "TRACKIO_"))}, "WANDB_MODE": "offline",
           "RUN_DIR": str(run_dir), "TINY": str(TINY)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    resolved = load_params(TINY, ["tracking.report_to=[wandb,trackio,tensorboard]", "run.name=recorded",
                                  "data.max_rows=123"]).model_dump(mode="json")  # fmt: skip
    config = {}
    for path in (run_dir / "tracking").glob("wandb/offline-run-*/run-*.wandb"):
        for record in wandb_records(path):
            if record.WhichOneof("record_type") == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update if item.key})
    assert config.get("dpo_kit") == resolved, sorted(config)
    with sqlite3.connect(run_dir / "tracking" / "trackio" / "dpo-kit.db") as db:
        (stored,) = db.execute("select config from configs where run_name = 'recorded'").fetchone()
    assert json.loads(stored)["dpo_kit"] == resolved
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "tracking" / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    text = accumulator.Tensors("dpo_kit/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_rows: 123" in text and "name: recorded" in text


def test_wandb_online_without_a_key_is_refused_before_the_first_stage(monkeypatch, tmp_path):
    """wandb online without WANDB_API_KEY failed only at wandb.init() in the train stage, after the format stage (which
    samples for minutes for `data.source: generate`). `dpo-kit run` refuses it before any stage, and the train and
    evaluate stages before they load a model; a `wandb login` entry in a netrc file does not count (the kit's secrets
    come from the environment only), WANDB_MODE=offline or disabled needs no key."""
    from types import SimpleNamespace

    import papermill

    from dpo_kit import manifest as mf
    from dpo_kit.evaluation.evaluate import evaluate_run
    from dpo_kit.run.runner import RunError
    from dpo_kit.training.train import train_dpo

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(Path(args[0]).name))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password fedcba9876543210fedcba9876543210fedcba98\n")
    monkeypatch.setenv("NETRC", str(netrc))
    overrides = [f"run.output_dir={tmp_path}", "run.name=tracked", "tracking.report_to=[wandb,tensorboard]"]

    def run(stages=None, **kwargs):
        return run_pipeline(TINY, overrides, stages, project_dir=REPO, progress=False, isolate_stages=True, **kwargs)

    with pytest.raises(RunError, match=r"names wandb, which logs online \(WANDB_MODE unset: wandb's default\), but WANDB_API_KEY is"
                                       r" not set in the environment .*set WANDB_API_KEY, or set WANDB_MODE=offline"
                                       r" .*WANDB_MODE=disabled.*Nothing was run"):
        run()
    assert started == [] and not (tmp_path / "tracked").exists()
    params = load_params(TINY, overrides)
    with pytest.raises(RuntimeError, match="WANDB_API_KEY is not set in the environment"):
        train_dpo(SimpleNamespace(params=params, run_dir=tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="WANDB_API_KEY is not set in the environment"):
        evaluate_run(params, tmp_path / "nowhere", REPO)
    monkeypatch.setenv("WANDB_MODE", "Offline")
    with pytest.raises(RunError, match=r"WANDB_MODE='Offline' in the environment is not a mode wandb takes: set it to"
                                       r" one of online, run, shared, offline, dryrun, disabled"):
        run()
    # The format stage alone logs nothing to wandb; a resumed run whose train and evaluate stages completed neither.
    monkeypatch.delenv("WANDB_MODE")
    run(["format"])
    run_dir = tmp_path / "tracked"
    for stage_name in ("format", "train", "evaluate"):
        mf.update_stage(run_dir, stage_name, status="completed")
    run(resume=True)
    assert started == ["01_format_data.ipynb", "03_merge.ipynb", "04_generate.ipynb"]
    for mode in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", mode)
        run(["format"], overwrite=True)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "canary0wandb1key2never3in4a5file6789abcd")
    run(["format"], overwrite=True)
    assert started[3:] == ["01_format_data.ipynb"] * 3


def test_a_wandb_settings_file_sets_the_mode_for_every_stage(monkeypatch, tmp_path):
    """`wandb offline`, as wandb's docs tell, writes its mode into ./wandb/settings, not WANDB_MODE: the kit refused
    such a user for want of WANDB_API_KEY. It now reads the mode as wandb does (the environment, then the settings
    file of the folder it runs in, then the global one) and puts it into WANDB_MODE for the stages, whose kernels run
    in notebooks/, where wandb would not have found it. `wandb online` (which clears the mode) is refused again."""
    import subprocess
    import sys

    import papermill

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(Path(args[0]).name))
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # the global settings file: none yet
    folder = tmp_path / "started-here"
    folder.mkdir()
    monkeypatch.chdir(folder)
    wandb_cli = [sys.executable, "-c", "import sys; from wandb.cli.cli import cli; sys.exit(cli())"]

    def run(name):
        overrides = [f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", "tracking.report_to=[wandb]"]
        run_pipeline(TINY, overrides, ["format", "train"], project_dir=REPO, progress=False, isolate_stages=True)

    subprocess.run([*wandb_cli, "offline"], check=True, capture_output=True)
    assert (folder / "wandb" / "settings").exists()
    run("offline-by-settings")
    assert os.environ["WANDB_MODE"] == "offline" and started == ["01_format_data.ipynb", "02_train_dpo.ipynb"]
    monkeypatch.delenv("WANDB_MODE")
    subprocess.run([*wandb_cli, "online"], check=True, capture_output=True)
    with pytest.raises(RuntimeError, match=r"names wandb, which logs online \(WANDB_MODE unset: wandb's default\), but WANDB_API_KEY"):
        run("online-again")
    assert "WANDB_MODE" not in os.environ and len(started) == 2
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "settings").write_text("[default]\nmode = disabled\n")
    run("disabled-globally")
    assert os.environ.pop("WANDB_MODE") == "disabled"
    (folder / "wandb" / "settings").write_text("[default]\nmode = Offline\n")  # the workspace file wins
    with pytest.raises(RuntimeError, match=r"mode = Offline in wandb/settings is not a mode wandb takes"):
        run("bad-mode")


def test_a_resumed_training_shows_each_step_once_in_tensorboard(tmp_path, tiny_model_dir):
    """A training killed after checkpoint-3 had logged steps 4-6, and the resumed one logged them again: TensorBoard's
    Python reader (`--load_fast=false`, EventAccumulator) showed two points per step over 4-6. The resumed writer
    marks the restart at step 4, and the reader keeps the resumed run's points only."""
    from dpo_kit import manifest as mf
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer
    from dpo_kit.run.stage import open_stage
    from dpo_kit.training.train import train_dpo

    overrides = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "run.name=resumed",
                 "dpo.max_steps=6", "dpo.logging_steps=1", "dpo.save_steps=3", "tracking.report_to=[tensorboard]"]  # fmt: skip
    stage = open_stage("format", TINY, overrides, str(REPO))
    prepare_data(stage.params, load_tokenizer(str(tiny_model_dir), stage.params), stage.run_dir, stage.project_dir)
    stage.complete()
    stage = open_stage("train", TINY, overrides, str(REPO))
    train_dpo(stage)
    # Killed after step 6 was logged, before checkpoint-6 was recorded: the resume starts from checkpoint-3.
    train = mf.read_manifest(stage.run_dir)["stages"]["train"]
    del train["checkpoints"]["checkpoint-6"]
    mf.update_stage(stage.run_dir, "train", status="interrupted", checkpoints=train["checkpoints"],
                    last_checkpoint="checkpoint-3")  # fmt: skip
    first = {s.step: s.value for s in _tensorboard_scalars(stage.run_dir, "train/loss")}
    resumed = open_stage("train", TINY, overrides, str(REPO), on_rerun="resume")
    assert resumed.resume_from.name == "checkpoint-3"
    result = train_dpo(resumed)
    again = {row["step"]: row["loss"] for row in result.log_history if "loss" in row}
    assert sorted(again) == sorted(first) == [1, 2, 3, 4, 5, 6]  # the resumed history starts with checkpoint-3's
    shown = _tensorboard_scalars(stage.run_dir, "train/loss")
    assert [s.step for s in shown] == [1, 2, 3, 4, 5, 6]
    assert [s.value for s in shown[3:]] == pytest.approx([again[4], again[5], again[6]])
    assert len(list((stage.run_dir / "tracking" / "tensorboard").glob("events.out.tfevents.*"))) == 2


def _tensorboard_scalars(run_dir: Path, tag: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tracking" / "tensorboard"))
    accumulator.Reload()
    return accumulator.Scalars(tag)


# A training killed after checkpoint-3 had logged steps 4-6, then resumed: in a subprocess, since trackio reads its
# folder once per process (and another test's may have been read here already).
RESUMED_IN_TRACKIO = """
import json, os, sqlite3, sys
from pathlib import Path
from dpo_kit import manifest as mf
from dpo_kit.data.pipeline import prepare_data
from dpo_kit.models.loading import load_tokenizer
from dpo_kit.run.stage import open_stage
from dpo_kit.training.train import train_dpo

tiny, model, runs = sys.argv[1:4]
overrides = [f"run.output_dir={runs}", f"model.name_or_path={model}", "run.name=resumed", "dpo.max_steps=6",
             "dpo.logging_steps=1", "dpo.save_steps=3", "tracking.report_to=[trackio]"]
repo = str(Path(tiny).parent.parent)
stage = open_stage("format", tiny, overrides, repo)
prepare_data(stage.params, load_tokenizer(model, stage.params), stage.run_dir, stage.project_dir)
stage.complete()
stage = open_stage("train", tiny, overrides, repo)
train_dpo(stage)
train = mf.read_manifest(stage.run_dir)["stages"]["train"]
del train["checkpoints"]["checkpoint-6"]
mf.update_stage(stage.run_dir, "train", status="interrupted", checkpoints=train["checkpoints"], last_checkpoint="checkpoint-3")

def rows():
    with sqlite3.connect(stage.run_dir / "tracking" / "trackio" / "dpo-kit.db") as db:
        return [[run_id, step, json.loads(metrics)] for run_id, step, metrics in
                db.execute("select run_id, step, metrics from metrics where run_name = 'resumed' order by id")]

first = rows()
resumed = open_stage("train", tiny, overrides, repo, on_rerun="resume")
assert resumed.resume_from.name == "checkpoint-3", resumed.resume_from
history = train_dpo(resumed).log_history
print(json.dumps({"first": first, "after": rows(), "losses": {row["step"]: row["loss"] for row in history if "loss" in row}}))
"""


def test_a_resumed_training_shows_each_step_once_in_trackio(tmp_path, tiny_model_dir):
    """trackio has no restart marker: the resumed training (resume="allow", the same run) added steps 4-6 again
    after the interrupted one's, and trackio's own step, one per logging call continued from the run's highest, ran
    on (7-10). The kit deletes the run's rows past checkpoint-3 before the resumed training logs: each step shows
    once, the resumed run's value, in the same run, at trackio's steps as in a training never interrupted."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKIO_")}
    done = subprocess.run([sys.executable, "-c", RESUMED_IN_TRACKIO, str(TINY), str(tiny_model_dir), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    first, after, losses = out["first"], out["after"], {int(step): loss for step, loss in out["losses"].items()}
    # The interrupted training's rows: trackio's steps 0-6, the Trainer's 1-6 and its closing row at 6.
    assert [row[2]["train/global_step"] for row in first] == [1, 2, 3, 4, 5, 6, 6]
    assert {row[0] for row in after} == {first[0][0]}  # one run, the interrupted one's, resumed
    assert [row[1] for row in after] == [0, 1, 2, 3, 4, 5, 6]
    assert [row[2]["train/global_step"] for row in after] == [1, 2, 3, 4, 5, 6, 6]
    assert [row[2] for row in after[:3]] == [row[2] for row in first[:3]]
    assert [row[2]["train/loss"] for row in after[3:6]] == pytest.approx([losses[4], losses[5], losses[6]])
    assert "trackio: deleted the 4 rows run 'resumed' logged after step 3" in done.stdout


def test_the_trackio_rewind_takes_only_this_runs_rows_past_the_checkpoint_in_a_local_store(tmp_path):
    """What rewind_trackio_after deletes: this run's rows from the first one past the checkpoint on (a row without
    the Trainer's step logged after it too), nothing of another run in the project; a run with no row left is
    deleted whole, so that the resumed training starts it again rather than a second run of that name; a store
    synced to a Space or a server (TRACKIO_SPACE_ID, TRACKIO_SERVER_URL, trackio_space_id) is left as it is."""
    import subprocess
    import sys

    code = (
        "import json, os, types\n"
        "import trackio\n"
        "from trackio.sqlite_storage import SQLiteStorage\n"
        "from dpo_kit.params import load_params\n"
        "from dpo_kit.tracking import rewind_trackio_after\n"
        "def log(name, rows):\n"
        "    trackio.init(project='dpo-kit', name=name, resume='allow', auto_log_cpu=False, auto_log_gpu=False)\n"
        "    for row in rows:\n"
        "        trackio.log(row)\n"
        "    trackio.finish()\n"
        "log('other', [{'train/loss': 1.0, 'train/global_step': step} for step in (1, 2, 3, 4)])\n"
        "log('a', [{'train/loss': 1.0, 'train/global_step': step} for step in (1, 2, 3, 4)] + [{'test/loss': 2.0}]\n"
        "    + [{'train/loss': 1.0, 'train/global_step': 5}])\n"
        "log('b', [{'train/loss': 1.0, 'train/global_step': 10}])\n"
        "local, space = types.SimpleNamespace(trackio_space_id=None), types.SimpleNamespace(trackio_space_id='me/space')\n"
        "a, b = (load_params(os.environ['TINY'], ['tracking.report_to=[trackio]', f'run.name={n}']) for n in 'ab')\n"
        "deleted = {'space_id': rewind_trackio_after(a, space, 2)}\n"
        "os.environ['TRACKIO_SERVER_URL'] = 'http://localhost:1/?write_token=x'\n"
        "deleted['server'] = rewind_trackio_after(a, local, 2)\n"
        "del os.environ['TRACKIO_SERVER_URL']\n"
        "deleted.update(a=rewind_trackio_after(a, local, 2), b=rewind_trackio_after(b, local, 5))\n"
        "steps = {name: [(row['step'], row.get('train/global_step')) for row in SQLiteStorage.get_logs('dpo-kit', name)]\n"
        "         for name in ('other', 'a')}\n"
        "print(json.dumps({'deleted': deleted, 'steps': steps, 'runs': sorted(SQLiteStorage.get_runs('dpo-kit'))}))\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("TRACKIO_")}, "TINY": str(TINY),
           "TRACKIO_DIR": str(tmp_path / "trackio")}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["deleted"] == {"space_id": 0, "server": 0, "a": 4, "b": 1}
    assert out["steps"] == {"other": [[0, 1], [1, 2], [2, 3], [3, 4]], "a": [[0, 1], [1, 2]]}
    assert out["runs"] == ["a", "other"]


def test_wandb_online_without_a_key_says_where_online_came_from(monkeypatch, tmp_path):
    """With no WANDB_MODE set at all, the refusal said "(WANDB_MODE='online')", a variable the user never set; it says
    the mode is wandb's default then, and names WANDB_MODE only where the environment holds it."""
    from dpo_kit.tracking import TrackerError, wandb_key_for_online

    monkeypatch.chdir(tmp_path)  # no ./wandb/settings
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))  # nor a global one
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    with pytest.raises(TrackerError, match=r"logs online \(WANDB_MODE unset: wandb's default\), but WANDB_API_KEY"):
        wandb_key_for_online(["wandb"])
    monkeypatch.setenv("WANDB_MODE", "shared")
    with pytest.raises(TrackerError, match=r"logs online \(WANDB_MODE='shared'\), but WANDB_API_KEY"):
        wandb_key_for_online(["wandb"])

"""Which checkpoints a resume may load (unit tier: files and a manifest, no training)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

from dpo_kit import manifest as mf
from dpo_kit.training.checkpoints import (
    RECORD_FILE,
    CheckpointRefused,
    RunIdentity,
    find_resume_point,
    record_checkpoint,
    recorded_checkpoints,
)

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


def make_run(run_dir: Path, steps=(2, 4)) -> RunIdentity:
    """A run whose train stage saved and recorded a checkpoint at each of `steps`."""
    run_dir.mkdir(parents=True)
    manifest = {"run_id": "run-1", "data": {"fingerprint": "data-1"},
                "stages": {"train": {"status": "interrupted", "params_fingerprint": "params-1"}}}  # fmt: skip
    mf.write_manifest(run_dir, manifest)
    identity = RunIdentity.of_run(run_dir)
    for step in steps:
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
        (checkpoint / "optimizer.pt").write_bytes(b"optimizer %d" % step)
        record_checkpoint(run_dir, checkpoint, identity, step)
    return identity


def resume_point(run_dir: Path, identity: RunIdentity):
    entry = mf.read_manifest(run_dir)["stages"]["train"]
    return find_resume_point(run_dir / "checkpoints", identity, recorded_checkpoints(entry))


def test_the_newest_recorded_checkpoint_is_resumed(tmp_path):
    identity = make_run(tmp_path / "run")
    point = resume_point(tmp_path / "run", identity)
    assert point.checkpoint.name == "checkpoint-4" and point.step == 4 and point.skipped == []
    entry = mf.read_manifest(tmp_path / "run")["stages"]["train"]
    assert list(entry["checkpoints"]) == ["checkpoint-2", "checkpoint-4"] and entry["last_checkpoint"] == "checkpoint-4"


def test_a_checkpoint_the_run_did_not_record_is_skipped_and_named(tmp_path):
    identity = make_run(tmp_path / "run")
    # The save the process died in: files but no record.
    cut_short = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    cut_short.mkdir()
    (cut_short / "optimizer.pt").write_bytes(b"half")
    # A checkpoint copied in from elsewhere, with a record naming the same run, params and data: the record
    # is not in this run's manifest, so it is not trusted.
    assert make_run(tmp_path / "other", steps=(8,)) == identity
    shutil.copytree(tmp_path / "other" / "checkpoints" / "checkpoint-8", tmp_path / "run" / "checkpoints" / "checkpoint-8")
    point = resume_point(tmp_path / "run", identity)
    assert point.checkpoint.name == "checkpoint-4"
    assert [note.split(" ")[0] for note in point.skipped] == ["checkpoint-8", "checkpoint-6"]
    assert all("not recorded by the run" in note for note in point.skipped)


@pytest.mark.parametrize("change", ["edit", "plant", "remove"])
def test_a_checkpoint_changed_after_the_save_is_refused(tmp_path, change):
    identity = make_run(tmp_path / "run")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    if change == "edit":
        (checkpoint / "optimizer.pt").write_bytes(b"a pickle someone else wrote")
    elif change == "plant":
        (checkpoint / "rng_state.pth").write_bytes(b"planted")
    else:
        (checkpoint / "adapter_model.safetensors").unlink()
    name = {"edit": "optimizer.pt", "plant": "rng_state.pth", "remove": "adapter_model.safetensors"}[change]
    with pytest.raises(CheckpointRefused, match=rf"checkpoint-4: {name} differ"):
        resume_point(tmp_path / "run", identity)


def test_an_edited_record_is_refused(tmp_path):
    identity = make_run(tmp_path / "run")
    record = tmp_path / "run" / "checkpoints" / "checkpoint-4" / RECORD_FILE
    record.write_text(record.read_text().replace("params-1", "params-2"))  # forged to match other params
    with pytest.raises(CheckpointRefused, match="changed after the run wrote it"):
        resume_point(tmp_path / "run", identity)


@pytest.mark.parametrize("key", ["params_fingerprint", "data_fingerprint", "run_id"])
def test_a_checkpoint_of_other_params_or_data_is_refused(tmp_path, key):
    identity = make_run(tmp_path / "run")
    other = RunIdentity(**{**identity.__dict__, key: "something else"})
    with pytest.raises(CheckpointRefused, match=rf"checkpoint-4 was written with {key} .* this run has 'something else'"):
        resume_point(tmp_path / "run", other)


def test_the_record_lists_every_file_with_its_sha256(tmp_path):
    make_run(tmp_path / "run", steps=(2,))
    record = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / RECORD_FILE).read_text())
    assert sorted(record["files"]) == ["adapter_model.safetensors", "optimizer.pt"]
    assert all(len(digest) == 64 for digest in record["files"].values())
    assert record["step"] == 2 and record["run_id"] == "run-1"


# ---------------------------------------------------------------------------------------------
# open_stage: which on_rerun values resume, and what a refused checkpoint says


def interrupted_train_run(run_dir: Path, overrides: list[str]) -> None:
    """A run directory whose train stage, made with `overrides`, was interrupted after recording checkpoint-4."""
    from dpo_kit.params import load_params, params_to_dict
    from dpo_kit.run.stage import params_fingerprint

    resolved = params_to_dict(load_params(TINY, overrides))
    run_dir.mkdir(parents=True)
    manifest = mf.new_manifest("tiny", 42, REPO, {})
    manifest["stages"]["train"] = {"status": "interrupted", "reason": "SIGTERM",
                                   "params_fingerprint": params_fingerprint(resolved, "train")}  # fmt: skip
    mf.write_manifest(run_dir, manifest)
    checkpoint = run_dir / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "optimizer.pt").write_bytes(b"optimizer")
    record_checkpoint(run_dir, checkpoint, RunIdentity.of_run(run_dir), 4)


@pytest.mark.parametrize("on_rerun", ["show", "resume"])
def test_an_interrupted_train_stage_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, on_rerun):
    from dpo_kit.run.stage import open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    interrupted_train_run(tmp_path / "run", overrides)
    stage = open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), on_rerun)
    assert stage.resume_from == tmp_path / "run" / "checkpoints" / "checkpoint-4"
    entry = mf.read_manifest(tmp_path / "run")["stages"]["train"]
    assert entry["status"] == "running" and entry["resumed_from"] == "checkpoint-4"
    assert entry["attempts"] == [{"status": "interrupted", "reason": "SIGTERM"}]


def test_newer_folders_the_run_did_not_record_are_moved_aside_before_resuming(tmp_path, tiny_model_dir, capsys):
    """The resumed Trainer saves into checkpoint-6 again at step 6: a cut-short save's leftovers (or files copied in)
    would then sit beside its files, and the new record would list them. They are moved aside first, and kept."""
    from dpo_kit.run.stage import open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    run_dir = tmp_path / "run"
    interrupted_train_run(run_dir, overrides)
    cut_short = run_dir / "checkpoints" / "checkpoint-6"
    cut_short.mkdir()
    (cut_short / "rng_state.pth").write_bytes(b"not written by this run")
    stage = open_stage("train", str(TINY), overrides, str(REPO), str(run_dir), "resume")
    assert stage.resume_from == run_dir / "checkpoints" / "checkpoint-4"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-4"]
    [kept] = (run_dir / "previous").glob("*-train-checkpoints-not-resumed/checkpoints/checkpoint-6/rng_state.pth")
    assert kept.read_bytes() == b"not written by this run"
    [moved] = mf.read_manifest(run_dir)["previous"]
    assert moved["path"] == str(kept.parents[2].relative_to(run_dir)) and "newer than checkpoint-4" in moved["reason"]
    assert "moved checkpoint-6 to " in capsys.readouterr().out


@pytest.mark.parametrize("on_rerun", ["refuse", "recompute"])
def test_refuse_and_recompute_start_over_and_keep_the_attempt(tmp_path, tiny_model_dir, on_rerun):
    from dpo_kit.run.stage import open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    interrupted_train_run(tmp_path / "run", overrides)
    stage = open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), on_rerun)
    assert stage.resume_from is None and not (tmp_path / "run" / "checkpoints").exists()
    kept = list((tmp_path / "run" / "previous").glob("*-train/checkpoints/checkpoint-4/optimizer.pt"))
    assert len(kept) == 1


def test_a_tampered_checkpoint_stops_the_stage_with_what_to_do(tmp_path, tiny_model_dir):
    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    interrupted_train_run(tmp_path / "run", overrides)
    (tmp_path / "run" / "checkpoints" / "checkpoint-4" / "optimizer.pt").write_bytes(b"planted pickle")
    with pytest.raises(StageError, match=r"cannot resume stage 'train'.*optimizer.pt differ.*recompute"):
        open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")


def test_a_refused_checkpoint_says_how_to_go_on_from_an_older_one_or_from_the_start(tmp_path, tiny_model_dir):
    """The refusal told a `dpo-kit run` user to "run without --resume", which refuses a run whose format stage
    completed, and said nothing of the older checkpoint that still verifies."""
    from dpo_kit.run.runner import guard_existing_run
    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    run_dir = tmp_path / "run"
    interrupted_train_run(run_dir, overrides)
    newest = run_dir / "checkpoints" / "checkpoint-8"
    newest.mkdir()
    (newest / "optimizer.pt").write_bytes(b"optimizer 8")
    record_checkpoint(run_dir, newest, RunIdentity.of_run(run_dir), 8)
    (newest / "optimizer.pt").write_bytes(b"damaged")
    with pytest.raises(StageError) as raised:
        open_stage("train", str(TINY), overrides, str(REPO), str(run_dir), "resume")
    message = str(raised.value)
    assert "checkpoint-8: optimizer.pt differ" in message and "without --resume" in message
    assert "(--stages train, and any later ones)" in message
    assert f"to resume from checkpoint-4 (it verifies), move {newest} out of {newest.parent}" in message
    # Both ways work: --stages without --resume is not refused for the completed format stage ...
    mf.update_stage(run_dir, "format", status="completed")
    assert guard_existing_run(run_dir, ["train", "merge"], overwrite=False).startswith("continuing an unfinished run")
    # ... and with checkpoint-8 moved away, the resume continues from checkpoint-4.
    newest.rename(tmp_path / "checkpoint-8")
    assert open_stage("train", str(TINY), overrides, str(REPO), str(run_dir), "resume").resume_from.name == "checkpoint-4"


def test_the_advice_names_every_refused_checkpoint_between_the_refused_one_and_the_one_that_verifies(
        tmp_path, tiny_model_dir):
    """Checkpoints 4 (good), 6 and 8 (damaged): moving only checkpoint-8 away, as the advice said, met checkpoint-6."""
    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    run_dir = tmp_path / "run"
    interrupted_train_run(run_dir, overrides)
    damaged = []
    for step in (6, 8):
        folder = run_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "optimizer.pt").write_bytes(b"optimizer")
        record_checkpoint(run_dir, folder, RunIdentity.of_run(run_dir), step)
        (folder / "optimizer.pt").write_bytes(b"damaged")
        damaged.append(folder)
    with pytest.raises(StageError) as raised:
        open_stage("train", str(TINY), overrides, str(REPO), str(run_dir), "resume")
    assert (f"to resume from checkpoint-4 (it verifies), move {damaged[1]} and {damaged[0]} out of"
            f" {run_dir / 'checkpoints'} and resume again (those between are refused too)") in str(raised.value)
    for folder in damaged:
        folder.rename(tmp_path / folder.name)
    assert open_stage("train", str(TINY), overrides, str(REPO), str(run_dir), "resume").resume_from.name == "checkpoint-4"


def test_a_stage_running_in_a_live_process_is_not_taken_over(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    interrupted_train_run(tmp_path / "run", overrides)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        import psutil

        owner = {"pid": other.pid, "host": mf.this_process()["host"], "pid_started": psutil.Process(other.pid).create_time()}
        mf.update_stage(tmp_path / "run", "train", status="running", **owner)
        with pytest.raises(StageError, match=rf"running in process {other.pid}"):
            open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")
    finally:
        other.kill()
        other.wait()
    # The same process gone: the next start records the stage as interrupted, and resumes it.
    stage = open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")
    attempt = mf.read_manifest(tmp_path / "run")["stages"]["train"]["attempts"][-1]
    assert stage.resume_from is not None and attempt["status"] == "interrupted"
    assert f"process {other.pid}" in attempt["reason"] and "ended without finishing" in attempt["reason"]


CLAIMING_PROCESS = """
import ast, pathlib, sys, time
from dpo_kit.training import checkpoints
from dpo_kit.run.stage import open_stage

find = checkpoints.find_resume_point
def slow_find(*args, **kwargs):  # holds this process inside the check, as hashing a large model's checkpoint does
    pathlib.Path(sys.argv[1], "inside").touch()
    while not pathlib.Path(sys.argv[1], "go").exists():
        time.sleep(0.05)
    return find(*args, **kwargs)
checkpoints.find_resume_point = slow_find
params, overrides, project, run_dir = sys.argv[2:6]
stage = open_stage("train", params, ast.literal_eval(overrides), project, run_dir, "resume")
print("resumed", stage.resume_from.name, flush=True)
time.sleep(3600)
"""


def test_two_processes_resuming_at_once_do_not_both_train(tmp_path, tiny_model_dir, monkeypatch):
    """Two `dpo-kit run --resume` started together both read the train stage as interrupted, and both resumed it into
    one checkpoints/ folder: the check and the claim are one step under a lock on the run directory, so the second
    waits, finds the first running, and is refused."""
    import fcntl
    import os
    import subprocess
    import sys
    import threading
    import time

    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    run_dir = tmp_path / "run"
    interrupted_train_run(run_dir, overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-c", CLAIMING_PROCESS, str(tmp_path), str(TINY), repr(overrides),
                              str(REPO), str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    waiting, outcome = threading.Event(), {}
    real_flock = fcntl.flock

    def flock(descriptor, operation):
        waiting.set()
        return real_flock(descriptor, operation)

    monkeypatch.setattr(fcntl, "flock", flock)

    def second() -> None:
        try:
            outcome["stage"] = open_stage("train", str(TINY), overrides, str(REPO), str(run_dir), "resume")
        except StageError as error:
            outcome["error"] = error

    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "inside").exists():  # the first process is between its check and its claim
            assert first.poll() is None and time.monotonic() < deadline, "the first process did not reach its check"
            time.sleep(0.05)
        thread = threading.Thread(target=second)
        thread.start()
        while not waiting.is_set() and thread.is_alive():  # the second waits for the lock (or, unlocked, is done)
            time.sleep(0.05)
        (tmp_path / "go").touch()
        said = [first.stdout.readline() for _ in range(2)]  # open_stage's "resuming from ...", then ours
        assert said[-1].split() == ["resumed", "checkpoint-4"], said
        thread.join(timeout=120)
        assert "stage" not in outcome, "a second process resumed the train stage the first had just resumed"
        assert f"running in process {first.pid}" in str(outcome["error"])
        entry = mf.read_manifest(run_dir)["stages"]["train"]
        assert entry["status"] == "running" and entry["pid"] == first.pid and len(entry["attempts"]) == 1
    finally:
        first.kill()
        first.wait()
        if mf.StageHeartbeat.current is not None:
            mf.StageHeartbeat.current.stop()


def test_an_output_directory_that_cannot_be_written_is_named(tmp_path, tiny_model_dir):
    from dpo_kit.run.stage import StageError, open_stage

    (tmp_path / "a-file").write_text("not a folder")
    overrides = [f"model.name_or_path={tiny_model_dir}", f"run.output_dir={tmp_path / 'a-file' / 'runs'}"]
    with pytest.raises(StageError, match=rf"cannot write to the run directory {tmp_path / 'a-file' / 'runs'}"):
        open_stage("format", str(TINY), overrides, str(REPO), "", "refuse")
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_stage_running_on_another_host_is_judged_by_its_heartbeat(tmp_path, tiny_model_dir):
    from datetime import datetime, timedelta, timezone

    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    interrupted_train_run(tmp_path / "run", overrides)

    def running_elsewhere(minutes_ago: float) -> None:
        beat = (datetime.now(timezone.utc) - timedelta(minutes=minutes_ago)).isoformat(timespec="seconds")
        mf.update_stage(tmp_path / "run", "train", status="running", pid=4242, host="another-machine",
                        pid_started=1.0, heartbeat=beat)  # fmt: skip

    running_elsewhere(minutes_ago=1)  # a live machine: refused, and told when it would count as gone
    with pytest.raises(StageError, match="running in process 4242 on host another-machine .* 10 minutes old"):
        open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")
    running_elsewhere(minutes_ago=11)  # its entry is silent for longer than STALE_AFTER_SECONDS...
    beat = {"stage": "train", "pid": 4242, "host": "another-machine"}
    for other in ({"stage": "merge"}, {"pid": 4343}, {"host": "a-third-machine"}):  # ...and these do not speak for it
        (tmp_path / "run" / mf.HEARTBEAT_FILE).write_text(json.dumps({**beat, **other, "time": mf.now_iso()}))
        assert mf.running_state(mf.read_manifest(tmp_path / "run")["stages"]["train"], tmp_path / "run", "train") == "gone"
    # ...but its heartbeat file, which that machine rewrites while any stage runs, is fresh: alive, and refused.
    (tmp_path / "run" / mf.HEARTBEAT_FILE).write_text(json.dumps({**beat, "time": mf.now_iso()}))
    with pytest.raises(StageError, match="running in process 4242 on host another-machine"):
        open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")
    (tmp_path / "run" / mf.HEARTBEAT_FILE).write_text("{")  # cut short by a crash: the entry's stamp decides
    stage = open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")
    attempt = mf.read_manifest(tmp_path / "run")["stages"]["train"]["attempts"][-1]
    assert stage.resume_from is not None and attempt["status"] == "interrupted"
    assert attempt["reason"].startswith("no heartbeat from process 4242 on another-machine since")


def test_a_live_stage_on_another_host_with_this_process_s_pid_is_not_taken_over(tmp_path, tiny_model_dir):
    """Containers started from one image give their processes the same pids: a stage running on another host under
    this process's pid was read as this process's own and taken over, though its heartbeat was fresh."""
    import os

    from dpo_kit.run.stage import StageError, open_stage

    overrides = [f"model.name_or_path={tiny_model_dir}"]
    interrupted_train_run(tmp_path / "run", overrides)
    mf.update_stage(tmp_path / "run", "train", status="running", pid=os.getpid(), host="another-container",
                    pid_started=1.0, heartbeat=mf.now_iso())  # fmt: skip
    with pytest.raises(StageError, match=f"running in process {os.getpid()} on host another-container"):
        open_stage("train", str(TINY), overrides, str(REPO), str(tmp_path / "run"), "resume")
    assert mf.read_manifest(tmp_path / "run")["stages"]["train"]["host"] == "another-container"


def test_every_stage_beats_while_it_runs_and_stops_when_it_completes(tmp_path, tiny_model_dir, monkeypatch):
    """A merge or generate that takes longer than STALE_AFTER_SECONDS on one machine must not count as gone on
    another sharing the run directory: the process running any stage rewrites the heartbeat file."""
    import os
    import time

    from dpo_kit.run.stage import open_stage

    monkeypatch.setattr(mf, "HEARTBEAT_SECONDS", 0.05)
    run_dir = tmp_path / "run"
    stage = open_stage("format", str(TINY), [f"model.name_or_path={tiny_model_dir}"], str(REPO), str(run_dir), "refuse")
    opened = json.loads((run_dir / mf.HEARTBEAT_FILE).read_text())
    assert {key: opened[key] for key in ("stage", "pid")} == {"stage": "format", "pid": os.getpid()}
    deadline = time.monotonic() + 10
    while json.loads((run_dir / mf.HEARTBEAT_FILE).read_text())["time"] == opened["time"]:
        assert time.monotonic() < deadline, "the heartbeat file was not rewritten while the stage ran"
        time.sleep(0.1)
    entry = mf.read_manifest(run_dir)["stages"]["format"]
    assert mf.last_heartbeat(entry, run_dir, "format") > entry["heartbeat"]  # what another host would read

    stage.complete()
    assert not (run_dir / mf.HEARTBEAT_FILE).exists() and mf.StageHeartbeat.current is None
    time.sleep(0.3)
    assert not (run_dir / mf.HEARTBEAT_FILE).exists(), "no beat after the stage completed"

    # A stage that failed (recorded so in the manifest by whoever saw it fail) stops beating by itself.
    stage = open_stage("train", str(TINY), [f"model.name_or_path={tiny_model_dir}"], str(REPO), str(run_dir), "refuse")
    heartbeat = mf.StageHeartbeat.current
    mf.update_stage(run_dir, "train", status="failed")
    heartbeat.thread.join(timeout=10)
    assert not heartbeat.thread.is_alive()


def test_a_full_disk_while_saving_is_named_with_what_is_intact(tmp_path):
    """A real ENOSPC: /dev/full refuses every write as a full disk does. A container without that device would have
    the test create a plain file /dev/full (as root) and write to it: there the same error is raised by hand (the
    EFBIG test below writes for real)."""
    import errno
    import os
    import stat

    from dpo_kit.training.train import CheckpointWriteError, clear_write_errors

    device = Path("/dev/full").exists() and stat.S_ISCHR(Path("/dev/full").stat().st_mode)
    identity = make_run(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "checkpoint-6").mkdir()  # the save that fails
    with pytest.raises(CheckpointWriteError) as raised:
        with clear_write_errors(tmp_path / "run" / "checkpoints"):
            if not device:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            with open("/dev/full", "wb") as disk:
                disk.write(b"optimizer state")
                disk.flush()
    message = str(raised.value)
    assert message.startswith(f"could not write {tmp_path / 'run' / 'checkpoints' / 'checkpoint-6'} (")
    assert "No space left on device" in message and "intact: checkpoint-2, checkpoint-4." in message
    assert resume_point(tmp_path / "run", identity).checkpoint.name == "checkpoint-4"


def test_a_checkpoint_whose_record_is_written_but_not_yet_in_the_manifest_is_not_called_intact(tmp_path):
    """The disk can fill between a checkpoint's record file and the manifest that lists it. A resume skips such a
    checkpoint, so the error must not name it as one to resume from (it did: it read the record files alone)."""
    import errno
    import os

    from dpo_kit.training.train import CheckpointWriteError, clear_write_errors

    identity = make_run(tmp_path / "run")
    unlisted = tmp_path / "run" / "checkpoints" / "checkpoint-6"
    unlisted.mkdir()
    (unlisted / RECORD_FILE).write_text("{}")  # the record made it to disk, the manifest write did not
    with pytest.raises(CheckpointWriteError) as raised:
        with clear_write_errors(tmp_path / "run" / "checkpoints"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(raised.value)
    assert message.startswith(f"could not write {unlisted} (") and "intact: checkpoint-2, checkpoint-4." in message
    assert resume_point(tmp_path / "run", identity).checkpoint.name == "checkpoint-4"  # what the message promises


def test_other_errors_pass_through_unchanged(tmp_path):
    from dpo_kit.training.train import clear_write_errors

    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with clear_write_errors(tmp_path / "checkpoints"):
            raise RuntimeError("CUDA out of memory")


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past `size` bytes fail with EFBIG, the short write a full disk gives with ENOSPC."""
    import resource
    import signal

    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    previous = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_full_disk_under_safetensors_is_named_in_a_checkpoint_and_in_the_trained_weights(tmp_path):
    """safetensors' SafetensorError is no OSError and names no path: only its text says "(os error 27)". It passed
    through as "SafetensorError: Error while serializing: I/O error: ..." with neither the folder nor the space."""
    import torch
    from safetensors.torch import save_file

    from dpo_kit.training.train import CheckpointWriteError, clear_write_errors

    make_run(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "checkpoint-6").mkdir()  # the save that fails
    for folder, writing in ((checkpoints / "checkpoint-6", None), (tmp_path / "run" / "adapter", tmp_path / "run" / "adapter")):
        folder.mkdir(exist_ok=True)
        with pytest.raises(CheckpointWriteError) as raised:
            with clear_write_errors(checkpoints, **({"writing": writing} if writing else {})), file_size_limit(1000):
                save_file({"weight": torch.zeros(10_000)}, folder / "adapter_model.safetensors")
        message = str(raised.value)
        assert message.startswith(f"could not write {folder} (") and "(os error 27)" in message, message
        assert "intact: checkpoint-2, checkpoint-4." in message


def test_a_manifest_that_cannot_be_written_stays_as_it_was(tmp_path):
    mf.write_manifest(tmp_path, {"status": "running"})
    with pytest.raises(OSError, match="File too large"), file_size_limit(1000):
        mf.write_manifest(tmp_path, {"status": "failed", "error": "x" * 5000})
    assert mf.read_manifest(tmp_path) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "no half-written manifest.json.tmp beside it"


def test_a_failed_training_records_the_run_as_failed_not_running(tmp_path):
    """A notebook's training that failed (notebook 02 run before 01: no pairs) recorded its stage `failed` and left
    the run's status `running`, with no stage running; the runner records both, and so does the train stage now."""
    from dpo_kit.training.train import recording_interruptions

    mf.write_manifest(tmp_path, {"status": "running", "stages": {"train": {"status": "running"}}})
    with pytest.raises(FileNotFoundError), recording_interruptions(tmp_path):
        raise FileNotFoundError("data/train.jsonl not found")
    manifest = mf.read_manifest(tmp_path)
    assert manifest["stages"]["train"]["status"] == "failed" and manifest["status"] == "failed", manifest

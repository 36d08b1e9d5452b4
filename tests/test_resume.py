"""Resume after a crash, for real: `dpo-kit run` is killed mid-training and `--resume` finishes the same run.

The tiny model trains in fp32 on CPU with a checkpoint every 4 steps and a logged loss every step. A resumed
run must equal an uninterrupted one within 1e-5: adapter weights, and the loss of every step after the resume
point (which holds only if the data order and the RNG states are restored too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from run_dirs import logged_losses
from safetensors.torch import load_file

from dpo_kit import manifest as mf
from dpo_kit.run.cli import main
from dpo_kit.run.runner import run_pipeline

pytestmark = pytest.mark.notebook
REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"
STAGES = ["format", "train"]


def overrides(runs: Path, model: Path, name: str) -> list[str]:
    return [f"run.output_dir={runs}", f"model.name_or_path={model}", f"run.name={name}", "dpo.max_steps=60",
            "dpo.save_steps=4", "dpo.logging_steps=1"]  # fmt: skip


def cli_args(settings: list[str], *extra: str) -> list[str]:
    return ["run", str(TINY), *[a for s in settings for a in ("--set", s)], "--stages", ",".join(STAGES), "--quiet", *extra]


def start_and_wait_for_a_checkpoint(settings: list[str], run_dir: Path, env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """Start `dpo-kit run` in its own process group; return once its train stage has recorded a checkpoint."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dpo_kit.run.cli", *cli_args(settings)], cwd=REPO, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, f"dpo-kit run ended before a checkpoint:\n{process.stdout.read()}"
        try:
            entry = mf.read_manifest(run_dir).get("stages", {}).get("train", {})
        except json.JSONDecodeError:  # never half-written (atomic replace), but be safe while polling
            entry = {}
        if entry.get("checkpoints"):
            return process, entry
        time.sleep(0.02)
    process.kill()
    raise AssertionError("no checkpoint recorded within 300 s")


def ended(pid: int) -> bool:
    """The process is gone, or a zombie (ended; its killed parent will never collect it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def assert_same_training(resumed: Path, whole: Path, resume_step: int) -> None:
    ours, theirs = load_file(resumed / "adapter" / "adapter_model.safetensors"), load_file(
        whole / "adapter" / "adapter_model.safetensors"
    )
    assert ours.keys() == theirs.keys() and ours
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    ours, theirs = logged_losses(resumed), logged_losses(whole)
    assert sorted(ours) == sorted(theirs) == list(range(1, 61))
    after = [step for step in ours if step > resume_step] if resume_step < 60 else list(ours)  # 60: nothing after
    assert after and max(abs(ours[s] - theirs[s]) for s in after) <= 1e-5


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    return run_pipeline(TINY, overrides(runs, tiny_model_dir, "whole"), STAGES, project_dir=REPO, progress=False)


def test_kill_9_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, uninterrupted, monkeypatch):
    settings = overrides(tmp_path, tiny_model_dir, "killed")
    run_dir = tmp_path / "killed"
    tmpdir = tmp_path / "tmp"  # $TMPDIR of both runners: the killed one's kernel directory is left there
    tmpdir.mkdir()
    process, entry = start_and_wait_for_a_checkpoint(settings, run_dir, env={**os.environ, "TMPDIR": str(tmpdir)})
    # kill -9 both the runner and the kernel that trains (its own session): nothing can record anything.
    os.kill(entry["pid"], signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = mf.read_manifest(run_dir)
    assert killed_at["stages"]["train"]["status"] == "running" and ended(entry["pid"])
    (left_behind,) = tmpdir.iterdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer; read $TMPDIR again
    format_entry = killed_at["stages"]["format"]

    # A plain re-run refuses to redo the completed format stage and points at --resume.
    assert main(cli_args(settings)) == 1
    assert main(cli_args(settings, "--resume")) == 0

    manifest = mf.read_manifest(run_dir)
    train = manifest["stages"]["train"]
    assert manifest["stages"]["format"] == format_entry, "a completed stage is never redone"
    assert train["status"] == "completed"
    (attempt,) = train["attempts"]
    assert attempt["status"] == "interrupted" and f"process {entry['pid']}" in attempt["reason"]
    resume_step = int(train["resumed_from"].split("-")[1])
    assert 4 <= resume_step < 60 and train["resumed_from"] in killed_at["stages"]["train"]["checkpoints"]
    assert_same_training(run_dir, uninterrupted, resume_step)
    assert not left_behind.exists() and list(tmpdir.iterdir()) == [], "the next runner removes what kill -9 left"


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_record_interrupted_and_resume(tmp_path, tiny_model_dir, uninterrupted, signum, exit_code):
    settings = overrides(tmp_path, tiny_model_dir, "signalled")
    run_dir = tmp_path / "signalled"
    process, entry = start_and_wait_for_a_checkpoint(settings, run_dir)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == exit_code, output
    assert "--resume" in output and "Task exception was never retrieved" not in output, output
    train = mf.read_manifest(run_dir)["stages"]["train"]
    assert train["status"] == "interrupted" and train["reason"] == signal.Signals(signum).name
    assert mf.read_manifest(run_dir)["interrupted_stage"] == "train"
    assert ended(entry["pid"]), "the kernel that trained is stopped with the runner"

    assert main(cli_args(settings, "--resume")) == 0
    run = mf.read_manifest(run_dir)
    train = run["stages"]["train"]
    assert train["status"] == "completed" and train["attempts"][0]["reason"] == signal.Signals(signum).name
    assert run["status"] != "interrupted" and "interrupted_stage" not in run  # the attempts keep the history
    assert_same_training(run_dir, uninterrupted, int(train["resumed_from"].split("-")[1]))


def train_filling_the_disk(settings: list[str], run_dir: Path, after_step: int | None, limit: int):
    """Train in a subprocess whose writes fail once a checkpoint is recorded (that of `after_step`, or the first),
    past `limit` bytes a file (RLIMIT_FSIZE: the OS fails the write with EFBIG, the short write that a full disk
    gives with ENOSPC). Returns the finished process."""
    script = textwrap.dedent(f"""
        import resource, signal
        import dpo_kit.training.checkpoints as checkpoints
        from dpo_kit.run.stage import open_stage
        from dpo_kit.training.train import train_dpo

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG
        record = checkpoints.record_checkpoint

        def record_then_fill_the_disk(run_dir, checkpoint, identity, step):
            digest = record(run_dir, checkpoint, identity, step)
            if {after_step!r} in (None, step):
                resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.RLIM_INFINITY))
            return digest

        checkpoints.record_checkpoint = record_then_fill_the_disk
        stage = open_stage("train", {str(TINY)!r}, {settings!r}, {str(REPO)!r}, {str(run_dir)!r}, "refuse")
        train_dpo(stage)
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_failed_checkpoint_write_names_the_path_and_keeps_earlier_checkpoints(tmp_path, tiny_model_dir, uninterrupted):
    """The file system refuses writes after checkpoint-4 (RLIMIT_FSIZE: the OS fails the write with EFBIG, the same
    short write that a full disk gives with ENOSPC). The error names the folder and the intact checkpoint, and a
    resume once writes work again finishes the run."""
    settings = overrides(tmp_path, tiny_model_dir, "full")
    run_dir = tmp_path / "full"
    run_pipeline(TINY, settings, ["format"], project_dir=REPO, progress=False)
    done = train_filling_the_disk(settings, run_dir, after_step=None, limit=100_000)  # optimizer.pt is ~180 kB
    assert done.returncode == 1
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("dpo_kit.training.train.CheckpointWriteError")]
    assert f"could not write {run_dir / 'checkpoints' / 'checkpoint-8'} (" in error, error
    assert "intact: checkpoint-4." in error and "--resume" in error, error
    train = mf.read_manifest(run_dir)["stages"]["train"]
    assert train["status"] == "failed" and list(train["checkpoints"]) == ["checkpoint-4"]
    assert mf.read_manifest(run_dir)["stages"]["format"]["status"] == "completed"

    assert main(cli_args(settings, "--resume")) == 0
    train = mf.read_manifest(run_dir)["stages"]["train"]
    assert train["status"] == "completed" and train["resumed_from"] == "checkpoint-4"
    assert_same_training(run_dir, uninterrupted, 4)


def test_a_full_disk_while_saving_the_trained_weights_names_them_and_resume_trains_no_step_more(
        tmp_path, tiny_model_dir, uninterrupted):
    """The last checkpoint (step 60 of 60) is recorded, then the disk fills while the adapter is written. safetensors
    says only "(os error 27)": the error names adapter/. Resumed from checkpoint-60, the Trainer trained a 61st step
    (it asks whether max_steps is reached only after a step) and the run no longer equalled an uninterrupted one."""
    settings = overrides(tmp_path, tiny_model_dir, "full-at-the-end")
    run_dir = tmp_path / "full-at-the-end"
    run_pipeline(TINY, settings, ["format"], project_dir=REPO, progress=False)
    # adapter_model.safetensors is ~80 kB, the manifest a few
    done = train_filling_the_disk(settings, run_dir, after_step=60, limit=50_000)
    assert done.returncode == 1
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("dpo_kit.training.train.CheckpointWriteError")]
    assert f"could not write {run_dir / 'adapter'} (" in error and "(os error 27)" in error, error
    assert "intact: " in error and "checkpoint-60." in error, error

    assert main(cli_args(settings, "--resume")) == 0
    train = mf.read_manifest(run_dir)["stages"]["train"]
    assert train["status"] == "completed" and train["resumed_from"] == "checkpoint-60"
    assert train["cost"]["steps"] == 0 and not (run_dir / "checkpoints" / "checkpoint-61").exists()
    assert_same_training(run_dir, uninterrupted, 60)


class KilledBeforeTheRecord(BaseException):
    """Stands for a kill between the Trainer's save of a checkpoint and the kit's record of it."""


def test_with_save_total_limit_1_the_recorded_checkpoint_stays_until_the_next_one_is_recorded(
        tmp_path, tiny_model_dir, monkeypatch):
    """transformers deletes the checkpoints beyond save_total_limit right after saving the new one, before on_save
    records it: with save_total_limit 1 a kill in between left checkpoint-8 unrecorded and checkpoint-4 deleted,
    nothing to resume from. checkpoint-4 now goes only once checkpoint-8 is recorded."""
    from dpo_kit.run.stage import open_stage
    from dpo_kit.training import checkpoints
    from dpo_kit.training.train import train_dpo

    settings = [*overrides(tmp_path, tiny_model_dir, "limit"), "dpo.max_steps=12", "dpo.save_total_limit=1"]
    run_dir = tmp_path / "limit"
    run_pipeline(TINY, settings, ["format"], project_dir=REPO, progress=False)
    record = checkpoints.record_checkpoint

    def killed_at_step_8(run, checkpoint, identity, step):
        if step == 8:
            raise KilledBeforeTheRecord()
        return record(run, checkpoint, identity, step)

    monkeypatch.setattr(checkpoints, "record_checkpoint", killed_at_step_8)
    try:
        with pytest.raises(KilledBeforeTheRecord):
            train_dpo(open_stage("train", str(TINY), settings, str(REPO), str(run_dir), "refuse"))
        assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
        monkeypatch.setattr(checkpoints, "record_checkpoint", record)
        mf.update_stage(run_dir, "train", status="interrupted")  # as the next start finds the killed process
        stage = open_stage("train", str(TINY), settings, str(REPO), str(run_dir), "resume")
        assert stage.resume_from == run_dir / "checkpoints" / "checkpoint-4"
        train_dpo(stage)
    finally:
        if mf.StageHeartbeat.current is not None:
            mf.StageHeartbeat.current.stop()
    # The limit still holds: one checkpoint is kept, the newest, and it is recorded.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-12"]
    assert "checkpoint-12" in mf.read_manifest(run_dir)["stages"]["train"]["checkpoints"]

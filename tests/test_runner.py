"""The runner's guards, without executing notebooks: stage parsing, run protection, secret scanning."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from dpo_kit.params import ParamsError, load_params, params_to_dict, save_params
from dpo_kit.run.runner import RunError, check_prerequisites, find_secrets, guard_existing_run, parse_stages
from dpo_kit.run.stage import params_fingerprint

REPO = Path(__file__).resolve().parent.parent
TINY_PARAMS = REPO / "params" / "tiny.yaml"


def test_stages_are_parsed_in_pipeline_order_and_unknown_ones_named():
    assert parse_stages("evaluate,format") == ["format", "evaluate"]
    assert parse_stages(None) == ["format", "train", "merge", "generate", "evaluate"]
    with pytest.raises(RunError, match="unknown stage.*trian.*valid stages"):
        parse_stages("format,trian")
    for empty in ("", ",", " , "):  # an empty list is not "all five"
        with pytest.raises(RunError, match="names no stage; give some of format,train,merge,generate,evaluate"):
            parse_stages(empty)


def write_manifest(run_dir, **stages):
    run_dir.mkdir(parents=True, exist_ok=True)
    status = "completed" if len(stages) == 5 and set(stages.values()) == {"completed"} else "running"
    manifest = {"status": status, "stages": {name: {"status": s} for name, s in stages.items()}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_completed_stage_is_never_redone_without_asking(tmp_path):
    run_dir = tmp_path / "run"
    write_manifest(run_dir, format="completed", train="failed")
    with pytest.raises(RunError, match="stages format already completed.*--resume.*--overwrite"):
        guard_existing_run(run_dir, ["format", "train"], overwrite=False)
    # Finishing an interrupted run is allowed: only stages that did not complete run again.
    assert "continuing" in guard_existing_run(run_dir, ["train", "merge"], overwrite=False)
    # --resume skips the completed stages instead of refusing them.
    note = guard_existing_run(run_dir, ["format", "train"], overwrite=False, resume=True)
    assert "completed stages are skipped (format)" in note


def test_overwrite_archives_instead_of_deleting(tmp_path):
    run_dir = tmp_path / "run"
    write_manifest(run_dir, **{s: "completed" for s in ["format", "train", "merge", "generate", "evaluate"]})
    (run_dir / "metrics.json").write_text("{}")
    note = guard_existing_run(run_dir, ["format"], overwrite=True)
    archived = [p for p in tmp_path.iterdir() if p.name.startswith("run.archived-")]
    assert len(archived) == 1 and (archived[0] / "metrics.json").exists()
    assert not run_dir.exists() and str(archived[0]) in note


def test_two_overwrites_within_one_second_archive_side_by_side(tmp_path, monkeypatch):
    """The archive's name has a one-second stamp: a second --overwrite in the same second moved the run *into* the
    first archive (shutil.move into an existing directory), nesting one run in another."""
    from datetime import datetime

    from dpo_kit.run import runner

    monkeypatch.setattr(runner, "datetime", type("Frozen", (), {"now": staticmethod(lambda: datetime(2026, 1, 2))}))
    run_dir = tmp_path / "run"
    for attempt in ("first", "second", "third"):
        write_manifest(run_dir, format="completed")
        (run_dir / "attempt.txt").write_text(attempt)
        guard_existing_run(run_dir, ["format"], overwrite=True)
    archived = sorted(p.name for p in tmp_path.iterdir())
    assert archived == ["run.archived-20260102-000000", "run.archived-20260102-000000-2",
                        "run.archived-20260102-000000-3"]  # fmt: skip
    assert [(tmp_path / name / "attempt.txt").read_text() for name in archived] == ["first", "second", "third"]


def test_a_directory_without_manifest_is_not_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    for resume in (False, True):
        with pytest.raises(RunError, match="already holds files but no dpo-kit run"):
            guard_existing_run(tmp_path / "run", ["format"], overwrite=False, resume=resume)
    # --overwrite archives an earlier run; a folder of the user's is neither run nor moved aside.
    with pytest.raises(RunError, match="already holds files but no dpo-kit run.*--overwrite either"):
        guard_existing_run(tmp_path / "run", ["format"], overwrite=True)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_resuming_a_run_that_is_not_there_is_refused_unless_a_sweep_may_start_it(tmp_path):
    for run_dir in (tmp_path / "nope", tmp_path / "empty"):
        if run_dir.name == "empty":
            run_dir.mkdir()
        refusal = f"nothing to resume at {re.escape(str(run_dir))}.*Run without --resume to start it"
        with pytest.raises(RunError, match=refusal):
            guard_existing_run(run_dir, ["format", "train"], overwrite=False, resume=True)
        # A sweep's trial resumes its run directory when there is one and starts it otherwise.
        assert guard_existing_run(run_dir, ["format"], overwrite=False, resume=True, start_if_missing=True) is None
        assert guard_existing_run(run_dir, ["format"], overwrite=False) is None
    assert not (tmp_path / "nope").exists()


def stages_made_with(run_dir, resolved, **stages):
    """A manifest whose stages were made with `resolved` (their fingerprints), with the given statuses."""
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = {name: {"status": status, "params_fingerprint": params_fingerprint(resolved, name)}
               for name, status in stages.items()}  # fmt: skip
    (run_dir / "manifest.json").write_text(json.dumps({"status": "partial", "stages": entries}))


def test_stages_whose_prerequisites_are_neither_completed_nor_requested_are_refused_naming_them(tmp_path):
    resolved = params_to_dict(load_params(REPO / "params" / "tiny.yaml"))
    run_dir = tmp_path / "run"
    # A new run: evaluate needs merge, which needs train; format is requested.
    refusal = (rf"--stages format,evaluate in {re.escape(str(run_dir))}: stage 'evaluate' needs stage 'merge', which"
               r" has not run; stage 'merge' needs stage 'train', which has not run\. Nothing was run\. Run the missing"
               r" stages \(train, merge\) too: --stages format,train,merge,evaluate$")
    with pytest.raises(RunError, match=refusal):
        check_prerequisites(run_dir, ["format", "evaluate"], resolved)
    check_prerequisites(run_dir, ["train"], resolved, provided=("format",))  # --reuse-format copies the format stage

    stages_made_with(run_dir, resolved, format="completed", train="completed")
    with pytest.raises(RunError, match="'generate' needs stage 'merge', which has not run.*too: --stages merge,generate$"):
        check_prerequisites(run_dir, ["generate"], resolved)
    check_prerequisites(run_dir, ["merge", "generate", "evaluate"], resolved)  # each one's prerequisite runs first

    stages_made_with(run_dir, resolved, format="completed", train="interrupted")
    with pytest.raises(RunError, match=r"'merge' needs stage 'train', which is interrupted\. .*: --stages train,merge$"):
        check_prerequisites(run_dir, ["merge"], resolved)

    stages_made_with(run_dir, resolved, format="completed", train="completed", merge="completed")
    check_prerequisites(run_dir, ["generate", "evaluate"], resolved)
    check_prerequisites(run_dir, ["evaluate"], resolved)  # evaluated without generations: no KL, no win-rate
    with pytest.raises(RunError, match="'generate' needs stage 'merge', which has not run.*--stages format,train,merge"):
        check_prerequisites(run_dir, ["generate"], resolved, fresh=True)  # --overwrite: the run starts afresh

    # A prerequisite made with other params than those it depends on is not built on (nor redone in batch).
    other = params_to_dict(load_params(REPO / "params" / "tiny.yaml", ["merge.dtype=bfloat16"]))
    save_params(other, run_dir / "other.yaml")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    manifest["stages"]["merge"].update(params_file="other.yaml", params_fingerprint=params_fingerprint(other, "merge"))
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunError, match=r"'merge', which completed with other params \(merge.dtype: 'bfloat16' ->"
                                       r" 'float32'\)\. Nothing was run\..*--set run.name="):
        check_prerequisites(run_dir, ["generate"], resolved)


def test_a_refused_stages_run_does_not_say_it_continues(tmp_path, capsys):
    """`--stages generate` on a run whose merge has not run is refused with "Nothing was run"; it used to print
    "continuing an unfinished run; its unfinished stages start over" first, which said the opposite."""
    from dpo_kit.run.runner import run_pipeline

    overrides = [f"run.output_dir={tmp_path}", "run.name=partial"]
    resolved = params_to_dict(load_params(TINY_PARAMS, overrides))
    stages_made_with(tmp_path / "partial", resolved, format="completed", train="completed")
    for resume in (False, True):
        with pytest.raises(RunError, match="'generate' needs stage 'merge'.*Nothing was run"):
            run_pipeline(TINY_PARAMS, overrides, stages=["generate"], project_dir=REPO, progress=False,
                         isolate_stages=True, resume=resume)  # fmt: skip
        printed = capsys.readouterr().out
        assert "continuing" not in printed and "resuming" not in printed, printed


def test_params_that_differ_from_the_runs_params_yaml_are_refused_without_saying_it_continues(tmp_path, capsys):
    """The refusal of params other than those in the run's params.yaml came after "continuing an unfinished run; its
    unfinished stages start over" had been printed, which said the opposite."""
    from dpo_kit.run.runner import run_pipeline

    overrides = [f"run.output_dir={tmp_path}", "run.name=partial"]
    stored = params_to_dict(load_params(TINY_PARAMS, overrides))
    stages_made_with(tmp_path / "partial", stored, format="completed")
    save_params(stored, tmp_path / "partial" / "params.yaml")
    with pytest.raises(ParamsError, match=r"differs from .*dpo.beta: 0.1 -> 0.2\. Stages of one run share"):
        run_pipeline(TINY_PARAMS, [*overrides, "dpo.beta=0.2"], stages=["train"], project_dir=REPO, progress=False,
                     isolate_stages=True)  # fmt: skip
    printed = capsys.readouterr().out
    assert "continuing" not in printed, printed


def test_a_run_is_not_refused_for_the_name_of_its_own_folder(tmp_path):
    """A run a notebook started with its own run_dir (the README's `-p run_dir runs/tiny-papermill`) records
    params.yaml's run.name 'tiny'; `dpo-kit run params/tiny.yaml --set run.name=tiny-papermill` finds that folder, and
    was refused for run.name: 'tiny' -> 'tiny-papermill', advised to "choose a new run.name". The name and output_dir
    only locate the folder; any other key still differs."""
    from dpo_kit.params import save_or_check_params

    stored = params_to_dict(load_params(TINY_PARAMS))
    save_params(stored, tmp_path / "params.yaml")
    moved = params_to_dict(load_params(TINY_PARAMS, ["run.name=tiny-papermill", f"run.output_dir={tmp_path}"]))
    save_or_check_params(moved, tmp_path / "params.yaml", "params/tiny.yaml + --set")
    assert (tmp_path / "params.yaml").read_text() == yaml.safe_dump(stored, sort_keys=False)  # the run's own, kept
    other = params_to_dict(load_params(TINY_PARAMS, ["run.name=tiny-papermill", "lora.r=4"]))
    with pytest.raises(ParamsError, match=r"differs from params/tiny.yaml \+ --set: lora.r: 8 -> 4\. Stages"):
        save_or_check_params(other, tmp_path / "params.yaml", "params/tiny.yaml + --set")


def test_secret_values_from_the_environment_are_found_in_run_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    (tmp_path / "clean.json").write_text("{}")
    assert find_secrets(tmp_path) == []
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "leak.ipynb").write_text('{"token": "hf_abcdefghijklmnop"}')
    assert find_secrets(tmp_path) == [str(tmp_path / "notebooks" / "leak.ipynb")]


def test_the_keys_of_a_stored_login_are_found_in_run_files_and_refused_in_params(tmp_path, monkeypatch):
    """`hf auth login` and `wandb login` keep the key on disk, and huggingface_hub and wandb use it where the environment
    holds none: the scan looked only for the environment's values, so with the usual logins it found nothing."""
    from huggingface_hub import constants

    hf_key, wandb_key = "hf_storedLoginToken0123456789", "fedcba9876543210fedcba9876543210fedcba98"
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "token").write_text(hf_key + "\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {wandb_key}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "clean.json").write_text("{}")
    assert find_secrets(run_dir) == []
    (run_dir / "hf.log").write_text(f"Authorization: Bearer {hf_key}")
    (run_dir / "wandb.log").write_text(f"api_key={wandb_key}")
    assert sorted(find_secrets(run_dir)) == [str(run_dir / "hf.log"), str(run_dir / "wandb.log")]
    # A W&B key is 40 hex digits, like a commit hash, so only its value tells it apart; a login's value is known now.
    with pytest.raises(ParamsError, match="tracking.project holds a secret"):
        load_params(TINY_PARAMS, [f"tracking.project=runs-{wandb_key}"])


def test_a_secret_in_the_metadata_of_a_safetensors_file_is_found(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    save_file({"weight": torch.zeros(4)}, tmp_path / "clean.safetensors", metadata={"format": "pt"})
    assert find_secrets(tmp_path) == []
    save_file({"weight": torch.zeros(4)}, tmp_path / "model.safetensors",
              metadata={"format": "pt", "note": "key 0123456789abcdef0123456789abcdef01234567"})  # fmt: skip
    assert find_secrets(tmp_path) == [str(tmp_path / "model.safetensors")]


def test_shared_kernel_reset_leaves_no_user_names_or_outputs(tmp_path):
    from dpo_kit.run.runner import SharedKernel

    kernel = SharedKernel(tmp_path)
    try:
        kernel.run_cell("stage = 'format'\nimport json\n40 + 2")
        kernel.reset()
        cell = kernel.run_cell("print(sorted(n for n in ('stage', 'json', '_name', 'sys') if n in dir()), len(Out))")
        assert cell.outputs[0]["text"].strip() == "[] 0"
    finally:
        kernel.shutdown()


def test_a_refused_secret_override_is_not_kept_in_the_kernels_ipython_history(tmp_path, monkeypatch):
    """The runner validates --set values in its kernel by executing them as code, and IPython wrote every executed
    cell to history.sqlite in its profile: `dpo-kit run ... --set tracking.project=<WANDB_API_KEY>` was refused, and
    the key stayed in ~/.ipython/profile_default/history.sqlite. The runner's kernels keep no history."""
    from dpo_kit.run.runner import SharedKernel

    secret = "FAKEwandbkey0123456789abcdef0123456789ab"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    kernel = SharedKernel(tmp_path)
    try:
        with pytest.raises(ParamsError, match="tracking.project holds a secret"):
            kernel.resolve_run(REPO / "params/tiny.yaml", [f"tracking.project=x-{secret}"], REPO)
        cell = kernel.run_cell("print(get_ipython().history_manager.enabled)")
        assert cell.outputs[0].text.strip() == "False"
    finally:
        kernel.shutdown()
    written = [path for path in (tmp_path / "ipython").rglob("*") if path.is_file()]
    assert not [path for path in written if secret.encode() in path.read_bytes()], written


def test_a_stopped_kernel_leaves_nothing_in_tmpdir(tmp_path, monkeypatch):
    """`import wandb` makes two temporary directories that only its exit handlers remove, and the runner kills its
    kernel: every run left them in $TMPDIR. The kernel gets a temporary directory of its own, removed with it."""
    import tempfile

    from dpo_kit.run.runner import SharedKernel

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer; read $TMPDIR again
    kernel = SharedKernel(tmp_path)
    try:
        cell = kernel.run_cell("import tempfile, wandb\nprint(tempfile.gettempdir())")
        assert cell.outputs[0].text.strip() == kernel.tmpdir
        assert Path(kernel.tmpdir).parent == tmpdir
        made = sorted(path.name for path in Path(kernel.tmpdir).iterdir())
        assert sum("wandb" in name for name in made) == 2, made
    finally:
        kernel.shutdown()
    assert list(tmpdir.iterdir()) == []
    kernel.shutdown()  # a second call does nothing


def test_a_live_process_stays_alive_when_the_wall_clock_moves():
    """psutil's create_time() adds a boot time that the kernel derives from the wall clock, so a clock correction
    moves a live process's start (psutil#2526); an exact comparison once told one sweep worker that the other, very
    much alive, was dead. Its start tick since boot does not move."""
    import subprocess
    import sys

    from dpo_kit import manifest as mf

    me = mf.this_process()
    assert me["boot_id"] and isinstance(me["pid_start_ticks"], int), "this test runs on Linux"
    assert mf.process_alive({**me, "pid_started": me["pid_started"] + 7.0}) is True
    assert mf.process_alive({**me, "pid_start_ticks": me["pid_start_ticks"] + 1}) is False  # another process
    assert mf.process_alive({**me, "boot_id": "an-earlier-boot"}) is False  # every process of that boot ended
    # An entry from an older kit (no boot id or ticks): its wall-clock start, within a clock correction's slack.
    legacy = {key: me[key] for key in ("pid", "host", "pid_started")}
    assert mf.process_alive({**legacy, "pid_started": me["pid_started"] - 1.0}) is True
    assert mf.process_alive({**legacy, "pid_started": me["pid_started"] - 60.0}) is False
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert mf.process_alive({**me, "pid": other.pid}) is False, "the same pid number alone is not the process"
    finally:
        other.kill()
        other.wait()


def test_a_runner_removes_the_kernel_tmpdirs_of_runners_that_ended_without_removing_them(tmp_path):
    """A runner killed with kill -9 never removes its kernel's directory; the next one does, and only such ones."""
    import socket
    import subprocess
    import sys

    import psutil

    from dpo_kit import manifest as mf
    from dpo_kit.run.runner import KERNEL_TMPDIR_OWNER, KERNEL_TMPDIR_PREFIX, remove_abandoned_kernel_tmpdirs

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    owner_of_ended = {**mf.this_process(), "pid": ended.pid, "pid_started": psutil.Process(ended.pid).create_time()}
    ended.wait()
    owners = {
        "ended": owner_of_ended,
        "alive": mf.this_process(),
        # The pid was given to another process: another start tick (Linux), or another wall-clock start elsewhere.
        "same-pid-new-process": {**mf.this_process(), "pid_started": 1.0, "pid_start_ticks": -1},
        "other-host": {**mf.this_process(), "host": socket.gethostname() + "-not"},  # unknown: left alone
    }
    for name, owner in owners.items():
        (tmp_path / (KERNEL_TMPDIR_PREFIX + name)).mkdir()
        (tmp_path / (KERNEL_TMPDIR_PREFIX + name) / KERNEL_TMPDIR_OWNER).write_text(json.dumps(owner))
        (tmp_path / (KERNEL_TMPDIR_PREFIX + name) / "wandb-left-over").mkdir()
    (tmp_path / (KERNEL_TMPDIR_PREFIX + "no-owner-file")).mkdir()  # being made, or not this kit's
    (tmp_path / "someone-elses").mkdir()

    removed = remove_abandoned_kernel_tmpdirs(tmp_path)

    assert sorted(path.name for path in removed) == [KERNEL_TMPDIR_PREFIX + "ended", KERNEL_TMPDIR_PREFIX + "same-pid-new-process"]
    left = sorted(path.name.removeprefix(KERNEL_TMPDIR_PREFIX) for path in tmp_path.iterdir())
    assert left == ["alive", "no-owner-file", "other-host", "someone-elses"]


def test_progress_relay_shows_the_newest_line_a_stage_prints():
    from tqdm import tqdm

    from dpo_kit.run.runner import ProgressRelay

    bar = tqdm(total=1, disable=True)
    relay = ProgressRelay(bar, "train", width=20)
    relay.write("sampling:  10%|#  | 64/576\rsampling:  22%|##  | 128/576\r")
    assert bar.postfix == "train: sampling:  22%|## …"  # cut after a whole word, and marked
    relay.write("\n\n")  # blank output keeps the last line
    relay.write("step 4/20: loss 0.61\n")
    assert bar.postfix == "train: step 4/20: loss 0.61"


def test_the_runners_kernel_starts_without_the_unencrypted_tcp_warning(tmp_path, capfd):
    """ipykernel warns on stderr (the terminal of `dpo-kit run`) unless the kernel's sockets get Curve keys."""
    from jupyter_client.manager import KernelManager

    from dpo_kit.run.runner import SharedKernel

    plain = KernelManager(kernel_name="python3")  # what a kernel manager does by default: the warning shows
    plain.start_kernel(cwd=str(tmp_path))
    client = plain.client()
    client.start_channels()
    client.wait_for_ready(timeout=60)
    client.stop_channels()
    plain.shutdown_kernel(now=True)
    assert "running over TCP without encryption" in capfd.readouterr().err

    kernel = SharedKernel(tmp_path)
    try:
        assert kernel.run_cell("print(6 * 7)").outputs[0]["text"].strip() == "42"
    finally:
        kernel.shutdown()
    assert "without encryption" not in capfd.readouterr().err


def test_resuming_says_a_train_stage_continues_only_where_one_was_interrupted(tmp_path):
    from dpo_kit import manifest as mf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text('{"stages": {"format": {"status": "completed"}}}')
    note = guard_existing_run(run_dir, list(mf.STAGES), overwrite=False, resume=True)
    assert note.endswith("completed stages are skipped (format), the other stages run"), note
    (run_dir / "manifest.json").write_text(
        '{"stages": {"format": {"status": "completed"}, "train": {"status": "interrupted"}}}'
    )
    note = guard_existing_run(run_dir, list(mf.STAGES), overwrite=False, resume=True)
    assert note.endswith("an unfinished train stage continues from its newest verified checkpoint"), note
    note = guard_existing_run(run_dir, ["format", "merge"], overwrite=False, resume=True)
    assert note.endswith("completed stages are skipped (format), the other stages run"), note
    (run_dir / "manifest.json").write_text(json.dumps({"stages": {s: {"status": "completed"} for s in mf.STAGES}}))
    note = guard_existing_run(run_dir, list(mf.STAGES), overwrite=False, resume=True)
    assert note.endswith(f"completed stages are skipped ({', '.join(mf.STAGES)}), nothing is left to run"), note


def test_a_sweep_trial_that_copied_its_pairs_is_not_said_to_resume(tmp_path):
    """The second trial of a fresh sweep adopts the first one's format stage and then runs with resume: the terminal
    said "resuming ...: completed stages are skipped (format)" of a trial that had never run."""
    from dpo_kit import manifest as mf

    run_dir = tmp_path / "beta=0.05"
    run_dir.mkdir()
    source = tmp_path / "beta=0.5"
    (run_dir / "manifest.json").write_text(json.dumps(
        {"stages": {"format": {"status": "completed", "reused_from": str(source)}}}
    ))
    note = guard_existing_run(run_dir, list(mf.STAGES), overwrite=False, resume=True, start_if_missing=True)
    assert note == f"the pairs of {source} are copied into {run_dir}; the format stage is not run again"
    # Once it has run further (killed during training, then retried), it does resume.
    (run_dir / "manifest.json").write_text(json.dumps(
        {"stages": {"format": {"status": "completed", "reused_from": str(source)}, "train": {"status": "interrupted"}}}
    ))
    note = guard_existing_run(run_dir, list(mf.STAGES), overwrite=False, resume=True, start_if_missing=True)
    assert note.startswith(f"resuming {run_dir}") and "completed stages are skipped (format)" in note
    # `dpo-kit run --resume` of such a run is a resume.
    (run_dir / "manifest.json").write_text(json.dumps(
        {"stages": {"format": {"status": "completed", "reused_from": str(source)}}}
    ))
    assert guard_existing_run(run_dir, list(mf.STAGES), overwrite=False, resume=True).startswith("resuming")


def test_the_stage_bar_cuts_a_long_line_after_a_whole_word():
    """The run's last bar showed "evaluate: judged reward ... over 8 held-out prompts; KL(policy ]"."""
    from dpo_kit.run.runner import ProgressRelay

    class Bar:
        postfix = None

        def set_postfix_str(self, text):
            self.postfix = text

    bar = Bar()
    relay = ProgressRelay(bar, "evaluate")
    line = ("judged reward 0.51 -> 0.60; win-rate 0.38 [0.12, 0.75] over 8 held-out prompts; KL(policy || reference)"
            " 0.65 nats; held-out implicit-reward accuracy 1.00 on 40 pairs")
    relay.write("\r" + line + "\n")
    assert bar.postfix == "evaluate: judged reward 0.51 -> 0.60; win-rate 0.38 [0.12, 0.75] over 8 held-out prompts …"
    assert len(bar.postfix) <= len("evaluate: ") + relay.width
    relay.write("step 5/40: loss 0.53\n")
    assert bar.postfix == "evaluate: step 5/40: loss 0.53"




@pytest.mark.parametrize("how", ["resume", "overwrite", "stages", "race"])
def test_a_run_whose_stage_runs_in_a_live_process_is_refused_before_anything_changes(tmp_path, tiny_model_dir, how,
                                                                                  monkeypatch):
    """A second `dpo-kit run` on a run that another one is training: refused, and the live stage's entry, its
    executed notebook and the run directory stay as they are (it once recorded the live stage as failed, which let
    a third runner resume it alongside the first, and --overwrite archived the run from under it). "race": the other
    process opened the stage after the runner's check, so the stage notebook refuses it, and the runner records
    nothing over the live entry."""
    import subprocess
    import sys

    import psutil

    from dpo_kit import manifest as mf
    from dpo_kit.run.runner import run_pipeline

    run_dir = tmp_path / "runs" / "busy"
    settings = [f"run.output_dir={tmp_path / 'runs'}", "run.name=busy", f"model.name_or_path={tiny_model_dir}"]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    try:
        owner = {"pid": other.pid, "host": mf.this_process()["host"], "pid_started": psutil.Process(other.pid).create_time()}
        stages_made_with(run_dir, params_to_dict(load_params(TINY_PARAMS, settings)), format="completed", train="running")
        mf.update_stage(run_dir, "train", **owner)
        (run_dir / "notebooks").mkdir()
        (run_dir / "notebooks" / "02_train_dpo.ipynb").write_text("the live stage's notebook")
        before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        kwargs = {"resume": {"resume": True}, "overwrite": {"overwrite": True}}.get(how, {})
        stages = ["train", "merge"] if how in ("stages", "race") else ["format", "train", "merge"]
        if how == "race":
            monkeypatch.setattr("dpo_kit.run.runner.refuse_if_running", lambda run_dir: None, raising=False)
            before.pop(run_dir / "notebooks" / "02_train_dpo.ipynb")  # the runner keeps it, renamed, as ever
            before.pop(run_dir / "manifest.json")
        refusal = "was not run: stage 'train'" if how == "race" else "Nothing was run"
        with pytest.raises(RunError, match=rf"stage 'train' .*busy is running in process {other.pid}") as raised:
            run_pipeline(TINY_PARAMS, settings, stages, project_dir=REPO, progress=False, isolate_stages=True, **kwargs)
        assert refusal in str(raised.value)
        after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        assert {p: after[p] for p in before} == before
        train = mf.read_manifest(run_dir)["stages"]["train"]
        assert {k: train[k] for k in ("status", *owner)} == {"status": "running", **owner} and "error" not in train
        assert [p.name for p in (tmp_path / "runs").iterdir()] == ["busy"]
    finally:
        other.kill()
        other.wait()


def test_a_stage_that_fills_the_disk_is_reported_with_the_run_directory_and_the_space_left(tmp_path):
    """A stage's write error often names no path ("[Errno 28] No space left on device", or safetensors'
    "(os error 28)" from the merged model); and on a full disk the manifest cannot record the failure either,
    which once ended `dpo-kit run` in a traceback from manifest.py instead of the stage's error."""
    from types import SimpleNamespace

    from dpo_kit import manifest as mf
    from dpo_kit.run.runner import _record_stage_end, failure_reason

    notebook_error = SimpleNamespace(ename="SafetensorError",
                                     evalue="Error while serializing: I/O error: No space left on device (os error 28)")
    reason = failure_reason(notebook_error, tmp_path)
    assert reason.startswith("SafetensorError: Error while serializing") and f"; {tmp_path} could not be written (" in reason
    assert "MiB free on its filesystem" in reason and "--resume" in reason
    assert "could not be written" in failure_reason(OSError(28, "No space left on device"), tmp_path)  # papermill's own
    said = SimpleNamespace(ename="CheckpointWriteError", evalue="could not write /x/checkpoint-8 (0 MiB free ...): [Errno 28]")
    assert failure_reason(said, tmp_path) == f"CheckpointWriteError: {said.evalue}"
    assert failure_reason(SimpleNamespace(ename="RuntimeError", evalue="CUDA out of memory"), tmp_path) == (
        "RuntimeError: CUDA out of memory")
    # A permission error is the run directory's only where it names it: reading a data file is about that file.
    unreadable = SimpleNamespace(ename="PermissionError", evalue="[Errno 13] Permission denied: '/data/pairs.jsonl'")
    assert failure_reason(unreadable, tmp_path) == f"PermissionError: {unreadable.evalue}"
    unwritable = SimpleNamespace(ename="PermissionError", evalue=f"[Errno 13] Permission denied: '{tmp_path}/merged'")
    assert f"; {tmp_path} could not be written (" in failure_reason(unwritable, tmp_path)

    write_manifest(tmp_path, format="completed", merge="running")
    before = (tmp_path / "manifest.json").read_text()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import pytest as _pytest

    with _pytest.MonkeyPatch.context() as patch:
        patch.setattr(mf, "write_manifest", disk_full)
        told = _record_stage_end(tmp_path, "merge", {"status": "failed"}, status="failed", error=reason)
    assert told.startswith(f"{tmp_path / 'manifest.json'} could not record that (No space left on device")
    assert (tmp_path / "manifest.json").read_text() == before
    assert _record_stage_end(tmp_path, "merge", {"status": "failed"}, status="failed") == (
        f"recorded in {tmp_path / 'manifest.json'}")
    assert mf.read_manifest(tmp_path)["stages"]["merge"]["status"] == "failed"


def run_holding_three_held_out_prompts(tmp_path: Path, num_prompts: int) -> tuple[Path, Path]:
    """A run directory whose format stage held out 3 prompts, and its params asking generate.num_prompts."""
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    held_out = [{"prompt": [{"role": "user", "content": f"question {i}"}], "chosen": "a", "rejected": "b"} for i in range(3)]
    (run_dir / "data" / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in held_out))
    params_file = run_dir / "params.yaml"
    save_params(params_to_dict(load_params(TINY_PARAMS, [f"generate.num_prompts={num_prompts}"])), params_file)
    return run_dir, params_file


def test_a_run_that_would_generate_for_more_prompts_than_were_held_out_stops_before_training(tmp_path, monkeypatch):
    """The generate stage refuses generate.num_prompts above the held-out prompts; the runner says so once the format
    stage has split the pairs, before a train stage that may take hours, and starts no kernel for it."""
    import papermill

    from dpo_kit.run import runner

    run_dir, params_file = run_holding_three_held_out_prompts(tmp_path, num_prompts=8)
    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(args))
    monkeypatch.setattr(runner, "SharedKernel", lambda *args: started.append("kernel"))
    with pytest.raises(RunError, match=r"generate.num_prompts is 8, but .*eval.jsonl holds 3 distinct held-out prompts.*Stopped"
                                       r" before the train stage.*--reuse-format .*run --set run.name=NEW"):
        runner._execute_stages(["train", "merge", "generate"], run_dir, params_file, tmp_path, tmp_path, None, False,
                               "refuse")  # fmt: skip
    assert started == []
    save_params(params_to_dict(load_params(TINY_PARAMS, ["generate.num_prompts=3"])), params_file)
    runner.refuse_prompts_generate_would_refuse(run_dir, params_file, "train")  # three asked, three held out: fine


def test_the_runner_process_leaves_torch_transformers_and_trl_to_its_kernel(tmp_path, tiny_model_dir):
    """The stages' kernel imports the ML stack anyway; the runner process beside it stays light. Reading the params
    for the check before training imported TRL (with transformers and torch) into the runner, ~0.4 GiB more on top
    of the kernel's for the rest of the run (bench/pipeline.py's process-tree peak: 0.75 -> 1.10 GiB)."""
    import subprocess
    import sys

    script = (
        "import sys\nfrom dpo_kit.run.runner import run_pipeline\n"
        f"run_pipeline({str(TINY_PARAMS)!r}, ['model.name_or_path={tiny_model_dir}', 'run.output_dir={tmp_path}'],"
        f" project_dir={str(REPO)!r}, progress=False)\n"
        "print(sorted(name for name in ('torch', 'transformers', 'trl', 'peft') if name in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "tiny" / "manifest.json").read_text())["status"] == "completed"
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]


def test_the_check_before_training_refuses_from_the_kernel_as_in_the_runner(tmp_path, monkeypatch):
    """Run in the shared kernel, the generate-prompts check still stops the run with the runner's own RunError."""
    import papermill

    from dpo_kit.run import runner

    run_dir, params_file = run_holding_three_held_out_prompts(tmp_path, num_prompts=8)
    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(args))
    kernel = runner.SharedKernel(tmp_path)
    try:
        with pytest.raises(RunError, match=r"generate.num_prompts is 8, but .*eval.jsonl holds 3 distinct held-out prompts"
                                           r".*Stopped before the train stage"):
            runner._execute_stages(["train", "merge", "generate"], run_dir, params_file, tmp_path, tmp_path, kernel,
                                   False, "refuse")  # fmt: skip
        save_params(params_to_dict(load_params(TINY_PARAMS, ["generate.num_prompts=3"])), params_file)
        assert kernel.call("refuse_prompts_generate_would_refuse", str(run_dir), str(params_file), "train") is None
    finally:
        kernel.shutdown()
    assert started == []


def test_a_relative_kit_cache_means_the_directory_the_run_was_started_in(tmp_path, monkeypatch):
    """The kernel runs in notebooks/: DPO_KIT_CACHE=cache put the converted models and reference log-probs under
    notebooks/cache there, not under ./cache where the command was typed."""
    from dpo_kit.run.runner import SharedKernel

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DPO_KIT_CACHE", "kit-cache")
    kernel_dir = tmp_path / "notebooks"
    kernel_dir.mkdir()
    kernel = SharedKernel(kernel_dir)
    try:
        cell = kernel.run_cell("from dpo_kit.models.gguf import cache_root\nprint(cache_root())")
    finally:
        kernel.shutdown()
    assert "".join(output.get("text", "") for output in cell.outputs).strip() == str(tmp_path / "kit-cache")


def test_the_shared_kernel_is_waited_for_once_not_before_every_notebook(tmp_path):
    """nbclient waits for the kernel before every notebook it runs (each stage, each reset, each call in the kernel):
    a kernel_info round trip, then 0.2 s of silence on iopub (jupyter_client's wait_for_ready), 14 times a run, ~3 s
    idle of a tiny run's ~18. The shared kernel is waited for once; later notebooks only check that it lives."""
    import os
    import signal
    import time

    from jupyter_core.utils import run_sync

    from dpo_kit.run.runner import SharedKernel

    kernel = SharedKernel(tmp_path)
    try:
        kernel.run_cell("1")  # the first waits for the kernel to answer
        client = kernel.manager.client()
        asked = []
        kernel_info = client.kernel_info
        client.kernel_info = lambda: asked.append(1) or kernel_info()
        for _ in range(3):
            assert kernel.run_cell("print(6 * 7)").outputs[0]["text"].strip() == "42"
        assert len(asked) == 3, "one kernel_info per notebook (nbclient's, for its language_info), none to wait"

        os.kill(kernel.manager.provisioner.process.pid, signal.SIGKILL)
        while run_sync(kernel.manager.is_alive)():
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="Kernel died"):  # a dead kernel is still said, as before
            run_sync(client.wait_for_ready)(timeout=60)
    finally:
        kernel.shutdown()


def test_an_interrupted_stage_says_where_to_resume_it_from(tmp_path, monkeypatch):
    """The message named `dpo-kit run <run>/params.yaml --resume`, an absolute path that reads as if it worked from
    anywhere; the relative paths inside it (run.output_dir: runs) resolve from where dpo-kit starts, so from another
    folder it answered "nothing to resume at <that folder>/runs/...". It names the project folder to start it in."""
    import papermill

    from dpo_kit.run.runner import RunInterrupted, _execute_stages

    class Kernel:  # the runner's shared kernel, without starting one
        manager = None

        def abandon_cell(self):
            pass

        def shutdown(self):
            pass

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(papermill, "execute_notebook", interrupted)
    run_dir = tmp_path / "project" / "runs" / "tiny"
    write_manifest(run_dir, format="running")
    (run_dir / "notebooks").mkdir()
    with pytest.raises(RunInterrupted) as caught:
        _execute_stages(["format"], run_dir, run_dir / "params.yaml", tmp_path / "project", REPO / "notebooks", Kernel(),
                        False, "refuse")  # fmt: skip
    assert f"`dpo-kit run {run_dir / 'params.yaml'} --resume`, started in {tmp_path / 'project'}:" in str(caught.value)
    assert caught.value.exit_code == 130


def test_reuse_format_from_a_path_that_does_not_exist_says_so(tmp_path):
    """--reuse-format with a mistyped path said "not a run directory (no manifest.json)", as if the directory were
    there; a directory that is there but holds no run keeps that message."""
    from dpo_kit.run.runner import run_pipeline

    overrides = [f"run.output_dir={tmp_path}", "run.name=new"]
    for name, message in (("missing", "does not exist"), ("a-file", "is not a directory"),
                          ("empty", r"not a run directory \(no manifest.json\)")):
        source = tmp_path / name
        if name == "a-file":
            source.write_text("")
        elif name == "empty":
            source.mkdir()
        with pytest.raises(RunError, match=rf"--reuse-format {re.escape(str(source))}: .*{message}"):
            run_pipeline(TINY_PARAMS, overrides, stages=["format"], project_dir=REPO, progress=False,
                         isolate_stages=True, reuse_format=source)  # fmt: skip
    assert not (tmp_path / "new" / "manifest.json").exists()

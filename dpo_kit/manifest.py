"""manifest.json: what ran, when, on what, and with which result, next to the run's outputs.

Both the runner (from outside the kernels) and each stage notebook (from inside) update it, one
at a time, so every write re-reads the file and replaces it atomically.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

STAGES = ("format", "train", "merge", "generate", "evaluate")
TRACKED_PACKAGES = (
    "dpo-kit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
    "tokenizers", "papermill", "wandb",
)  # fmt: skip


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(directory: str | Path) -> dict[str, Any]:
    """Commit and dirtiness of the repo holding `directory`; None fields outside a git checkout."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


class OutputNotWritable(OSError):
    """A run's output cannot be written (read-only, not a folder, disk full): the message names the path."""


# What an operating system says when a file cannot be written (full disk, quota, size limit, read-only).
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)
# torch.save reports a short write from its zip writer as a RuntimeError, e.g. "[enforce fail at
# inline_container.cc:672] . unexpected pos 119616 vs 119504", without the errno.
TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "file write failed")
# An errno in an error's text: Python's "[Errno 28] No space left on device", and Rust's "(os error 28)", which is
# all that safetensors' SafetensorError says ("Error while serializing: I/O error: No space left on device (os error
# 28)"), in a checkpoint, the trained weights or the merged model alike.
ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)")


# Of those, the ones that say the disk (or a quota, or a size limit) is full rather than that a path is not writable.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_write_failure(error: BaseException | str, errnos: tuple[int, ...] = WRITE_ERRNOS) -> bool:
    """Whether an error (or its text, as a stage's notebook reports it) says a file could not be written (with
    `errnos` SPACE_ERRNOS: for want of space)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in errnos
    text = str(error)
    codes = {int(code) for pair in ERRNO_IN_TEXT.findall(text) for code in pair if code}
    return bool(codes & set(errnos)) or any(marker in text for marker in TORCH_WRITE_FAILURES)


def free_space(path: str | Path) -> str:
    """'N MiB free' on the filesystem holding `path`, for an error that says a write failed."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f} MiB free"
    except OSError:
        return "free space unknown"


def ensure_writable_dir(directory: str | Path) -> Path:
    """Create `directory` if needed and prove a file can be written there; OutputNotWritable names the path."""
    directory = Path(directory)
    probe = directory / f".write-test-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OutputNotWritable(
            f"cannot write to the run directory {directory}: {error.strerror or error} ({type(error).__name__});"
            " choose another run.output_dir or free that path. Nothing in it was changed."
        ) from error
    return directory


def manifest_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "manifest.json"


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = manifest_path(run_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def write_manifest(run_dir: str | Path, manifest: dict[str, Any]) -> None:
    path = manifest_path(run_dir)
    temporary = path.with_suffix(".json.tmp")
    try:
        temporary.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(temporary, path)
    except OSError:  # a full disk: the manifest stays as it was, and no half-written copy is left beside it
        temporary.unlink(missing_ok=True)
        raise


def recorded_command(argv: list[str] | None = None) -> str:
    """The command line as a run or sweep records it, without the secrets it may hold: a sweep's --storage URL
    carries the database password when it is given there (postgresql://USER:PASSWORD@HOST/DB)."""
    from dpo_kit.params import redact_secrets

    return redact_secrets(" ".join(sys.argv if argv is None else argv))


def new_manifest(run_name: str, seed: int, project_dir: str | Path, hardware: dict) -> dict[str, Any]:
    return {
        "run": run_name,
        "run_id": uuid.uuid4().hex,  # ties the run's checkpoints to it: resume refuses another run's
        "status": "created",
        "created": now_iso(),
        "seed": seed,
        "command": recorded_command(),
        "git": git_state(project_dir),
        "packages": package_versions(),
        "hardware": hardware,
        "data": {},
        "stages": {},
    }


def update_manifest(run_dir: str | Path, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    manifest.update(fields)
    write_manifest(run_dir, manifest)
    return manifest


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks (a GGUF is hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def update_stage(run_dir: str | Path, stage: str, **fields: Any) -> dict[str, Any]:
    manifest = read_manifest(run_dir)
    entry = manifest.setdefault("stages", {}).setdefault(stage, {})
    entry.update(fields)
    write_manifest(run_dir, manifest)
    return manifest


def run_id(manifest: dict[str, Any]) -> str:
    """The run's id; runs made before ids were kept are named by their name and creation time."""
    return manifest.get("run_id") or f"{manifest.get('run')}@{manifest.get('created')}"


# What this_process() records; an entry's copy of them is dropped when the entry is adopted by another run.
PROCESS_KEYS = ("pid", "host", "pid_started", "boot_id", "pid_start_ticks", "heartbeat")
# How far a process's wall-clock start may move between two readings. psutil computes it as the boot time in
# /proc/stat plus the start in ticks since boot, and the kernel derives that boot time from the wall clock, so
# an NTP or VM clock correction moves it by a second or more (psutil#2526): an exact comparison once told a
# live sweep worker that its sibling was dead. Linux is compared by ticks instead; this slack is for the rest.
WALL_CLOCK_SLACK_SECONDS = 2.0


def _boot_id() -> str | None:
    """This boot of this Linux host; None elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot. Unlike the wall-clock
    start it never moves, so with the boot id it names one process exactly. None off Linux or for a gone pid."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2 :].split()[19])  # fields after "(comm)" start at field 3
    except (OSError, ValueError, IndexError):
        return None


def this_process() -> dict[str, Any]:
    """Who is running a stage, recorded in its entry so that the next start can tell a live run from a dead one."""
    import psutil

    record = {"pid": os.getpid(), "host": socket.gethostname(), "pid_started": psutil.Process().create_time()}
    boot, ticks = _boot_id(), _start_ticks(os.getpid())
    if boot and ticks is not None:
        record.update(boot_id=boot, pid_start_ticks=ticks)
    return {**record, "heartbeat": now_iso()}


def process_alive(entry: dict[str, Any]) -> bool | None:
    """Whether the process recorded in a stage entry still runs: None when it ran on another host (unknown)."""
    import psutil

    if "pid" not in entry or entry.get("host") != socket.gethostname():
        return None
    try:
        # The start guards against a new process that got the same pid. A zombie has ended: it only waits for
        # its parent (gone too, after a kill -9) to collect its exit status.
        process = psutil.Process(entry["pid"])
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        boot = _boot_id()
        if entry.get("boot_id") and boot:
            # Same boot: the same start tick is the same process. Another boot: every process of it has ended.
            return entry["boot_id"] == boot and _start_ticks(entry["pid"]) == entry.get("pid_start_ticks")
        started = entry.get("pid_started")
        return isinstance(started, (int, float)) and abs(process.create_time() - started) <= WALL_CLOCK_SLACK_SECONDS
    except psutil.Error:
        return False


UNFINISHED = ("running", "interrupted", "failed")
# A stage running on another host cannot be asked whether its process lives; its heartbeat says so instead:
# HEARTBEAT_FILE, rewritten every HEARTBEAT_SECONDS by the process running the stage (any stage: a long merge or
# generate beats as a training does), and the entry's own `heartbeat` (written when the stage opens and by the
# train stage's callback). Silent this long: gone.
HEARTBEAT_SECONDS = 30
STALE_AFTER_SECONDS = 600
HEARTBEAT_FILE = "heartbeat.json"


def _beat_in(run_dir: str | Path, stage: str, pid: Any, host: Any) -> dict[str, Any] | None:
    """The run's HEARTBEAT_FILE where it was written for `stage` by that process on that host, else None (none yet,
    cut short by a crash, or another stage's or process's)."""
    try:
        beat = json.loads((Path(run_dir) / HEARTBEAT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if isinstance(beat, dict) and [beat.get(k) for k in ("stage", "pid", "host")] == [stage, pid, host]:
        return beat
    return None


def last_heartbeat(entry: dict[str, Any], run_dir: str | Path | None = None, stage: str = "") -> str | None:
    """When the stage's process last said it lives: its entry's heartbeat (or start), or the run's HEARTBEAT_FILE
    where that was written by the same stage, process and host; the later of the two."""
    stamps = [entry.get("heartbeat") or entry.get("started")]
    beat = _beat_in(run_dir, stage, entry.get("pid"), entry.get("host")) if run_dir is not None else None
    if beat is not None:
        stamps.append(beat.get("time"))
    known = [stamp for stamp in stamps if isinstance(stamp, str) and stamp]
    return max(known, key=datetime.fromisoformat) if known else None


def seconds_since_heartbeat(entry: dict[str, Any], run_dir: str | Path | None = None, stage: str = "") -> float | None:
    stamp = last_heartbeat(entry, run_dir, stage)
    return (datetime.now(timezone.utc) - datetime.fromisoformat(stamp)).total_seconds() if stamp else None


def running_state(entry: dict[str, Any], run_dir: str | Path | None = None, stage: str = "") -> str:
    """For a `running` entry: 'alive' (its process runs, or another host's heartbeat is fresh), or 'gone'."""
    alive = process_alive(entry)
    if alive is None:  # another host, or an entry from before processes were recorded
        silent = seconds_since_heartbeat(entry, run_dir, stage)
        alive = silent is not None and silent < STALE_AFTER_SECONDS if "pid" in entry else False
    return "alive" if alive else "gone"


class StageHeartbeat:
    """A daemon thread that rewrites <run>/HEARTBEAT_FILE every HEARTBEAT_SECONDS while a stage runs in this
    process, so that a runner on another host sharing the run directory sees it alive however long the stage
    takes. It writes its own small file, never the manifest: a read-modify-write of manifest.json from a second
    thread could undo what the stage itself records there. It stops when the stage completes, when the manifest
    no longer shows the stage running in this process (failed, or taken over), or when another stage opens here."""

    current: StageHeartbeat | None = None  # one stage runs in a process at a time

    def __init__(self, run_dir: str | Path, stage: str):
        import threading

        self.run_dir, self.stage = Path(run_dir), stage
        self.record = {"stage": stage, "pid": os.getpid(), "host": socket.gethostname()}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"dpo-kit heartbeat {stage}", daemon=True)

    @classmethod
    def start(cls, run_dir: str | Path, stage: str) -> StageHeartbeat:
        if cls.current is not None:
            cls.current.stop()
        cls.current = heartbeat = cls(run_dir, stage)
        heartbeat.write()
        heartbeat.thread.start()
        return heartbeat

    def still_running_here(self) -> bool:
        try:
            entry = read_manifest(self.run_dir).get("stages", {}).get(self.stage, {})
        except (OSError, ValueError):  # caught mid-replace, or the folder moved: ask again next beat
            return True
        return entry.get("status") == "running" and entry.get("pid") == self.record["pid"]

    def write(self) -> None:
        path = self.run_dir / HEARTBEAT_FILE
        temporary = path.with_name(f"{HEARTBEAT_FILE}.{self.record['pid']}.tmp")
        try:
            temporary.write_text(json.dumps({**self.record, "time": now_iso()}))
            temporary.replace(path)  # whole or absent: a reader never sees half a beat
        except OSError:  # a full disk or a run directory moved away: the stage's own work says what is wrong
            temporary.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            if not self.still_running_here():
                break
            self.write()

    def stop(self) -> None:
        """Stop beating and remove the file (it speaks only for a running stage)."""
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join()
        if _beat_in(self.run_dir, self.stage, self.record["pid"], self.record["host"]) is not None:
            (self.run_dir / HEARTBEAT_FILE).unlink(missing_ok=True)
        if StageHeartbeat.current is self:
            StageHeartbeat.current = None


@contextlib.contextmanager
def run_lock(run_dir: str | Path):
    """An exclusive lock on the run directory itself (a lock on a folder leaves no file behind) while a process
    checks whether a stage may start and claims it in the manifest. Without it two processes started together
    (two `dpo-kit run --resume`, a notebook and a runner) both read the stage as not running and both claimed it:
    two trainings resumed into one checkpoints/ folder. Where the OS or file system has no flock (Windows, some
    network file systems) the check runs unlocked, as before."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(run_dir, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a file system without locks: unlocked
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def mark_dead_stages_interrupted(run_dir: str | Path) -> list[str]:
    """Record as `interrupted` every stage entry still `running` whose process is gone (kill -9, a dead kernel, a
    lost machine: on this host by its pid, on another by a heartbeat silent for STALE_AFTER_SECONDS): the next
    start finds it so, not as running or failed. Returns them."""
    manifest = read_manifest(run_dir)
    running = {s: e for s, e in manifest.get("stages", {}).items() if e.get("status") == "running"}
    dead = [s for s, e in running.items() if running_state(e, run_dir, s) == "gone"]
    for stage in dead:
        entry = manifest["stages"][stage]
        if "pid" not in entry:
            why = "an attempt recorded without its process (an older dpo-kit) never finished"
        elif process_alive(entry) is False:
            why = f"process {entry['pid']} on {entry['host']} ended without finishing the stage (killed, or out of memory)"
        else:
            why = (f"no heartbeat from process {entry['pid']} on {entry['host']} since"
                   f" {last_heartbeat(entry, run_dir, stage)}: that machine or process is gone")  # fmt: skip
        entry.update(status="interrupted", interrupted=now_iso(), reason=why)
    if dead:
        manifest["status"] = "interrupted"
        write_manifest(run_dir, manifest)
    return dead


def new_previous_dir(parent: str | Path, label: str = "") -> Path:
    """Create and return <parent>/previous/<time>[-label], a fresh folder for earlier outputs moved aside
    (a -2, -3, ... suffix when two moves fall within one second)."""
    stem = datetime.now().strftime("%Y%m%d-%H%M%S") + (f"-{label}" if label else "")
    target, suffix = Path(parent) / "previous" / stem, 1
    while target.exists():
        suffix += 1
        target = Path(parent) / "previous" / f"{stem}-{suffix}"
    target.mkdir(parents=True)
    return target


class StageTimer:
    """Wall time of a stage, measured from inside its notebook."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.started, 3)

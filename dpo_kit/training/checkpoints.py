"""Checkpoints the run can trust: each one the Trainer saves is recorded, and resume loads only a recorded one.

Resuming loads files from a checkpoint folder, and three of them are pickles (`optimizer.pt`, `scheduler.pt`,
`rng_state.pth`; transformers reads them with `torch.load(weights_only=True)`, and never reads
`training_args.bin`). A folder that someone copied in, or a file changed after the save, must not be loaded.
So right after the Trainer saves `checkpoint-N`, the kit writes `dpo_kit_checkpoint.json` into it: the run's
id, the train stage's params fingerprint, the data fingerprint and the sha256 of every file. The sha256 of
that record goes into the train stage's manifest entry. Resume takes the newest checkpoint whose record is
in the manifest and whose files still hash to it; it refuses one made with other params or data.

A checkpoint without a record is one the Trainer was still writing when the process died (or one the run
did not write): it is skipped, named, and never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_kit import manifest as mf

RECORD_FILE = "dpo_kit_checkpoint.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_KEY = "checkpoints"  # in the train stage's manifest entry: {checkpoint name: sha256 of its record}


class CheckpointRefused(RuntimeError):
    """A checkpoint of this run cannot be resumed from: the message names it and what differs."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must match to be resumed in this run."""

    run_id: str
    params_fingerprint: str
    data_fingerprint: str

    @classmethod
    def of_run(cls, run_dir: Path, stage: str = "train") -> RunIdentity:
        manifest = mf.read_manifest(run_dir)
        return cls(
            run_id=mf.run_id(manifest),
            params_fingerprint=manifest["stages"][stage]["params_fingerprint"],
            data_fingerprint=manifest.get("data", {}).get("fingerprint", ""),
        )


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(checkpoint: Path) -> dict[str, str]:
    return {
        str(path.relative_to(checkpoint)): _sha256(path)
        for path in sorted(checkpoint.rglob("*"))
        if path.is_file() and path.name != RECORD_FILE
    }


def record_checkpoint(run_dir: Path, checkpoint: Path, identity: RunIdentity, step: int) -> str:
    """Write the checkpoint's record and list it in the manifest; returns the record's sha256."""
    record = {"step": step, **identity.__dict__, "files": _files(checkpoint)}
    text = json.dumps(record, indent=1, sort_keys=True)
    temporary = checkpoint / f"{RECORD_FILE}.tmp"
    temporary.write_text(text)
    temporary.replace(checkpoint / RECORD_FILE)  # a record is whole or absent, never half-written
    digest = hashlib.sha256(text.encode()).hexdigest()
    manifest = mf.read_manifest(run_dir)
    entry = manifest["stages"]["train"]
    entry.setdefault(MANIFEST_KEY, {})[checkpoint.name] = digest
    entry["last_checkpoint"] = checkpoint.name
    entry["heartbeat"] = mf.now_iso()
    mf.write_manifest(run_dir, manifest)
    return digest


def checkpoint_recorder(run_dir: Path, identity: RunIdentity):
    """A TrainerCallback that records every checkpoint right after the Trainer has saved it."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import rotate_checkpoints

    class RecordCheckpoint(TrainerCallback):
        rotates_checkpoints = True  # the kit's trainer leaves save_total_limit to it (KitDPOTrainer._save_checkpoint)

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if checkpoint.is_dir():
                    record_checkpoint(run_dir, checkpoint, identity, state.global_step)
            if args.should_save:
                # The checkpoints beyond save_total_limit go only once the new one is recorded (the kit's trainer
                # leaves them to this callback): until then the newest recorded one is what a resume needs. As the
                # Trainer does it; nothing is left to do where the Trainer has done it already.
                rotate_checkpoints(output_dir=args.output_dir, save_total_limit=args.save_total_limit,
                                   best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)

    return RecordCheckpoint()


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else -1


def verify_checkpoint(checkpoint: Path, identity: RunIdentity, recorded: dict[str, str]) -> None:
    """Raise CheckpointRefused unless `checkpoint` is one this run wrote, with these params and data, unchanged."""
    record_path = checkpoint / RECORD_FILE
    if checkpoint.name not in recorded or not record_path.is_file():
        raise CheckpointRefused(f"{checkpoint} is not a checkpoint this run recorded in its manifest", checkpoint)
    text = record_path.read_text()
    if hashlib.sha256(text.encode()).hexdigest() != recorded[checkpoint.name]:
        raise CheckpointRefused(f"{record_path} changed after the run wrote it", checkpoint)
    record = json.loads(text)
    for key, expected in identity.__dict__.items():
        if record.get(key) != expected:
            raise CheckpointRefused(
                f"{checkpoint} was written with {key} {record.get(key)!r}, but this run has {expected!r}:"
                " a checkpoint is resumed only by the run, params and data that made it", checkpoint,
            )
    files = _files(checkpoint)
    changed = sorted(name for name in set(files) | set(record["files"]) if files.get(name) != record["files"].get(name))
    if changed:
        raise CheckpointRefused(
            f"{checkpoint}: {', '.join(changed)} differ from what the run wrote (added, removed or changed since)",
            checkpoint,
        )


@dataclass
class ResumePoint:
    checkpoint: Path | None  # the newest verified checkpoint, None when there is none
    skipped: list[str]  # newer checkpoints that were not resumed from, each with why
    skipped_folders: list[Path] = field(default_factory=list)  # those folders, newest first

    @property
    def step(self) -> int:
        return checkpoint_step(self.checkpoint) if self.checkpoint else 0


def find_resume_point(checkpoints_dir: Path, identity: RunIdentity, recorded: dict[str, str]) -> ResumePoint:
    """The newest checkpoint under `checkpoints_dir` that the run recorded and that verifies.

    A newer folder without a record (the save the process died in) is skipped and named. A recorded
    checkpoint that fails verification raises: its params, data or files differ, and silently going back
    to an older one would hide that."""
    folders = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if checkpoint_step(p) >= 0), key=checkpoint_step, reverse=True)
    skipped, skipped_folders = [], []
    for folder in folders:
        if folder.name not in recorded:
            skipped.append(f"{folder.name} (not recorded by the run: a save cut short, or not the run's own)")
            skipped_folders.append(folder)
            continue
        verify_checkpoint(folder, identity, recorded)
        return ResumePoint(folder, skipped, skipped_folders)
    return ResumePoint(None, skipped, skipped_folders)


def older_verified_checkpoint(checkpoints_dir: Path, identity: RunIdentity, recorded: dict[str, str],
                              below: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint older than the refused `below` that verifies, if any, and the recorded ones between
    that are refused too: what a resume would continue from once `below` and those are moved out of the way (told,
    never done silently). find_resume_point stops at the first recorded checkpoint that fails."""
    older = sorted((p for p in checkpoints_dir.glob("checkpoint-*") if 0 <= checkpoint_step(p) < checkpoint_step(below)
                    and p.name in recorded), key=checkpoint_step, reverse=True)  # fmt: skip
    refused = []
    for folder in older:
        try:
            verify_checkpoint(folder, identity, recorded)
        except CheckpointRefused:
            refused.append(folder)
            continue
        return folder, refused
    return None, refused


def recorded_checkpoints(entry: dict[str, Any]) -> dict[str, str]:
    return dict(entry.get(MANIFEST_KEY, {}))

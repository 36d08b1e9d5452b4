"""One process of a launched train stage: `accelerate launch ... --module dpo_kit.training.worker RUN_DIR PROJECT_DIR`.

The notebook opened the stage (manifest entry, parameter set) before launching; every worker reads that
parameter set, trains its share, and the main worker hands the result back in RUN_DIR/train_result.json.
Workers never mark the stage: the notebook that launched them records how it ended.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import record


@dataclass
class WorkerStage:
    """What training reads of a dpo_kit.run.stage.Stage; the notebook's process holds the Stage itself."""

    params: Any
    run_dir: Path
    project_dir: Path
    hardware: Any
    resume_from: Path | None
    name: str = "train"


# torch's elastic agent then names a failed worker's exception (its traceback's last lines) in the summary it prints
# last: without an error file that summary says only "exitcode: 1", and the last lines of the launcher's output, which
# the train stage's error and the manifest carry, held the launcher's own traceback and not the worker's error.
@record
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dpo_kit.training.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("project_dir", type=Path)
    parser.add_argument("--resume-from", type=Path, default=None)
    args = parser.parse_args(argv)

    import datasets
    import transformers

    from dpo_kit import manifest as mf
    from dpo_kit.hardware import choose_hardware
    from dpo_kit.params import load_params
    from dpo_kit.training.launch import RESULT_FILE
    from dpo_kit.training.train import train_in_this_process

    # Progress bars redraw with carriage returns, which arrive garbled through a pipe from several processes;
    # the train stage's one line per logged step says the same.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    entry = mf.read_manifest(args.run_dir)["stages"]["train"]
    params = load_params(args.run_dir / entry["params_file"])
    stage = WorkerStage(params=params, run_dir=args.run_dir, project_dir=args.project_dir, hardware=choose_hardware(),
                        resume_from=args.resume_from)  # fmt: skip
    result = train_in_this_process(stage)
    if result.launch["process_index"] == 0:
        (args.run_dir / RESULT_FILE).write_text(json.dumps(result.summary(), indent=2) + "\n")


if __name__ == "__main__":
    main()

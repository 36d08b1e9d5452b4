"""Benchmark: `dpo-kit run params/tiny.yaml` against one plain Python process doing the same work.

Both sides run in this process tree, one after the other, with the same params, the same tiny
model (built once beforehand, outside both timings) and the same library calls; only the
notebook machinery (papermill, one kernel per stage, imports per kernel) differs. Prints wall
times, peak memory of each process tree, their ratios, and per-stage time split into work done
inside the notebook and overhead around it.

    .venv/bin/python bench/pipeline.py            # targets: ratio <= 1.25, tiny end-to-end <= 60 s
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
PLAIN_SCRIPT = REPO / "bench" / "plain_pipeline.py"


def run_measured(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak summed RSS (GiB) of the process tree started by `command`."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    done.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{stderr.decode()[-3000:]}")
    return time.perf_counter() - started, peak / 2**30


def main() -> None:
    sys.path.insert(0, str(REPO))
    from dpo_kit.tiny_model import ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="dpo-kit-bench-") as scratch:
        scratch = Path(scratch)
        model = ensure_tiny_model(scratch / "tiny-model")
        common = [f"run.output_dir={scratch}", f"model.name_or_path={model}"]
        sets = lambda name: [a for o in [*common, f"run.name={name}"] for a in ("--set", o)]  # noqa: E731

        plain_seconds, plain_peak = run_measured([sys.executable, str(PLAIN_SCRIPT), "params/tiny.yaml", *sets("plain")])
        kit_seconds, kit_peak = run_measured(
            [str(Path(sys.executable).parent / "dpo-kit"), "run", "params/tiny.yaml", "--quiet", *sets("notebooks")]
        )
        notebook_manifest = json.loads((scratch / "notebooks" / "manifest.json").read_text())
        plain_manifest = json.loads((scratch / "plain" / "manifest.json").read_text())
        for name in ("plain", "notebooks"):
            metrics = json.loads((scratch / name / "metrics.json").read_text())
            print(f"{name:>9}: held-out rewards/accuracies {metrics.get('rewards/accuracies'):.3f}")

    print(f"\n{'':>24}{'plain script':>14}{'dpo-kit run':>14}{'ratio':>8}")
    print(f"{'wall time (s)':>24}{plain_seconds:>14.1f}{kit_seconds:>14.1f}{kit_seconds / plain_seconds:>8.2f}")
    print(f"{'peak memory (GiB)':>24}{plain_peak:>14.2f}{kit_peak:>14.2f}{kit_peak / plain_peak:>8.2f}")
    print("\nper stage (s): work inside the stage | notebook wall time incl. kernel start + imports")
    for stage, entry in notebook_manifest["stages"].items():
        plain = plain_manifest["stages"][stage]["seconds"]
        print(f"{stage:>10}: plain {plain:6.1f} | notebook work {entry['seconds']:6.1f} | notebook wall {entry['wall_seconds']:6.1f}")
    overhead = sum(e["wall_seconds"] - e["seconds"] for e in notebook_manifest["stages"].values())
    print(f"\nnotebook overhead outside the stages' work: {overhead:.1f} s of {kit_seconds:.1f} s")
    print(f"targets: ratio <= 1.25 ({'met' if kit_seconds / plain_seconds <= 1.25 else 'NOT met'}), "
          f"tiny end-to-end <= 60 s ({'met' if kit_seconds <= 60 else 'NOT met'})")


if __name__ == "__main__":
    main()

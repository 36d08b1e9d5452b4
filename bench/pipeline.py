"""Benchmark: `dpo-kit run params/tiny.yaml` against one plain Python process doing the same work.

Both sides run in this process tree, one after the other, with the same params, the same tiny
model (built once beforehand, outside both timings) and the same library calls; only the
notebook machinery (papermill, one kernel per stage, imports per kernel) differs. Prints wall
times, peak memory of each process tree, their ratios, and per-stage time split into work done
inside the notebook and overhead around it.

    .venv/bin/python bench/pipeline.py [--repeat 3]   # targets: ratio <= 1.25, tiny end-to-end <= 60 s

The two sides alternate `--repeat` times and medians are reported: on a shared 2-core VM a single
pair of runs varies by +-20%.
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs of each side; medians reported")
    repeat = parser.parse_args().repeat
    sys.path.insert(0, str(REPO))
    from dpo_kit.models.tiny import ensure_tiny_model

    with tempfile.TemporaryDirectory(prefix="dpo-kit-bench-") as scratch:
        scratch = Path(scratch)
        model = ensure_tiny_model(scratch / "tiny-model")
        common = [f"run.output_dir={scratch}", f"model.name_or_path={model}"]
        sets = lambda name: [a for o in [*common, f"run.name={name}"] for a in ("--set", o)]  # noqa: E731
        plain_runs, kit_runs = [], []
        for attempt in range(repeat):
            plain_runs.append(run_measured([sys.executable, str(PLAIN_SCRIPT), "params/tiny.yaml", *sets(f"plain-{attempt}")]))
            kit_runs.append(run_measured(
                [str(Path(sys.executable).parent / "dpo-kit"), "run", "params/tiny.yaml", "--quiet", *sets(f"notebooks-{attempt}")]
            ))
        plain_seconds, plain_peak = (statistics.median(values) for values in zip(*plain_runs, strict=True))
        kit_seconds, kit_peak = (statistics.median(values) for values in zip(*kit_runs, strict=True))
        print("wall times (s), plain:", [round(t, 1) for t, _ in plain_runs], " dpo-kit run:", [round(t, 1) for t, _ in kit_runs])
        notebook_manifest = json.loads((scratch / "notebooks-0" / "manifest.json").read_text())
        plain_manifest = json.loads((scratch / "plain-0" / "manifest.json").read_text())
        for name in ("plain-0", "notebooks-0"):
            metrics = json.loads((scratch / name / "metrics.json").read_text())
            print(f"{name:>11}: held-out rewards/accuracies {metrics.get('rewards/accuracies'):.3f}")

    print(f"\nmedians of {repeat}")
    print(f"{'':>24}{'plain script':>14}{'dpo-kit run':>14}{'ratio':>8}")
    print(f"{'wall time (s)':>24}{plain_seconds:>14.1f}{kit_seconds:>14.1f}{kit_seconds / plain_seconds:>8.2f}")
    print(f"{'peak memory (GiB)':>24}{plain_peak:>14.2f}{kit_peak:>14.2f}{kit_peak / plain_peak:>8.2f}")
    print("\nper stage (s), first run: work inside the stage | notebook wall time incl. cell round trips")
    for stage, entry in notebook_manifest["stages"].items():
        plain = plain_manifest["stages"][stage]["seconds"]
        print(f"{stage:>10}: plain {plain:6.1f} | notebook work {entry['seconds']:6.1f} | notebook wall {entry['wall_seconds']:6.1f}")
    overhead = sum(e["wall_seconds"] - e["seconds"] for e in notebook_manifest["stages"].values())
    print(f"\nnotebook overhead outside the stages' work: {overhead:.1f} s of {kit_seconds:.1f} s")
    print(f"targets: ratio <= 1.25 ({'met' if kit_seconds / plain_seconds <= 1.25 else 'NOT met'}), "
          f"tiny end-to-end <= 60 s ({'met' if kit_seconds <= 60 else 'NOT met'})")


if __name__ == "__main__":
    main()

"""Benchmark: a 4-point beta sweep (`dpo-kit sweep`) against four independent `dpo-kit run`s of the same points.

The sweep shares what the points have in common: one kernel for every trial (the stack is imported once), one
format stage (the pairs are copied to the other trials), and, with precompute_ref_log_probs, one pass of the
reference over the pairs (the cache). The four runs share nothing but the disk cache of converted models; each
side starts with an empty reference log-prob cache (its own DPO_KIT_CACHE). The sides alternate --repeat times
and medians are printed with the target (sweep <= 0.7x the four runs).

    .venv/bin/python bench/sweep.py [--params params/tiny.yaml] [--repeat 3] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BETAS = ("0.05", "0.1", "0.25", "0.5")
TARGET = 0.7


def timed(command: list[str], cache: Path) -> float:
    environment = {**os.environ, "DPO_KIT_CACHE": str(cache)}
    gguf = Path(os.environ.get("DPO_KIT_CACHE") or Path.home() / ".cache" / "dpo-kit") / "gguf"
    cache.mkdir(parents=True, exist_ok=True)
    if gguf.is_dir() and not (cache / "gguf").exists():  # converted GGUF models: set-up, not part of either side
        (cache / "gguf").symlink_to(gguf)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr.decode()[-3000:]}")
    return time.perf_counter() - started


def stage_seconds(run_dirs: list[Path]) -> dict[str, float]:
    """Seconds spent in each stage over `run_dirs`, from their manifests; a format stage copied from a sibling
    trial counts 0 (its entry carries the seconds of the one that formatted)."""
    totals = dict.fromkeys(("format", "train", "merge", "generate", "evaluate"), 0.0)
    for run_dir in run_dirs:
        for name, entry in json.loads((run_dir / "manifest.json").read_text())["stages"].items():
            if not entry.get("reused_from"):
                totals[name] += entry.get("seconds") or 0.0
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/tiny.yaml")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    dpo_kit = [sys.executable, "-m", "dpo_kit.run.cli"]
    sweeps, separate, splits = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        for repeat in range(args.repeat):
            base = Path(scratch) / str(repeat)
            settings = [f"run.output_dir={base}", "dpo.precompute_ref_log_probs=true", *args.set]
            flags = [a for s in settings for a in ("--set", s)]
            sweeps.append(timed([*dpo_kit, "sweep", args.params, "--grid", f"dpo.beta={','.join(BETAS)}", *flags,
                                 "--quiet"], base / "cache-sweep"))
            separate.append(sum(
                timed([*dpo_kit, "run", args.params, *flags, "--set", f"dpo.beta={beta}", "--set",
                       f"run.name=separate-beta-{beta}", "--quiet"], base / "cache-separate")
                for beta in BETAS
            ))
            trials = sorted(p.parent for p in base.glob("*-sweep/*/manifest.json"))
            runs = [base / f"separate-beta-{beta}" for beta in BETAS]
            splits.append((stage_seconds(trials), stage_seconds(runs)))
            shutil.rmtree(base, ignore_errors=True)
            print(f"repeat {repeat + 1}: sweep {sweeps[-1]:.1f} s, four runs {separate[-1]:.1f} s", flush=True)
    sweep, runs = statistics.median(sweeps), statistics.median(separate)
    ratio = sweep / runs
    print(f"\n{args.params}, beta in {', '.join(BETAS)}, median of {args.repeat}:")
    print(f"  dpo-kit sweep (4 trials)   {sweep:7.1f} s")
    print(f"  four dpo-kit runs          {runs:7.1f} s")
    print(f"  ratio {ratio:.2f}  target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}")
    # Where the time goes, from the manifests of the median repeat: what the sweep shares (the format stage, the
    # kernel and its imports, which fall outside the stages) against what every point pays again.
    index = sorted(range(len(sweeps)), key=lambda i: sweeps[i])[len(sweeps) // 2]
    (sweep_stages, run_stages), walls = splits[index], (sweeps[index], separate[index])
    print(f"  where the time goes (repeat {index + 1}), seconds:     sweep   four runs")
    for name in sweep_stages:
        print(f"    {name + ' stage':34s} {sweep_stages[name]:7.1f} {run_stages[name]:9.1f}")
    outside = [wall - sum(stages.values()) for wall, stages in zip(walls, (sweep_stages, run_stages), strict=True)]
    print(f"    {'outside the stages (start, imports)':34s} {outside[0]:7.1f} {outside[1]:9.1f}")
    if ratio > TARGET:
        shared = run_stages["format"] - sweep_stages["format"] + outside[1] - outside[0]
        print(f"  not met: the sweep saves {shared:.0f} s of shared work (format, start-up), and the points' own"
              f" stages (train, merge, generate, evaluate: {sum(sweep_stages.values()) - sweep_stages['format']:.0f} s)"
              " dominate; the more of a run the format stage is (sampled pairs, a real model), the lower the ratio")  # fmt: skip


if __name__ == "__main__":
    main()

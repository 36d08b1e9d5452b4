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
    if gguf.is_dir() and not (cache / "gguf").exists():  # converted GGUF models: set-up, not part of either side
        (cache / "gguf").symlink_to(gguf)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr.decode()[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/tiny.yaml")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    dpo_kit = [sys.executable, "-m", "dpo_kit.run.cli"]
    sweeps, separate = [], []
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
            shutil.rmtree(base, ignore_errors=True)
            print(f"repeat {repeat + 1}: sweep {sweeps[-1]:.1f} s, four runs {separate[-1]:.1f} s", flush=True)
    sweep, runs = statistics.median(sweeps), statistics.median(separate)
    ratio = sweep / runs
    print(f"\n{args.params}, beta in {', '.join(BETAS)}, median of {args.repeat}:")
    print(f"  dpo-kit sweep (4 trials)   {sweep:7.1f} s")
    print(f"  four dpo-kit runs          {runs:7.1f} s")
    print(f"  ratio {ratio:.2f}  target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'}")


if __name__ == "__main__":
    main()

"""The GPU branch CI cannot reach: a few training steps of a real model's shape through `dpo-kit run --stages train`.

    .venv/bin/python bench/gpu_train.py [--shape qwen2.5-0.5b] [--params params/tiny.yaml] [--steps 8]
        [--checks auto,qlora4] [--output-dir runs/gpu-checks] [--set KEY=VALUE ...]

A GPU machine lent without a network cannot fetch the model, so the script builds a random model of the named
shape with the kit's own code (dpo_kit.models.tiny.build_random_model: every weight matrix at full size, the
tiny tokenizer), then runs the format and train stages of `--params` on it once per check:

- auto:   the kit's own hardware choice (on a bf16 GPU: bf16 autocast with activation checkpointing; on an
          older GPU fp16; on a CPU fp32 without checkpointing), the weights placed by the kit's device_map;
- qlora4: the same with the base loaded in 4-bit by bitsandbytes (quantization.bits=4, NF4), LoRA on top.

It then prints, per check, what the manifest recorded: the device, the precision and checkpointing chosen,
the steps run, tokens/s and pairs/s over the Trainer's train() call, peak GPU memory allocated during it, and
the process's peak resident memory. Issue 9 asks for `--shape qwen2.5-0.5b` (params/tiny.yaml's pairs);
issue 7 for the sentiment recipe's train stage on SmolLM2's shape:

    .venv/bin/python bench/gpu_train.py --shape smollm2-135m --params params/smollm2-135m-sentiment.yaml \
        --checks auto --set data.max_rows=64

It runs on a CPU too (slowly), which is how it was tried here; no test depends on a GPU. Each run is a new
directory (`<output-dir>/<shape>-<check>-<n>`), and each invocation's results a new file
(`<output-dir>/<shape>-results-<n>.json`, written after every check): an earlier check is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHECKS = {"auto": [], "qlora4": ["quantization.bits=4"]}


def model_dir(output_dir: Path, shape: str, seed: int) -> Path:
    """The random model of `shape`, built once per output directory and reused by later checks."""
    from dpo_kit.models.tiny import build_random_model

    path = output_dir / "models" / f"{shape}-random-seed{seed}"
    marker = path / "dpo_kit_random_model.json"
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built != {"shape": shape, "seed": seed}:
            raise SystemExit(f"{path} holds another model ({built}); name another --output-dir")
        return path
    print(f"gpu_train: building a random {shape} model in {path}", flush=True)
    build_random_model(path, shape, seed=seed)
    marker.write_text(json.dumps({"shape": shape, "seed": seed}) + "\n")
    return path


def new_run_name(output_dir: Path, stem: str, suffix: str = "") -> str:
    """`<stem>-<n><suffix>` with the first n that names nothing in `output_dir` yet."""
    n = 1
    while (output_dir / f"{stem}-{n}{suffix}").exists():
        n += 1
    return f"{stem}-{n}{suffix}"


def run_check(args, check: str, model: Path) -> dict:
    name = new_run_name(args.output_dir, f"{args.shape}-{check}")
    settings = [
        f"run.name={name}", f"run.output_dir={args.output_dir}", f"model.name_or_path={model}",
        "model.build_tiny_model=false", f"dpo.max_steps={args.steps}",
        f"dpo.save_steps={args.steps}", "dpo.logging_steps=1",
        *CHECKS[check], *args.set,
    ]  # fmt: skip
    # `python -m` rather than the dpo-kit script: on a GPU machine the kit may be on PYTHONPATH, not installed.
    command = [sys.executable, "-m", "dpo_kit.run.cli", "run", args.params, "--stages", "format,train", "--quiet"]
    command += [a for s in settings for a in ("--set", s)]
    print(f"gpu_train: {check}: {' '.join(command)}", flush=True)
    finished = subprocess.run(command, cwd=REPO)
    run_dir = args.output_dir / name
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    train = manifest.get("stages", {}).get("train", {})
    return {"check": check, "run_dir": str(run_dir), "exit": finished.returncode, "hardware": manifest.get("hardware", {}),
            "train": train}  # fmt: skip


def table(shape: str, results: list[dict]) -> str:
    lines = [
        f"random model of {shape}'s shape, built by the kit",
        "| check | exit | device | precision | checkpointing | steps | tokens/s | pairs/s | GPU peak allocated (GiB)"
        " | process peak RSS (GiB) | weights on |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        precision, cost = r["train"].get("precision", {}), r["train"].get("cost", {})
        dtype = "bf16" if precision.get("bf16") else "fp16" if precision.get("fp16") else "fp32"
        device = cost.get("cuda_device") or r["hardware"].get("device", "?")
        cells = [r["check"], r["exit"], device, dtype, precision.get("gradient_checkpointing"), cost.get("steps"),
                 cost.get("tokens_per_second"), cost.get("pairs_per_second"), cost.get("cuda_peak_allocated_gib", "-"),
                 cost.get("process_peak_rss_gib"), ",".join(cost.get("weights_on_devices", [])) or "-"]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from dpo_kit.models.tiny import RANDOM_MODEL_SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", choices=sorted(RANDOM_MODEL_SHAPES))
    parser.add_argument("--params", default="params/tiny.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--checks", default="auto,qlora4", help=f"comma-separated: {', '.join(CHECKS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=REPO / "runs" / "gpu-checks")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more params overrides")
    args = parser.parse_args(argv)
    checks = args.checks.split(",")
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")
    args.output_dir = args.output_dir.resolve()
    model = model_dir(args.output_dir, args.shape, args.seed)
    # One results file per invocation, rewritten after every check: a second invocation never overwrites the first's,
    # and a command cut off by a time limit keeps the checks it finished.
    results_file = args.output_dir / new_run_name(args.output_dir, f"{args.shape}-results", ".json")
    results = []
    for check in checks:
        results.append(run_check(args, check, model))
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    print(table(args.shape, results))
    print(f"gpu_train: results in {results_file}")
    return max(r["exit"] for r in results)


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: train throughput of the kit's train stage against bare TRL, and the FLOP/s of its train step.

Four sides train the same model with LoRA on the same pairs, with the same batch size, learning rate, max_length
and LoRA settings, alternated --repeat times in this one process (medians printed):

- kit:          the kit's train stage (`train_dpo`, as `dpo-kit run` calls it) in a fresh run directory that
                starts from the prepared pairs, as every trial of a sweep after the first does: the reference
                log-probs come from the on-disk cache (dpo.precompute_ref_log_probs), warmed once beforehand;
- kit bf16:     the same with dpo.bf16=true (bf16 autocast, still no checkpointing): what a params file can ask
                for where the CPU multiplies in bf16 natively (the kit's own CPU choice is fp32);
- TRL defaults: `DPOTrainer` with `DPOConfig` left at its defaults apart from the task (bf16 autocast and
                gradient checkpointing, which TRL turns on everywhere), plus `use_cpu=True` on a machine without a
                GPU, where the bf16 default otherwise refuses to start;
- TRL tuned:    TRL defaults with the settings the kit chooses for this hardware instead (on a CPU: fp32, no
                checkpointing, no pinned memory); the reference forward still runs in every step.

Throughput is steady state: pairs per second over the steps after the first (one timer, the same TrainerCallback
for every side), so model loading, tokenization and the cache read are left out. The FLOP/s of the kit's
step counts matrix-multiply FLOPs from parameters x tokens: 2 per weight and token for the forward, 2 for the
backward through frozen weights (LoRA: input gradients only) or 4 with full fine-tuning, and 2 for a reference
forward where one runs; tokens are the pairs' real (unpadded) tokens. The peak is this machine's fp32 matmul
(torch.mm of two 2048 x 2048 matrices), measured in the same run. A short profile of the kit's step names what
dominates where a target is missed.

    .venv/bin/python bench/train_throughput.py [--params params/smollm2-135m-sentiment.yaml] [--steps 6]
        [--default-steps 3] [--repeat 3] [--data-from RUN_DIR] [--set KEY=VALUE ...]

--data-from takes the pairs of a finished run made with the same data params (e.g. the demo's
runs/smollm2-135m-sentiment-seed0); without it the format stage runs first (minutes: the sentiment pairs are
sampled from the model), outside every timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TARGET_OVER_DEFAULTS = 20.0
TARGET_OVER_TUNED = 1.3
TARGET_PEAK_SHARE = 0.70
BF16 = ("dpo.bf16=true",)  # the kit with bf16 autocast asked for in params (its CPU default is fp32)


class StepTimes:
    """Wall-clock time at the end of every optimizer step of whichever Trainer runs next."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        if not gaps:
            sys.exit("a side trained fewer than 2 steps: raise --steps / --default-steps")
        return statistics.median(gaps)


def step_timer(times: StepTimes):
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            times.ends.clear()

        def on_step_end(self, args, state, control, **kwargs):
            times.ends.append(time.perf_counter())

    return Timer()


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` fp32 torch.mm of two size x size matrices, on this process's threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def linear_weights(model) -> int:
    """Weights that take part in a matmul per token: every nn.Linear, the LM head included (tied or not)."""
    import torch

    return sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))


def real_tokens_per_pair(run_dir: Path, tokenizer, max_length: int | None) -> float:
    """Mean unpadded tokens of a pair's two sequences (prompt + chosen, prompt + rejected) as TRL tokenizes them."""
    from dpo_kit.data.pipeline import load_split
    from dpo_kit.models.sampling import prompt_token_ids

    rows = load_split(run_dir, "train")
    total = 0
    for row in rows:
        prompt = len(prompt_token_ids(tokenizer, row["prompt"]))
        for side in ("chosen", "rejected"):
            text = row[side] if isinstance(row[side], str) else row[side][-1]["content"]
            length = prompt + len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + eos
            total += min(length, max_length or length)
    return total / len(rows)


def prepare_pairs(args, scratch: Path) -> Path:
    """A run directory whose completed format stage holds the pairs: --data-from, or formatted here."""
    from dpo_kit.run.stage import format_stage_differences, open_stage

    if args.data_from:
        from dpo_kit.params import load_params, params_to_dict

        source = Path(args.data_from).resolve()
        differences = format_stage_differences(source, params_to_dict(load_params(args.params, args.set)), REPO)
        if differences:
            sys.exit(f"--data-from {args.data_from}: its pairs cannot stand for these params: {'; '.join(differences)}")
        return source
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer, model_source

    print("formatting the pairs (not timed) ...", flush=True)
    stage = open_stage("format", args.params, [*args.set, f"run.output_dir={scratch}", "run.name=pairs"], str(REPO))
    tokenizer = load_tokenizer(model_source(stage.params, stage.project_dir), stage.params)
    stage.record(data=prepare_data(stage.params, tokenizer, stage.run_dir, stage.project_dir).to_dict())
    stage.complete()
    return stage.run_dir


def kit_side(args, pairs: Path, scratch: Path, name: str, times: StepTimes, extra: tuple[str, ...] = ()) -> float:
    """Seconds per step of the kit's train stage in a new run `name` that starts from `pairs`."""
    from dpo_kit.run.runner import resolve_run
    from dpo_kit.run.stage import adopt_format_stage, open_stage
    from dpo_kit.training.train import train_dpo

    overrides = [*args.set, *args.train_set, *extra, f"run.output_dir={scratch}", f"run.name={name}"]
    resolved = resolve_run(args.params, overrides, REPO)
    run_dir = scratch / name
    adopt_format_stage(run_dir, pairs, resolved["params"], REPO, resolved["hardware"])
    stage = open_stage("train", args.params, overrides, str(REPO), str(run_dir))
    result = train_dpo(stage)
    stage.complete(**result.summary())
    cache = {split: record["status"] for split, record in (result.ref_logps_cache or {}).get("splits", {}).items()}
    SETTINGS["kit bf16" if extra else "kit"] = f"{result.precision}, reference log-probs from the cache: {cache}"
    return times.seconds_per_step()


def trl_side(args, pairs: Path, scratch: Path, tuned: bool, steps: int, times: StepTimes) -> float:
    """Seconds per step of bare TRL on the same pairs: DPOConfig defaults, or with the kit's hardware settings."""
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpo_kit.params import load_params
    from dpo_kit.training.train import build_dpo_config, precision_record

    params = load_params(args.params, [*args.set, *args.train_set])
    source = str(model_dir(params))
    task = {key: params.dpo[key] for key in ("beta", "loss_type", "learning_rate", "lr_scheduler_type",
                                             "per_device_train_batch_size", "max_length") if key in params.dpo}  # fmt: skip
    settings = dict(output_dir=str(scratch / "trl"), max_steps=steps, logging_steps=steps, save_strategy="no",
                    report_to="none", seed=params.run.seed, **task)  # fmt: skip
    import torch

    if not torch.cuda.is_available():
        settings["use_cpu"] = True  # without it TRL's bf16 default refuses to start on a CPU ("doesn't support bf16/gpu")
    if tuned:  # what the kit sets for this hardware, nothing else
        from dpo_kit.hardware import choose_hardware

        kit = build_dpo_config(params, scratch / "kit-config", choose_hardware())
        for key in ("bf16", "fp16", "gradient_checkpointing", "activation_checkpointing", "dataloader_pin_memory",
                    "dataloader_num_workers"):
            if hasattr(kit, key):
                settings[key] = getattr(kit, key)
    model = AutoModelForCausalLM.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    train = load_dataset("json", data_files=str(pairs / "data" / "train.jsonl"), split="train")
    lora = LoraConfig(r=params.lora.r, lora_alpha=params.lora.alpha, lora_dropout=params.lora.dropout,
                      target_modules=params.lora.target_modules, task_type="CAUSAL_LM")  # fmt: skip
    trainer = DPOTrainer(model=model, args=DPOConfig(**settings), train_dataset=train, processing_class=tokenizer,
                         peft_config=lora)  # fmt: skip
    trainer.train()
    SETTINGS["TRL tuned" if tuned else "TRL defaults"] = f"{precision_record(trainer.args)}, reference forward per step"
    return times.seconds_per_step()


SETTINGS: dict[str, str] = {}  # what each side trained with, as the kit's manifest records it


def model_dir(params) -> Path:
    from dpo_kit.models.loading import model_source

    return Path(model_source(params, str(REPO)))


def profile_kit_step(args, pairs: Path, scratch: Path, times: StepTimes, top: int = 6) -> list[tuple[str, float]]:
    """The operators that take the most self CPU time over a short kit run: (name, share of the total)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        kit_side(args, pairs, scratch, "kit-profiled", times)
    events = [e for e in profiler.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [(e.key, e.self_cpu_time_total / total) for e in ranked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params/smollm2-135m-sentiment.yaml")
    parser.add_argument("--steps", type=int, default=6, help="steps of the kit and tuned-TRL sides")
    parser.add_argument("--default-steps", type=int, default=3, help="steps of the TRL-defaults side (slow on a CPU)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--data-from", help="a finished run whose pairs (same data params) are trained on")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import torch
    import transformers

    from dpo_kit.models.loading import load_tokenizer
    from dpo_kit.params import load_params

    times = StepTimes()
    transformers.trainer.DEFAULT_CALLBACKS.append(step_timer(times))  # every Trainer below gets the timer
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch_name:
        scratch = Path(scratch_name)
        os.environ["DPO_KIT_CACHE"] = os.environ.get("DPO_KIT_CACHE") or str(Path.home() / ".cache" / "dpo-kit")
        # The reference log-prob cache of these pairs goes to a fresh directory, warmed by one untimed kit run.
        gguf = Path(os.environ["DPO_KIT_CACHE"]) / "gguf"
        cache = scratch / "cache"
        cache.mkdir()
        if gguf.is_dir():
            (cache / "gguf").symlink_to(gguf)  # converted GGUF models: set-up, shared
        os.environ["DPO_KIT_CACHE"] = str(cache)
        pairs = prepare_pairs(args, scratch)
        args.train_set = [f"dpo.max_steps={args.steps}", f"dpo.logging_steps={args.steps}",
                          f"dpo.save_steps={args.steps}", "dpo.precompute_ref_log_probs=true"]  # fmt: skip
        params = load_params(args.params, [*args.set, *args.train_set])
        batch = params.dpo.get("per_device_train_batch_size", 8)

        print("warming the reference log-prob cache (not timed) ...", flush=True)
        started = time.perf_counter()
        kit_side(args, pairs, scratch, "kit-warm-up", times)
        cold = time.perf_counter() - started
        kit_side(args, pairs, scratch, "kit-bf16-warm-up", times, BF16)  # bf16 autocast: another cache key

        sides: dict[str, list[float]] = {"kit": [], "kit bf16": [], "TRL tuned": [], "TRL defaults": []}
        for repeat in range(args.repeat):
            sides["kit"].append(kit_side(args, pairs, scratch, f"kit-{repeat}", times))
            sides["kit bf16"].append(kit_side(args, pairs, scratch, f"kit-bf16-{repeat}", times, BF16))
            sides["TRL tuned"].append(trl_side(args, pairs, scratch, True, args.steps, times))
            sides["TRL defaults"].append(trl_side(args, pairs, scratch, False, args.default_steps, times))
            print(f"repeat {repeat + 1}: " + ", ".join(f"{name} {values[-1]:.2f} s/step" for name, values in sides.items()),
                  flush=True)  # fmt: skip
        per_step = {name: statistics.median(values) for name, values in sides.items()}

        from transformers import AutoModelForCausalLM

        weights = linear_weights(AutoModelForCausalLM.from_pretrained(str(model_dir(params))))
        tokens = real_tokens_per_pair(pairs, load_tokenizer(str(model_dir(params)), params),
                                      params.dpo.get("max_length", 1024))  # fmt: skip
        backward = 2 if params.lora.enabled else 4
        kit_flops = batch * tokens * weights * (2 + backward)  # the cache stands in for the reference forward
        peak = matmul_peak()
        achieved = kit_flops / per_step["kit"]
        hotspots = profile_kit_step(args, pairs, scratch, times)

    pairs_per_second = {name: batch / seconds for name, seconds in per_step.items()}
    over_defaults = per_step["TRL defaults"] / per_step["kit"]
    over_tuned = per_step["TRL tuned"] / per_step["kit"]
    share = achieved / peak
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"\n{args.params} {' '.join(args.set)}, LoRA r={params.lora.r}, batch {batch}, torch threads"
          f" {torch.get_num_threads()}, median of {args.repeat}, steady-state steps (the first left out):")  # fmt: skip
    for name in sides:
        print(f"  {name:13s} {per_step[name]:7.2f} s/step  {pairs_per_second[name]:6.2f} pairs/s   ({SETTINGS.get(name)})")
    print(f"  (the kit's first run, which computed and cached the reference log-probs: {cold:.1f} s in all)")
    print(f"kit over TRL defaults: {over_defaults:5.1f}x  target >= {TARGET_OVER_DEFAULTS:g}x:"
          f" {met(over_defaults >= TARGET_OVER_DEFAULTS)}")
    print(f"kit over TRL tuned:    {over_tuned:5.2f}x  target >= {TARGET_OVER_TUNED:g}x: {met(over_tuned >= TARGET_OVER_TUNED)}")
    bf16_gain = per_step["kit"] / per_step["kit bf16"]
    print(f"the kit with dpo.bf16=true: {bf16_gain:.2f}x its own CPU default (fp32), "
          f"{per_step['TRL defaults'] / per_step['kit bf16']:.2f}x TRL defaults")  # fmt: skip
    if over_defaults < TARGET_OVER_DEFAULTS and bf16_gain > 1:
        print("  TRL's defaults are not slow here: this CPU multiplies in bf16 natively (avx512_bf16/AMX) and, at"
              " this model size, bf16 autocast outweighs recomputing activations; the kit's CPU choice (fp32, from"
              " a model too small for bf16 to pay) costs the difference")  # fmt: skip
    print(f"FLOP/s of the kit's step: {achieved / 1e9:.1f} GFLOP/s ({weights / 1e6:.1f}M matmul weights x {tokens:.0f}"
          f" real tokens per pair x {2 + backward}) against an fp32 matmul peak of {peak / 1e9:.1f} GFLOP/s:"
          f" {share:.0%}  target >= {TARGET_PEAK_SHARE:.0%}: {met(share >= TARGET_PEAK_SHARE)}")  # fmt: skip
    print("what dominates the kit's step (self CPU time of a short profiled run):")
    for name, part in hotspots:
        print(f"  {part:6.1%}  {name}")


if __name__ == "__main__":
    main()

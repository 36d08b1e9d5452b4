"""Held-out implicit-reward accuracy of the sentiment recipe against the number of distinct training pairs.

    .venv/bin/python bench/sentiment_more_pairs.py [--times 1 2 3] [--report-only]

Needs the three seed runs of bench/sentiment_seeds.py. Each of them sampled 4 continuations of all 384
bundled prompts from the same reference model, so for seed 0's training prompts they hold three independent
best-of-4 / worst-of-4 pairs. `--times N` trains on the pairs of the first N seeds for seed 0's training prompts
(seed 0's own pairs first: N = 1 is the recipe's data), one epoch, with seed 0's params, the kit's trainer
and TRL's evaluation of seed 0's held-out pairs every 11 steps. Seed 0's held-out prompts are never trained
on: a pair of seeds 1 and 2 is taken only for a prompt that seed 0 trained on. It answers whether more
distinct pairs than the CPU demo can sample would reach an accuracy of 0.9 (README, "Not reached").
Each N writes runs/sentiment-more-pairs/<N>x/ and is skipped when its result exists. About 6, 11 and
15 minutes for N = 1, 2, 3 on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpo_kit.evaluation.generate import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SEED_RUNS = [REPO / "runs" / f"smollm2-135m-sentiment-seed{seed}" for seed in (0, 1, 2)]
OUT = REPO / "runs" / "sentiment-more-pairs"
EVAL_EVERY = 11


def prompt_key(messages: list[dict]) -> str:
    return json.dumps([m["content"] for m in messages])


def training_pairs(times: int, min_score_gap: float) -> list[dict]:
    """Seed 0's training pairs, then those of seeds 1.. for the same prompts, in TRL's standard format."""
    from dpo_kit.data.drops import DropRow
    from dpo_kit.data.on_policy import ranked_pair

    convert = ranked_pair(min_score_gap)
    seed0 = SEED_RUNS[0] / "data"
    # samples.jsonl holds the prompt as messages, train.jsonl the same prompt rendered by the chat template:
    # a sample row is a training prompt of seed 0 when its best/worst pair is one of train.jsonl's pairs.
    rendered = {(row["chosen"], row["rejected"]): row["prompt"] for row in read_jsonl(seed0 / "train.jsonl")}
    held_out = {(row["chosen"], row["rejected"]) for row in read_jsonl(seed0 / "eval.jsonl")}
    train_prompts: dict[str, str] = {}
    for row in read_jsonl(seed0 / "samples.jsonl"):
        try:
            pair = convert(row)
        except DropRow:
            continue  # dropped by seed 0, so in neither of its splits: not used
        texts = (pair["chosen"][0]["content"], pair["rejected"][0]["content"])
        if texts in rendered:
            train_prompts[prompt_key(pair["prompt"])] = rendered[texts]
        elif texts not in held_out:
            raise RuntimeError(f"{seed0}: a pair in neither train.jsonl nor eval.jsonl: {texts}")
    pairs = read_jsonl(seed0 / "train.jsonl")  # the recipe's own pairs, in its order
    for run in SEED_RUNS[1:times]:
        for row in read_jsonl(run / "data" / "samples.jsonl"):
            prompt = train_prompts.get(prompt_key(row["prompt"]))
            if prompt is None:
                continue  # seed 0 held this prompt out, or dropped it
            try:
                pair = convert(row)
            except DropRow:
                continue
            pairs.append({"prompt": prompt, "chosen": pair["chosen"][0]["content"],
                          "rejected": pair["rejected"][0]["content"]})  # fmt: skip
    return pairs


def train(times: int) -> dict:
    from datasets import Dataset

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.params import load_params
    from dpo_kit.training.train import build_dpo_config, build_trainer

    params = load_params(SEED_RUNS[0] / "params.yaml")
    pairs = training_pairs(times, params.data.generate.min_score_gap)
    held_out = read_jsonl(SEED_RUNS[0] / "data" / "eval.jsonl")
    run_dir = OUT / f"{times}x"
    hardware = choose_hardware()
    config = build_dpo_config(params, run_dir, hardware)
    config.max_steps = -(-len(pairs) // config.per_device_train_batch_size)  # one epoch
    config.eval_strategy, config.eval_steps, config.per_device_eval_batch_size = "steps", EVAL_EVERY, 16
    config.save_strategy = "no"
    source = model_source(params, REPO)
    trainer = build_trainer(params, source, hardware, config, load_tokenizer(source, params),
                            Dataset.from_list(pairs), Dataset.from_list(held_out))  # fmt: skip
    output = trainer.train()
    history = trainer.state.log_history
    accuracies = {row["step"]: row["eval_rewards/accuracies"] for row in history if "eval_rewards/accuracies" in row}
    if config.max_steps not in accuracies:
        accuracies[config.max_steps] = trainer.evaluate()["eval_rewards/accuracies"]
    result = {"times": times, "pairs": len(pairs), "held_out_pairs": len(held_out), "steps": config.max_steps,
              "accuracy_by_step": accuracies, "train_runtime_s": output.metrics["train_runtime"]}  # fmt: skip
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def table(results: list[dict]) -> str:
    lines = ["| distinct pairs | steps (one epoch) | held-out accuracy at steps 11, 22, … and the last | after the epoch | best |",
             "|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        curve = {int(step): value for step, value in result["accuracy_by_step"].items()}
        lines.append(
            f"| {result['pairs']} ({result['times']}x) | {result['steps']} | "
            + ", ".join(f"{curve[step]:.2f}" for step in sorted(curve))
            + f" | {curve[max(curve)]:.2f} | {max(curve.values()):.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--report-only", action="store_true", help="print the table of finished results only")
    args = parser.parse_args()
    missing = [str(run) for run in SEED_RUNS[: max(args.times)] if not (run / "data" / "samples.jsonl").is_file()]
    if missing:
        print(f"missing seed runs {', '.join(missing)}: run bench/sentiment_seeds.py first", file=sys.stderr)
        return 2
    results = []
    for times in args.times:
        done = OUT / f"{times}x" / "result.json"
        if done.is_file():
            results.append(json.loads(done.read_text()))
        elif not args.report_only:
            if (OUT / f"{times}x").exists():  # a half-finished earlier attempt is kept, never overwritten
                print(f"{OUT / f'{times}x'} holds an unfinished attempt: move it aside to run {times}x again", file=sys.stderr)
                return 2
            (OUT / f"{times}x").mkdir(parents=True)
            results.append(train(times))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

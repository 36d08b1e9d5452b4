"""Held-out implicit-reward accuracy of the sentiment recipe against the number of distinct training pairs.

    .venv/bin/python bench/sentiment_more_pairs.py [--times 1 2 3] [--pool 2 3] [--all-pairs] [--report-only]

Needs the three seed runs of bench/sentiment_seeds.py, or only their format stage (`dpo-kit run
params/smollm2-135m-sentiment.yaml --stages format --set run.seed=N --set run.name=smollm2-135m-sentiment-seedN`,
about 4 minutes each: the same seed samples the same continuations). Each of them sampled 4 continuations of all 384
bundled prompts from the same reference model, so for seed 0's training prompts they hold three independent
best-of-4 / worst-of-4 pairs. `--times N` trains on the pairs of the first N seeds for seed 0's training prompts
(seed 0's own pairs first: N = 1 is the recipe's data), one epoch, with seed 0's params, the kit's trainer
and TRL's evaluation of seed 0's held-out pairs every 11 steps. Seed 0's held-out prompts are never trained
on: a pair of seeds 1 and 2 is taken only for a prompt that seed 0 trained on. It answers whether more
distinct pairs than the CPU demo can sample would reach an accuracy of 0.9 (docs/implicit-reward-accuracy.md).
Each N writes runs/sentiment-more-pairs/<N>x/ and is skipped when its result exists. About 6, 11 and
15 minutes for N = 1, 2, 3 on 2 CPU cores.

`--pool N` asks instead whether sharper pairs would: it pools the 4N samples that the first N seeds drew for
each of seed 0's training prompts and pairs the best of them with the worst (best-of-8 for N = 2, best-of-12
for N = 3), so the number of pairs stays the recipe's and their score gaps grow. The trained model is evaluated
on seed 0's held-out pairs, the test every other row uses, and, as a second evaluation set, on best-of-4N pairs
of the same held-out prompts. Writes runs/sentiment-more-pairs/best-of-<4N>/; about 6 minutes each.

`--all-pairs` asks whether the finer distinctions would: every two of seed 0's 4 samples of a training prompt whose
scores differ by at least min_score_gap make a pair (up to 6 per prompt, the recipe's best/worst pair among them),
evaluated on seed 0's held-out pairs. Writes runs/sentiment-more-pairs/all-pairs/; about 18 minutes.

`--round-two RUN` asks whether iterative DPO would: RUN is a round-2 run of the recipe, whose pairs were sampled
from seed 0's round-1 policy (`dpo-kit run params/smollm2-135m-sentiment.yaml --set
data.generate.sampler=<seed 0's full run>/merged`), so it held out seed 0's held-out prompts. It trains one epoch on
RUN's training pairs alone (`round-2`: what RUN's own train stage trains on) and on seed 0's pairs followed by
RUN's (`rounds-1+2`: the expanded dataset that a retrain of round 2 uses), each evaluated on seed 0's held-out
pairs and on RUN's own held-out pairs. About 6 and 11 minutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

from dpo_kit.data.drops import DropRow
from dpo_kit.data.on_policy import ranked_pair
from dpo_kit.evaluation.generate import read_jsonl

REPO = Path(__file__).resolve().parent.parent
SEED_RUNS = [REPO / "runs" / f"smollm2-135m-sentiment-seed{seed}" for seed in (0, 1, 2)]
OUT = REPO / "runs" / "sentiment-more-pairs"
EVAL_EVERY = 11


def prompt_key(messages: list[dict]) -> str:
    return json.dumps([m["content"] for m in messages])


def seed0_prompts(convert) -> tuple[dict[str, str], dict[str, str]]:
    """Seed 0's training and held-out prompts: prompt key (the messages' texts) -> the prompt as rendered.
    `convert` is the format stage's ranking of a sample row into a pair (dpo_kit.data.on_policy.ranked_pair)."""
    seed0 = SEED_RUNS[0] / "data"
    # samples.jsonl holds the prompt as messages, train/eval.jsonl the same prompt rendered by the chat template:
    # a sample row belongs to the split whose file holds its best/worst pair.
    splits = {name: {(row["chosen"], row["rejected"]): row["prompt"] for row in read_jsonl(seed0 / f"{name}.jsonl")}
              for name in ("train", "eval")}  # fmt: skip
    prompts: dict[str, dict[str, str]] = {"train": {}, "eval": {}}
    for row in read_jsonl(seed0 / "samples.jsonl"):
        try:
            pair = convert(row)
        except DropRow:
            continue  # dropped by seed 0, so in neither of its splits: not used
        texts = (pair["chosen"][0]["content"], pair["rejected"][0]["content"])
        found = [name for name, split in splits.items() if texts in split]
        if not found:
            raise RuntimeError(f"{seed0}: a pair in neither train.jsonl nor eval.jsonl: {texts}")
        prompts[found[0]][prompt_key(pair["prompt"])] = splits[found[0]][texts]
    return prompts["train"], prompts["eval"]


def as_pair(prompt: str, row: dict, convert) -> dict:
    """`row` (prompt messages, samples, scores) ranked by `convert` into a TRL pair on the rendered `prompt`."""
    pair = convert(row)
    return {"prompt": prompt, "chosen": pair["chosen"][0]["content"], "rejected": pair["rejected"][0]["content"]}


def training_pairs(times: int, train_prompts: dict[str, str], convert) -> list[dict]:
    """Seed 0's training pairs, then those of seeds 1.. for the same prompts (`train_prompts`, from seed0_prompts),
    in TRL's standard format."""
    pairs = read_jsonl(SEED_RUNS[0] / "data" / "train.jsonl")  # the recipe's own pairs, in its order
    for run in SEED_RUNS[1:times]:
        for row in read_jsonl(run / "data" / "samples.jsonl"):
            prompt = train_prompts.get(prompt_key(row["prompt"]))
            if prompt is None:
                continue  # seed 0 held this prompt out, or dropped it
            try:
                pairs.append(as_pair(prompt, row, convert))
            except DropRow:
                continue
    return pairs


def pooled_pairs(pool: int, prompts: dict[str, str], convert) -> list[dict]:
    """One pair per prompt of `prompts`: the best and the worst of the 4 x `pool` samples that the first `pool`
    seeds drew for it. A prompt whose pooled score gap is still below the min_score_gap of `convert` is left out."""
    pooled: dict[str, dict] = {}
    for run in SEED_RUNS[:pool]:
        for row in read_jsonl(run / "data" / "samples.jsonl"):
            key = prompt_key(row["prompt"])
            if key in prompts:
                entry = pooled.setdefault(key, {"prompt": row["prompt"], "samples": [], "scores": []})
                entry["samples"] += row["samples"]
                entry["scores"] += row["scores"]
    pairs = []
    for key in prompts:  # seed 0's order
        try:
            pairs.append(as_pair(prompts[key], pooled[key], convert))
        except DropRow:
            continue
    return pairs


def all_pairs(prompts: dict[str, str], min_score_gap: float) -> list[dict]:
    """Every two of seed 0's 4 samples of each prompt of `prompts` whose scores differ by at least `min_score_gap`,
    the higher-scored one chosen: up to 6 pairs per prompt, the recipe's best/worst pair among them, in seed 0's
    prompt order. Ties in score make no pair."""
    rows = {prompt_key(row["prompt"]): row for row in read_jsonl(SEED_RUNS[0] / "data" / "samples.jsonl")}
    pairs = []
    for key, prompt in prompts.items():
        samples, scores = rows[key]["samples"], rows[key]["scores"]
        for i, j in itertools.combinations(range(len(samples)), 2):
            if abs(scores[i] - scores[j]) >= min_score_gap:
                high, low = (i, j) if scores[i] > scores[j] else (j, i)
                pairs.append({"prompt": prompt, "chosen": samples[high], "rejected": samples[low]})
    return pairs


def round_two_pairs(run: Path, eval_prompts: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """The training and held-out pairs of the round-2 run `run`. None of its training prompts may be one of seed 0's
    held-out prompts (`eval_prompts`): the format stage holds out the prompts of the sampler's run."""
    train_pairs, held_out = read_jsonl(run / "data" / "train.jsonl"), read_jsonl(run / "data" / "eval.jsonl")
    leaked = {row["prompt"] for row in train_pairs} & set(eval_prompts.values())
    if leaked:
        raise SystemExit(f"{run} trains on {len(leaked)} of seed 0's held-out prompts: is it a round 2 of seed 0?")
    return train_pairs, held_out


def train(name: str, pairs: list[dict], eval_sets: dict[str, list[dict]], params, out: Path = OUT, **recorded) -> dict:
    """One epoch on `pairs` with seed 0's params (or `params`) and the kit's trainer, into `out`/`name`; TRL evaluates
    every set of `eval_sets` every EVAL_EVERY steps and after the last. Returns {set: {step: eval_rewards/accuracies}}
    and the counts."""
    from datasets import Dataset

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.training.train import build_dpo_config, build_trainer

    run_dir = out / name
    hardware = choose_hardware()
    config = build_dpo_config(params, run_dir, hardware)
    config.max_steps = -(-len(pairs) // config.per_device_train_batch_size)  # one epoch
    config.eval_strategy, config.eval_steps, config.per_device_eval_batch_size = "steps", EVAL_EVERY, 16
    config.save_strategy = "no"
    source = model_source(params, REPO)
    datasets = {key: Dataset.from_list(rows) for key, rows in eval_sets.items()}
    several = len(datasets) > 1
    trainer = build_trainer(params, source, hardware, config, load_tokenizer(source, params), Dataset.from_list(pairs),
                            datasets if several else datasets["recipe"])  # fmt: skip
    output = trainer.train()
    # TRL logs its DPO metrics as eval_rewards/accuracies for every set; the Trainer's own loss says which set
    # the row is of: eval_<set>_loss with several sets, eval_loss with one.
    prefix = {key: f"eval_{key}" if several else "eval" for key in datasets}
    for key in datasets:
        if not any(
            f"{prefix[key]}_loss" in row and row["step"] == config.max_steps for row in trainer.state.log_history
        ):
            trainer.evaluate(datasets[key], metric_key_prefix=prefix[key])  # the last step was no eval step
    history = trainer.state.log_history
    accuracies = {key: {row["step"]: row["eval_rewards/accuracies"] for row in history if f"{prefix[key]}_loss" in row}
                  for key in datasets}  # fmt: skip
    result = {"name": name, "pairs": len(pairs), "steps": config.max_steps,
              "eval_pairs": {key: len(rows) for key, rows in eval_sets.items()},
              "accuracy_by_step": accuracies, "train_runtime_s": output.metrics["train_runtime"], **recorded}  # fmt: skip
    (run_dir / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    (run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def curve_cells(curve: dict) -> tuple[str, str, str]:
    """The curve at every evaluation, after the epoch (the last one), and its best, as table cells."""
    curve = {int(step): value for step, value in curve.items()}
    return (
        ", ".join(f"{curve[step]:.2f}" for step in sorted(curve)),
        f"{curve[max(curve)]:.2f}",
        f"{max(curve.values()):.2f}",
    )


def times_table(results: list[dict]) -> str:
    lines = ["| distinct pairs | steps (one epoch) | held-out accuracy at steps 11, 22, … and the last | after the epoch | best |",
             "|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        curve, last, best = curve_cells(result["accuracy_by_step"]["recipe"])
        lines.append(f"| {result['pairs']} ({result['name']}) | {result['steps']} | {curve} | {last} | {best} |")
    return "\n".join(lines)


def two_set_table(results: list[dict], first: str, second: str, second_header: str) -> str:
    """Each result's curve on seed 0's held-out pairs (`first` names them in the first column's header) and its
    accuracy after the epoch on a second evaluation set, the one `train` evaluated as `second`."""
    lines = [f"| training pairs | steps (one epoch) | {first}: at steps 11, 22, … and the last | after the epoch "
             f"| {second_header}: after the epoch |", "|---|---|---|---|---|"]  # fmt: skip
    for result in results:
        curve, last, _ = curve_cells(result["accuracy_by_step"]["recipe"])
        _, second_last, _ = curve_cells(result["accuracy_by_step"][second])
        lines.append(f"| {result['pairs']} ({result['name']}) | {result['steps']} | {curve} | {last} | "
                     f"{second_last} on {result['eval_pairs'][second]} |")  # fmt: skip
    return "\n".join(lines)


def existing_result(name: str, out: Path = OUT) -> dict | None:
    """The result in `out`/<name>/ (runs/sentiment-more-pairs/), or None where that run is still to make. A
    half-finished earlier attempt is kept, never overwritten."""
    if (out / name / "result.json").is_file():
        return json.loads((out / name / "result.json").read_text())
    if (out / name).exists():
        raise SystemExit(f"{out / name} holds an unfinished attempt: move it aside to run it again")
    return None


def main() -> int:
    from dpo_kit.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, nargs="+", default=[], choices=[1, 2, 3],
                        help="train on the pairs of the first N seeds (default, with no --pool: 1 2 3)")  # fmt: skip
    parser.add_argument("--pool", type=int, nargs="+", default=[], choices=[2, 3],
                        help="pool the samples of the first N seeds per prompt into one best-of-4N pair")  # fmt: skip
    parser.add_argument("--all-pairs", action="store_true",
                        help="train on every two of seed 0's 4 samples per prompt whose score gap is at least min_score_gap")  # fmt: skip
    parser.add_argument("--round-two", type=Path, metavar="RUN",
                        help="a round-2 run of seed 0 (sampled from its policy): train on its pairs, alone and after seed 0's")  # fmt: skip
    parser.add_argument("--report-only", action="store_true", help="print the table of finished results only")
    args = parser.parse_args()
    if not args.times and not args.pool and not args.all_pairs and not args.round_two:
        args.times = [1, 2, 3]
    needed = SEED_RUNS[: max(args.times + args.pool + [1] * (args.all_pairs or bool(args.round_two)), default=0)]
    missing = [str(run) for run in needed if not (run / "data" / "samples.jsonl").is_file()]
    if missing:
        print(f"missing seed runs {', '.join(missing)}: run bench/sentiment_seeds.py first", file=sys.stderr)
        return 2
    params = load_params(SEED_RUNS[0] / "params.yaml")
    convert = ranked_pair(params.data.generate.min_score_gap)
    held_out = read_jsonl(SEED_RUNS[0] / "data" / "eval.jsonl")
    train_prompts, eval_prompts = seed0_prompts(convert)
    results: dict[str, list[dict]] = {"times": [], "pool": []}
    for times in args.times:
        result = existing_result(f"{times}x")
        if result is None and not args.report_only:
            (OUT / f"{times}x").mkdir(parents=True)
            result = train(f"{times}x", training_pairs(times, train_prompts, convert), {"recipe": held_out}, params)
        results["times"] += [result] if result else []
    for pool in args.pool:
        name = f"best-of-{4 * pool}"
        result = existing_result(name)
        if result is None and not args.report_only:
            (OUT / name).mkdir(parents=True)
            eval_sets = {"recipe": held_out, "pooled": pooled_pairs(pool, eval_prompts, convert)}
            result = train(name, pooled_pairs(pool, train_prompts, convert), eval_sets, params)
        results["pool"] += [result] if result else []
    if args.all_pairs:
        result = existing_result("all-pairs")
        if result is None and not args.report_only:
            (OUT / "all-pairs").mkdir(parents=True)
            pairs = all_pairs(train_prompts, params.data.generate.min_score_gap)
            result = train("all-pairs", pairs, {"recipe": held_out}, params)
        print(times_table([row for row in (existing_result("1x"), result) if row]))  # beside the recipe's own pairs
    if args.round_two:
        round_two, round_two_held_out = round_two_pairs(args.round_two, eval_prompts)
        source = str(args.round_two.resolve())
        rows = []
        for name, pairs in (("round-2", round_two), ("rounds-1+2", training_pairs(1, train_prompts, convert) + round_two)):
            result = existing_result(name)
            if result is None and not args.report_only:
                (OUT / name).mkdir(parents=True)
                result = train(name, pairs, {"recipe": held_out, "round2": round_two_held_out}, params,
                               round_two_run=source)  # fmt: skip
            if result and result.get("round_two_run") != source:
                raise SystemExit(f"{OUT / name} was trained on the pairs of {result.get('round_two_run')}, not {source}:"
                                 " move it aside to run it again")  # fmt: skip
            rows += [result] if result else []
        print(two_set_table(rows, "seed 0's held-out pairs", "round2", "round 2's held-out pairs"))
    if args.times:
        print(times_table(results["times"]))
    if args.pool:
        print(two_set_table(results["pool"], "seed 0's held-out pairs (best/worst of 4)", "pooled",
                            "held-out pairs, best/worst of the same pool"))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

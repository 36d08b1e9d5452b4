"""Does the end-of-sequence token that TRL appends after a continuation cut at max_new_tokens cap the held-out
implicit-reward accuracy of the sentiment recipe?

    .venv/bin/python bench/sentiment_cut_eos.py [RUN_DIR]

RUN_DIR is a run of params/smollm2-135m-sentiment.yaml whose format stage has run (default:
runs/smollm2-135m-sentiment, what `bash scripts/demo.sh` writes). Its pairs are written in TRL's standard format,
and TRL 1.x appends the eos token to every standard-format response. The recipe's samples are cut at
data.generate.max_new_tokens (16) before the model ends them, so nearly every pair's two responses end in an eos
that the model never produced, at a position where the reference gives it little probability: a cheap place for
DPO to put margin, and a term in every implicit reward. This script trains the recipe's one epoch on RUN_DIR's
pairs once more with the kit's trainer, but with that eos taken off each response that was cut (the rest of the
sequence as TRL builds it), and TRL evaluates the held-out pairs both ways after 17 and 34 steps: as TRL
tokenizes them, and without the eos after a cut response.

A response counts as cut where data/samples.jsonl says so (`cut`, recorded by the format stage since it existed);
for a run sampled before that, when it holds at least max_new_tokens - 1 tokens in its pair (the decoded text can
merge one token at the boundary when tokenized again; the counts are printed). Writes
runs/sentiment-cut-eos/<RUN_DIR's name>/result.json, and refuses to overwrite an earlier result. About 5
minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from dpo_kit.evaluation.generate import read_jsonl

REPO = Path(__file__).resolve().parent.parent
EVAL_EVERY = 17


def recorded_cut(samples: list[dict]) -> dict[str, bool] | None:
    """Sample text -> whether max_new_tokens cut it, from samples.jsonl; None where the run did not record it. A text
    sampled for several prompts with different flags is left out (its length decides, as for an older run)."""
    if not any("cut" in row for row in samples):
        return None
    flags: dict[str, set[bool]] = {}
    for row in samples:
        for text, cut in zip(row.get("samples", []), row.get("cut", []), strict=True):
            flags.setdefault(text, set()).add(cut)
    return {text: found.pop() for text, found in flags.items() if len(found) == 1}


def mark_cut(rows: list[dict], tokenizer, max_new_tokens: int, recorded: dict[str, bool] | None):
    """`rows` with chosen_cut / rejected_cut flags (`recorded` where it has the text, else by length), and the counts
    of response lengths (tokens in the pair)."""
    lengths: Counter = Counter()
    marked = []
    for row in rows:
        prompt_length = len(tokenizer(row["prompt"])["input_ids"])
        flags = {}
        for side in ("chosen", "rejected"):
            length = len(tokenizer(row["prompt"] + row[side])["input_ids"]) - prompt_length
            lengths[length] += 1
            by_length = length >= max_new_tokens - 1
            flags[f"{side}_cut"] = recorded.get(row[side], by_length) if recorded is not None else by_length
        marked.append({**row, **flags})
    return marked, lengths


def without_cut_eos_trainer(eos_id: int) -> type:
    """The kit's trainer, taking the appended eos off every response a row flags as cut (`<side>_cut`), after TRL
    has tokenized the dataset and before the reference log-probs are computed. Rows without flags are TRL's."""
    from dpo_kit.training.train import kit_trainer_class

    class WithoutCutEos(kit_trainer_class()):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if "chosen_cut" not in dataset.column_names:
                return dataset

            def drop_eos(row):
                for side in ("chosen", "rejected"):
                    if row[f"{side}_cut"] and row[f"{side}_ids"][-1:] == [eos_id]:
                        row[f"{side}_ids"] = row[f"{side}_ids"][:-1]
                return row

            return dataset.map(drop_eos)

    return WithoutCutEos


def main() -> int:
    from datasets import Dataset

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.params import load_params
    from dpo_kit.training.train import build_dpo_config, build_trainer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=REPO / "runs" / "smollm2-135m-sentiment")
    args = parser.parse_args()
    data = args.run_dir / "data"
    if not (data / "train.jsonl").is_file() or not (data / "eval.jsonl").is_file():
        print(f"{data} has no train.jsonl and eval.jsonl: run the sentiment recipe's format stage first", file=sys.stderr)
        return 2
    out = REPO / "runs" / "sentiment-cut-eos" / args.run_dir.resolve().name
    if out.exists():
        print(f"{out} holds an earlier result: move it aside to run again", file=sys.stderr)
        return 2
    params = load_params(args.run_dir / "params.yaml")
    source = model_source(params, REPO)
    tokenizer = load_tokenizer(source, params)
    max_new_tokens = params.data.generate.max_new_tokens
    recorded = recorded_cut(read_jsonl(data / "samples.jsonl"))
    train_rows, train_lengths = mark_cut(read_jsonl(data / "train.jsonl"), tokenizer, max_new_tokens, recorded)
    eval_rows, eval_lengths = mark_cut(read_jsonl(data / "eval.jsonl"), tokenizer, max_new_tokens, recorded)
    unmarked = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in eval_rows]

    hardware = choose_hardware()
    out.mkdir(parents=True)
    config = build_dpo_config(params, out, hardware)
    config.eval_strategy, config.eval_steps, config.per_device_eval_batch_size = "steps", EVAL_EVERY, 16
    config.save_strategy = "no"
    eval_sets = {"trl": Dataset.from_list(unmarked), "without_cut_eos": Dataset.from_list(eval_rows)}
    trainer = build_trainer(params, source, hardware, config, tokenizer, Dataset.from_list(train_rows), eval_sets,
                            trainer_class=without_cut_eos_trainer(tokenizer.eos_token_id))  # fmt: skip
    trainer.train()
    history = trainer.state.log_history
    curves = {name: {row["step"]: {"accuracy": row["eval_rewards/accuracies"], "margin": row["eval_rewards/margins"]}
                     for row in history if f"eval_{name}_loss" in row} for name in eval_sets}  # fmt: skip
    result = {
        "run": str(args.run_dir.resolve()),
        "pairs": {"train": len(train_rows), "eval": len(eval_rows)},
        "cut_responses": {"train": sum(r["chosen_cut"] + r["rejected_cut"] for r in train_rows),
                          "eval": sum(r["chosen_cut"] + r["rejected_cut"] for r in eval_rows)},  # fmt: skip
        "cut_from": "data/samples.jsonl" if recorded is not None else f"length >= {max_new_tokens - 1} tokens",
        "response_tokens": {"train": dict(sorted(train_lengths.items())), "eval": dict(sorted(eval_lengths.items()))},
        "held_out": curves,
    }
    (out / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"responses cut at {max_new_tokens} tokens ({result['cut_from']}): {result['cut_responses']['train']} of"
          f" {2 * len(train_rows)}"
          f" (training), {result['cut_responses']['eval']} of {2 * len(eval_rows)} (held out);"
          f" tokens per response: {result['response_tokens']}")  # fmt: skip
    print("| held-out pairs tokenized | " + " | ".join(f"after {step} steps" for step in curves["trl"]) + " |")
    for name, label in (("trl", "as TRL does (eos after every response)"), ("without_cut_eos", "without the eos after a cut response")):
        cells = " | ".join(f"{point['accuracy']:.2f} (margins {point['margin']:.2f})" for point in curves[name].values())
        print(f"| {label} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

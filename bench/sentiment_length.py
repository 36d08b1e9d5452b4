"""Short responses ranked by sentiment, not by the judge's length floor: is response length a lever of its own?

    .venv/bin/python bench/sentiment_length.py RUN [RUN ...] [--min-words 3]

RUN is the format stage of the recipe at 8 tokens (`dpo-kit run params/smollm2-135m-sentiment.yaml --stages format
--set data.generate.max_new_tokens=8 --set generate.max_new_tokens=8 --set run.name=x-tok8`, about 2 minutes; add
`--set run.seed=N` for another seed). At 8 tokens the sentiment judge's floor (a response of fewer than 8 words
scores -1) decides nearly every pair: the chosen has 8 words, the rejected fewer, and the held-out accuracy passes
0.9 on that alone (README, "Shorter responses"). This re-scores RUN's own samples with the floor lowered to
`--min-words` words (3: an empty or one- or two-word answer still scores -1), ranks them into best/worst pairs
with the recipe's min_score_gap, splits them with RUN's seed and eval_fraction as the format stage does, and
trains one epoch with RUN's params and the kit's trainer; TRL evaluates the held-out pairs every 11 steps.
Writes runs/sentiment-length/<RUN name>-min<N>/ (skipped when its result exists); about 4 minutes each.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sentiment_more_pairs import existing_result, train  # noqa: E402  (a bench beside this one)

from dpo_kit.chat_templates import render_prompt  # noqa: E402
from dpo_kit.data.drops import DropRow  # noqa: E402
from dpo_kit.data.on_policy import ranked_pair  # noqa: E402
from dpo_kit.data.pipeline import split_rows  # noqa: E402
from dpo_kit.evaluation.generate import read_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "runs" / "sentiment-length"


def rescored_pairs(run: Path, params, min_words: int, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """RUN's samples (made with `params`) re-scored with the floor at `min_words`, ranked, rendered and split as its
    format stage does."""
    from dpo_kit.judges import SentimentJudge

    judge, floor = SentimentJudge(min_words=min_words), SentimentJudge()
    convert = ranked_pair(params.data.generate.min_score_gap)
    rendered = {row["prompt"] for split in ("train", "eval") for row in read_jsonl(run / "data" / f"{split}.jsonl")}
    kept, counts = [], {"dropped": 0, "floor_of_8_would_decide": 0}
    for index, row in enumerate(read_jsonl(run / "data" / "samples.jsonl")):
        rescored = {**row, "scores": [judge.score_one(text) for text in row["samples"]]}
        try:
            pair = convert(rescored)
        except DropRow:
            counts["dropped"] += 1
            continue
        prompt = render_prompt(tokenizer, pair["prompt"])
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        counts["floor_of_8_would_decide"] += floor.floored(rejected) and not floor.floored(chosen)
        kept.append((index, {"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    if not rendered & {row["prompt"] for _, row in kept}:
        raise SystemExit(f"{run}: no prompt renders as its format stage rendered it; is the chat template the same?")
    train_pairs, held_out = split_rows(kept, params.data.eval_fraction, params.run.seed)
    return train_pairs, held_out, counts


def main() -> int:
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="format-stage runs of the recipe at 8 tokens")
    parser.add_argument("--min-words", type=int, default=3, help="the judge's floor for the re-scoring (default 3)")
    args = parser.parse_args()
    print(
        "| run | seed | pairs | held-out pairs | floor of 8 would decide | held-out accuracy at steps 11, 22, … (one epoch) |"
    )
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        run = run.resolve()
        name = f"{run.name}-min{args.min_words}"
        result = existing_result(name, OUT)
        if result is None:
            params = load_params(run / "params.yaml")
            tokenizer = load_tokenizer(model_source(params, REPO), params)
            train_pairs, held_out, counts = rescored_pairs(run, params, args.min_words, tokenizer)
            (OUT / name).mkdir(parents=True)
            result = train(name, train_pairs, {"recipe": held_out}, params, out=OUT, source_run=str(run),
                           min_words=args.min_words, seed=params.run.seed, **counts)  # fmt: skip
        curve = result["accuracy_by_step"]["recipe"]
        cells = ", ".join(f"{curve[step]:.2f}" for step in sorted(curve, key=int))
        total = result["pairs"] + result["eval_pairs"]["recipe"]
        print(f"| {Path(result['source_run']).name} | {result['seed']} | {result['pairs']} | {result['eval_pairs']['recipe']}"
              f" | {result['floor_of_8_would_decide']} of {total} | {cells} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Are the held-out pairs that DPO's implicit reward ranks wrongly the ones whose order is a judgment call?

    .venv/bin/pip install afinn textblob     # two more sentiment lexicons; not dependencies of the kit
    .venv/bin/python bench/sentiment_judge_agreement.py [RUN_DIR]

RUN_DIR is a finished run of params/smollm2-135m-sentiment.yaml (default: runs/smollm2-135m-sentiment, what
`bash scripts/demo.sh` writes). The judge (VADER, dpo_kit.judges.SentimentJudge) decided which continuation of
each pair is chosen. Two other offline sentiment lexicons, AFINN and TextBlob's, score the same continuations.
Where they order a pair the other way, the pair's order is a matter of which lexicon one asks, and a policy that
learnt "positive sentiment" in general, rather than VADER's word list, could not be expected to match it. The
script prints how often each lexicon agrees with VADER, and the held-out implicit-reward accuracy of the run's
DPO model (from its metrics.json) on the pairs that both, one or neither of the other lexicons order as VADER
does. If the accuracy were far higher on the pairs all three agree on, the 0.9 bar (docs/implicit-reward-accuracy.md)
would be out of reach because of the judge's idiosyncrasies; if it is about the same, the misses are the
model's. Seconds, no model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpo_kit.evaluation.generate import read_jsonl
from dpo_kit.judges import SentimentJudge

REPO = Path(__file__).resolve().parent.parent


def other_lexicons():
    try:
        from afinn import Afinn
        from textblob import TextBlob
    except ImportError as error:
        sys.exit(f"{error.name} is not installed: run `.venv/bin/pip install afinn textblob` first")
    afinn = Afinn()
    return {"AFINN": afinn.score, "TextBlob": lambda text: TextBlob(text).sentiment.polarity}


def score_gaps(rows: list[dict], score) -> list[float]:
    """score(chosen) - score(rejected) of every pair: above 0 where the scorer orders it as the judge did."""
    return [score(row["chosen"]) - score(row["rejected"]) for row in rows]


def agreement(gaps: list[float]) -> str:
    """Share of pairs ordered as the judge did, and the share tied, as a table cell."""
    return f"{sum(gap > 0 for gap in gaps) / len(gaps):.2f} (ties {sum(gap == 0 for gap in gaps) / len(gaps):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", nargs="?", default=str(REPO / "runs" / "smollm2-135m-sentiment"))
    run_dir = Path(parser.parse_args().run_dir)
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.exists():
        sys.exit(f"{metrics_file} not found: RUN_DIR must be a run whose evaluate stage completed")
    metrics = json.loads(metrics_file.read_text())
    held_out = read_jsonl(run_dir / "data" / "eval.jsonl")
    margins = metrics["per_pair"]["reward_margins"]
    # evaluate.held_out_examples keeps the file's order; a dropped or capped pair would shift it
    if metrics["num_pairs_dropped"] or len(margins) != len(held_out):
        sys.exit(f"{run_dir}: {len(margins)} evaluated pairs for {len(held_out)} in data/eval.jsonl; cannot match them")

    others = other_lexicons()
    lexicons = {"VADER (the judge)": SentimentJudge().score_one, **others}
    training = read_jsonl(run_dir / "data" / "train.jsonl")
    held_out_gaps = {name: score_gaps(held_out, score) for name, score in lexicons.items()}
    print(f"{run_dir.name}: how often each lexicon orders a pair as the judge did (ties apart)\n")
    print("| lexicon | training pairs | held-out pairs |\n|---|---|---|")
    for name, score in lexicons.items():
        print(f"| {name} | {agreement(score_gaps(training, score))} | {agreement(held_out_gaps[name])} |")

    groups: dict[str, list[bool]] = {"both agree": [], "one agrees": [], "neither agrees": []}
    for i, margin in enumerate(margins):
        agreeing = sum(held_out_gaps[name][i] > 0 for name in others)
        groups[["neither agrees", "one agrees", "both agree"][agreeing]].append(margin > 0)
    print(f"\nheld-out implicit-reward accuracy of the DPO model ({metrics['rewards/accuracies']:.2f} on all"
          f" {len(margins)} pairs), by how many of AFINN and TextBlob order the pair as VADER did\n")
    print("| other lexicons | held-out pairs | implicit-reward accuracy |\n|---|---|---|")
    for name, correct in groups.items():
        accuracy = f"{sum(correct) / len(correct):.2f}" if correct else "-"
        print(f"| {name} | {len(correct)} | {accuracy} |")


if __name__ == "__main__":
    main()

"""Held-out implicit-reward accuracy of the sentiment recipe with three times the distinct prompts.

    .venv/bin/python bench/sentiment_more_prompts.py [--report-only]

The bundled set holds 384 prompts (16 kinds of film x 24 openings); this one holds 1,152 (24 kinds x 48
openings, the bundled ones among them), in the same prefill form. The recipe runs on it unchanged but for
data.max_rows (all 1,152 prompts, a quarter held out), one epoch of all the training pairs instead of 34 steps,
and TRL's evaluation of the held-out pairs every 25 steps; format and train stages only, about 25 minutes on 2
CPU cores. It answers the question bench/sentiment_more_pairs.py left open (docs/implicit-reward-accuracy.md): do more
distinct prompts, rather than more pairs per prompt, raise the held-out accuracy towards 0.9?
Writes runs/sentiment-more-prompts/ (the prompts file) and runs/smollm2-135m-sentiment-1152-prompts/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from dpo_kit.bundled import FILM_KINDS, REVIEW_OPENINGS, movie_review_prompts
from dpo_kit.evaluation.generate import read_jsonl

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "runs" / "sentiment-more-prompts" / "prompts.jsonl"
RUN = REPO / "runs" / "smollm2-135m-sentiment-1152-prompts"
EVAL_EVERY = 25
MORE_KINDS = ["political thriller", "buddy comedy", "space opera", "psychological horror", "sports drama",
              "martial arts film", "mystery", "biopic"]  # fmt: skip
MORE_OPENINGS = [
    "The first ten minutes", "The lighting in this film", "Halfway through, I", "The music score",
    "The story of this film", "The young actress in the lead", "The editing", "The final battle",
    "Sitting in the theater, I", "The sound design", "The way the film handles", "After the first scene,",
    "The writers clearly", "This film's world", "The romance subplot", "The humor in this movie",
    "The second half of the film", "My expectations for this one", "The title sequence",
    "The camera work", "Every scene with the villain", "The runtime", "The climax", "The opening monologue",
]  # fmt: skip


def prompts_text() -> str:
    kinds, openings = FILM_KINDS + MORE_KINDS, REVIEW_OPENINGS + MORE_OPENINGS
    assert len(set(kinds)) == 24 and len(set(openings)) == 48, "kinds and openings must be distinct"
    rows = movie_review_prompts(seed=0, prefill=True, kinds=kinds, openings=openings)
    return "".join(json.dumps(row) + "\n" for row in rows)


def write_prompts() -> None:
    text = prompts_text()
    if PROMPTS.exists() and PROMPTS.read_text() != text:  # an earlier run's input is never overwritten
        sys.exit(f"{PROMPTS} exists and differs from the prompts this script makes: move it aside")
    PROMPTS.parent.mkdir(parents=True, exist_ok=True)
    PROMPTS.write_text(text)


def report() -> str:
    history = read_jsonl(RUN / "train_log.jsonl")
    curve = {row["step"]: row["eval_rewards/accuracies"] for row in history if "eval_rewards/accuracies" in row}
    data = json.loads((RUN / "data" / "report.json").read_text())
    steps = max(row["step"] for row in history if "step" in row)
    return (f"{data['rows_read']} prompts: {data['n_train']} training pairs, {data['n_eval']} held-out pairs,"
            f" {data['rows_dropped']} dropped (data/dropped.jsonl); one epoch of {steps} steps\n"
            f"held-out implicit-reward accuracy at steps "
            + ", ".join(f"{step}: {value:.2f}" for step, value in sorted(curve.items())))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="print the result of a finished run only")
    args = parser.parse_args()
    if not args.report_only:
        write_prompts()
        # This interpreter's kit (`python -m`), not <repo>/.venv/bin/dpo-kit: a conda environment has no .venv.
        command = [sys.executable, "-m", "dpo_kit.run.cli", "run", "params/smollm2-135m-sentiment.yaml", "--quiet",
                   "--stages", "format,train", "--set", f"run.name={RUN.name}",
                   "--set", f"data.generate.prompts={PROMPTS.relative_to(REPO)}", "--set", "data.max_rows=1152",
                   "--set", "dpo.max_steps=-1", "--set", "dpo.num_train_epochs=1",
                   "--set", "dpo.eval_strategy=steps", "--set", f"dpo.eval_steps={EVAL_EVERY}",
                   "--set", "dpo.per_device_eval_batch_size=16"]  # fmt: skip
        if not (RUN / "train_log.jsonl").is_file():
            subprocess.run(command, cwd=REPO, check=True)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())

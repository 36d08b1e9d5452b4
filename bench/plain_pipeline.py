"""The five stages' work as one plain Python process: the baseline that bench/pipeline.py compares with.

It makes the same library calls as the notebooks, in the same order, with the same params, so
the difference in time is the notebook machinery itself. It saves the same plots, without display.

    .venv/bin/python bench/plain_pipeline.py params/tiny.yaml --set run.name=plain
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dpo_kit.data.pipeline import plot_token_lengths, prepare_data  # noqa: E402
from dpo_kit.evaluation.evaluate import evaluate_run, plot_evaluation  # noqa: E402
from dpo_kit.evaluation.generate import generate_comparisons  # noqa: E402
from dpo_kit.models.loading import load_tokenizer, model_source  # noqa: E402
from dpo_kit.run.stage import open_stage  # noqa: E402
from dpo_kit.training.merge import merge_adapter  # noqa: E402
from dpo_kit.training.train import plot_training_curves, train_dpo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("params")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    opened = lambda name: open_stage(name, args.params, args.set, str(REPO))  # noqa: E731

    stage = opened("format")
    tokenizer = load_tokenizer(model_source(stage.params, stage.project_dir), stage.params)
    report = prepare_data(stage.params, tokenizer, stage.run_dir, stage.project_dir)
    plot_token_lengths(report).savefig(stage.path("token_lengths.png"), dpi=110)
    stage.record(data=report.to_dict())
    stage.complete()

    stage = opened("train")
    result = train_dpo(stage)
    plot_training_curves(result.log_history, stage.path("training_curves.png"), stage.params)
    stage.complete(**result.summary())

    stage = opened("merge")
    stage.complete(**merge_adapter(stage).to_dict())

    stage = opened("generate")
    generate_comparisons(stage.params, stage.run_dir, stage.project_dir)
    stage.complete()

    stage = opened("evaluate")
    metrics = evaluate_run(stage.params, stage.run_dir, stage.project_dir)
    plot_evaluation(metrics).savefig(stage.path("evaluation.png"), dpi=110)
    stage.complete()


if __name__ == "__main__":
    main()

"""Evaluation on the tiny model: TRL's metric values, identical vs perturbed policies, the KL estimator, plots."""

from __future__ import annotations

import json
import math

import pytest
import torch
from run_dirs import make_run_dir as make_shared_run_dir

from dpo_kit.bundled import bundled_preference_rows
from dpo_kit.evaluation.evaluate import (
    METRICS_FILE,
    evaluate_run,
    plot_evaluation,
    reference_agreement_table,
    reward_metrics,
    scalar_metrics,
    tokenize_pair,
)
from dpo_kit.evaluation.generate import GENERATIONS_FILE, generate_comparisons, read_jsonl
from dpo_kit.models.tiny import build_tiny_model
from dpo_kit.params import parse_params

# Eight rows over several topics; rows 0 and 235 carry a system message, so prompt lengths differ.
EVAL_ROWS = bundled_preference_rows()[::47][:8]
BETA = 0.2  # not TRL's default, so a test fails if beta is not read from params
TRL_METRICS = [
    "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def make_run_dir(path, base_dir, noise: float, rows=EVAL_ROWS):
    return make_shared_run_dir(path, base_dir, noise, rows)


def make_params(model_dir, **dpo):
    return parse_params(
        {
            "run": {"name": "eval", "seed": 7},
            "model": {"name_or_path": str(model_dir)},
            "dpo": {"beta": BETA, **dpo},
            "generate": {"num_prompts": 5, "max_new_tokens": 12, "batch_size": 4},
            "evaluate": {"judge": "rule", "batch_size": 3},  # 8 pairs in 3 batches, the last one short
        }
    )


def generate_and_evaluate(run_dir, model_dir):
    params = make_params(model_dir)
    generate_comparisons(params, run_dir)
    return evaluate_run(params, run_dir)


@pytest.fixture(scope="module")
def perturbed(tiny_model_dir, tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("run") / "perturbed", tiny_model_dir, noise=0.05)
    return run_dir, generate_and_evaluate(run_dir, tiny_model_dir)


@pytest.fixture(scope="module")
def identical(tiny_model_dir, tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("run") / "identical", tiny_model_dir, noise=0.0)
    return run_dir, generate_and_evaluate(run_dir, tiny_model_dir)


def test_metrics_json_holds_trl_named_scalars_and_per_item_arrays(perturbed):
    run_dir, metrics = perturbed
    assert json.loads((run_dir / METRICS_FILE).read_text()) == metrics
    expected_scalars = TRL_METRICS + [
        "ref_logps/chosen", "ref_logps/rejected", "logps_per_token/chosen", "logps_per_token/rejected",
        "ref_logps_per_token/chosen", "ref_logps_per_token/rejected", "loss/sigmoid", "beta", "num_pairs",
        "num_pairs_dropped", "kl", "kl/token", "num_generations", "judge", "win_rate", "win_rate/wins",
        "win_rate/ties", "win_rate/losses", "win_rate/n", "ref_logps/accuracies", "num_pairs/ref_prefers_chosen",
        "num_pairs/ref_prefers_rejected",
    ]  # fmt: skip
    assert set(expected_scalars) <= set(metrics)
    assert (metrics["beta"], metrics["num_pairs"], metrics["num_pairs_dropped"]) == (BETA, 8, 0)
    assert (metrics["num_generations"], metrics["win_rate/n"], metrics["judge"]) == (5, 5, "rule")
    assert all(len(values) == 8 for values in metrics["per_pair"].values())
    assert set(metrics["per_generation"]) == {"kl", "policy_score", "reference_score"}
    assert all(len(values) == 5 for values in metrics["per_generation"].values())

    scalars = scalar_metrics(metrics).to_dict()  # what the evaluate notebook shows and puts in the manifest
    assert set(scalars) == set(metrics) - {"per_pair", "per_generation"}
    assert json.loads(json.dumps(scalars)) == scalars


def test_the_sweeps_objectives_are_the_numbers_metrics_json_holds(perturbed):
    """`dpo-kit sweep --objective` is checked against OBJECTIVE_METRICS before any trial runs: the list must name
    every number the evaluate stage writes, and nothing else (two accuracies are left out where their set of
    pairs is empty)."""
    from dpo_kit.run.sweep import OBJECTIVE_METRICS

    _, metrics = perturbed
    numbers = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= set(OBJECTIVE_METRICS), sorted(numbers - set(OBJECTIVE_METRICS))
    sometimes = {"rewards/accuracies/ref_prefers_chosen", "rewards/accuracies/ref_prefers_rejected"}
    assert set(OBJECTIVE_METRICS) - numbers <= sometimes, sorted(set(OBJECTIVE_METRICS) - numbers - sometimes)
    assert len(set(OBJECTIVE_METRICS)) == len(OBJECTIVE_METRICS)


def test_identical_policy_and_reference_give_zero_rewards_and_zero_kl(identical):
    _, metrics = identical
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "kl/token"):
        assert metrics[key] == pytest.approx(0.0, abs=1e-6), key
    assert metrics["rewards/accuracies"] == 0.0  # TRL counts chosen > rejected strictly; all margins are 0
    assert metrics["loss/sigmoid"] == pytest.approx(math.log(2))
    assert metrics["logps/chosen"] == metrics["ref_logps/chosen"] < metrics["logps/rejected"] < 0
    # Same weights and the same seed sample the same responses: every comparison is a tie.
    assert (metrics["win_rate"], metrics["win_rate/ties"]) == (0.5, 5)


def test_perturbed_policy_has_positive_kl_and_consistent_rewards(perturbed):
    _, metrics = perturbed
    pairs = metrics["per_pair"]
    assert all(kl >= 0.0 for kl in metrics["per_generation"]["kl"])
    assert metrics["kl"] == pytest.approx(sum(metrics["per_generation"]["kl"]) / 5)
    assert metrics["kl"] > 0.1
    for side in ("chosen", "rejected"):
        assert pairs[f"{side}_rewards"] == pytest.approx(
            [BETA * (p - r) for p, r in zip(pairs[f"policy_{side}_logps"], pairs[f"reference_{side}_logps"], strict=True)]
        )
        assert metrics[f"logps_per_token/{side}"] == pytest.approx(
            sum(logps / n for logps, n in zip(pairs[f"policy_{side}_logps"], pairs[f"{side}_tokens"], strict=True)) / 8
        )
    margins = pairs["reward_margins"]
    assert metrics["rewards/margins"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    assert metrics["rewards/accuracies"] == sum(m > 0 for m in margins) / 8
    assert any(m != 0 for m in margins)
    # The split by the reference's own ranking covers every pair, and its accuracies average back to the whole.
    counts = metrics["num_pairs/ref_prefers_chosen"], metrics["num_pairs/ref_prefers_rejected"]
    assert sum(counts) == 8
    assert metrics["ref_logps/accuracies"] == pytest.approx(counts[0] / 8)
    whole = sum(metrics.get(f"rewards/accuracies/{name}", 0) * count
                for name, count in zip(("ref_prefers_chosen", "ref_prefers_rejected"), counts, strict=True)) / 8  # fmt: skip
    assert whole == pytest.approx(metrics["rewards/accuracies"])
    assert metrics["win_rate/wins"] + metrics["win_rate/ties"] + metrics["win_rate/losses"] == 5


def test_kl_is_the_exact_per_token_kl_summed_along_the_policy_continuation(perturbed, tiny_model_dir):
    from torch.distributions import Categorical, kl_divergence
    from transformers import AutoModelForCausalLM

    run_dir, metrics = perturbed
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    records = read_jsonl(run_dir / GENERATIONS_FILE)
    for record, kl in zip(records, metrics["per_generation"]["kl"], strict=True):
        ids = torch.tensor([record["prompt_token_ids"] + record["policy_token_ids"]])
        predicting_generated = slice(len(record["prompt_token_ids"]) - 1, -1)  # one unpadded sequence at a time
        with torch.no_grad():
            p = Categorical(logits=policy(ids).logits[0, predicting_generated])
            q = Categorical(logits=reference(ids).logits[0, predicting_generated])
        assert kl == pytest.approx(kl_divergence(p, q).sum().item(), rel=1e-4)


# ---------------------------------------------------------------------------------------------
# Agreement with TRL's own DPOTrainer.evaluate on the same models and pairs


def standard_rows(tokenizer, rows):
    """TRL's standard format: the prompt rendered with the chat template, plain-text responses without eos."""
    return [
        {
            "prompt": tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False),
            "chosen": row["chosen"][0]["content"],
            "rejected": row["rejected"][0]["content"],
        }
        for row in rows
    ]


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.*:FutureWarning")  # raised inside TRL/transformers
@pytest.mark.parametrize(
    "data_format, max_length, ld_alpha",
    [("conversational", None, None), ("standard", None, None), ("conversational", 30, None),
     ("conversational", None, 0.5)],
    ids=["conversational", "standard", "max_length-drops-and-truncates", "ld_alpha-weighs-the-longer-tail"],
)  # fmt: skip
def test_metrics_agree_with_trl_dpo_trainer_evaluate(tiny_model_dir, tmp_path, data_format, max_length, ld_alpha):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = EVAL_ROWS if data_format == "conversational" else standard_rows(tokenizer, EVAL_ROWS)
    run_dir = make_run_dir(tmp_path / "run", tiny_model_dir, noise=0.05, rows=rows)
    # dpo.ld_alpha (LD-DPO) changes TRL's logps/* and rewards/*: the evaluation must count the tokens as TRL does.
    dpo = {**({"max_length": max_length} if max_length else {}), **({"ld_alpha": ld_alpha} if ld_alpha else {})}
    with pytest.warns(UserWarning, match="generations.jsonl"):  # none made here: KL and win-rate are skipped
        metrics = evaluate_run(make_params(tiny_model_dir, **dpo), run_dir)
    assert "kl" not in metrics and "win_rate" not in metrics

    trainer = DPOTrainer(
        model=str(run_dir / "merged"),
        ref_model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"), report_to="none", bf16=False, use_cpu=True, beta=BETA,
            per_device_eval_batch_size=len(rows), **dpo,  # one batch: TRL's per-batch mean is the per-pair mean
        ),  # fmt: skip
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trl_examples = trainer.eval_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    assert metrics["num_pairs"] == len(trl_examples) == len(rows) - metrics["num_pairs_dropped"]
    if max_length:
        assert metrics["num_pairs_dropped"] > 0  # the system-prompt rows; the others are truncated
    kept = [tokenize_pair(tokenizer, row) for row in rows]
    assert [e for e in kept if len(e["prompt_ids"]) < (max_length or 10**9)] == trl_examples

    trl_metrics = trainer.evaluate()
    for key in TRL_METRICS:
        assert metrics[key] == pytest.approx(trl_metrics[f"eval_{key}"], rel=1e-4, abs=1e-5), key
    assert metrics["loss/sigmoid"] == pytest.approx(trl_metrics["eval_loss"], rel=1e-4)


def test_max_pairs_limits_the_held_out_pairs(tiny_model_dir, perturbed):
    run_dir, _ = perturbed
    params = make_params(tiny_model_dir)
    params.evaluate.max_pairs = 3
    metrics = evaluate_run(params, run_dir)
    assert metrics["num_pairs"] == 3 and len(metrics["per_pair"]["reward_margins"]) == 3


def test_metrics_name_where_the_held_out_pairs_came_from(tiny_model_dir, tmp_path):
    """With data.eval_split the held-out pairs are another split's: metrics.json, notebook 05's table of scalars and
    the manifest's evaluate stage said nothing of where they came from (only the format stage's data block did)."""
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.tiny import build_tiny_tokenizer

    run_dir = make_run_dir(tmp_path / "run", tiny_model_dir, noise=0.05)
    params = make_params(tiny_model_dir)
    params.evaluate.max_pairs = 3
    with pytest.warns(UserWarning, match="generations.jsonl"):
        assert "held_out_pairs" not in evaluate_run(params, run_dir), "no data/report.json: nothing to say"
    # the format stage's report of a run that held out data.eval_split (the StableLM recipe's)
    prepare_data(parse_params({"run": {"name": "t"}, "model": {"name_or_path": "unused"}, "data": {"max_length": 256}}),
                 build_tiny_tokenizer(), tmp_path / "formatted")  # fmt: skip
    stored = json.loads((tmp_path / "formatted" / "data" / "report.json").read_text())
    stored.update(source="Anthropic/hh-rlhf", eval_split="test[:1000]", eval_fraction=None)
    (run_dir / "data" / "report.json").write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match="generations.jsonl"):
        metrics = evaluate_run(params, run_dir)
    held_out = "data.eval_split 'test[:1000]' of data.source 'Anthropic/hh-rlhf'"
    assert (metrics["held_out_pairs"], metrics["num_pairs"]) == (held_out, 3), "evaluate.max_pairs of eval.jsonl's pairs"
    assert json.loads((run_dir / METRICS_FILE).read_text())["held_out_pairs"] == held_out
    assert scalar_metrics(metrics)["held_out_pairs"] == held_out


def test_plot_evaluation_draws_margins_rewards_scores_and_verdicts(perturbed):
    _, metrics = perturbed
    figure = plot_evaluation(metrics)
    assert len(figure.axes) == 4
    assert "judge scores" in figure.axes[2].get_title() and len(figure.axes[2].patches) > 0
    assert "win-rate" in figure.axes[3].get_title()
    assert sum(len(axis.patches) for axis in figure.axes[:2]) > 0  # histograms were drawn

    without_generations = {k: v for k, v in metrics.items() if not k.startswith(("win_rate", "kl"))}
    without_generations["per_generation"] = {}
    figure = plot_evaluation(without_generations)
    assert not figure.axes[2].axison and not figure.axes[3].axison


# ---------------------------------------------------------------------------------------------
# The KL estimator on a hand-computed case, repetition measures and the win-rate interval


class FixedDistribution(torch.nn.Module):
    """A 'language model' whose next-token distribution is the same at every position."""

    def __init__(self, probabilities):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(probabilities).log())

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


def test_the_figure_calls_generations_on_explicit_generate_prompts_so_and_not_held_out():
    pairs = {"policy_chosen_logps": [-1.0, -2.0], "policy_rejected_logps": [-3.0, -1.5],
             "reference_chosen_logps": [-1.5, -2.0], "reference_rejected_logps": [-2.0, -2.0],
             "reward_margins": [0.1, -0.05]}  # fmt: skip
    metrics = {"beta": 0.1, "rewards/accuracies": 0.5, "judge": "rule", "kl": 1.0, "win_rate": 0.5,
               "win_rate/ci_low": 0.1, "win_rate/ci_high": 0.9, "win_rate/wins": 1, "win_rate/ties": 0,
               "win_rate/losses": 1, "per_pair": pairs,
               "per_generation": {"kl": [1.0, 1.0], "policy_score": [0.5, 0.1], "reference_score": [0.2, 0.3]}}  # fmt: skip
    titles = {kind: plot_evaluation({**metrics, "generate/prompts": kind}).axes[2].get_title()
              for kind in ("held-out", "generate.prompts")}  # fmt: skip
    assert "held-out" in titles["held-out"]
    assert "held-out" not in titles["generate.prompts"] and "generate.prompts" in titles["generate.prompts"]
    # The y axes count pairs and prompts: 2 generations drew ticks at 0.25, 0.5, ... prompts.
    for axis in plot_evaluation(metrics).axes:
        ticks = axis.get_yticks()
        assert all(float(tick).is_integer() for tick in ticks), (axis.get_title(), ticks)


def test_generation_kl_matches_a_hand_computed_case():
    from dpo_kit.evaluation.evaluate import generation_kl

    policy, reference = FixedDistribution([0.5, 0.5]), FixedDistribution([0.9, 0.1])
    records = [
        {"prompt_token_ids": [0, 1], "policy_token_ids": [1, 0, 1]},  # 3 generated tokens
        {"prompt_token_ids": [1], "policy_token_ids": [0]},  # 1 generated token, padded in the batch
    ]
    per_token = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # = 0.5108 nats
    kls = generation_kl(policy, reference, records, pad_token_id=0, batch_size=2)
    assert kls == pytest.approx([3 * per_token, per_token], rel=1e-6)
    assert generation_kl(reference, reference, records, pad_token_id=0, batch_size=2) == pytest.approx([0.0, 0.0], abs=1e-7)


def test_repetition_measures_on_hand_counted_texts():
    from dpo_kit.evaluation.evaluate import distinct_n, repeated_ngram_share

    loop = "particularly impressive particularly impressive particularly impressive"
    assert distinct_n([loop], 2) == pytest.approx(2 / 5)  # bigrams: (p,i) (i,p) (p,i) (i,p) (p,i)
    assert repeated_ngram_share(loop, 3) == pytest.approx(2 / 4)  # 4 trigrams, the last 2 seen before
    fresh = "the battle scenes were staged with care"
    assert distinct_n([fresh], 2) == 1.0 and repeated_ngram_share(fresh, 3) == 0.0
    assert distinct_n([fresh, fresh], 2) == pytest.approx(0.5)  # across texts too
    assert repeated_ngram_share("too short", 3) == 0.0 and distinct_n([""], 2) == 0.0


def test_win_rate_interval_covers_the_true_win_rate_near_one_and_at_small_n():
    """A percentile bootstrap over prompts held a true win-rate of 0.95 over 40 prompts in about 83 % of its 95 %
    intervals, and read 40 wins of 40 as [1.00, 1.00]; the interval must keep its level where the README's runs are."""
    import numpy as np

    from dpo_kit.evaluation.evaluate import win_rate_interval

    rng = np.random.default_rng(0)
    for true_rate, prompts in ((0.95, 40), (0.9, 10), (0.5, 10)):
        covered = 0
        for _ in range(400):
            outcomes = (rng.random(prompts) < true_rate).astype(float).tolist()
            low, high = win_rate_interval(outcomes, 0.95)
            covered += low <= true_rate <= high
        assert covered / 400 >= 0.9, (true_rate, prompts, covered / 400)
    for outcomes in ([1.0] * 40, [0.0] * 3, [0.5] * 10, [1.0]):  # every prompt agreeing says little about others
        low, high = win_rate_interval(outcomes, 0.95)
        mean = sum(outcomes) / len(outcomes)
        assert 0.0 <= low <= mean <= high <= 1.0 and high - low > 0.05, outcomes
    assert win_rate_interval([1.0] * 40, 0.95)[0] < win_rate_interval([1.0] * 40, 0.5)[0]  # the level is used
    one = win_rate_interval([1.0], 0.95)
    assert one[1] - one[0] > 0.5  # one prompt is barely evidence
    with pytest.raises(ValueError, match="at least one prompt"):
        win_rate_interval([], 0.95)


def test_metrics_report_win_rate_interval_length_and_repetition(perturbed):
    _, metrics = perturbed
    assert metrics["win_rate/ci_low"] <= metrics["win_rate"] <= metrics["win_rate/ci_high"]
    assert metrics["win_rate/ci_method"] == "wilson"
    for model in ("reference", "policy"):
        assert 0.0 <= metrics[f"text/{model}_distinct_2"] <= 1.0
        assert 0.0 <= metrics[f"text/{model}_repeated_3grams"] <= 1.0
        assert metrics[f"text/{model}_words"] > 0
    from dpo_kit.evaluation.evaluate import before_after_table, headline

    table = before_after_table(metrics)
    assert list(table.columns) == ["reference (before)", "policy (after DPO)"]
    assert table.loc["judged reward (rule)", "policy (after DPO)"] == pytest.approx(metrics["judge/policy_score"])
    assert f"win-rate {metrics['win_rate']:.2f}" in headline(metrics)


def test_accuracy_split_by_the_references_own_ranking_on_a_hand_made_case():
    # Pairs 0-2: the reference already ranks chosen above rejected; pairs 3-5 it ranks rejected above chosen.
    reference_chosen, reference_rejected = [-10.0, -12.0, -9.0, -20.0, -18.0, -25.0], [-15.0, -14.0, -11.0, -10.0, -12.0, -15.0]
    # The policy's log-ratios: right on all three pairs of the first set, on one of the second (pair 4).
    policy_chosen = [-9.0, -11.0, -8.0, -21.0, -17.0, -26.0]
    policy_rejected = [-16.0, -15.0, -12.0, -9.0, -13.0, -14.0]
    per_pair = {"chosen_tokens": [4] * 6, "rejected_tokens": [4] * 6,
                "policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
                "reference_chosen_logps": reference_chosen, "reference_rejected_logps": reference_rejected}  # fmt: skip
    metrics = reward_metrics(per_pair, beta=0.1)
    assert metrics["rewards/accuracies"] == pytest.approx(4 / 6)
    assert metrics["ref_logps/accuracies"] == pytest.approx(3 / 6)
    assert (metrics["num_pairs/ref_prefers_chosen"], metrics["num_pairs/ref_prefers_rejected"]) == (3, 3)
    assert metrics["rewards/accuracies/ref_prefers_chosen"] == pytest.approx(1.0)
    assert metrics["rewards/accuracies/ref_prefers_rejected"] == pytest.approx(1 / 3)

    # Where the reference prefers the chosen of every pair, the other set is empty: no accuracy for it, not a made-up
    # one, and the scalars stay plain JSON. The policy's log-probs are unchanged: pair 4 now ranks wrong, 0-2 still right.
    everywhere = dict(per_pair, reference_rejected_logps=[-15.0, -14.0, -11.0, -22.0, -19.0, -27.0])
    metrics = reward_metrics(everywhere, beta=0.1)
    assert metrics["num_pairs/ref_prefers_rejected"] == 0 and "rewards/accuracies/ref_prefers_rejected" not in metrics
    assert metrics["rewards/accuracies/ref_prefers_chosen"] == pytest.approx(3 / 6) == metrics["rewards/accuracies"]
    scalars = scalar_metrics(metrics).to_dict()
    assert json.loads(json.dumps(scalars)) == scalars
    # Notebook 05's table says the empty half has no pairs, where a NaN would read as a failed computation.
    table = reference_agreement_table({**metrics, "num_pairs": 6, "per_pair": everywhere})
    assert table.loc["the reference prefers the rejected"].tolist() == [0, "none: no pairs"]
    assert table.loc["the reference already prefers the chosen"].tolist() == [6, pytest.approx(3 / 6)]


def test_evaluate_rescores_the_generations_when_evaluate_judge_changed_after_the_generate_stage(perturbed, tmp_path,
                                                                                                 capsys):
    """The generate stage stores its judge's scores; evaluate.judge is not one of its inputs, so a changed judge does
    not redo it. The evaluate stage then scores again rather than report the old judge's scores under the new name."""
    from dpo_kit.evaluation.evaluate import judge_scores
    from dpo_kit.judges import RuleJudge, SentimentJudge

    run_dir, _ = perturbed
    records = read_jsonl(run_dir / GENERATIONS_FILE)
    assert {record["judge"] for record in records} == {"rule"}
    prompts = [record["prompt"] for record in records]
    rule = make_params(run_dir.parent)
    assert judge_scores(rule, records, tmp_path) == ([r["policy_score"] for r in records],
                                                     [r["reference_score"] for r in records], None)  # fmt: skip
    assert capsys.readouterr().out == ""  # the stored scores, read as they are

    sentiment = parse_params({**rule.model_dump(mode="json"), "evaluate": {"judge": "sentiment"}})
    policy, reference, truncated = judge_scores(sentiment, records, tmp_path)
    assert truncated is None  # a judge that reads a text whole cuts none, and no count is recorded
    assert policy == SentimentJudge().score(prompts, [r["policy"] for r in records])
    assert reference == SentimentJudge().score(prompts, [r["reference"] for r in records])
    assert policy != [r["policy_score"] for r in records]
    assert "scored by rule in the generate stage; scoring its generations again with evaluate.judge sentiment" in (
        capsys.readouterr().out)

    unrecorded = [{k: v for k, v in record.items() if k != "judge"} for record in records]  # generations from before
    assert judge_scores(rule, unrecorded, tmp_path)[0] == RuleJudge().score(prompts, [r["policy"] for r in records])
    assert "an unrecorded judge" in capsys.readouterr().out


def test_an_evaluation_without_generations_shows_what_notebook_05_shows_and_says_what_is_missing(tiny_model_dir,
                                                                                                  tmp_path):
    """`--stages merge,evaluate` evaluates the held-out pairs without generations.jsonl; every table and figure of
    notebook 05 must then still show, the missing comparison named, rather than fail the stage with a KeyError."""
    from dpo_kit.evaluation.evaluate import before_after_table, headline

    run_dir = make_run_dir(tmp_path / "run", tiny_model_dir, noise=0.05)
    with pytest.warns(UserWarning, match="generations.jsonl"):
        metrics = evaluate_run(make_params(tiny_model_dir), run_dir)
    assert headline(metrics).startswith("held-out implicit-reward accuracy")
    table = before_after_table(metrics)
    assert list(table.columns) == ["reference (before)", "policy (after DPO)"]
    assert "no generations.jsonl; run the generate stage (notebook 04) first" in table.iloc[0, 1]
    plot_evaluation(metrics)
    reference_agreement_table(metrics)
    scalar_metrics(metrics).to_dict()


def test_the_sentiment_seeds_bench_prints_each_target_as_met_or_not(tmp_path, monkeypatch):
    """bench/sentiment_seeds.py printed the seed table alone; the README's targets (win-rate 0.75 over 32 prompts,
    implicit-reward accuracy 0.9) are now printed as met or not, with each seed's value."""
    import importlib.util
    from pathlib import Path

    bench_file = Path(__file__).resolve().parent.parent / "bench" / "sentiment_seeds.py"
    spec = importlib.util.spec_from_file_location("sentiment_seeds", bench_file)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for seed, (win, n, accuracy) in enumerate([(0.95, 40, 0.80), (0.93, 40, 0.72)]):
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "metrics.json").write_text(
            json.dumps({"win_rate": win, "win_rate/n": n, "rewards/accuracies": accuracy}))
    monkeypatch.setattr(bench, "run_dir", lambda seed: tmp_path / str(seed))
    lines = bench.targets([0, 1]).splitlines()
    assert lines == [
        "target: win-rate >= 0.75 over >= 32 held-out prompts: met (seed 0 0.95, seed 1 0.93; prompts 40, 40)",
        "target: held-out implicit-reward accuracy >= 0.9: NOT met (seed 0 0.80, seed 1 0.72)",
    ]


def test_the_headline_names_explicit_generate_prompts_instead_of_calling_them_held_out(tiny_model_dir, tmp_path):
    """With generate.prompts the models are compared on the user's own prompts, which may have been trained on; the
    headline (notebook 05, and the last line of `dpo-kit run`) said 'held-out prompts' all the same."""
    from dpo_kit.evaluation.evaluate import headline

    run_dir = make_run_dir(tmp_path / "run", tiny_model_dir, noise=0.05)
    params = make_params(tiny_model_dir)
    params.generate.prompts = ["How do I brew coffee?", "Tell me about meditation."]
    generate_comparisons(params, run_dir)
    metrics = evaluate_run(params, run_dir)
    assert metrics["generate/prompts"] == "generate.prompts"
    assert "over 2 prompts of generate.prompts;" in headline(metrics) and "held-out prompts" not in headline(metrics)
    assert "over 5 held-out prompts;" in headline({**metrics, "generate/prompts": "held-out", "win_rate/n": 5})


def test_the_log_probs_and_the_kl_take_no_float32_copy_of_a_whole_batchs_logits(perturbed, tiny_model_dir):
    """On a GPU the models return half-precision logits, one per token and vocabulary entry. A float32 copy of a whole
    batch's and its log-softmax are twice their size each: for 8 pairs of 1,024 tokens of Qwen2.5's 151,936-token
    vocabulary 20 GB beside the logits' 5 GB, more than the 16 GB GPU the Qwen recipe names. Here, in bfloat16 on the
    CPU, nothing the evaluation allocates may be larger than the logits the models return."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from dpo_kit.evaluation.evaluate import generation_kl, pair_logps

    run_dir, metrics = perturbed
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.bfloat16).eval()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    half = 2 * policy.config.vocab_size  # bytes of one token's bfloat16 logits

    examples = [tokenize_pair(tokenizer, row) for row in EVAL_ROWS]
    collator = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as pairs:
        per_pair = pair_logps({"policy": policy, "reference": reference}, examples, collator, len(examples))
    records = read_jsonl(run_dir / GENERATIONS_FILE)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as generations:
        kls = generation_kl(policy, reference, records, tokenizer.pad_token_id, len(records))

    logits = {"pairs": collator(examples)["input_ids"].numel() * half,
              "generations": len(records) * max(len(r["prompt_token_ids"] + r["policy_token_ids"]) for r in records) * half}
    for name, profiled in (("pairs", pairs), ("generations", generations)):
        largest = max(profiled.events(), key=lambda event: event.cpu_memory_usage)
        assert largest.cpu_memory_usage <= logits[name], (name, largest.name, largest.cpu_memory_usage, logits[name])
    # The same numbers as in float32, to bfloat16's precision.
    assert per_pair["policy_chosen_logps"] == pytest.approx(metrics["per_pair"]["policy_chosen_logps"], rel=0.05)
    assert kls == pytest.approx(metrics["per_generation"]["kl"], rel=0.3, abs=0.05)


def test_a_nan_log_prob_or_kl_is_refused_naming_the_pair_or_prompt(tiny_model_dir, tmp_path):
    """A policy whose logits are NaN (weights a diverged training left, float16 overflow) gave NaN margins, which
    compare false: each pair counted as wrongly ranked, rewards/accuracies read 0.0 as if measured, and the means were
    NaN in metrics.json. The stage now stops, naming the first pair, and writes no metrics.json."""
    from dpo_kit.evaluation.evaluate import generation_metrics

    run_dir = make_run_dir(tmp_path / "run", tiny_model_dir, noise=float("nan"))
    with pytest.warns(UserWarning, match="generations.jsonl"), pytest.raises(
        ValueError, match=r"the policy's log-prob of the chosen response of held-out pair 0 \(0-based\) is nan"
    ):
        evaluate_run(make_params(tiny_model_dir), run_dir)
    assert not (run_dir / METRICS_FILE).exists()

    records = [{"policy_token_ids": [1], "reference_token_ids": [1], "policy": "a b", "reference": "a b"}] * 2
    with pytest.raises(ValueError, match=r"response to prompt 1 \(0-based\) is inf"):
        generation_metrics(records, [0.5, math.inf])

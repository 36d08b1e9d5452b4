"""Evaluation of a trained run against its reference (the base model), on held-out pairs and on generations.

1. Implicit rewards on the held-out pairs (data/eval.jsonl), r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x))
   with log pi(y|x) summed over response tokens, under TRL's metric names (rewards/*, logps/*). Pairs are
   tokenized as TRL 1.16's DPOTrainer does (`tokenize_pair`) and batched by TRL's own collator, so the
   figures agree with the eval metrics TRL logs for the same models and data (a test checks this).
   TRL averages per batch; here everything is averaged per pair, which is the same for one batch. With dpo.ld_alpha
   (LD-DPO) the log-probs weigh the longer response's tokens beyond the shorter one's length by ld_alpha, as TRL's do.

2. KL(pi || pi_ref) on the generation prompts (generations.jsonl). Estimator: along each continuation y the
   policy generated, the exact KL between the two next-token distributions over the whole vocabulary,
   summed over the generated tokens and averaged over prompts:

       KL(x, y) = sum_t  KL( pi(. | x, y_<t) || pi_ref(. | x, y_<t) )

   Were y sampled from pi itself (temperature 1, top_p 1, top_k 0), its mean over prompts would be an unbiased
   estimate of the sequence-level KL with less variance than the sampled log-ratio log pi(y|x) - log pi_ref(y|x),
   because each step sums the exact expectation instead of one sampled token; and it is never negative.
   With a lower temperature, top_p or greedy decoding the prefixes follow the decoding distribution, so it
   is the KL along the paths the policy actually takes. The distributions compared are untempered.

3. Win-rate of the policy's generations over the reference's under `evaluate.judge` (dpo_kit.judges), ties counted
   half, with its Wilson score interval over the prompts (`win_rate_interval`).

Both language models are held in memory at once (as DPO training with a reference copy does), because
the exact KL needs both distributions at every position; the judge is loaded only after they are freed.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from dpo_kit.data.pipeline import held_out_origin
from dpo_kit.evaluation.generate import GENERATIONS_FILE, read_jsonl
from dpo_kit.judges import judge_name, make_judge, score_with_cuts, win_outcomes, win_rate_from_scores
from dpo_kit.models.loading import device_of, free_memory, load_causal_lm, load_tokenizer, model_source
from dpo_kit.models.sampling import prompt_token_ids
from dpo_kit.params import Params, dpo_config_defaults
from dpo_kit.tracking import log_summary, record_summary, wandb_key_for_online

METRICS_FILE = "metrics.json"


def tokenize_pair(tokenizer, row: dict) -> dict:
    """prompt_ids / chosen_ids / rejected_ids of one TRL row, as `tokenize_fn` in TRL 1.16's DPOTrainer builds them.

    Conversational: the prompt with the generation prompt, each response as part of the whole conversation.
    Standard: eos is appended to each response unless present (TRL's `add_eos`). In both, the response starts
    where the prompt and prompt+response first differ, since templates may render a lone prompt differently.
    """
    from trl.data_utils import common_prefix_length, is_conversational

    prompt_ids = prompt_token_ids(tokenizer, row["prompt"])
    if is_conversational(row):
        full_ids = [
            tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=True, return_dict=True)["input_ids"]
            for key in ("chosen", "rejected")
        ]
    else:
        eos = tokenizer.eos_token
        full_ids = [
            tokenizer(row["prompt"] + (row[key] if row[key].endswith(eos) else row[key] + eos))["input_ids"]
            for key in ("chosen", "rejected")
        ]
    chosen_ids, rejected_ids = full_ids
    prompt_length = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    return {
        "prompt_ids": prompt_ids[:prompt_length],
        "chosen_ids": chosen_ids[prompt_length:],
        "rejected_ids": rejected_ids[prompt_length:],
    }


def held_out_examples(params: Params, run_dir: Path, tokenizer) -> tuple[list[dict], int]:
    """Tokenized held-out pairs (up to evaluate.max_pairs) and how many TRL would drop.

    TRL silently drops pairs whose prompt alone fills max_length under keep_start truncation; so do we,
    and the count is reported instead of hidden.
    """
    rows = read_jsonl(run_dir / "data" / "eval.jsonl")[: params.evaluate.max_pairs]
    if not rows:
        raise ValueError(f"no held-out pairs in {run_dir / 'data' / 'eval.jsonl'}")
    examples = [tokenize_pair(tokenizer, row) for row in rows]
    max_length, truncation_mode = trl_truncation(params)
    if max_length is not None and truncation_mode == "keep_start":
        kept = [example for example in examples if len(example["prompt_ids"]) < max_length]
        return kept, len(examples) - len(kept)
    return examples, 0


def trl_truncation(params: Params) -> tuple[int | None, str]:
    defaults = dpo_config_defaults()
    return (
        params.dpo.get("max_length", defaults["max_length"]),
        params.dpo.get("truncation_mode", defaults["truncation_mode"]),
    )


def _logits(model, input_ids, attention_mask):
    device = device_of(model)
    return model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False).logits


def ld_masks(completion_mask, ld_alpha: float | None):
    """The response tokens of a collated batch (chosen rows, then rejected) split as TRL 1.16's DPOTrainer weighs them
    under `ld_alpha` (LD-DPO): the first min(chosen, rejected) tokens of each response count fully, the rest of the
    longer one `ld_alpha` times. Returns (full, tail) masks aligned like completion_mask; tail is None without
    ld_alpha, where every response token counts fully."""
    import torch

    if ld_alpha is None:
        return completion_mask, None
    # Numbered over labels[:, 1:], the positions TRL (and sequence_logps) score; the first column is never scored.
    position = completion_mask[:, 1:].cumsum(-1)
    shared = torch.minimum(*completion_mask[:, 1:].sum(-1).chunk(2)).repeat(2).unsqueeze(-1)
    scored = completion_mask[:, 1:].bool()
    first = torch.zeros_like(completion_mask[:, :1])
    return (torch.cat([first, (scored & (position <= shared)).long()], -1),
            torch.cat([first, (scored & (position > shared)).long()], -1))  # fmt: skip


def pair_logps(
    models: dict, examples: list[dict], collator, batch_size: int, ld_alpha: float | None = None
) -> dict[str, list]:
    """Summed response log-probs of chosen and rejected under each model, plus response lengths, per pair. With
    `ld_alpha` (dpo.ld_alpha, LD-DPO) the tokens of the longer response beyond the shorter one's length count
    `ld_alpha` times, as TRL counts them in its log-probs, rewards and loss."""
    import torch

    from dpo_kit.scratch.loss import sequence_logps

    per_pair: dict[str, list] = {"chosen_tokens": [], "rejected_tokens": []}
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])  # chosen rows first, then rejected rows
        # Counted over labels[:, 1:], the positions sequence_logps sums.
        chosen_tokens, rejected_tokens = batch["completion_mask"][:, 1:].sum(-1).chunk(2)
        per_pair["chosen_tokens"] += chosen_tokens.tolist()
        per_pair["rejected_tokens"] += rejected_tokens.tolist()
        full, tail = ld_masks(batch["completion_mask"], ld_alpha)
        for name, model in models.items():
            with torch.no_grad():
                logits = _logits(model, batch["input_ids"], batch["attention_mask"])
                labels, mask = batch["input_ids"].to(logits.device), full.to(logits.device)
                # One sequence at a time: sequence_logps makes a float32 copy of the logits and its log-softmax over
                # the vocabulary, each twice the size of half-precision logits. For a whole batch of 8 pairs of 1,024
                # tokens of Qwen2.5's 151,936-token vocabulary that was 20 GB on top of the logits' 5 GB: more than
                # the 16 GB GPU that recipe says it fits.
                logps = torch.cat([sequence_logps(logits[row : row + 1], labels[row : row + 1], mask[row : row + 1])
                                   for row in range(len(logits))])  # fmt: skip
                if tail is not None:
                    tail = tail.to(logits.device)
                    logps += ld_alpha * torch.cat([
                        sequence_logps(logits[row : row + 1], labels[row : row + 1], tail[row : row + 1])
                        for row in range(len(logits))
                    ])  # fmt: skip
            chosen, rejected = logps.cpu().chunk(2)
            per_pair.setdefault(f"{name}_chosen_logps", []).extend(chosen.tolist())
            per_pair.setdefault(f"{name}_rejected_logps", []).extend(rejected.tolist())
    return per_pair


def generation_kl(policy, reference, records: list[dict], pad_token_id: int, batch_size: int) -> list[float]:
    """Per prompt: sum over the policy's generated tokens of the exact KL(pi || pi_ref) of the next-token
    distributions (see the module docstring for the estimator)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.utils.rnn import pad_sequence

    kls = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        sequences = [torch.tensor(r["prompt_token_ids"] + r["policy_token_ids"]) for r in chunk]
        generated = [torch.tensor([0] * len(r["prompt_token_ids"]) + [1] * len(r["policy_token_ids"])) for r in chunk]
        input_ids = pad_sequence(sequences, batch_first=True, padding_value=pad_token_id)
        attention_mask = pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
        # Aligned with the labels like sequence_logps' mask: logits at t-1 give the distribution of token t.
        generated_mask = pad_sequence(generated, batch_first=True)[:, 1:]
        with torch.no_grad():
            policy_logits = _logits(policy, input_ids, attention_mask)[:, :-1]
            reference_logits = _logits(reference, input_ids, attention_mask)[:, :-1].to(policy_logits.device)
            for row in range(len(chunk)):
                # One sequence at a time, as in pair_logps: the float32 log-softmaxes of a whole batch are several
                # times the size of the half-precision logits the models return.
                policy_logps = policy_logits[row].float().log_softmax(-1)
                reference_logps = reference_logits[row].float().log_softmax(-1)
                # kl_div(input, target) = p_target * (log p_target - input): KL(policy || reference) per position.
                per_token = F.kl_div(reference_logps, policy_logps, log_target=True, reduction="none").sum(-1)
                kls.append((per_token.cpu() * generated_mask[row]).sum(-1).item())
    return kls


def refuse_non_finite(values: list[float], what: str) -> None:
    """Refuse a NaN or infinite log-prob or KL, naming the first item: a NaN margin compares false and would count as a
    wrongly ranked pair, and every mean over it would be NaN in metrics.json (which strict JSON readers refuse)."""
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(
                f"{what} {index} (0-based) is {value}, so no reward, accuracy or KL can be computed from it: the"
                " model's logits hold NaN or infinity, from weights that a diverged training left (see the train"
                " stage's loss) or from float16 overflowing in some models (this stage loads both models in"
                " model.dtype, where 'auto' is float16 on a GPU without bfloat16; model.dtype float32 avoids it)"
            )


def reward_metrics(per_pair: dict[str, list], beta: float) -> dict:
    """TRL's rewards/* and logps/* (policy) metrics, the reference's logps and per-token means, per-pair rewards."""
    import torch
    import torch.nn.functional as F

    for model in ("policy", "reference"):
        for side in ("chosen", "rejected"):
            what = f"the {model}'s log-prob of the {side} response of held-out pair"
            refuse_non_finite(per_pair[f"{model}_{side}_logps"], what)
    logps = {key: torch.tensor(values, dtype=torch.float64) for key, values in per_pair.items()}
    chosen_rewards = beta * (logps["policy_chosen_logps"] - logps["reference_chosen_logps"])
    rejected_rewards = beta * (logps["policy_rejected_logps"] - logps["reference_rejected_logps"])
    margins = chosen_rewards - rejected_rewards
    per_pair["chosen_rewards"] = chosen_rewards.tolist()
    per_pair["rejected_rewards"] = rejected_rewards.tolist()
    per_pair["reward_margins"] = margins.tolist()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        # Strictly greater, as TRL counts it: a pair with zero margin is not accurate.
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": margins.mean(),
        # The DPO sigmoid loss (TRL's eval_loss when loss_type is sigmoid), whatever loss was trained.
        "loss/sigmoid": -F.logsigmoid(margins).mean(),
    }
    for model, prefix in (("policy", ""), ("reference", "ref_")):
        for side in ("chosen", "rejected"):
            summed = logps[f"{model}_{side}_logps"]
            metrics[f"{prefix}logps/{side}"] = summed.mean()
            metrics[f"{prefix}logps_per_token/{side}"] = (summed / logps[f"{side}_tokens"].clamp(min=1)).mean()
    return {**{key: value.item() for key, value in metrics.items()}, **reference_agreement(per_pair)}


def reference_agreement(per_pair: dict[str, list]) -> dict:
    """How far the implicit reward's ranking of the held-out pairs follows the reference's own likelihoods.

    `ref_logps/accuracies`: the share of pairs that the reference alone already ranks right (chosen more likely
    than rejected). Then the implicit-reward accuracy (a positive `reward_margins`, as `rewards/accuracies` counts
    it) on the pairs where the reference prefers the chosen, and on the others (`ref_prefers_rejected`; a tie would
    need equal log-probs to the last bit). An accuracy is left out where its set is empty, which keeps NaN out of
    metrics.json. A policy that only learnt the preference ranks both sets alike; one that also narrowed onto what
    the reference finds likely (both log-ratios fall, the less typical response's further) ranks the second set
    worse. In the sentiment recipe the two sets rank alike over three seeds (docs/implicit-reward-accuracy.md).
    """
    import torch

    correct = torch.tensor(per_pair["reward_margins"], dtype=torch.float64) > 0
    prefers_chosen = torch.tensor(per_pair["reference_chosen_logps"], dtype=torch.float64) > torch.tensor(
        per_pair["reference_rejected_logps"], dtype=torch.float64
    )
    result: dict = {"ref_logps/accuracies": prefers_chosen.double().mean().item()}
    for name, subset in (("ref_prefers_chosen", prefers_chosen), ("ref_prefers_rejected", ~prefers_chosen)):
        count = int(subset.sum())
        result[f"num_pairs/{name}"] = count
        if count:
            result[f"rewards/accuracies/{name}"] = correct[subset].double().mean().item()
    return result


def evaluate_run(params: Params, run_dir: str | Path, project_dir: str | Path = ".") -> dict:
    """Evaluate <run_dir>/merged against the reference; write <run_dir>/metrics.json and return its content.

    The result holds scalars under flat keys (TRL's names where TRL has one), plus `per_pair` and
    `per_generation` dicts of per-item lists for plots. Without generations.jsonl the KL and win-rate
    are skipped with a warning.
    """
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    run_dir = Path(run_dir)
    wandb_key_for_online(params.tracking.report_to)  # the summary goes to wandb last, after the models have run
    beta = params.dpo.get("beta", dpo_config_defaults()["beta"])
    tokenizer = load_tokenizer(str(run_dir / "merged"), params)  # the one generate.py used
    examples, dropped = held_out_examples(params, run_dir, tokenizer)
    max_length, truncation_mode = trl_truncation(params)
    collator = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    generations_path = run_dir / GENERATIONS_FILE
    records = read_jsonl(generations_path) if generations_path.exists() else []
    if not records:
        warnings.warn(f"{generations_path} not found: run generate first for the KL and the win-rate", stacklevel=2)

    models = {
        "policy": load_causal_lm(str(run_dir / "merged"), params).eval(),
        "reference": load_causal_lm(model_source(params, project_dir), params).eval(),
    }
    per_pair = pair_logps(models, examples, collator, params.evaluate.batch_size, params.dpo.get("ld_alpha"))
    kls = generation_kl(
        models["policy"], models["reference"], records, tokenizer.pad_token_id, params.evaluate.batch_size
    )
    del models
    free_memory()

    metrics = {"beta": beta, "num_pairs": len(examples), "num_pairs_dropped": dropped}
    if origin := held_out_origin(run_dir):  # data.eval_split, or data.eval_fraction by run.seed, or round 1's
        metrics["held_out_pairs"] = origin
    metrics.update(reward_metrics(per_pair, beta))
    per_generation = {}
    if records:
        metrics.update(generation_metrics(records, kls))
        policy_scores, reference_scores, truncated = judge_scores(params, records, project_dir)
        per_generation = {"kl": kls, "policy_score": policy_scores, "reference_score": reference_scores}
        outcome = win_rate_from_scores(policy_scores, reference_scores)
        metrics["judge"] = judge_name(params.evaluate)
        # Which prompts the models were compared on: the user's own generate.prompts may well have been trained on.
        metrics["generate/prompts"] = "generate.prompts" if params.generate.prompts else "held-out"
        metrics["win_rate"] = outcome.pop("win_rate")
        metrics.update({f"win_rate/{key}": value for key, value in outcome.items()})
        level = params.evaluate.confidence
        low, high = win_rate_interval(win_outcomes(policy_scores, reference_scores), level)
        metrics.update({"win_rate/ci_low": low, "win_rate/ci_high": high, "win_rate/ci_level": level,
                        "win_rate/ci_method": "wilson"})  # fmt: skip
        metrics["judge/policy_score"] = sum(policy_scores) / len(records)
        metrics["judge/reference_score"] = sum(reference_scores) / len(records)
        if truncated is not None:  # a reward-model judge: how many of the 2 x num_generations texts it cut to fit
            metrics["judge/truncated"] = truncated
    metrics.update(per_pair=per_pair, per_generation=per_generation)
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    record_summary(run_dir, log_summary(params, run_dir, metrics))  # the trackers get the headline numbers too
    return metrics


def judge_scores(
    params: Params, records: list[dict], project_dir: str | Path
) -> tuple[list[float], list[float], int | None]:
    """The judge's scores of policy and reference generations: those the generate stage stored when evaluate.judge
    gave them, else scored now (evaluate.judge changed after the generate stage, which does not redo that stage,
    or generations.jsonl from before the kit recorded each score's judge). Third, how many of those texts (policy's
    and reference's) a reward-model judge cut to the length it reads; None for a judge that cuts nothing, or
    stored scores from before the kit recorded it."""
    judged_by = judge_name(params.evaluate)
    if all(r.get("judge") == judged_by and "policy_score" in r and "reference_score" in r for r in records):
        flags = [r.get(f"{side}_judge_truncated") for r in records for side in ("policy", "reference")]
        truncated = None if None in flags else sum(flags)
        return [r["policy_score"] for r in records], [r["reference_score"] for r in records], truncated
    stored = sorted({str(r.get("judge", "an unrecorded judge")) for r in records})
    print(f"{GENERATIONS_FILE} was scored by {', '.join(stored)} in the generate stage; scoring its generations again"
          f" with evaluate.judge {judged_by}")
    judge = make_judge(params, project_dir)
    prompts = [r["prompt"] for r in records]
    policies, references = [r["policy"] for r in records], [r["reference"] for r in records]
    policy_scores, policy_cut = score_with_cuts(judge, prompts, policies)
    reference_scores, reference_cut = score_with_cuts(judge, prompts, references)
    truncated = sum(policy_cut) + sum(reference_cut) if policy_cut is not None else None
    return policy_scores, reference_scores, truncated


def win_rate_interval(outcomes: list[float], level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the win-rate over the n prompts (outcomes 1, 0.5 for a tie, 0), at `level`.

    It stays inside [0, 1] and keeps its coverage near a win-rate of 0 or 1 and at small n, where a percentile
    bootstrap over prompts does not: that collapses to the point itself when every prompt agrees (40 wins of 40 read
    [1.00, 1.00]) and, simulated at a true win-rate of 0.95 over 40 prompts, held it in only about 83 % of its
    nominal 95 % intervals (Wilson: 95 %). A tie counts half: its outcome varies less than a win or loss would, so
    with ties the interval is, if anything, too wide."""
    from statistics import NormalDist

    n = len(outcomes)
    if n == 0:
        raise ValueError("no outcomes: a win-rate interval needs at least one prompt")
    mean = sum(outcomes) / n
    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
    # The interval always holds the win-rate itself; min/max only undo rounding (1 - 1e-16 at 40 wins of 40).
    return max(0.0, min(centre - half, mean)), min(1.0, max(centre + half, mean))


def _tokens(text: str) -> list[str]:
    return text.lower().split()


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams in the texts (Li et al. 2016): low when outputs repeat phrases."""
    grams = [tuple(words[i : i + n]) for words in map(_tokens, texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(text: str, n: int = 3) -> float:
    """Share of a text's n-grams that already occurred earlier in the same text: 0 for fresh prose, near 1 for
    a loop such as "particularly impressive, particularly impressive, ..."."""
    words = _tokens(text)
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    seen, repeats = set(), 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0


def generation_metrics(records: list[dict], kls: list[float]) -> dict:
    """KL, lengths and repetition of the generations: what a reward can be bought with shows next to it."""
    refuse_non_finite(kls, "the KL(policy || reference) along the policy's response to prompt")
    generated_tokens = sum(len(r["policy_token_ids"]) for r in records)
    metrics = {
        "num_generations": len(records),
        "kl": sum(kls) / len(kls),  # nats per generation
        "kl/token": sum(kls) / max(generated_tokens, 1),
        "generate/policy_tokens": generated_tokens / len(records),
        "generate/reference_tokens": sum(len(r["reference_token_ids"]) for r in records) / len(records),
    }
    for model in ("reference", "policy"):
        texts = [r[model] for r in records]
        metrics[f"text/{model}_words"] = sum(len(_tokens(t)) for t in texts) / len(texts)
        metrics[f"text/{model}_distinct_2"] = distinct_n(texts, 2)
        metrics[f"text/{model}_repeated_3grams"] = sum(repeated_ngram_share(t, 3) for t in texts) / len(texts)
    return metrics


def before_after_table(metrics: dict):
    """Reference (before DPO) against policy (after) on the held-out generations: judged reward, length and
    repetition side by side, so a reward bought with repetition shows next to the reward itself."""
    import pandas as pd

    columns = ["reference (before)", "policy (after DPO)"]
    if "win_rate" not in metrics:
        # Evaluated without generations.jsonl (`--stages merge,evaluate` allows it): there is nothing to compare, and
        # a KeyError would fail notebook 05 after the implicit-reward metrics were computed and written.
        missing = f"not measured: no {GENERATIONS_FILE}; run the generate stage (notebook 04) first"
        return pd.DataFrame([[missing, missing]], index=["judged reward, length and repetition"], columns=columns)
    rows = {
        f"judged reward ({metrics['judge']})": ("judge/reference_score", "judge/policy_score"),
        "words per response": ("text/reference_words", "text/policy_words"),
        "distinct-2 (higher = more varied)": ("text/reference_distinct_2", "text/policy_distinct_2"),
        "repeated 3-grams (share)": ("text/reference_repeated_3grams", "text/policy_repeated_3grams"),
    }
    return pd.DataFrame(
        {label: dict(zip(columns, (metrics[old], metrics[new]), strict=True)) for label, (old, new) in rows.items()}
    ).T


def reference_agreement_table(metrics: dict):
    """The held-out pairs split by the reference's own ranking (see `reference_agreement`): how many, and how
    often the implicit reward ranks them right, beside all pairs. Computed from the per-pair log-probs, so an
    evaluation stored before these metrics existed shows it too."""
    import pandas as pd

    split = reference_agreement(metrics["per_pair"])
    rows = {"all held-out pairs": (metrics["num_pairs"], metrics["rewards/accuracies"])}
    for name, label in (("ref_prefers_chosen", "the reference already prefers the chosen"),
                        ("ref_prefers_rejected", "the reference prefers the rejected")):  # fmt: skip
        # An empty half has no accuracy: say so, where a NaN would read as a failed computation.
        rows[label] = (split[f"num_pairs/{name}"], split.get(f"rewards/accuracies/{name}", "none: no pairs"))
    return pd.DataFrame.from_dict(rows, orient="index", columns=["pairs", "implicit-reward accuracy"])


def headline(metrics: dict) -> str:
    """One line with the numbers a reader looks for first."""
    parts = [f"held-out implicit-reward accuracy {metrics['rewards/accuracies']:.2f} on {metrics['num_pairs']} pairs"]
    if "win_rate" in metrics:
        # Explicit generate.prompts are the user's own, perhaps trained on (an evaluation stored before the key
        # existed reads as held-out).
        held_out = metrics.get("generate/prompts", "held-out") == "held-out"
        prompts = "held-out prompts" if held_out else "prompts of generate.prompts"
        parts = [
            f"judged reward {metrics['judge/reference_score']:.2f} -> {metrics['judge/policy_score']:.2f}",
            f"win-rate {metrics['win_rate']:.2f} [{metrics['win_rate/ci_low']:.2f}, {metrics['win_rate/ci_high']:.2f}]"
            f" over {metrics['win_rate/n']} {prompts}",
            f"KL(policy || reference) {metrics['kl']:.2f} nats",
            *parts,
        ]
    return "; ".join(parts)


def scalar_metrics(metrics: dict):
    """The scalars of an evaluation as a pandas Series: a readable table in a notebook, `.to_dict()` for JSON."""
    import pandas as pd

    return pd.Series({key: value for key, value in metrics.items() if not isinstance(value, dict)}, name="value")


def plot_evaluation(metrics: dict):
    """Per-pair log-prob margins of policy vs reference, implicit reward margins, and the judge's verdicts.

    Returns a matplotlib Figure (not a pyplot figure, so a notebook shows it once, where it is returned).
    """
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    pairs = metrics["per_pair"]
    figure = Figure(figsize=(17, 3.8), layout="constrained")
    margins_axis, rewards_axis, scores_axis, judge_axis = figure.subplots(1, 4)

    margins = {
        label: np.subtract(pairs[f"{model}_chosen_logps"], pairs[f"{model}_rejected_logps"])
        for label, model in (("reference (base)", "reference"), ("policy (DPO)", "policy"))
    }
    bins = np.histogram_bin_edges(np.concatenate(list(margins.values())), bins=20)
    for label, values in margins.items():
        margins_axis.hist(values, bins=bins, alpha=0.6, label=label)
    margins_axis.set(title="log p(chosen) - log p(rejected)", xlabel="nats, per held-out pair", ylabel="pairs")
    margins_axis.legend()

    rewards_axis.hist(pairs["reward_margins"], bins=20, color="tab:green")
    rewards_axis.axvline(0, color="black", linewidth=0.8)
    rewards_axis.set(
        title=f"implicit reward margin (accuracy {metrics['rewards/accuracies']:.0%})",
        xlabel=f"beta={metrics['beta']} x (log-ratio chosen - log-ratio rejected)",
        ylabel="pairs",
    )

    scores = metrics.get("per_generation", {})
    if scores:
        bins = np.histogram_bin_edges(np.concatenate([scores["reference_score"], scores["policy_score"]]), bins=20)
        scores_axis.hist(scores["reference_score"], bins=bins, alpha=0.6, label="reference (base)")
        scores_axis.hist(scores["policy_score"], bins=bins, alpha=0.6, label="policy (DPO)")
        # generate.prompts are the user's own, perhaps trained on: not held-out (as in the headline)
        held_out = metrics.get("generate/prompts", "held-out") == "held-out"
        which = "held-out generations" if held_out else "generations on generate.prompts"
        scores_axis.set(title=f"judge scores of {which} ({metrics['judge']})", xlabel="score", ylabel="prompts")
        scores_axis.legend()
    else:
        scores_axis.set_axis_off()

    if "win_rate" in metrics:
        counts = [metrics["win_rate/wins"], metrics["win_rate/ties"], metrics["win_rate/losses"]]
        judge_axis.bar(["policy wins", "ties", "reference wins"], counts, color=["tab:orange", "tab:gray", "tab:blue"])
        judge_axis.set(
            title=f"win-rate {metrics['win_rate']:.0%} [{metrics['win_rate/ci_low']:.0%}, {metrics['win_rate/ci_high']:.0%}]",
            ylabel="prompts",
        )
        judge_axis.set_xlabel(f"KL(policy || reference) = {metrics['kl']:.3g} nats per generation")
    else:
        judge_axis.text(0.5, 0.5, "no generations.jsonl:\nrun generate first", ha="center", va="center")
        judge_axis.set_axis_off()
    # Every y axis counts pairs or prompts: whole-number ticks (matplotlib's own put 2.5 prompts on 8 generations).
    for axis in figure.axes:
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    return figure

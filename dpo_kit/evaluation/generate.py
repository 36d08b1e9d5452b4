"""Side-by-side generations of the reference (base) model and the DPO policy on the same prompts.

Both models start from the same token ids with the same sampling settings and the same seed, so what
differs in the table comes from the weights. The generated token ids are saved as well: evaluate.py
measures the KL of the policy to the reference along exactly these continuations. The sampling itself is
`dpo_kit.models.sampling`, shared with the on-policy data source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dpo_kit.data.on_policy import HELD_OUT_PROMPTS, prompt_key
from dpo_kit.judges import Prompt, judge_name, make_judge, score_with_cuts
from dpo_kit.models.loading import free_memory, load_causal_lm, load_tokenizer, model_source
from dpo_kit.models.sampling import eos_token_ids, prompt_token_ids, response_text, sample_continuations
from dpo_kit.params import Params

if TYPE_CHECKING:
    import pandas

GENERATIONS_FILE = "generations.jsonl"
# generate.best_of_n responses per prompt from the reference, judged: the report's best-of-N baseline.
REFERENCE_SAMPLES_FILE = "reference_samples.jsonl"


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as lines:
        return [json.loads(line) for line in lines if line.strip()]


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    with open(path, "w") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def comparison_prompts(params: Params, run_dir: str | Path) -> list[Prompt]:
    """params.generate.prompts as single user messages, else the first num_prompts distinct held-out prompts: in
    round 2 of iterative DPO those of the sampler's run (data/held_out_prompts.jsonl), which this round's score-gap
    filter may have thinned in eval.jsonl, so that both rounds are compared on the same prompts."""
    if params.generate.prompts:
        return [[{"role": "user", "content": text}] for text in params.generate.prompts]
    data_dir = Path(run_dir) / "data"
    source = data_dir / HELD_OUT_PROMPTS if (data_dir / HELD_OUT_PROMPTS).is_file() else data_dir / "eval.jsonl"
    # One row per held-out pair, and pairs that share a prompt (hh-rlhf, UltraFeedback and orca ask one question more
    # than once) are held out together: taken row by row, one prompt was generated for and judged twice, and counted
    # twice in the win-rate and its interval. Each prompt once, where it first appears.
    distinct: dict[str, dict] = {}
    for row in read_jsonl(source):
        distinct.setdefault(prompt_key(row), row)
    rows = list(distinct.values())
    wanted = params.generate.num_prompts
    # Fewer prompts than asked would silently shrink the comparison (the win-rate's interval widens with it), and
    # none would only fail later, in the side-by-side table, with a KeyError.
    if not rows:
        raise ValueError(
            f"{source} holds no held-out prompts to generate for: run the format stage (notebook 01) again, which"
            " holds out at least one pair, or give generate.prompts explicitly"
        )
    if wanted > len(rows):
        raise ValueError(
            f"generate.num_prompts is {wanted}, but {source} holds {len(rows)} distinct held-out prompts: set"
            f" generate.num_prompts to at most {len(rows)}, hold out more pairs in the format stage (data.eval_fraction,"
            " or a larger data.eval_split; round 2 of iterative DPO holds out round 1's), or give generate.prompts explicitly"
        )
    return [row["prompt"] for row in rows[:wanted]]


def display_prompt(prompt: Prompt, tokenizer=None) -> str:
    """The last user message, for tables, followed by an assistant prefill the responses continue. A standard-format
    prompt is its text; given the tokenizer, without the chat template's special tokens (the demo's prompts are
    rendered ChatML: "<|im_start|>user\nReview a heist movie.<|im_end|>..." reads "user\nReview a heist movie.")."""
    if isinstance(prompt, str):
        if tokenizer is None:
            return prompt
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()
    user = [message["content"] for message in prompt if message["role"] == "user"][-1]
    return f"{user} → {prompt[-1]['content']}…" if prompt[-1]["role"] == "assistant" else user


def generate_continuations(
    source: str,
    params: Params,
    tokenizer,
    prompts_ids: list[list[int]],
    description: str | None = None,
    best_of_n: int = 0,
) -> tuple[list[list[int]], list[list[list[int]]], set[int]]:
    """Load the model at `source` and generate one continuation per prompt with the `generate` settings; with
    `best_of_n`, also that many more per prompt from the same model (else an empty list). Also the model's eos ids,
    which tell a continuation max_new_tokens cut (`response_text`)."""
    settings = params.generate
    model = load_causal_lm(source, params).eval()

    def sample(num_samples: int, what: str | None, seed: int) -> list[list[list[int]]]:
        return sample_continuations(
            model,
            tokenizer,
            prompts_ids,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            batch_size=settings.batch_size,
            num_samples=num_samples,
            seed=seed,
            description=what,
        )

    continuations = [one for (one,) in sample(1, description, params.run.seed)]
    # Drawn after, from their own seed, so the side-by-side responses are the same with and without them.
    extra = sample(best_of_n, description and f"{description}, best-of-{best_of_n}", params.run.seed + 1) if best_of_n else []
    return continuations, extra, eos_token_ids(model, tokenizer)


def generate_comparisons(params: Params, run_dir: str | Path, project_dir: str | Path = ".") -> pandas.DataFrame:
    """Generate with the reference (base) and the DPO policy (<run_dir>/merged) on the same prompts.

    Writes <run_dir>/generations.jsonl, one line per prompt with the prompt (messages, rendered text, and as tables show it),
    both responses, their token ids and token counts, and returns a DataFrame for a side-by-side table.
    With generate.best_of_n, also <run_dir>/reference_samples.jsonl: that many more judged reference responses
    per prompt.
    """
    run_dir = Path(run_dir)
    policy_source = str(run_dir / "merged")
    reference_source = model_source(params, project_dir)
    # The policy's saved tokenizer is the one it was trained with; both models get the same prompt ids.
    tokenizer = load_tokenizer(policy_source, params)
    prompts = comparison_prompts(params, run_dir)
    prompts_ids = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]

    # One model in memory at a time: each is dropped when generate_continuations returns.
    best_of_n = params.generate.best_of_n
    reference_ids, reference_samples_ids, reference_eos = generate_continuations(
        reference_source, params, tokenizer, prompts_ids, "reference", best_of_n
    )
    free_memory()
    policy_ids, _, policy_eos = generate_continuations(policy_source, params, tokenizer, prompts_ids, "policy (DPO)")
    free_memory()

    # A reward-model judge reads a standard prompt and its response joined as text: stripped, "...this film, I" and
    # " was great" read "...this film, Iwas great", a text the format stage's pairs never held.
    references = [response_text(tokenizer, ids, prompt, reference_eos) for ids, prompt in zip(reference_ids, prompts, strict=True)]
    policies = [response_text(tokenizer, ids, prompt, policy_eos) for ids, prompt in zip(policy_ids, prompts, strict=True)]
    # Scored here, once, so the table shows the judge's verdicts. Each record names its judge: the evaluate stage
    # reads these scores only while evaluate.judge is still that judge (it is not one of this stage's inputs).
    judge, judged_by = make_judge(params, project_dir), judge_name(params.evaluate)
    # A reward model says which texts it cut to the length it reads (the start of their prompt), so a record shows
    # when its score was of less than the whole prompt; the other judges cut nothing and record nothing.
    reference_scores, reference_cut = score_with_cuts(judge, prompts, references)
    policy_scores, policy_cut = score_with_cuts(judge, prompts, policies)
    judge_cut = [{"reference_judge_truncated": reference, "policy_judge_truncated": policy}
                 for reference, policy in zip(reference_cut, policy_cut, strict=True)
                 ] if reference_cut is not None else [{} for _ in prompts]  # fmt: skip
    if best_of_n:
        samples = [[response_text(tokenizer, ids, prompt, reference_eos) for ids in per_prompt]
                   for per_prompt, prompt in zip(reference_samples_ids, prompts, strict=True)]
        repeated, flat = [p for p in prompts for _ in range(best_of_n)], [t for texts in samples for t in texts]
        scores, sample_cut = score_with_cuts(judge, repeated, flat)
        write_jsonl(run_dir / REFERENCE_SAMPLES_FILE, [
            {"prompt": prompt, "judge": judged_by, "samples": texts,
             "scores": scores[i * best_of_n : (i + 1) * best_of_n], "tokens": [len(ids) for ids in per_prompt],
             **({"judge_truncated": sample_cut[i * best_of_n : (i + 1) * best_of_n]} if sample_cut else {})}
            for i, (prompt, texts, per_prompt) in enumerate(zip(prompts, samples, reference_samples_ids, strict=True))
        ])  # fmt: skip
    del judge
    free_memory()

    records = [
        {
            "prompt": prompt,
            "prompt_text": tokenizer.decode(prompt_ids),
            "prompt_display": display_prompt(prompt, tokenizer),
            "reference": reference_text,
            "policy": policy_text,
            "reference_score": reference_score,
            "policy_score": policy_score,
            "judge": judged_by,
            **cut,
            "prompt_tokens": len(prompt_ids),
            "reference_tokens": len(reference),
            "policy_tokens": len(policy),
            "prompt_token_ids": prompt_ids,
            "reference_token_ids": reference,
            "policy_token_ids": policy,
        }
        for prompt, prompt_ids, reference, policy, reference_text, policy_text, reference_score, policy_score, cut in zip(
            prompts, prompts_ids, reference_ids, policy_ids, references, policies, reference_scores, policy_scores,
            judge_cut, strict=True,
        )
    ]
    write_jsonl(run_dir / GENERATIONS_FILE, records)
    return comparisons_frame(records)


def comparisons_frame(records: list[dict]) -> pandas.DataFrame:
    """The readable columns of generation records (e.g. `read_jsonl(run_dir / 'generations.jsonl')`)."""
    import pandas as pd

    frame = pd.DataFrame(records)
    # Records of an earlier kit have no prompt_display: their prompts are shown as written.
    shown = [record.get("prompt_display") or display_prompt(record["prompt"]) for record in records]
    frame.insert(0, "user_prompt", shown)
    columns = ["user_prompt", "reference", "policy", "prompt_tokens", "reference_tokens", "policy_tokens"]
    return frame[columns + [c for c in ("reference_score", "policy_score", "judge") if c in frame]]


def side_by_side_table(frame: pandas.DataFrame):
    """A Styler showing prompt, reference and policy side by side with wrapped text and the judge's scores."""
    shown = ["user_prompt", "reference", "reference_score", "policy", "policy_score"]
    # The scores are the generate stage's, by the judge it recorded: evaluate.judge may have changed since.
    judges = sorted(set(frame["judge"].dropna())) if "judge" in frame else []
    judge = f"judge ({', '.join(judges)})" if judges else "judge"
    return (
        frame[[c for c in shown if c in frame]]
        .rename(columns={"user_prompt": "prompt", "reference": "reference (base)", "policy": "policy (DPO)",
                         "reference_score": f"{judge}: reference", "policy_score": f"{judge}: policy"})
        .style.format(precision=2)
        .set_properties(**{"white-space": "pre-wrap", "text-align": "left", "vertical-align": "top"})
        .set_table_styles([{"selector": "th", "props": [("text-align", "left")]}])
    )

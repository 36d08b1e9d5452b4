"""The 'generate' data source: preference pairs sampled from a model and ranked by a judge (on-policy).

As in the DPO paper's controlled-sentiment experiment, the pairs come from the model being trained: for
each prompt, `num_samples` responses are sampled from the sampler (the reference model, unless
`data.generate.sampler` names another), the judge scores them, and the best becomes `chosen`, the worst
`rejected`. A prompt whose best and worst scores are closer than `min_score_gap` carries no clear
preference and is dropped, with its samples and scores, to dropped.jsonl (reason `score_gap_too_small`). A prompt
repeated in the prompts file is sampled once (reason `duplicate_prompt` for the later rows), so that no prompt is
both trained on and held out.

Naming a previous run's merged policy as the sampler gives round 2 of iterative DPO: pairs sampled from
the round-one policy, trained against the same reference. Round 2 holds out the prompts that round 1 held
out (`sampler_run_held_out_prompts`), so every round is tested on the same prompts and none of them was
ever trained on, by this round or by the policy that sampled it.

The source yields one raw row per prompt: {"prompt", "samples", "scores", "cut"}. `ranked_pair` converts such
a row into a TRL pair, so ranking happens inside the audit, which keeps or drops every row with a reason.
`cut` says which samples data.generate.max_new_tokens stopped before the model ended them: TRL appends the eos
token to every response of a standard-format pair (a conversational one ends in the chat template's end of turn),
so such a response is trained as if the model had ended it there. The data report counts them (`responses_cut`),
so a max_new_tokens that cuts most replies short shows.

A judge with a length floor (the sentiment judge scores a response of fewer than `sentiment_min_words` words, 8 by
default, -1) adds `floored`: which samples the floor scored. A pair whose rejected response is floored and whose
chosen is not was decided by length, not by what the judge measures. With a max_new_tokens that leaves room for only
about as many words as the floor asks, nearly every pair is such a pair, and DPO learns to write more words per
token: the data report counts them (`judge_floor`), so that shows too.

A reward-model judge adds `judge_truncated`: which samples it scored with the start of their prompt cut away, the
prompt and response together being longer than the reward model reads. The data report counts them
(`judge_truncated`).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from dpo_kit.data.drops import DropRow, row_name
from dpo_kit.data.formats import checked_messages, present_columns
from dpo_kit.params import BUNDLED_PROMPT_SETS, Params, missing_sampler_directory, sampler_is_local

# Written by the format stage of a round 2 (data/): the held-out prompts of the sampler's run, which the generate
# stage compares the models on.
HELD_OUT_PROMPTS = "held_out_prompts.jsonl"
# Marks the row of samples.jsonl for a prompt that was not sampled, with the reason and detail ranked_pair drops it
# for: a repeat of an earlier row's prompt (data.deduplicate), one the chat template refuses, or one too long alone.
NOT_SAMPLED = "not_sampled"


def prompt_rows(params: Params, project_dir: str | Path = ".") -> list[dict]:
    """The prompts of `data.generate.prompts`, at most `data.max_rows`, each as {"prompt": ...} as read."""
    return prompt_rows_and_lines(params, project_dir)[0]


def prompt_rows_and_lines(params: Params, project_dir: str | Path = ".") -> tuple[list[dict], list[int] | None]:
    """prompt_rows, and the line of a .jsonl or .csv prompts file where each starts (None for other files)."""
    from dpo_kit.bundled import movie_review_prompts
    from dpo_kit.data.sources import read_local_file_and_lines

    settings = params.data.generate
    lines = None
    if settings.prompts in BUNDLED_PROMPT_SETS:
        rows = movie_review_prompts(prefill=settings.prompts == "movie-review-openings")
    else:
        path = Path(project_dir) / settings.prompts
        rows, lines = read_local_file_and_lines(path, params.data.max_rows, key="data.generate.prompts")
    if params.data.max_rows:
        rows, lines = rows[: params.data.max_rows], lines and lines[: params.data.max_rows]
    return rows, lines


def as_messages(row: dict) -> list[dict]:
    """A prompt row's chat messages; a plain string is the user's turn. Raises DropRow for anything else."""
    if "prompt" not in row:
        raise DropRow("missing_column", f"no 'prompt' column ({present_columns(row, 'prompt')})")
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DropRow("empty_prompt", "the prompt is empty or whitespace only")
        return [{"role": "user", "content": prompt}]
    if not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)):
        raise DropRow("malformed_messages", f"prompt is neither text nor a list of {{role, content}} messages: {prompt!r:.80}")
    # A role or content that is not text (null, a number) would be sampled from and then fail the audit's text
    # checks with an AttributeError; it is dropped here with the message's position, as the converters drop it.
    checked_messages(prompt, "prompt")
    return prompt


def sampler_source(params: Params, project_dir: str | Path = ".") -> str:
    """The model that samples: data.generate.sampler (a local directory or hub id), else the run's own model."""
    from dpo_kit.models.loading import model_source

    sampler = params.data.generate.sampler
    if sampler is None:
        return model_source(params, project_dir)
    if problem := missing_sampler_directory(params, project_dir):
        raise FileNotFoundError(problem)
    return str(Path(project_dir) / sampler) if sampler_is_local(params, project_dir) else sampler


def sampler_load_params(params: Params, source: str) -> Params:
    """The params the sampler at `source` (sampler_source's answer) is loaded with. model.revision and
    model.trust_remote_code are the policy repo's: a hub sampler that is another repo gets neither (its own default
    branch, none of its code run), where it had the policy's revision and ran its code on the policy's yes. A local
    directory (an earlier run's merged/, which holds that model's code if it has any) keeps the trust; a revision
    means nothing there."""
    sampler = params.data.generate.sampler
    if sampler is None or sampler == params.model.name_or_path:
        return params
    update = {"revision": None}
    if not Path(source).exists():
        update["trust_remote_code"] = False
    return params.model_copy(update={"model": params.model.model_copy(update=update)})


# Files that hold a tokenizer: a model directory with none of them has no vocabulary of its own to compare.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def refuse_sampler_with_another_vocabulary(params: Params, source: str, tokenizer) -> None:
    """Refuse a data.generate.sampler whose tokenizer is not the run's. The prompts are encoded and the samples decoded
    with the run's tokenizer (the pairs are trained with it), so another model's token ids turned into other text: a
    SmolLM2 sampler for the tiny model wrote 'rKqq?@ADBA' and the judge ranked that, without an error."""
    if params.data.generate.sampler is None:
        return  # the run's own model
    from transformers import AutoTokenizer

    from dpo_kit.models.loading import from_pretrained, hub_kwargs

    local = Path(source)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        return  # e.g. a checkpoint saved without its tokenizer: the run's is the only one it has
    own = from_pretrained(AutoTokenizer, source, **hub_kwargs(sampler_load_params(params, source)))
    if own.get_vocab() == tokenizer.get_vocab():
        return
    sizes = f"{len(own)} tokens, not {len(tokenizer)}" if len(own) != len(tokenizer) else "its tokens map to other text"
    raise ValueError(
        f"data.generate.sampler '{params.data.generate.sampler}' has another tokenizer than model.name_or_path"
        f" '{params.model.name_or_path}' ({sizes}). The prompts are encoded and the samples decoded with the run's"
        " tokenizer, which the pairs are trained with, so that model's token ids would be read as other text. Sample"
        " with a policy of the same model (an earlier run's merged/) or another model that shares its tokenizer."
    )


@dataclass(frozen=True)
class HeldOutPrompts:
    """The held-out prompts of the run whose policy samples this round, read from `source_file`."""

    source_file: Path  # that run's data/held_out_prompts.jsonl where it has one (it was a round 2), else eval.jsonl
    prompts: tuple  # the held-out prompts in that file's order, as written there
    keys: frozenset[str]


def prompt_key(pair: dict) -> str:
    """A pair's prompt as one comparable string, in whichever TRL format the pair was written."""
    return json.dumps(pair["prompt"], ensure_ascii=False, sort_keys=True)


def sampler_run_held_out_prompts(params: Params, project_dir: str | Path = ".") -> HeldOutPrompts | None:
    """The held-out prompts of the kit run that holds the policy data.generate.sampler names (its merged/, or
    any model directory inside the run: a checkpoint, an earlier output moved aside), else None.

    A seeded split of this round's own pairs cannot be used there: it shuffles the pairs that survive the
    score-gap filter, and a different sampler drops different prompts, so the held-out set would take in
    prompts that the sampling policy was trained on, and round 2's win-rate would be measured partly on
    round 1's training prompts. Rounds share one held-out set instead.
    """
    sampler = params.data.generate.sampler
    if problem := missing_sampler_directory(params, project_dir):
        raise FileNotFoundError(problem)  # before any split: a missing round 1 is not a reason for a seeded one
    if sampler is None or not (Path(project_dir) / sampler).is_dir():
        return None  # the reference itself, or a hub id: no earlier run to stay consistent with
    policy = (Path(project_dir) / sampler).resolve()
    # The nearest enclosing folder with a manifest and a data/ folder is the run. A folder moved aside under
    # previous/ has its own manifest entries but no data/: the run's data/ is further up.
    runs = [folder for folder in policy.parents if (folder / "manifest.json").is_file()]
    if not runs:
        return None  # a model directory that no kit run wrote: nothing is known of what it trained on
    refuse_unfinished_policy(runs[0], policy, sampler)
    for run_dir in runs:
        # A round 2 as the sampler's run (this is round 3) keeps round 1's held-out prompts in held_out_prompts.jsonl,
        # those its score-gap filter dropped included; its eval.jsonl has only the ones it kept.
        found = [run_dir / "data" / name for name in (HELD_OUT_PROMPTS, "eval.jsonl") if (run_dir / "data" / name).is_file()]
        if found:
            break
    else:
        raise FileNotFoundError(
            f"data.generate.sampler '{sampler}' is a policy of the run {runs[0]}, but no data/eval.jsonl was found in"
            f" it or above it ({', '.join(str(run) for run in runs)}). Iterative DPO holds out the prompts that the"
            " sampler's run held out, so that file is needed: re-run that run's format stage. A policy trained on"
            " other prompts samples without this check from a copy outside any run directory."
        )
    source_file = found[0]
    pairs = [json.loads(line) for line in source_file.read_text().splitlines() if line.strip()]
    keys = frozenset(prompt_key(pair) for pair in pairs)
    return HeldOutPrompts(source_file=source_file, prompts=tuple(pair["prompt"] for pair in pairs), keys=keys)


# A run's model directories and the stage that writes each: a sampler among them is that stage's output.
POLICY_STAGES = {"merged": "merge", "trained": "train", "adapter": "train"}


def refuse_unfinished_policy(run_dir: Path, policy: Path, sampler: str) -> None:
    """Refuse a sampler that is the merged/ (or trained/, adapter/) of a run whose stage writing it did not complete:
    a merge that failed its logits check or was interrupted leaves its merged/ on disk, and one running elsewhere is
    still writing it. Round 2 would sample from a policy that the kit refused or that is half written."""
    relative = policy.relative_to(run_dir).parts
    stage = POLICY_STAGES.get(relative[0]) if relative else None
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return
    entry = (manifest.get("stages") or {}).get(stage) if stage and isinstance(manifest, dict) else None
    if entry is None or entry.get("status") == "completed":
        return
    raise ValueError(
        f"data.generate.sampler '{sampler}' is the {relative[0]}/ of the run {run_dir}, whose {stage} stage is"
        f" {entry.get('status', 'unfinished')}, not completed ({run_dir / 'manifest.json'}): its {relative[0]}/ is not"
        f" a policy the kit finished. Finish that run first (dpo-kit run {run_dir / 'params.yaml'} --resume), then"
        " sample from it."
    )


def split_as_sampler_run(kept: list[tuple[int, dict]], held_out: HeldOutPrompts) -> tuple[list[dict], list[dict]]:
    """Kept pairs whose prompt the sampler's run held out go to eval; every other one (trained on by that run,
    dropped by it, or new) to train. Each split stays in source order, as `split_rows` keeps it."""
    eval_ = [row for _, row in kept if prompt_key(row) in held_out.keys]
    train = [row for _, row in kept if prompt_key(row) not in held_out.keys]
    if not eval_ or not train:
        empty = "none of its held-out prompts is" if not eval_ else "only its held-out prompts are"
        raise ValueError(
            f"this round holds out the prompts of {held_out.source_file} ({len(held_out.keys)} of them), but {empty}"
            f" among this run's {len(kept)} kept pairs. Either this run's filters dropped them (dropped.jsonl;"
            " data.generate.min_score_gap), or the runs render their prompts differently (data.output_format,"
            " model.chat_template, the tokenizer), or they use other prompts (data.generate.prompts, data.max_rows)."
            " A policy trained on other prompts samples without this check from a copy outside any run directory."
        )
    return train, eval_


def sample_scored_rows(params: Params, tokenizer, project_dir: str | Path = ".") -> list[dict]:
    """One row per prompt: the prompt as read, `num_samples` sampled responses and the judge's score of each.

    A prompt that is not usable is passed through unsampled, so the audit drops it with its reason. So is one that
    could give no pair: a repeat, one the chat template refuses, or one longer alone than the audit's max_length.
    """
    from dpo_kit.judges import make_judge, score_with_cuts
    from dpo_kit.models.loading import free_memory, load_causal_lm
    from dpo_kit.models.sampling import eos_token_ids, prompt_token_ids, response_text, sample_continuations, was_cut

    settings = params.data.generate
    rows, lines = prompt_rows_and_lines(params, project_dir)
    usable: dict[int, list[dict]] = {}
    prompts_ids: dict[int, list[int]] = {}
    first_seen: dict[str, int] = {}  # each prompt's first row
    not_sampled: dict[int, DropRow] = {}
    for index, row in enumerate(rows):
        try:
            messages = as_messages(row)
        except DropRow:
            continue  # ranked_pair raises the same DropRow inside the audit, which records it
        # Each copy of a repeated prompt gave a pair of its own, and the audit's de-duplication compares whole pairs,
        # whose sampled responses differ: the seeded split could then hold out one copy and train on another.
        key = prompt_key({"prompt": messages})
        if params.data.deduplicate and key in first_seen:
            not_sampled[index] = DropRow(
                "duplicate_prompt",
                f"the same prompt as {row_name(first_seen[key], lines and lines[first_seen[key]])}, which was sampled"
                " instead: one prompt gives one pair, so it"
                " is never both trained on and held out (data.deduplicate)",
            )
            continue
        first_seen.setdefault(key, index)
        # Rendered here, before any sampling: a template that refuses a prompt (Gemma's refuses a system message)
        # stopped the whole stage with its exception, and a prompt over max_length alone, which the audit drops, was
        # sampled num_samples times at its full length (and past the context of a model with learned positions).
        try:
            ids = prompt_token_ids(tokenizer, messages)
        except Exception as error:  # noqa: BLE001 - a template raises whatever it likes
            not_sampled[index] = DropRow("chat_template_error", f"{type(error).__name__}: {error}")
            continue
        if params.max_length is not None and len(ids) > params.max_length:
            not_sampled[index] = DropRow(
                "too_long",
                f"the prompt alone is {len(ids)} tokens, over max_length {params.max_length}, so no response can follow"
                " it: not sampled",
            )
            continue
        usable[index], prompts_ids[index] = messages, ids
    source = sampler_source(params, project_dir)
    refuse_sampler_with_another_vocabulary(params, source, tokenizer)
    model = load_causal_lm(source, sampler_load_params(params, source)).eval()
    samples_ids = sample_continuations(
        model,
        tokenizer,
        list(prompts_ids.values()),
        max_new_tokens=settings.max_new_tokens,
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        batch_size=settings.batch_size,
        num_samples=settings.num_samples,
        seed=params.run.seed,
        description=f"sampling {settings.num_samples} responses per prompt",
    )
    eos_ids = eos_token_ids(model, tokenizer)
    del model
    free_memory()

    judge = make_judge(params, project_dir, settings)
    scored = list(rows)
    floored = getattr(judge, "floored", None)  # a judge with a length floor says which scores it set
    for (index, messages), ids in zip(usable.items(), samples_ids, strict=True):
        texts = [response_text(tokenizer, one, messages, eos_ids) for one in ids]
        # A reward model says which texts it cut to the length it reads; the other judges cut none and say None.
        scores, truncated = score_with_cuts(judge, [messages] * len(texts), texts)
        scored[index] = {"prompt": messages, "samples": texts, "scores": scores,
                         "cut": [was_cut(one, eos_ids) for one in ids]}  # fmt: skip
        if floored is not None:
            scored[index]["floored"] = [floored(text) for text in texts]
        if truncated is not None:
            scored[index]["judge_truncated"] = truncated
    for index, drop in not_sampled.items():
        scored[index] = {"prompt": as_messages(rows[index]), NOT_SAMPLED: {"reason": drop.reason, "detail": drop.detail}}
    return scored


def best_and_worst(scores: list[float]) -> tuple[int, int]:
    """The indices of the chosen (highest score; the first of equals) and the rejected (lowest) sample."""
    return max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)


def pair_flags(
    rows: list[dict], kept_indices: list[int], key: str
) -> tuple[list[list[bool]], list[tuple[bool, bool]]] | None:
    """A per-sample flag (`cut`, `floored`) of every sampled row, and (chosen's, rejected's) flag of each kept pair
    (`kept_indices`: their rows in `rows`). None when no row has the flag (written before the kit recorded it, or a
    judge that has no such flag)."""
    sampled = [row[key] for row in rows if isinstance(row, dict) and key in row]
    if not sampled:
        return None
    sides = ((rows[index], best_and_worst(rows[index]["scores"])) for index in kept_indices)
    return sampled, [(row[key][best], row[key][worst]) for row, (best, worst) in sides]


def flagged_responses(rows: list[dict], kept_indices: list[int], key: str, word: str) -> dict | None:
    """How many samples carry the flag `key`, among all samples and among the chosen and rejected responses of the
    kept pairs (`kept_indices`: their rows in `rows`), counted as samples_<word> and pair_responses_<word>. None for
    rows without the flag."""
    flags = pair_flags(rows, kept_indices, key)
    if flags is None:
        return None
    sampled, pairs = flags
    return {
        "samples": sum(len(row) for row in sampled),
        f"samples_{word}": sum(sum(row) for row in sampled),
        "pair_responses": 2 * len(pairs),
        f"pair_responses_{word}": sum(chosen + rejected for chosen, rejected in pairs),
    }


def cut_responses(rows: list[dict], kept_indices: list[int], max_new_tokens: int) -> dict | None:
    """How many responses max_new_tokens cut before the model ended them. None for rows without `cut` (a
    samples.jsonl written before the kit recorded it)."""
    counts = flagged_responses(rows, kept_indices, "cut", "cut")
    return None if counts is None else {"max_new_tokens": max_new_tokens, **counts}


def judge_truncated_responses(rows: list[dict], kept_indices: list[int]) -> dict | None:
    """How many samples a reward-model judge scored with the start of their prompt cut away. None for rows without
    `judge_truncated` (a judge that reads every text whole, or a samples.jsonl from before the kit recorded it)."""
    return flagged_responses(rows, kept_indices, "judge_truncated", "truncated")


def judge_floor_pairs(rows: list[dict], kept_indices: list[int]) -> dict | None:
    """How many samples the judge's length floor scored, and how many kept pairs (`kept_indices`: their rows in
    `rows`) it decided: the rejected response floored and the chosen not. None for rows without `floored` (a judge
    without a floor, or a samples.jsonl written before the kit recorded it)."""
    flags = pair_flags(rows, kept_indices, "floored")
    if flags is None:
        return None
    sampled, pairs = flags
    return {
        "samples": sum(len(row) for row in sampled),
        "samples_floored": sum(sum(row) for row in sampled),
        "pairs": len(pairs),
        "pairs_decided_by_floor": sum(rejected and not chosen for chosen, rejected in pairs),
    }


def ranked_pair(min_score_gap: float):
    """A converter (see dpo_kit.data.formats) from a scored row to a TRL pair: best sample chosen, worst rejected."""

    def convert(row: dict) -> dict:
        messages = as_messages(row)
        if NOT_SAMPLED in row:
            raise DropRow(row[NOT_SAMPLED]["reason"], row[NOT_SAMPLED]["detail"])
        samples, scores = row.get("samples"), row.get("scores")
        if not samples or not scores or len(samples) != len(scores):
            raise DropRow("missing_column", "no scored samples for this prompt")
        # A NaN compares false with every score: first in the list it was both best and worst, elsewhere never either,
        # so the pair was ranked without that sample, or dropped as a tie.
        for position, value in enumerate(scores):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise DropRow(
                    "judge_score_not_finite",
                    f"the judge scored sample {position} (0-based) {value!r}: check the judge (a reward model in"
                    " float16 can overflow to NaN: try model.dtype float32)",
                )
        best, worst = best_and_worst(scores)
        gap = scores[best] - scores[worst]
        # All scores equal make best and worst the same sample: with min_score_gap 0 that pair of one response with
        # itself was dropped as identical_responses, "the same text", though the samples differed.
        if gap < min_score_gap or best == worst:
            detail = (f"best - worst score = {gap:.3f} < data.generate.min_score_gap {min_score_gap}" if gap < min_score_gap
                      else f"all {len(scores)} samples scored {scores[best]:.3f}: the judge prefers none")  # fmt: skip
            if len({sample.strip() for sample in samples}) == 1:
                detail += (f"; all {len(samples)} samples are the same text: sampling that leaves the model one likely"
                           " token (a data.generate.temperature near 0, a small top_p or top_k 1) draws no alternatives")
            raise DropRow("score_gap_too_small", detail)
        return {
            "prompt": messages,
            "chosen": [{"role": "assistant", "content": samples[best]}],
            "rejected": [{"role": "assistant", "content": samples[worst]}],
        }

    return convert

"""The format stage: read the source, convert it to TRL's format, audit it, split it and write it.

Notebook 01 calls `prepare_data`, shows `dropped_summary_table` and `plot_token_lengths`, and the train
stage reads the result back with `load_split`. Files written under `<run_dir>/data/`:

- train.jsonl, eval.jsonl: prompt/chosen/rejected rows in TRL's conversational (default) or standard format
- dropped.jsonl: one line per dropped row: source index (from 0), line (in a .jsonl or .csv file, from 1; else
  null), reason code, detail and the row as read; with data.eval_split, also the split it was read from (`split`)
- samples.jsonl (data.source 'generate'): per prompt, every sampled response and its judge score
- held_out_prompts.jsonl (round 2 of iterative DPO and later): the held-out prompts of round 1, in its
  order, those whose pair this round dropped among them; the generate stage compares the models on them, so
  every round is evaluated on the same prompts
- report.json: `DataReport.to_dict()`, the summary the manifest records, plus the per-pair token lengths
  (`load_data_report` reads the report back)
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_kit.data.audit import (
    TEMPLATE_CHECKS,
    AuditResult,
    NoPairsLeftError,
    audit_rows,
    merged_audit,
    raise_if_nothing_left,
)
from dpo_kit.data.drops import REASONS, DropRow
from dpo_kit.data.formats import SHAPE_REASONS, converter, formats_that_fit
from dpo_kit.data.on_policy import (
    HELD_OUT_PROMPTS,
    cut_responses,
    judge_floor_pairs,
    judge_truncated_responses,
    prompt_key,
    prompt_rows_and_lines,
    ranked_pair,
    sample_scored_rows,
    sampler_run_held_out_prompts,
    split_as_sampler_run,
)
from dpo_kit.data.sources import describe_source, read_hub_dataset_copy, read_source

SPLITS = ("train", "eval")


@dataclass
class DataReport:
    source: str
    format: str
    output_format: str
    rows_read: int
    rows_kept: int
    rows_dropped: int
    dropped_by_reason: dict[str, int]
    n_train: int
    n_eval: int
    seed: int  # the split's shuffle, and the samples of data.source: generate
    eval_fraction: float | None  # None where held_out_from or eval_split chose the held-out pairs instead
    max_length: int | None
    fingerprint: str  # sha256 of train.jsonl + eval.jsonl bytes
    chat_template: dict  # BOS/EOS and prefix findings, see dpo_kit.data.audit.template_checks
    files: dict[str, str]
    # Token lengths as TRL computes them, for every pair that reached the length check (kept or too_long).
    prompt_lengths: list[int] = field(repr=False)
    prompt_chosen_lengths: list[int] = field(repr=False)
    prompt_rejected_lengths: list[int] = field(repr=False)
    # Iterative DPO: the file of the sampler's run whose prompts were held out instead of a seeded split (its
    # eval.jsonl, or held_out_prompts.jsonl in a round 3); None = the seeded split of run.seed and eval_fraction.
    held_out_from: str | None = None
    # data.source: generate: how many responses data.generate.max_new_tokens cut before the model ended them
    # (dpo_kit.data.on_policy.cut_responses); None for other sources.
    responses_cut: dict | None = None
    # data.source: generate with a judge that has a length floor: the samples it scored and the kept pairs it
    # decided (dpo_kit.data.on_policy.judge_floor_pairs); None otherwise.
    judge_floor: dict | None = None
    # data.source: generate with a reward-model judge: the samples it scored with their prompt's start cut away to
    # fit the reward model (dpo_kit.data.on_policy.judge_truncated_responses); None otherwise.
    judge_truncated: dict | None = None
    # The subset of a hub dataset read (data.config, data.data_dir), as params.yaml records it; None when unset, and for
    # every other source, which has no subsets.
    config: str | None = None
    data_dir: str | None = None
    # data.eval_split: the split of the hub dataset held out instead of eval_fraction of data.split's pairs; None otherwise.
    eval_split: str | None = None
    # With eval_split, each split's own counts ('train': data.split's, 'eval': eval_split's: split, rows_read, rows_kept,
    # rows_dropped, dropped_by_reason), of which the counts above are the sums; None otherwise.
    by_split: dict | None = None
    # A hub dataset: which copy of it was read (sources.HubCopy.to_dict(): `commit`, the commit of the copy loaded, and
    # `from_cache`, why datasets took a cached copy without asking the hub, None when it asked). Without data.revision,
    # offline or with the hub not reached, datasets takes the newest cached copy: this names the commit that was read.
    # With data.eval_split, data.split's copy, and under `eval_split` data.eval_split's. None for every other source.
    hub_copy: dict | None = None

    def responses_cut_line(self) -> str | None:
        """One line for the notebook: the sampled responses cut short, and what TRL does with them."""
        cut = self.responses_cut
        if not cut:
            return None
        line = (f"cut at data.generate.max_new_tokens={cut['max_new_tokens']} before the model ended them:"
                f" {cut['samples_cut']} of {cut['samples']} samples, {cut['pair_responses_cut']} of the"
                f" {cut['pair_responses']} chosen and rejected responses kept")  # fmt: skip
        if cut["pair_responses_cut"]:
            # Standard format: TRL appends eos; conversational: the chat template closes the assistant turn.
            ending = "eos" if self.output_format == "standard" else "the chat template's end of turn"
            line += f"; each response ends in {ending} in training, so a cut one is trained as if the model ended it there"
        return line

    def judge_floor_line(self) -> str | None:
        """One line for the notebook: the pairs that the judge's length floor decided, and what they teach."""
        floor = self.judge_floor
        if not floor:
            return None
        line = (f"scored by the judge's length floor (too few words): {floor['samples_floored']} of {floor['samples']}"
                f" samples; it decided {floor['pairs_decided_by_floor']} of the {floor['pairs']} pairs kept"
                " (rejected floored, chosen not)")  # fmt: skip
        if floor["pairs_decided_by_floor"] * 2 > floor["pairs"]:
            line += ("; most pairs teach writing more words, not what the judge measures:"
                     " a larger data.generate.max_new_tokens leaves the responses room above the floor, or a lower"
                     " data.generate.sentiment_min_words lowers it")  # fmt: skip
        return line

    @property
    def sequence_lengths(self) -> list[int]:
        """The longer of the two training sequences of each pair: what max_length is checked against."""
        return [max(pair) for pair in zip(self.prompt_chosen_lengths, self.prompt_rejected_lengths, strict=True)]

    def token_length_stats(self) -> dict[str, dict[str, float]]:
        return {
            "prompt": _stats(self.prompt_lengths),
            "prompt_chosen": _stats(self.prompt_chosen_lengths),
            "prompt_rejected": _stats(self.prompt_rejected_lengths),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary for the manifest: everything but the per-pair length arrays."""
        return {
            "source": self.source,
            "config": self.config,
            "data_dir": self.data_dir,
            "format": self.format,
            "output_format": self.output_format,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_dropped": self.rows_dropped,
            "dropped_by_reason": self.dropped_by_reason,
            "n_train": self.n_train,
            "n_eval": self.n_eval,
            "seed": self.seed,
            "eval_fraction": self.eval_fraction,
            "eval_split": self.eval_split,
            "by_split": self.by_split,
            "hub_copy": self.hub_copy,
            "max_length": self.max_length,
            "fingerprint": self.fingerprint,
            "token_lengths": self.token_length_stats(),
            "chat_template": self.chat_template,
            "files": self.files,
            "held_out_from": self.held_out_from,
            "responses_cut": self.responses_cut,
            "judge_floor": self.judge_floor,
            "judge_truncated": self.judge_truncated,
        }


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def percentile(fraction: float) -> int:  # nearest-rank, so the value is a length that occurs
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": percentile(0.5),
        "p95": percentile(0.95),
        "max": ordered[-1],
    }


def prepare_data(params, tokenizer, run_dir: str | Path, project_dir: str | Path = ".") -> DataReport:
    """Read, convert, audit, split and write the run's data; returns the report the notebook displays.

    Raises SourceError when the source cannot be read and NoPairsLeftError when every row is dropped, or
    when the pairs kept leave nothing to train on or nothing held out (dropped.jsonl is written first, so the
    reasons can be inspected; train.jsonl and eval.jsonl are not written, so no later stage runs on them).
    """
    data = params.data
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of model.name_or_path '{params.model.name_or_path}' has no chat template; both output"
            " formats render prompts with it. Use a chat/instruct model, or set model.chat_template to a preset"
            " (chatml, human-assistant, instruct-output) or a Jinja template."
        )
    data_dir = Path(run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: data_dir / f"{name}.jsonl" for name in (*SPLITS, "dropped")}
    held_out_prompts_file = data_dir / HELD_OUT_PROMPTS
    stale_files = [*paths.values(), data_dir / "report.json", data_dir / "samples.jsonl", held_out_prompts_file]
    try:  # the sampler's run may be this one: its held-out prompts are read before its files go
        held_out = sampler_run_held_out_prompts(params, project_dir) if data.source == "generate" else None
    finally:
        for stale in stale_files:
            stale.unlink(missing_ok=True)  # a failed rerun must not leave the last run's split looking current

    hub_copy = None
    if data.source == "generate":
        # The prompts file's lines, read just before sample_scored_rows reads its rows (a few KB), not after minutes of
        # sampling, when an edited file could give lines for other rows.
        lines = prompt_rows_and_lines(params, project_dir)[1]
        rows = sample_scored_rows(params, tokenizer, project_dir)
        _write_jsonl(data_dir / "samples.jsonl", rows)  # every sample and its score, kept or not
        convert = ranked_pair(data.generate.min_score_gap)
    else:
        rows, lines, copy = read_source(data, project_dir)
        hub_copy = copy and copy.to_dict()
        convert = converter(data.format, data.columns)
    eval_data = data.model_copy(update={"split": data.eval_split}) if data.eval_split is not None else None
    # data.eval_split's rows, read before either split's audit so that a split the dataset lacks fails at once
    eval_rows, eval_copy = (None, None) if eval_data is None else read_hub_dataset_copy(eval_data, "data.eval_split")
    if eval_copy is not None:  # a second load of the dataset, which may have found another copy than the first
        hub_copy["eval_split"] = eval_copy.to_dict()

    def audit(source_rows: list[dict], source_lines: list[int] | None) -> AuditResult:
        return audit_rows(source_rows, convert, tokenizer, max_length=params.max_length, output_format=data.output_format,
                          deduplicate=data.deduplicate, lines=source_lines)  # fmt: skip

    result = audit(rows, lines)
    held = None if eval_rows is None else audit(eval_rows, None)  # data.eval_split's pairs: the held-out ones
    if held is not None:
        drop_prompts_held_out(result, rows, held, data.eval_split)
    _write_jsonl(paths["dropped"], dropped_lines(result, held, data))
    raise_if_nothing_left(result, describe_source(data), str(paths["dropped"]), format_hint(result, data))
    if held is not None:
        raise_if_nothing_left(held, describe_source(eval_data), str(paths["dropped"]), format_hint(held, data), use="hold out")

    if held is not None:
        train, eval_ = [row for _, row in result.kept], [row for _, row in held.kept]
    elif held_out is None:
        train, eval_ = split_rows(result.kept, data.eval_fraction, params.run.seed)
    else:
        train, eval_ = split_as_sampler_run(result.kept, held_out)
        _write_jsonl(held_out_prompts_file, ({"prompt": prompt} for prompt in held_out.prompts))
    raise_if_a_split_is_empty(result, train, eval_, params, str(paths["dropped"]))
    _write_jsonl(paths["train"], train)
    _write_jsonl(paths["eval"], eval_)
    digest = hashlib.sha256(paths["train"].read_bytes() + paths["eval"].read_bytes()).hexdigest()
    kept_rows = [index for index, _ in result.kept]
    cut = cut_responses(rows, kept_rows, data.generate.max_new_tokens) if data.source == "generate" else None
    floor = judge_floor_pairs(rows, kept_rows) if data.source == "generate" else None
    truncated = judge_truncated_responses(rows, kept_rows) if data.source == "generate" else None
    by_split = None
    if held is not None:
        by_split = {name: {"split": split, "rows_read": part.rows_read, "rows_kept": len(part.kept),
                           "rows_dropped": len(part.dropped), "dropped_by_reason": part.dropped_by_reason}
                    for name, split, part in (("train", data.split, result), ("eval", data.eval_split, held))}  # fmt: skip
        result = merged_audit(result, held, tokenizer)

    report = DataReport(
        source=data.source,
        format=data.format,
        output_format=data.output_format,
        rows_read=result.rows_read,
        rows_kept=len(result.kept),
        rows_dropped=len(result.dropped),
        dropped_by_reason=result.dropped_by_reason,
        n_train=len(train),
        n_eval=len(eval_),
        seed=params.run.seed,
        eval_fraction=data.eval_fraction if held_out is None and held is None else None,
        max_length=params.max_length,
        fingerprint=digest,
        chat_template=result.checks,
        files={name: str(path) for name, path in {**paths, "report": data_dir / "report.json"}.items()},
        prompt_lengths=[pair.prompt for pair in result.lengths],
        prompt_chosen_lengths=[pair.prompt_chosen for pair in result.lengths],
        prompt_rejected_lengths=[pair.prompt_rejected for pair in result.lengths],
        held_out_from=None if held_out is None else str(held_out.source_file),
        responses_cut=cut,
        judge_floor=floor,
        judge_truncated=truncated,
        config=data.config,
        data_dir=data.data_dir,
        eval_split=data.eval_split,
        by_split=by_split,
        hub_copy=hub_copy,
    )
    stored = {**report.to_dict(), PAIR_LENGTHS: {key: getattr(report, key) for key in LENGTH_FIELDS}}
    (data_dir / "report.json").write_text(json.dumps(stored, indent=2, ensure_ascii=False) + "\n")
    return report


def drop_prompts_held_out(result: AuditResult, rows: list, held: AuditResult, eval_split: str) -> None:
    """Drop from `result` (data.split's audit) every kept pair whose prompt is also that of a pair kept in `held`
    (data.eval_split's), recorded as prompt_in_eval_split: hh-rlhf's and UltraFeedback's splits share some questions,
    and one trained on would be evaluated as if it were held out."""
    held_out = {prompt_key(row) for _, row in held.kept}
    kept = []
    for index, row in result.kept:
        if prompt_key(row) in held_out:
            result.drop(index, rows[index], DropRow(
                "prompt_in_eval_split", f"its prompt is also that of a held-out pair of data.eval_split {eval_split!r}"))
        else:
            kept.append((index, row))
    result.kept = kept
    result.dropped.sort(key=lambda dropped: dropped.index)


def dropped_lines(result: AuditResult, held: AuditResult | None, data):
    """dropped.jsonl's lines: data.split's drops, then data.eval_split's, each naming its split where there are two."""
    if held is None:
        return [dropped.to_dict() for dropped in result.dropped]
    return [{**dropped.to_dict(), "split": split}
            for split, part in ((data.split, result), (data.eval_split, held)) for dropped in part.dropped]  # fmt: skip


PAIR_LENGTHS = "pair_token_lengths"
LENGTH_FIELDS = ("prompt_lengths", "prompt_chosen_lengths", "prompt_rejected_lengths")


def load_data_report(run_dir: str | Path) -> DataReport:
    """The DataReport that `prepare_data` returned for this run, read back from data/report.json."""
    path = Path(run_dir) / "data" / "report.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the format stage has not completed in {run_dir}")
    stored = json.loads(path.read_text())
    lengths = stored[PAIR_LENGTHS]
    fields = {name for name in DataReport.__dataclass_fields__ if name not in LENGTH_FIELDS}
    # a report written before a field existed (held_out_from, responses_cut, judge_floor, judge_truncated, config,
    # data_dir) reads back with that field's default
    found = {key: stored[key] for key in fields if key in stored}
    return DataReport(**found, **{key: lengths[key] for key in LENGTH_FIELDS})


def held_out_origin(run_dir: str | Path) -> str | None:
    """Where the format stage took this run's held-out pairs (data/eval.jsonl) from, in the params' terms, as the
    evaluate stage records it in metrics.json: data.eval_split, data.eval_fraction by run.seed, or round 1's held-out
    prompts; None where the run has no data/report.json."""
    if not (Path(run_dir) / "data" / "report.json").is_file():
        return None
    report = load_data_report(run_dir)
    if report.eval_split is not None:
        return f"data.eval_split {report.eval_split!r} of data.source {report.source!r}"
    if report.held_out_from is not None:
        return f"the held-out prompts of {report.held_out_from}"
    return f"data.eval_fraction {report.eval_fraction:g} of the kept pairs of data.source {report.source!r}, by run.seed {report.seed}"


def format_hint(result, data) -> str | None:
    """When no row was kept and most were dropped for their shape, the data.format values that read the first such
    row: a file of another format than data.format names what would read it, not only the column it lacks."""
    if result.kept or not result.dropped or data.source == "generate":
        return None
    top_reason = next(iter(result.dropped_by_reason))
    if top_reason not in SHAPE_REASONS:
        return None
    row = next(dropped.row for dropped in result.dropped if dropped.reason == top_reason)
    fits = [name for name in formats_that_fit(row) if name != data.format] if isinstance(row, dict) else []
    if not fits:
        return None  # the row's own detail says what is wrong with it
    return (f"data.format is '{data.format}', but the rows have the shape of data.format"
            f" {' or '.join(repr(name) for name in fits)}: set that if it is the file's format.")  # fmt: skip


def raise_if_a_split_is_empty(result, train: list, eval_: list, params, dropped_path: str) -> None:
    """NoPairsLeftError when the split leaves no pair to train on or none held out, with the counts and the fix.

    The train stage needs a pair, and evaluate and generate need a held-out one: an empty eval.jsonl would
    only fail them after training and merging.
    """
    if train and eval_:
        return
    data = params.data
    dropped = ", ".join(f"{reason}: {count}" for reason, count in result.dropped_by_reason.items()) or "none"
    more = "prompts to data.generate.prompts" if data.source == "generate" else "rows to data.source"
    limit = f" or raise data.max_rows (now {data.max_rows})" if data.max_rows else ""
    prompts = len({prompt_key(row) for _, row in result.kept})
    if len(result.kept) > 1 and prompts < 2:
        # split_rows keeps the pairs of one prompt together, so pairs that all share one prompt cannot be split.
        need = (f"so at least 2 distinct prompts must be kept: the {len(result.kept)} pairs kept all have one prompt,"
                " and pairs that share a prompt stay in one split so that no held-out prompt is trained on")  # fmt: skip
    else:
        need = "so at least 2 pairs must be kept"
    raise NoPairsLeftError(
        f"{describe_source(data)}: {result.rows_read} rows read, {len(result.kept)} kept, {len(result.dropped)}"
        f" dropped (by reason: {dropped}; every dropped row, with its reason, is in {dropped_path}). The split gives train"
        f" {len(train)}, held out {len(eval_)}, but training needs at least one pair and the"
        f" evaluate and generate stages at least one held-out pair, {need}. Add {more}"
        f"{limit}, or fix what made rows drop; data.eval_fraction (now {data.eval_fraction})"
        " sets the share held out once 2 or more pairs are kept."
    )


def split_rows(kept: list[tuple[int, dict]], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/eval split by prompt; each split stays in source order so the files read naturally.

    Pairs that share a prompt (hh-rlhf, UltraFeedback and orca ask one question more than once) go to the
    same split, so no held-out prompt is trained on: a pair-level shuffle put 5 of 6 such held-out prompts
    in train as well. Prompts are held out whole, in seeded order, while they fit in `eval_fraction` of the
    pairs; with every prompt distinct this is exactly the seeded pair-level split. At least one pair is held
    out (and one trained on) whenever the pairs have two or more distinct prompts.
    """
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(round(len(kept) * eval_fraction), 1), len(kept) - 1) if len(kept) > 1 else 0
    keys = [prompt_key(row) for _, row in kept]
    groups: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    held_out: set[int] = set()
    for position in order:
        group = groups[keys[position]]
        if position not in held_out and len(held_out) + len(group) <= n_eval:
            held_out.update(group)
    if not held_out and len(groups) > 1:
        # Every prompt has more pairs than the share held out: hold out the smallest prompt (the first in seeded
        # order among equals) rather than none, since the evaluate and generate stages need a held-out pair.
        held_out.update(min((groups[keys[position]] for position in order), key=len))
    train = [row for position, (_, row) in enumerate(kept) if position not in held_out]
    eval_ = [row for position, (_, row) in enumerate(kept) if position in held_out]
    return train, eval_


# json.dumps(ensure_ascii=False) writes these three line breaks raw inside strings, and str.splitlines(), which the
# kit's readers of these files use (load_split, merge, evaluate, iterative DPO), breaks a line at each: a pair holding
# one (web text often does) read back as two halves of invalid JSON. Escaped, each line is one row for every reader.
LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _write_jsonl(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            # default=str: source rows may hold dates or other values JSON has no type for.
            out.write(json.dumps(row, ensure_ascii=False, default=str).translate(LINE_BREAKS_JSON_KEEPS) + "\n")


def load_split(run_dir: str | Path, split: str):
    """The 'train' or 'eval' pairs written by prepare_data, as a datasets.Dataset for TRL's DPOTrainer."""
    from datasets import Dataset

    if split not in SPLITS:
        raise ValueError(f"split '{split}' is unknown; valid splits: {', '.join(SPLITS)}")
    path = Path(run_dir) / "data" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the format stage (prepare_data / notebook 01) for this run first")
    # split at "\n" only, as the file was written: splitlines() would also break at a U+2028 inside a row's text
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    if not rows:
        return Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    return Dataset.from_list(rows)


def plot_token_lengths(report: DataReport):
    """Histograms of prompt and prompt+response token lengths, with the max_length TRL trains with."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 3.8), layout="constrained")
    prompt_axes, pair_axes = figure.subplots(1, 2)
    # Shared bin edges from 0 past the limit, so both panels compare directly and the limit is in view.
    longest = max([*report.prompt_chosen_lengths, *report.prompt_rejected_lengths, report.max_length or 0, 1])
    bins = [round(longest * step / 40, 2) for step in range(41)]
    prompt_axes.hist(report.prompt_lengths, bins=bins, color="tab:blue")
    prompt_axes.set_title("prompt")
    pair_axes.hist(report.prompt_chosen_lengths, bins=bins, alpha=0.6, label="prompt + chosen", color="tab:green")
    pair_axes.hist(report.prompt_rejected_lengths, bins=bins, alpha=0.6, label="prompt + rejected", color="tab:red")
    pair_axes.set_title("prompt + response")
    for axes in (prompt_axes, pair_axes):
        axes.set_xlabel("tokens (as TRL tokenizes them)")
        axes.set_ylabel("pairs")
        if report.max_length is not None:
            axes.axvline(report.max_length, color="black", linestyle="--", label=f"max_length = {report.max_length}")
    pair_axes.legend()
    over = report.dropped_by_reason.get("too_long", 0)
    title = f"Token lengths of {len(report.prompt_lengths)} pairs ({over} dropped as too_long)"
    if report.by_split:
        # both splits' pairs, and data.split's that were measured before their prompt was found held out
        held = report.dropped_by_reason.get("prompt_in_eval_split", 0)
        splits = " and ".join(f"{SPLIT_KEYS[name]} {part['split']!r}" for name, part in report.by_split.items())
        title = (f"Token lengths of {len(report.prompt_lengths)} pairs of {splits} ({over} dropped as too_long,"
                 f" {held} as prompt_in_eval_split)")  # fmt: skip
    figure.suptitle(title)
    return figure


def chat_template_table(report: DataReport):
    """The chat-template checks (report.chat_template) as notebook 01 shows them: each check, its value and what it
    measures. Shown as the raw dict, its fourteen keys (template_bos_text_removed, missing_bos...) went unexplained.
    Each warning is a row of its own; "none" where the template raised nothing."""
    import pandas as pd

    rows = []
    for key, value in report.chat_template.items():
        if key == "warnings":
            for line in value or ["none"]:
                rows.append({"check": "warning", "value": line, "meaning": TEMPLATE_CHECKS[key]})
            continue
        rows.append({"check": key, "value": "None" if value is None else str(value),
                     "meaning": TEMPLATE_CHECKS.get(key, "")})  # fmt: skip
    # A Styler, not a DataFrame: pandas would cut a warning or a meaning at 50 characters.
    return pd.DataFrame(rows, columns=["check", "value", "meaning"]).style.hide(axis="index")


def dropped_summary_table(report: DataReport):
    """A pandas DataFrame of drop reasons: count, share of rows read and what the reason means, then a total row
    (so a run that dropped nothing says so, rather than showing an empty table)."""
    import pandas as pd

    def share(count: int) -> float:
        return round(100 * count / report.rows_read, 2) if report.rows_read else 0.0

    records = [
        {"reason": reason, "count": count, "percent_of_read": share(count), "meaning": REASONS[reason]}
        for reason, count in report.dropped_by_reason.items()
    ]
    records.append({
        "reason": "total", "count": report.rows_dropped, "percent_of_read": share(report.rows_dropped),
        "meaning": "every dropped row is in data/dropped.jsonl, with its reason" if report.rows_dropped
        else "no row was dropped",
    })
    columns = ["reason", "count", "percent_of_read", "meaning"]
    if report.by_split:
        # data.eval_split: each split's own drops beside the sums, and what each split read and kept, so that the
        # held-out split's drops (and data.split's prompt_in_eval_split) are not read as the train split's alone
        parts = {f"{SPLIT_KEYS[name]} {part['split']!r}": part for name, part in report.by_split.items()}
        for record in records:
            for column, part in parts.items():
                record[column] = part["rows_dropped"] if record["reason"] == "total" else part["dropped_by_reason"].get(record["reason"], 0)
        records[-1]["meaning"] = records[-1]["meaning"].replace("with its reason", "with its reason and split") + "; " + ", ".join(
            f"{column}: read {part['rows_read']}, kept {part['rows_kept']} ({SPLIT_FILES[name]})" for (name, part), column
            in zip(report.by_split.items(), parts, strict=True))  # fmt: skip
        columns[2:2] = list(parts)
    return pd.DataFrame(records, columns=columns)


SPLIT_KEYS = {"train": "data.split", "eval": "data.eval_split"}  # report.by_split's parts, by the params key that named each
SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}

"""The data audit: every source row is either kept or dropped with a stable reason code, never lost.

TRL's DPOTrainer silently drops pairs whose prompt alone fills `max_length` and silently truncates the
rest; it tokenizes prompt and prompt+response separately, so a template that renders them differently
shifts the completion start; and a chat template that writes BOS/EOS itself can double them. The audit
tokenizes every pair exactly as TRL 1.x `DPOTrainer._prepare_dataset` does, drops what TRL would damage,
and reports the template traps it finds, so the notebook, `manifest.json` and `data/dropped.jsonl` all
say what happened to each row. The reason codes and `DropRow`, which the converters raise too, are in
`dpo_kit.data.drops`.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from dpo_kit.chat_templates import ends_with_prefill
from dpo_kit.data.drops import REASONS, DroppedRow, DropRow, row_name
from dpo_kit.data.formats import render_standard

ROLES = ("system", "user", "assistant")


class NoPairsLeftError(ValueError):
    """Every row was dropped (the message gives the top reasons with counts and an example each), or too few
    pairs are left to have one to train on and one held out (`dpo_kit.data.pipeline.raise_if_a_split_is_empty`)."""


# ---------------------------------------------------------------------------------------------
# Content checks on a converted (conversational) pair


def check_pair(row: dict) -> None:
    """Raise DropRow for empty text, roles out of order or identical responses. The first failing check wins."""
    if not row["prompt"]:
        raise DropRow("empty_prompt", "the prompt has no messages")
    for position, message in enumerate(row["prompt"]):
        if not message["content"].strip():
            raise DropRow("empty_prompt", f"prompt message {position} ({message['role']}) is empty or whitespace only")
    for name in ("chosen", "rejected"):
        if not row[name][0]["content"].strip():
            raise DropRow("empty_response", f"{name} is empty or whitespace only: {row[name][0]['content']!r}")
    _check_roles(row)
    if row["chosen"][0]["content"].strip() == row["rejected"][0]["content"].strip():
        raise DropRow("identical_responses", "chosen and rejected have the same text")


def _check_roles(row: dict) -> None:
    roles = [m["role"] for m in row["prompt"]]
    for role in roles:
        if role not in ROLES:
            raise DropRow("roles_not_alternating", f"unknown role '{role}' in the prompt (valid: {', '.join(ROLES)})")
    turns = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * len(turns)
    # Ending with assistant is a prefill: the response continues that message (see ends_with_prefill).
    if not turns or turns != expected[: len(turns)]:
        raise DropRow(
            "roles_not_alternating",
            f"prompt roles are {', '.join(roles)}; expected an optional system message, then user and assistant"
            " alternating, ending with user (or with an assistant prefill that the response continues)",
        )
    for name in ("chosen", "rejected"):
        if len(row[name]) != 1 or row[name][0]["role"] != "assistant":
            found = ", ".join(m["role"] for m in row[name])
            raise DropRow("roles_not_alternating", f"{name} should be one assistant message, got roles: {found}")


# ---------------------------------------------------------------------------------------------
# BOS / EOS traps (trl#1073, #2054, #4481)


@dataclass(frozen=True)
class TokenizerTraits:
    bos_token: str | None
    eos_token: str | None
    bos_id: int | None
    eos_id: int | None
    adds_bos: bool  # tokenizer("text") starts with BOS: TRL's standard-format path adds one
    adds_eos: bool  # tokenizer("text") ends with EOS: a standard-format prompt then ends in EOS
    special_texts: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tokenizer_adds_bos": self.adds_bos,
            "tokenizer_adds_eos": self.adds_eos,
        }


def tokenizer_traits(tokenizer) -> TokenizerTraits:
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    return TokenizerTraits(
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        bos_id=bos_id,
        eos_id=eos_id,
        adds_bos=bos_id is not None and with_special[:1] == [bos_id] and without[:1] != [bos_id],
        adds_eos=eos_id is not None and with_special[-1:] == [eos_id] and without[-1:] != [eos_id],
        special_texts=tuple(t for t in tokenizer.all_special_tokens if t),
    )


def strip_special_text(row: dict, traits: TokenizerTraits) -> tuple[dict, Counter]:
    """Remove BOS text leading a prompt message and EOS text ending a response.

    The chat template (conversational) or TRL (standard) adds them again, so text copies would double
    them. Returns the fixed row and how many of each fix it needed.
    """
    fixes = Counter()
    prompt = []
    for message in row["prompt"]:
        content = message["content"]
        while traits.bos_token and content.startswith(traits.bos_token):
            content = content[len(traits.bos_token) :]
            fixes["prompt_bos_text_removed"] += 1
        prompt.append({**message, "content": content})
    fixed = {"prompt": prompt}
    for name in ("chosen", "rejected"):
        content = row[name][0]["content"]
        while traits.eos_token and content.rstrip().endswith(traits.eos_token):
            content = content.rstrip()[: -len(traits.eos_token)]
            fixes["response_eos_text_removed"] += 1
        fixed[name] = [{**row[name][0], "content": content}]
    return fixed, fixes


def has_special_text(row: dict, traits: TokenizerTraits) -> bool:
    """True when a message contains special-token text, e.g. a source already rendered with a template."""
    contents = [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    return any(token in content for token in traits.special_texts for content in contents)


# ---------------------------------------------------------------------------------------------
# Tokenizing as TRL does


@dataclass(frozen=True)
class PairLengths:
    prompt: int  # prompt tokens TRL keeps: the common prefix of prompt and prompt+response ids
    prompt_chosen: int  # length of the chosen training sequence
    prompt_rejected: int
    prompt_is_prefix: bool  # False: TRL's "tokenized prompt is not a prefix" warning applies
    double_bos: bool
    double_eos: bool
    missing_bos: bool  # the tokenizer adds BOS to plain text, but this sequence starts without it
    mismatch: str | None = None  # the prompt tokens TRL leaves out when the prompt is not a prefix

    @property
    def longest(self) -> int:
        return max(self.prompt_chosen, self.prompt_rejected)




def common_prefix_length(ids: list[int], other_ids: list[int]) -> int:
    """How many leading tokens two id lists share: where TRL starts the completion."""
    return len(os.path.commonprefix([ids, other_ids]))


def _token_ids(rows: list[dict], tokenizer, eos_token: str | None) -> tuple[list, list, list]:
    """Prompt, prompt+chosen and prompt+rejected ids for a batch, as TRL 1.x `tokenize_fn` computes them.

    Conversational: apply_chat_template(prompt, add_generation_prompt=True) and apply_chat_template(prompt
    + response), which tokenizes without adding special tokens. Standard: tokenizer(prompt) and
    tokenizer(prompt + response + eos), where TRL appends eos unless the response already ends in it.
    """
    if isinstance(rows[0]["prompt"], list):
        def ids(conversations, **kwargs):
            return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)["input_ids"]

        return (
            ids([r["prompt"] for r in rows], add_generation_prompt=True),
            ids([r["prompt"] + r["chosen"] for r in rows]),
            ids([r["prompt"] + r["rejected"] for r in rows]),
        )

    def with_eos(text: str) -> str:
        return text if eos_token is None or text.endswith(eos_token) else text + eos_token

    return (
        tokenizer([r["prompt"] for r in rows])["input_ids"],
        tokenizer([r["prompt"] + with_eos(r["chosen"]) for r in rows])["input_ids"],
        tokenizer([r["prompt"] + with_eos(r["rejected"]) for r in rows])["input_ids"],
    )


def _lengths(prompt_ids, chosen_ids, rejected_ids, traits: TokenizerTraits, tokenizer) -> PairLengths:
    prompt_len = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
    completions = (chosen_ids[prompt_len:], rejected_ids[prompt_len:])
    is_prefix = prompt_len == len(prompt_ids)
    return PairLengths(
        prompt=prompt_len,
        prompt_chosen=len(chosen_ids),
        prompt_rejected=len(rejected_ids),
        prompt_is_prefix=is_prefix,
        double_bos=traits.bos_id is not None and prompt_ids[:2] == [traits.bos_id] * 2,
        double_eos=traits.eos_id is not None and any(ids.count(traits.eos_id) > 1 for ids in completions),
        missing_bos=traits.adds_bos and prompt_ids[:1] != [traits.bos_id],
        mismatch=None if is_prefix else tokenizer.decode(prompt_ids[prompt_len:]),
    )


def measure_pairs(rows: list[dict], tokenizer, traits: TokenizerTraits | None = None, batch_size: int = 256) -> list:
    """PairLengths for each row (all conversational or all standard), or a DropRow where the template fails.

    Batches go through the fast tokenizer at once; a batch the template refuses is redone row by row so
    only the offending rows are dropped, each with the template's own message.
    """
    traits = traits or tokenizer_traits(tokenizer)
    results: list = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        try:
            results.extend(_measure_batch(batch, tokenizer, traits))
        except Exception:  # noqa: BLE001 - which row failed, and why, is found just below
            for row in batch:
                try:
                    results.extend(_measure_batch([row], tokenizer, traits))
                except Exception as error:  # noqa: BLE001 - a template raises whatever it likes
                    results.append(DropRow("chat_template_error", f"{type(error).__name__}: {error}"))
    return results


def _measure_batch(batch: list[dict], tokenizer, traits: TokenizerTraits) -> list[PairLengths]:
    ids = _token_ids(batch, tokenizer, traits.eos_token)
    return [_lengths(prompt, chosen, rejected, traits, tokenizer) for prompt, chosen, rejected in zip(*ids, strict=True)]


# ---------------------------------------------------------------------------------------------
# The whole audit


@dataclass
class AuditResult:
    rows_read: int
    kept: list[tuple[int, dict]] = field(default_factory=list)  # (source index, row in the output format)
    dropped: list[DroppedRow] = field(default_factory=list)
    # Every pair that reached the length check, kept or too_long, so a plot shows what the limit cuts.
    lengths: list[PairLengths] = field(default_factory=list)
    checks: dict = field(default_factory=dict)
    lines: list[int] | None = None  # each source row's line in its file (sources.read_rows_and_lines), or None

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return dict(Counter(d.reason for d in self.dropped).most_common())

    def drop(self, index: int, row: Any, problem: DropRow) -> None:
        self.dropped.append(DroppedRow(index, problem.reason, problem.detail, row, self.line(index)))

    def line(self, index: int) -> int | None:
        return self.lines[index] if self.lines is not None else None


def audit_rows(
    raw_rows: list[dict],
    convert: Callable[[dict], dict],
    tokenizer,
    *,
    max_length: int | None,
    output_format: str = "conversational",
    deduplicate: bool = True,
    lines: list[int] | None = None,
) -> AuditResult:
    """Convert, check, fix, de-duplicate and length-check every row; each ends up kept or dropped with a reason.

    `convert` maps a source row to the conversational shape (see dpo_kit.data.formats.converter). Kept rows
    are in `output_format` ('conversational' or 'standard'), in source order. `lines`, where the rows come from a
    .jsonl or .csv file, is each row's line there: drops record it and name it.
    """
    if lines is not None and len(lines) != len(raw_rows):
        raise ValueError(f"{len(lines)} line numbers for {len(raw_rows)} rows")
    traits = tokenizer_traits(tokenizer)
    result = AuditResult(rows_read=len(raw_rows), lines=lines)
    fixes: Counter = Counter()
    first_seen: dict[str, int] = {}
    candidates: list[tuple[int, dict]] = []
    for index, raw in enumerate(raw_rows):
        try:
            row, row_fixes = strip_special_text(convert(raw), traits)
            check_pair(row)
            if deduplicate:
                key = json.dumps(row, sort_keys=True, ensure_ascii=False)
                if key in first_seen:
                    first = row_name(first_seen[key], result.line(first_seen[key]))
                    raise DropRow("duplicate", f"same prompt, chosen and rejected as {first}")
                first_seen[key] = index
            fixes.update(row_fixes)
            fixes["special_token_text_in_content"] += has_special_text(row, traits)
            if output_format == "standard":
                row = _render_standard(row, tokenizer, traits, fixes, render_standard)
            elif ends_with_prefill(row["prompt"]):
                raise DropRow(
                    "prefill_needs_standard_format",
                    "the prompt ends with an assistant message to continue; TRL's conversational format would open"
                    " a new assistant turn after it. Set data.output_format: standard",
                )
        except DropRow as problem:
            result.drop(index, raw, problem)
            continue
        candidates.append((index, row))

    measured = measure_pairs([row for _, row in candidates], tokenizer, traits)
    for (index, row), lengths in zip(candidates, measured, strict=True):
        if isinstance(lengths, DropRow):
            result.drop(index, raw_rows[index], lengths)
            continue
        result.lengths.append(lengths)
        if max_length is not None and lengths.longest > max_length:
            result.drop(index, raw_rows[index], _too_long(lengths, max_length))
            continue
        result.kept.append((index, row))

    result.dropped.sort(key=lambda dropped: dropped.index)
    assert len(result.kept) + len(result.dropped) == result.rows_read, (
        f"audit lost rows: {len(result.kept)} kept + {len(result.dropped)} dropped != {result.rows_read} read"
    )
    result.checks = template_checks(traits, fixes, result.lengths)
    return result


def _render_standard(row: dict, tokenizer, traits: TokenizerTraits, fixes: Counter, render) -> dict:
    try:
        rendered = render(row, tokenizer)
    except Exception as error:  # noqa: BLE001 - a template raises whatever it likes
        raise DropRow("chat_template_error", f"{type(error).__name__}: {error}") from None
    # TRL tokenizes a standard prompt with special tokens on: a template that writes BOS itself, for a
    # tokenizer that adds BOS too, would start every sequence with two (trl#1073, #2054, #4481).
    if traits.adds_bos and traits.bos_token and rendered["prompt"].startswith(traits.bos_token):
        rendered["prompt"] = rendered["prompt"][len(traits.bos_token) :]
        fixes["template_bos_text_removed"] += 1
    return rendered


def _too_long(lengths: PairLengths, max_length: int) -> DropRow:
    detail = (
        f"prompt+chosen is {lengths.prompt_chosen} tokens and prompt+rejected {lengths.prompt_rejected},"
        f" over max_length {max_length}"
    )
    if lengths.prompt >= max_length:
        detail += f"; the prompt alone is {lengths.prompt} tokens, which TRL would drop without a word"
    else:
        detail += "; TRL would cut the end of the response"
    return DropRow("too_long", detail)


# What each key of template_checks measures, for notebook 01's table (dpo_kit.data.pipeline.chat_template_table).
TEMPLATE_CHECKS = {
    "bos_token": "the tokenizer's beginning-of-sequence token (None: it has none)",
    "eos_token": "its end-of-sequence token, which closes each response",
    "tokenizer_adds_bos": "the tokenizer puts BOS before any text it is given",
    "tokenizer_adds_eos": "the tokenizer puts EOS after any text it is given (a standard-format prompt then ends in EOS)",
    "prompt_bos_text_removed": "BOS written as text at the start of a prompt message, removed: the template adds it",
    "response_eos_text_removed": "EOS written as text at the end of a response, removed: the template or TRL adds it",
    "template_bos_text_removed": "standard format: BOS the chat template wrote, removed as the tokenizer adds it too",
    "special_token_text_in_content": "pairs with special-token text inside a message (a source already templated?)",
    "double_bos": "pairs whose tokens start with two BOS (trl#1073, #2054, #4481)",
    "double_eos": "pairs with more than one EOS in a response",
    "missing_bos": "pairs starting without BOS though the tokenizer adds it to plain text",
    "prompt_not_prefix": "pairs whose tokenized prompt is not a prefix of prompt+response (TRL's 'Mismatch' warning)",
    "prompt_not_prefix_example": "the first such pair's text that TRL leaves out of the training context",
    "warnings": "what needs a look, one line each",
}


# What the audit fixed in rows it kept, counted per row (the rest of template_checks is measured on the pairs' lengths).
FIX_COUNTS = ("prompt_bos_text_removed", "response_eos_text_removed", "template_bos_text_removed",
              "special_token_text_in_content")  # fmt: skip


def template_checks(traits: TokenizerTraits, fixes: Counter, lengths: list[PairLengths]) -> dict:
    """JSON-able findings about the chat template and special tokens, with a warning line per problem."""
    mismatched = [pair for pair in lengths if not pair.prompt_is_prefix]
    checks = {
        **traits.to_dict(),
        **{key: fixes[key] for key in FIX_COUNTS},
        "double_bos": sum(pair.double_bos for pair in lengths),
        "double_eos": sum(pair.double_eos for pair in lengths),
        "missing_bos": sum(pair.missing_bos for pair in lengths),
        "prompt_not_prefix": len(mismatched),
        "prompt_not_prefix_example": mismatched[0].mismatch if mismatched else None,
    }
    warnings = []
    if checks["prompt_not_prefix"]:
        warnings.append(
            f"{checks['prompt_not_prefix']} pairs: the tokenized prompt is not a prefix of the tokenized"
            f" prompt+response (TRL's 'not a prefix' / 'Mismatch' warning); TRL leaves"
            f" {checks['prompt_not_prefix_example']!r} out of the training context"
        )
    if checks["double_bos"]:
        warnings.append(f"{checks['double_bos']} pairs start with two BOS tokens")
    if checks["double_eos"]:
        warnings.append(f"{checks['double_eos']} pairs have more than one EOS token in a response")
    if checks["missing_bos"]:
        warnings.append(
            f"{checks['missing_bos']} pairs start without BOS although the tokenizer adds it to plain text: the chat"
            " template does not write BOS, and TRL tokenizes conversations without adding special tokens"
        )
    if checks["special_token_text_in_content"]:
        warnings.append(
            f"{checks['special_token_text_in_content']} pairs contain special-token text (e.g. {traits.special_texts[:3]})"
            " inside messages: the source may already be rendered with a chat template, and it is rendered again"
        )
    if traits.adds_eos:
        warnings.append("the tokenizer appends EOS to every text, so standard-format prompts end in EOS")
    checks["warnings"] = warnings
    return checks


def raise_if_nothing_left(
    result: AuditResult, source: str, dropped_path: str | None = None, hint: str | None = None, use: str = "train on"
) -> None:
    """NoPairsLeftError naming the source, the top reasons with counts and one example detail each, then `hint`.
    `use` is what the rows were read for ('hold out', for data.eval_split's)."""
    if result.kept:
        return
    if not result.rows_read:
        raise NoPairsLeftError(f"{source} has no rows: nothing to {use}")
    examples: dict[str, DroppedRow] = {}
    for dropped in result.dropped:
        examples.setdefault(dropped.reason, dropped)
    lines = [f"all {result.rows_read} rows read from {source} were dropped, so nothing is left to {use}. Top reasons:"]
    for reason, count in list(result.dropped_by_reason.items())[:3]:
        example = examples[reason]
        lines.append(f"  {reason}: {count} rows ({REASONS[reason]}); e.g. {row_name(example.index, example.line)}: {example.detail}")
    if hint:
        lines.append(hint)
    if dropped_path:
        lines.append(f"Every dropped row, with its reason, is in {dropped_path}")
    raise NoPairsLeftError("\n".join(lines))



def merged_audit(first: AuditResult, second: AuditResult, tokenizer) -> AuditResult:
    """One AuditResult for two audits of one source (data.split's and data.eval_split's), as the report counts them:
    rows, drops and lengths of both, and the chat-template checks over both (each keeps its own source indices: the
    format stage's dropped.jsonl names the split of each)."""
    fixes = Counter({key: first.checks[key] + second.checks[key] for key in FIX_COUNTS})
    merged = AuditResult(rows_read=first.rows_read + second.rows_read, kept=[*first.kept, *second.kept],
                         dropped=[*first.dropped, *second.dropped], lengths=[*first.lengths, *second.lengths])  # fmt: skip
    merged.checks = template_checks(tokenizer_traits(tokenizer), fixes, merged.lengths)
    return merged

"""Why a row is dropped: the stable reason codes, the exception that drops a row, and the record kept of it.

Imports nothing of the kit, so every producer of drops can use it: the converters (`formats`), the
on-policy ranking (`on_policy`) and the audit (`audit`), which records each drop in `data/dropped.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Stable reason codes: they are keys in manifests and dropped.jsonl, so rename none of them.
REASONS = {
    "missing_column": "a column the data format needs is absent",
    "non_string_value": "a value that should be text is None, a number or another non-string",
    "malformed_messages": "a message column is not a list of {role, content} messages (ShareGPT: {from, value}"
    " turns from human, gpt or system)",
    "unsplittable_transcript": "chosen and rejected do not split into a shared prompt and one final reply each",
    "empty_prompt": "the prompt, or one of its messages, is empty or whitespace only",
    "empty_response": "chosen or rejected is empty or whitespace only",
    "roles_not_alternating": "roles are not [system,] user, assistant, ... alternating (ending with user, or with"
    " an assistant prefill), followed by one assistant reply",
    "prefill_needs_standard_format": "the prompt ends with an assistant prefill, which TRL's conversational"
    " format cannot express (it opens a new assistant turn); data.output_format: standard renders it",
    "identical_responses": "chosen and rejected are the same text (ignoring surrounding whitespace)",
    "duplicate": "an exact copy of an earlier (prompt, chosen, rejected) pair",
    "duplicate_prompt": "data.source generate: the same prompt as an earlier row, which alone was sampled",
    "chat_template_error": "the model's chat template refused to render the conversation",
    "too_long": "prompt+response is longer than the max_length TRL trains with",
    "score_gap_too_small": "the judge scored the best and worst sampled responses too closely to prefer one",
    "prompt_in_eval_split": "data.eval_split: a pair of data.split whose prompt is also a held-out pair's, dropped from"
    " training so that no held-out prompt is trained on",
    "judge_score_not_finite": "the judge scored a sampled response NaN or infinite, so the samples cannot be ranked",
}


class DropRow(Exception):
    """Raised by converters and checks: this row is dropped for `reason` (a key of REASONS)."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown drop reason '{reason}'; valid reasons: {', '.join(REASONS)}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def row_name(index: int, line: int | None = None) -> str:
    """How a message names a source row: its line in the file where it has one (a .jsonl or .csv file, which an editor
    numbers from 1, past a CSV's header and a JSONL's blank lines), and always its position counting from 0, the
    `index` of dropped.jsonl (a row of a hub dataset, a .json list's element, a Parquet table's row)."""
    return f"row {index} (line {line})" if line is not None else f"row {index} (counting from 0)"


@dataclass
class DroppedRow:
    index: int  # position of the row in the source, counting from 0
    reason: str
    detail: str
    row: Any  # the source row as read, unchanged
    line: int | None = None  # the line of a .jsonl or .csv source where the row starts, counting from 1; else None

    def to_dict(self) -> dict:
        return {"index": self.index, "line": self.line, "reason": self.reason, "detail": self.detail, "row": self.row}

"""Per-format conversion of one source row into TRL's conversational preference format.

Every format ends in the same shape, so the audit, the length check and the trainer see one kind of row:

    {"prompt":   [{"role": "system", ...}?, {"role": "user", ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}],
     "chosen":   [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

Converters only reshape; they raise `DropRow` when a row has no usable shape (a missing column, a value
that is not text, a transcript that cannot be split). Content checks (empty text, role order, identical
responses) live in `dpo_kit.data.audit`, so every format gets the same ones.

The 'standard' output format is rendered from this shape with the model tokenizer's own chat template
(`render_standard`), never with hard-coded role markers.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, Callable

from dpo_kit.chat_templates import ends_with_prefill, render_prompt
from dpo_kit.data.drops import DropRow

Message = dict[str, str]
Row = dict[str, Any]

HH_SPEAKER_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_ROLE_SPEAKERS = {role: speaker for speaker, role in HH_SPEAKER_ROLES.items()}
# A turn marker is a blank line, the speaker and a colon. The capture group keeps the speaker in re.split.
HH_TURN_MARKER = re.compile(r"\n\n(Human|Assistant):")


# ---------------------------------------------------------------------------------------------
# Building blocks


def _column(row: Row, column: str) -> Any:
    if column not in row:
        raise DropRow("missing_column", f"column '{column}' is missing ({present_columns(row, column)})")
    return row[column]


def present_columns(row: Row, wanted: str) -> str:
    """'the row has: ' and its column names, quoted so that spaces in them show (a CSV header 'prompt, chosen,
    rejected' has the columns 'prompt', ' chosen' and ' rejected'), then a note when one is `wanted` but for those."""
    present = f"the row has: {', '.join(map(repr, row)) or 'none'}"
    near = [name for name in row if isinstance(name, str) and name.strip() == wanted]
    if near:
        present += f"; {near[0]!r} is '{wanted}' with spaces around it: remove them from the file's column name"
    return present


def _text(row: Row, column: str) -> str:
    value = _column(row, column)
    if not isinstance(value, str):
        raise DropRow("non_string_value", f"column '{column}' should hold text, got {_describe(value)}")
    return value


def _messages_as_text(value: str) -> bool:
    """True when text is a list of {role, content} messages (or ShareGPT {from, value} turns) written out: as JSON,
    or as Python's repr, which pandas' to_csv writes for a column of lists."""
    text = value.strip()
    if not (text.startswith(("[", "{")) and text.endswith(("]", "}"))):
        return False
    for parse in (json.loads, ast.literal_eval):
        try:
            parsed = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        items = parsed if isinstance(parsed, list) else [parsed]
        return bool(items) and all(
            isinstance(item, dict) and ({"role", "content"} <= item.keys() or {"from", "value"} <= item.keys())
            for item in items
        )
    return False


def _refuse_messages_as_text(value: str, column: str) -> None:
    """A CSV cell (or a column saved as strings) cannot hold a list: read as text, the messages' JSON would be
    trained on as the words of one turn, so such a row is dropped saying where message lists are kept. Applied where
    messages are expected and to prompts, not to a text response, which may be a JSON list that was asked for."""
    if _messages_as_text(value):
        raise DropRow(
            "malformed_messages",
            f"column '{column}' holds messages written out as text ({_describe(value)}), not a list of messages;"
            " a CSV cell holds only text, so keep message lists in a .jsonl, .json or .parquet file and read it"
            " with a message data.format (conversational, messages, sharegpt)",
        )


def _optional_system(row: Row, column: str | None) -> str | None:
    """The system text, or None when the column is absent, null or blank (all mean 'no system message')."""
    if not column or row.get(column) is None:
        return None
    value = row[column]
    if not isinstance(value, str):
        raise DropRow("non_string_value", f"column '{column}' (system) should hold text, got {_describe(value)}")
    return value if value.strip() else None


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def checked_messages(value: Any, column: str) -> list[Message]:
    """Validate a list of {role, content} messages; extra keys are dropped so every row has one schema."""
    if isinstance(value, str):
        _refuse_messages_as_text(value, column)
    if not isinstance(value, list) or not value:
        raise DropRow(
            "malformed_messages", f"column '{column}' should be a non-empty list of {{role, content}} messages, got {_describe(value)}"
        )
    messages = []
    for position, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DropRow(
                "malformed_messages",
                f"{column}[{position}] should be a {{role, content}} message, got {_describe(message)}",
            )
        for key in ("role", "content"):
            if not isinstance(message[key], str):
                raise DropRow("non_string_value", f"{column}[{position}].{key} should be text, got {_describe(message[key])}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _drop_blank_system(prompt: list[Message]) -> list[Message]:
    # A blank system message renders as an empty system block in most templates; no system message is what was meant.
    return [m for m in prompt if not (m["role"] == "system" and not m["content"].strip())]


def _pair(prompt: list[Message], chosen: str | Message, rejected: str | Message, system: str | None = None) -> Row:
    # A system message already in the prompt wins over a system column.
    if system is not None and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    return {"prompt": _drop_blank_system(prompt), "chosen": [_reply(chosen)], "rejected": [_reply(rejected)]}


def _reply(response: str | Message) -> Message:
    return response if isinstance(response, dict) else {"role": "assistant", "content": response}


def _text_pair(row: Row, prompt: str, chosen: str, rejected: str, system: str | None = None) -> Row:
    """A row of plain texts: the prompt is the user's turn, the responses are assistant turns."""
    user = {"role": "user", "content": _text(row, prompt)}
    # Only the prompt is checked: a response may well be a JSON list of messages (asked for one, say).
    _refuse_messages_as_text(user["content"], prompt)
    return _pair([user], _text(row, chosen), _text(row, rejected), _optional_system(row, system))


# ---------------------------------------------------------------------------------------------
# Formats


def from_standard(row: Row) -> Row:
    """TRL standard rows: prompt, chosen and rejected strings (an optional `system` string is honoured)."""
    return _text_pair(row, "prompt", "chosen", "rejected", system="system")


def from_conversational(row: Row) -> Row:
    """TRL conversational rows, explicit or with an implicit prompt (UltraFeedback-binarized style).

    Explicit: `prompt` holds messages (or a string, taken as the user's turn) and chosen/rejected hold the
    reply. Implicit: chosen and rejected hold whole conversations; the prompt is the messages they share,
    and each must then differ in exactly one final message. A `prompt` column next to whole conversations
    (UltraFeedback keeps the first user text there) is ignored, since the transcripts already contain it.
    """
    return _conversational(row, "prompt", "chosen", "rejected", "system")


def _conversational(row: Row, prompt_column: str, chosen_column: str, rejected_column: str, system_column: str | None) -> Row:
    """`from_conversational` reading the named columns, so a drop names the column the source has (data.columns)."""
    chosen = checked_messages(_column(row, chosen_column), chosen_column)
    rejected = checked_messages(_column(row, rejected_column), rejected_column)
    system = _optional_system(row, system_column)
    if len(chosen) > 1 or len(rejected) > 1:
        if prompt_column in row and chosen[0]["role"] == rejected[0]["role"] == "assistant":
            # Replies after a prompt column, not whole conversations: the implicit-prompt split would report that
            # they "share no leading messages, so there is no prompt", next to the prompt the row has.
            found = "; ".join(f"{name}: {', '.join(m['role'] for m in messages)}"
                              for name, messages in ((chosen_column, chosen), (rejected_column, rejected)))  # fmt: skip
            raise DropRow(
                "roles_not_alternating",
                f"with the prompt in '{prompt_column}', '{chosen_column}' and '{rejected_column}' should each be one"
                f" assistant message, got roles: {found} (or give whole conversations that share the prompt, for an"
                " implicit prompt)",
            )
        prompt, chosen_reply, rejected_reply = _split_shared_prefix(chosen, rejected)
        return _pair(prompt, chosen_reply, rejected_reply, system)
    prompt = _column(row, prompt_column)
    if isinstance(prompt, str):
        _refuse_messages_as_text(prompt, prompt_column)
        prompt = [{"role": "user", "content": prompt}]
    return _pair(checked_messages(prompt, prompt_column), chosen[0], rejected[0], system)


def _split_shared_prefix(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], Message, Message]:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if chosen == rejected:
        raise DropRow("identical_responses", "chosen and rejected are the same conversation")
    if shared == 0:
        raise DropRow("unsplittable_transcript", "chosen and rejected share no leading messages, so there is no prompt")
    if len(chosen) != shared + 1 or len(rejected) != shared + 1:
        raise DropRow(
            "unsplittable_transcript",
            f"chosen ({len(chosen)} messages) and rejected ({len(rejected)} messages) diverge at message {shared},"
            " not only in their final message",
        )
    return chosen[:shared], chosen[shared], rejected[shared]


def parse_hh_transcript(text: str, column: str = "transcript") -> list[Message]:
    """Split an hh-rlhf transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages.

    A turn's content is everything after "Speaker: " up to the next turn marker, byte for byte (inner
    and trailing whitespace included), so `rebuild_hh_transcript` gives back the original text. Only the
    one space after the colon belongs to the marker; a turn without it could not be rebuilt exactly.
    """
    preamble, *parts = HH_TURN_MARKER.split(text)
    if preamble:
        raise DropRow(
            "unsplittable_transcript",
            f"{column} does not start with '\\n\\nHuman:' (it starts with {preamble[:40]!r})",
        )
    if not parts:
        raise DropRow("unsplittable_transcript", f"{column} has no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    messages = []
    for speaker, body in zip(parts[::2], parts[1::2], strict=False):
        if body and not body.startswith(" "):
            raise DropRow(
                "unsplittable_transcript",
                f"{column}: turn {len(messages)} ('{speaker}:') is not followed by a space, so it would not rebuild exactly",
            )
        messages.append({"role": HH_SPEAKER_ROLES[speaker], "content": body[1:]})
    return messages


def from_hh_rlhf(row: Row) -> Row:
    """Anthropic/hh-rlhf rows: `chosen` and `rejected` transcripts that differ only in the last Assistant turn."""
    chosen = parse_hh_transcript(_text(row, "chosen"), "chosen")
    rejected = parse_hh_transcript(_text(row, "rejected"), "rejected")
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if turns[-1]["role"] != "assistant":
            raise DropRow("unsplittable_transcript", f"{name} does not end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise DropRow(
            "unsplittable_transcript",
            f"chosen ({len(chosen)} turns) and rejected ({len(rejected)} turns) differ before their last Assistant turn",
        )
    return _pair(chosen[:-1], chosen[-1], rejected[-1])


def rebuild_hh_transcript(row: Row, response: str = "chosen") -> str:
    """The hh-rlhf transcript of a formatted conversational row, ending in its `response` ('chosen' or 'rejected')."""
    messages = row["prompt"] + row[response]
    return "".join(f"\n\n{HH_ROLE_SPEAKERS[m['role']]}: {m['content']}" for m in messages)


def from_orca(row: Row) -> Row:
    """Intel/orca_dpo_pairs rows: system (often empty), question, chosen, rejected."""
    return _text_pair(row, "question", "chosen", "rejected", system="system")


def from_truthy(row: Row) -> Row:
    """jondurbin/truthy-dpo-v0.1 rows: id, source, system, prompt, chosen, rejected."""
    return _text_pair(row, "prompt", "chosen", "rejected", system="system")


# ShareGPT turns as LLaMA-Factory writes them; "observation" and "function_call" (tool turns) have no place in
# a chat template's user/assistant alternation, so such rows are dropped, naming the value found.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _sharegpt_turn(turn: Any, where: str) -> Message:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise DropRow("malformed_messages", f"{where} should be a {{from, value}} turn, got {_describe(turn)}")
    if turn["from"] not in SHAREGPT_ROLES:
        raise DropRow(
            "malformed_messages",
            f"{where}.from is {turn['from']!r}; ShareGPT turns come from {', '.join(map(repr, SHAREGPT_ROLES))}",
        )
    if not isinstance(turn["value"], str):
        raise DropRow("non_string_value", f"{where}.value should be text, got {_describe(turn['value'])}")
    return {"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}


def from_sharegpt(row: Row) -> Row:
    """ShareGPT-style preference rows (LLaMA-Factory, many hub datasets): `conversations`, a list of
    {"from": "human"|"gpt"|"system", "value": ...} turns, and `chosen` / `rejected`, each one {"from": "gpt", ...}
    turn. The whole conversation is the prompt; a `system` column is used when no system turn leads it."""
    conversations = _column(row, "conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DropRow(
            "malformed_messages", f"column 'conversations' should be a non-empty list of turns, got {_describe(conversations)}"
        )
    prompt = [_sharegpt_turn(turn, f"conversations[{position}]") for position, turn in enumerate(conversations)]
    replies = []
    for name in ("chosen", "rejected"):
        reply = _sharegpt_turn(_column(row, name), name)
        if reply["role"] != "assistant":
            raise DropRow("malformed_messages", f"{name} should be a turn from 'gpt', got one from {row[name]['from']!r}")
        replies.append(reply)
    return _pair(prompt, *replies, _optional_system(row, "system"))


def _one_reply(value: Any, column: str) -> Message:
    """A reply given as text, as one {role, content} message, or as a list holding exactly one."""
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    messages = checked_messages(value if isinstance(value, list) else [value], column)
    if len(messages) != 1:
        raise DropRow("malformed_messages", f"column '{column}' should hold one reply, got {len(messages)} messages")
    return messages[0]


def from_messages(row: Row) -> Row:
    """OpenAI-style rows: `messages`, the conversation so far as {role, content} messages (system included), and
    `chosen` / `rejected`, each the assistant reply (a message, a one-message list, or text)."""
    prompt = checked_messages(_column(row, "messages"), "messages")
    return _pair(prompt, _one_reply(_column(row, "chosen"), "chosen"), _one_reply(_column(row, "rejected"), "rejected"))


def from_columns(row: Row, columns) -> Row:
    """Any dataset described by a `ColumnMap`: text columns, or message-list columns like 'conversational'.

    The row is read under its own column names, so a drop names the source's column ('instruction'), not the
    TRL name it maps to ('prompt').
    """
    names = (columns.prompt, columns.chosen, columns.rejected)
    values = [_column(row, name) for name in names]  # each mapped column must be there, the prompt's included
    if columns.system and columns.system not in row:
        # A named system column that is absent (misspelled, say) would otherwise give every row no system message
        # without a word; null or blank in the column is how a row says it has none.
        raise DropRow(
            "missing_column",
            f"column '{columns.system}' (data.columns.system) is missing ({present_columns(row, columns.system)});"
            " a row without a system message holds null or an empty string there",
        )
    if any(isinstance(value, list) for value in values):
        return _conversational(row, *names, columns.system)
    return _text_pair(row, *names, system=columns.system)


CONVERTERS: dict[str, Callable[[Row], Row]] = {
    "standard": from_standard,
    "conversational": from_conversational,
    "hh-rlhf": from_hh_rlhf,
    "orca": from_orca,
    "truthy": from_truthy,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
}


# The drop reasons that say a row does not have the shape of data.format (not that its content is unusable).
SHAPE_REASONS = ("missing_column", "non_string_value", "malformed_messages", "unsplittable_transcript")


def formats_that_fit(row: Row) -> list[str]:
    """The data.format values (but 'columns') whose converter reads `row`: a shape check, no content checks."""
    fits = []
    for name, convert in CONVERTERS.items():
        try:
            convert(row)
        except DropRow:
            continue
        fits.append(name)
    return fits


def converter(data_format: str, columns=None) -> Callable[[Row], Row]:
    """The row converter for `data.format`; 'columns' needs `data.columns`."""
    if data_format == "columns":
        if columns is None:
            raise ValueError("data.format 'columns' needs data.columns (prompt, chosen, rejected, optional system)")
        return lambda row: from_columns(row, columns)
    if data_format not in CONVERTERS:
        raise ValueError(f"data.format '{data_format}' is unknown; valid formats: {', '.join([*CONVERTERS, 'columns'])}")
    return CONVERTERS[data_format]


# ---------------------------------------------------------------------------------------------
# Output


def render_standard(row: Row, tokenizer) -> Row:
    """TRL standard row: the prompt rendered by the tokenizer's own chat template with the generation prompt
    (or continuing a final assistant prefill), the responses as plain text (TRL appends the eos token to them),
    each after the whitespace the template writes between its generation prompt and a reply (`reply_opening`).

    TRL tokenizes this prompt with special tokens on; `dpo_kit.data.audit` removes a BOS the template writes
    itself when the tokenizer adds one too, so the sequence does not start with two.
    """
    prompt = render_prompt(tokenizer, row["prompt"])
    opening = "" if ends_with_prefill(row["prompt"]) else reply_opening(tokenizer, row["prompt"], prompt)
    return {
        "prompt": prompt,
        "chosen": opening + row["chosen"][0]["content"],
        "rejected": opening + row["rejected"][0]["content"],
    }


REPLY_MARKER = "DPO_KIT_REPLY_MARKER"


def reply_opening(tokenizer, prompt: list[Message], rendered_prompt: str) -> str:
    """The whitespace the chat template writes between its generation prompt and a reply's text: ' ' for the
    human-assistant and instruct-output presets, whose generation prompt ends at 'Assistant:' / 'Output:' (a
    trailing space there would tokenize apart from the reply) while a reply renders as 'Assistant: text'.

    TRL joins a standard row's prompt and response as text, so without it the pairs trained 'Assistant:text', a
    format the template never writes. Anything but whitespace (a template's think block, say) is left to the
    template's own conversational rendering, and a template that does not render the reply after its generation
    prompt gets nothing added.
    """
    try:
        rendered = tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": REPLY_MARKER}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template raises whatever it likes; the prompt alone rendered
        return ""
    if not rendered.startswith(rendered_prompt) or REPLY_MARKER not in rendered[len(rendered_prompt) :]:
        return ""
    opening = rendered[len(rendered_prompt) : rendered.index(REPLY_MARKER, len(rendered_prompt))]
    return opening if not opening.strip() else ""

"""Every drop reason, the length limit as TRL counts tokens, de-duplication and the bookkeeping invariant."""

import pytest

from dpo_kit.data.audit import (
    NoPairsLeftError,
    audit_rows,
    measure_pairs,
    raise_if_nothing_left,
    strip_special_text,
    tokenizer_traits,
)
from dpo_kit.data.drops import REASONS, DropRow
from dpo_kit.data.formats import converter
from dpo_kit.models.tiny import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def good(prompt="Can you give me a few tips on baking bread?", chosen="Happy to help with that!", rejected="No."):
    return {"prompt": [user(prompt)], "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}


def audit(rows, tokenizer, data_format="conversational", max_length=None, **kwargs):
    return audit_rows(rows, converter(data_format), tokenizer, max_length=max_length, **kwargs)


def only_drop(rows, tokenizer, **kwargs):
    result = audit(rows, tokenizer, **kwargs)
    assert len(result.dropped) == 1, result.dropped
    return result.dropped[0]


# --- one test per reason --------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(tokenizer, prompt):
    dropped = only_drop([good(prompt=prompt)], tokenizer)
    assert dropped.reason == "empty_prompt" and "prompt message 0" in dropped.detail


def test_empty_message_inside_a_multi_turn_prompt(tokenizer):
    row = good()
    row["prompt"] = [user("Hi"), assistant(" "), user("Go on")]
    assert only_drop([row], tokenizer).reason == "empty_prompt"


@pytest.mark.parametrize("side", ["chosen", "rejected"])
def test_empty_response(tokenizer, side):
    dropped = only_drop([good(**{side: "  "})], tokenizer)
    assert dropped.reason == "empty_response" and side in dropped.detail


def test_non_string_value(tokenizer):
    dropped = only_drop([{"prompt": "Hi", "chosen": None, "rejected": "No"}], tokenizer, data_format="standard")
    assert dropped.reason == "non_string_value"


def test_missing_column(tokenizer):
    dropped = only_drop([{"prompt": [user("Hi")], "chosen": [assistant("Hello")]}], tokenizer)
    assert dropped.reason == "missing_column" and "'rejected'" in dropped.detail


def test_malformed_messages(tokenizer):
    dropped = only_drop([{"prompt": "Hi", "chosen": ["Hello"], "rejected": [assistant("No")]}], tokenizer)
    assert dropped.reason == "malformed_messages"


def test_identical_responses_ignoring_surrounding_whitespace(tokenizer):
    dropped = only_drop([good(chosen="Same answer.", rejected=" Same answer.\n")], tokenizer)
    assert dropped.reason == "identical_responses"


def test_identical_whole_conversations(tokenizer):
    conversation = [user("Hi"), assistant("Hello")]
    assert only_drop([{"chosen": conversation, "rejected": conversation}], tokenizer).reason == "identical_responses"


def test_unsplittable_transcript(tokenizer):
    row = {"chosen": "Human: hi Assistant: hello", "rejected": "Human: hi Assistant: bye"}
    assert only_drop([row], tokenizer, data_format="hh-rlhf").reason == "unsplittable_transcript"


@pytest.mark.parametrize(
    "prompt, response_role, expected",
    [
        ([user("Hi"), user("Hello?")], "assistant", "prompt roles are user, user"),
        ([assistant("I start"), user("Hi")], "assistant", "prompt roles are assistant, user"),
        ([user("Hi"), {"role": "system", "content": "late system"}], "assistant", "prompt roles are user, system"),
        ([{"role": "gpt", "content": "Hi"}], "assistant", "unknown role 'gpt'"),
        ([user("Hi")], "user", "should be one assistant message"),
    ],
    ids=["user-user", "starts-with-assistant", "system-not-first", "unknown-role", "user-reply"],
)
def test_roles_not_alternating(tokenizer, prompt, response_role, expected):
    row = {"prompt": prompt, "chosen": [{"role": response_role, "content": "A"}], "rejected": [assistant("B")]}
    dropped = only_drop([row], tokenizer)
    assert dropped.reason == "roles_not_alternating" and expected in dropped.detail


def prefilled(chosen=" a delight from start to finish.", rejected=" a slog I could not sit through."):
    """A prompt ending with the opening of the assistant's reply, which the responses continue."""
    prompt = [user("Write a short review of a western."), assistant("The pacing of this movie was")]
    return {"prompt": prompt, "chosen": [assistant(chosen)], "rejected": [assistant(rejected)]}


def test_a_prefill_in_conversational_output_is_dropped_with_the_setting_that_renders_it(tokenizer):
    dropped = only_drop([prefilled()], tokenizer)
    assert dropped.reason == "prefill_needs_standard_format" and "data.output_format: standard" in dropped.detail


def test_a_prefill_in_standard_output_is_continued_not_closed(tokenizer):
    [(_, row)] = audit([prefilled()], tokenizer, output_format="standard").kept
    # The reply continues the opening: no end of turn and no new assistant turn between them.
    assert row["prompt"].endswith("<|im_start|>assistant\nThe pacing of this movie was")
    assert row["chosen"] == " a delight from start to finish."
    [lengths] = measure_pairs([row], tokenizer)
    assert lengths.prompt_is_prefix and lengths.prompt == len(tokenizer(row["prompt"])["input_ids"])


def test_hh_rlhf_roles_not_alternating(tokenizer):
    row = {
        "chosen": "\n\nHuman: Hi\n\nHuman: Hello?\n\nAssistant: Yes?",
        "rejected": "\n\nHuman: Hi\n\nHuman: Hello?\n\nAssistant: What.",
    }
    assert only_drop([row], tokenizer, data_format="hh-rlhf").reason == "roles_not_alternating"


def test_duplicate_keeps_the_first_and_names_it(tokenizer):
    result = audit([good(), good(chosen="Other"), good()], tokenizer)
    assert [kept_index for kept_index, _ in result.kept] == [0, 1]
    assert [(d.index, d.reason) for d in result.dropped] == [(2, "duplicate")]
    assert "row 0" in result.dropped[0].detail


def test_deduplicate_off_keeps_duplicates(tokenizer):
    assert len(audit([good(), good()], tokenizer, deduplicate=False).kept) == 2


def test_chat_template_error(tokenizer):
    strict = build_tiny_tokenizer()
    strict.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    result = audit([good(), good(prompt="a forbidden question"), good(prompt="Other")], strict)
    assert [d.index for d in result.dropped] == [1]
    assert result.dropped[0].reason == "chat_template_error" and "no forbidden words" in result.dropped[0].detail


# --- the length limit ------------------------------------------------------------------------


def test_too_long_is_checked_against_the_longer_trl_sequence(tokenizer):
    row = good(chosen="Happy to help with that! " * 5, rejected="No.")
    [lengths] = measure_pairs([row], tokenizer)
    assert lengths.prompt_chosen > lengths.prompt_rejected
    # Exactly at the limit is kept (TRL truncates only beyond it); one token less is dropped.
    assert len(audit([row], tokenizer, max_length=lengths.prompt_chosen).kept) == 1
    dropped = only_drop([row], tokenizer, max_length=lengths.prompt_chosen - 1)
    assert dropped.reason == "too_long" and f"prompt+chosen is {lengths.prompt_chosen} tokens" in dropped.detail
    assert "cut the end of the response" in dropped.detail


def test_a_prompt_that_fills_max_length_is_dropped_with_a_reason_not_silently(tokenizer):
    row = good(prompt="Explain baking bread to a complete beginner. " * 10)
    [lengths] = measure_pairs([row], tokenizer)
    dropped = only_drop([row], tokenizer, max_length=lengths.prompt)
    assert dropped.reason == "too_long" and "which TRL would drop without a word" in dropped.detail


def test_lengths_follow_trl_conversational_tokenization(tokenizer):
    row = good()
    [lengths] = measure_pairs([row], tokenizer)
    prompt_ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True, return_dict=True)["input_ids"]
    assert (lengths.prompt, lengths.prompt_chosen) == (len(prompt_ids), len(full_ids))


def test_lengths_follow_trl_standard_tokenization_with_eos_appended(tokenizer):
    row = {"prompt": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "chosen": "Hello", "rejected": "No"}
    [lengths] = measure_pairs([row], tokenizer)
    assert lengths.prompt_chosen == len(tokenizer(row["prompt"] + "Hello<|im_end|>")["input_ids"])


def test_no_length_limit_keeps_everything(tokenizer):
    assert len(audit([good(chosen="word " * 300)], tokenizer, max_length=None).kept) == 1


def test_batches_measure_like_single_rows(tokenizer):
    rows = [good(prompt=f"Question {i}?", chosen="Yes " * i) for i in range(1, 8)]
    assert measure_pairs(rows, tokenizer, batch_size=3) == [measure_pairs([row], tokenizer)[0] for row in rows]


# --- special-token text ----------------------------------------------------------------------


def test_eos_text_at_the_end_of_a_response_is_stripped_and_counted(tokenizer):
    row = good(chosen="Happy to help!<|im_end|>\n", rejected="No.<|im_end|>")
    fixed, fixes = strip_special_text(row, tokenizer_traits(tokenizer))
    assert fixed["chosen"][0]["content"] == "Happy to help!" and fixed["rejected"][0]["content"] == "No."
    assert fixes["response_eos_text_removed"] == 2
    result = audit([row], tokenizer)
    assert result.checks["response_eos_text_removed"] == 2 and result.checks["double_eos"] == 0


def test_a_response_that_is_only_eos_text_is_empty(tokenizer):
    assert only_drop([good(rejected="<|im_end|>")], tokenizer).reason == "empty_response"


def test_already_rendered_sources_are_flagged(tokenizer):
    result = audit([good(prompt="<|im_start|>user\nHi<|im_end|>")], tokenizer)
    assert result.checks["special_token_text_in_content"] == 1
    assert any("already be rendered" in warning for warning in result.checks["warnings"])


# --- bookkeeping -----------------------------------------------------------------------------


def test_kept_plus_dropped_equals_read_with_a_reason_each(tokenizer):
    rows = [
        good(),
        good(prompt=""),
        good(chosen=" "),
        good(chosen="Same", rejected="Same"),
        {"prompt": [user("Hi")], "chosen": [assistant("Hello")]},
        {"prompt": [user("Hi")], "chosen": [assistant(None)], "rejected": [assistant("x")]},
        good(prompt="Tell me more " * 40, chosen="Hello"),
        good(),
        good(prompt="Another question?"),
    ]
    result = audit(rows, tokenizer, max_length=64)
    assert len(result.kept) + len(result.dropped) == result.rows_read == len(rows)
    assert [index for index, _ in result.kept] == [0, 8]
    assert result.dropped_by_reason == {
        "empty_prompt": 1,
        "empty_response": 1,
        "identical_responses": 1,
        "missing_column": 1,
        "non_string_value": 1,
        "too_long": 1,
        "duplicate": 1,
    }
    assert all(d.reason in REASONS and d.detail for d in result.dropped)
    assert result.dropped[3].row is rows[4]  # the row exactly as read


def test_every_reason_code_has_a_meaning_and_unknown_codes_are_refused():
    assert set(REASONS) >= {
        "empty_prompt", "empty_response", "non_string_value", "missing_column", "identical_responses",
        "unsplittable_transcript", "roles_not_alternating", "too_long", "duplicate",
    }
    with pytest.raises(ValueError, match="unknown drop reason 'typo'"):
        DropRow("typo", "x")


def test_nothing_left_error_lists_top_reasons_with_counts_and_an_example(tokenizer):
    rows = [{"question": "Q"}] * 5 + [good(chosen="", rejected="x")] * 2
    result = audit(rows, tokenizer)
    with pytest.raises(NoPairsLeftError) as caught:
        raise_if_nothing_left(result, "'pairs.jsonl'", "runs/x/data/dropped.jsonl")
    message = str(caught.value)
    assert "all 7 rows read from 'pairs.jsonl' were dropped" in message
    assert "missing_column: 5 rows" in message and "empty_response: 2 rows" in message
    assert "e.g. row 0 (counting from 0): column 'chosen' is missing" in message
    assert message.index("missing_column") < message.index("empty_response")
    assert "runs/x/data/dropped.jsonl" in message


def test_nothing_left_error_for_an_empty_source(tokenizer):
    with pytest.raises(NoPairsLeftError, match="has no rows"):
        raise_if_nothing_left(audit([], tokenizer), "'empty.jsonl'")


def test_notebook_01_shows_every_chat_template_check_with_what_it_measures(tokenizer):
    """01 showed report.chat_template as a raw dict: fourteen keys (template_bos_text_removed, missing_bos...) that
    nothing explained. Its table names each check, its value and its meaning, and each warning on a row of its own."""
    from types import SimpleNamespace

    from dpo_kit.data.audit import TEMPLATE_CHECKS
    from dpo_kit.data.pipeline import chat_template_table

    eos = tokenizer.eos_token
    checks = audit([good(), good(prompt="<|im_start|>user\nHi<|im_end|>")], tokenizer).checks
    assert checks["special_token_text_in_content"] == 1 and checks["warnings"]
    table = chat_template_table(SimpleNamespace(chat_template=checks)).data
    assert set(checks) <= set(TEMPLATE_CHECKS), "every check has a meaning"
    assert all(table["meaning"].str.len() > 0)
    rows = dict(zip(table["check"], table["value"], strict=False))
    assert rows["eos_token"] == eos and rows["bos_token"] == "None" and rows["special_token_text_in_content"] == "1"
    assert table[table["check"] == "warning"]["value"].tolist() == checks["warnings"]
    clean = chat_template_table(SimpleNamespace(chat_template=audit([good()], tokenizer).checks)).data
    assert clean[clean["check"] == "warning"]["value"].tolist() == ["none"]

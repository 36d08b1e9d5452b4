"""Each data format on rows written here in that dataset's published shape."""

import pytest

from dpo_kit.data.drops import DropRow
from dpo_kit.data.formats import (
    converter,
    from_conversational,
    from_hh_rlhf,
    from_orca,
    from_standard,
    from_truthy,
    parse_hh_transcript,
    rebuild_hh_transcript,
    render_standard,
)
from dpo_kit.models.tiny import build_tiny_tokenizer
from dpo_kit.params import ColumnMap


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def drop_reason(convert, row):
    with pytest.raises(DropRow) as caught:
        convert(row)
    return caught.value


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


# --- standard -------------------------------------------------------------------------------


def test_standard_strings_become_one_user_turn_and_assistant_replies():
    row = {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"}
    assert from_standard(row) == {"prompt": [user("What is 2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}


def test_standard_missing_column_names_it_and_the_columns_present():
    problem = drop_reason(from_standard, {"prompt": "Hi", "chosen": "Hello"})
    assert problem.reason == "missing_column"
    assert "'rejected'" in problem.detail and "(the row has: 'prompt', 'chosen')" in problem.detail


def test_a_column_name_with_spaces_around_it_is_shown_and_named():
    # A CSV header "prompt, chosen, rejected" has the columns ' chosen' and ' rejected': the detail read
    # "column 'chosen' is missing (the row has: prompt,  chosen,  rejected)", as if chosen were there.
    problem = drop_reason(from_standard, {"prompt": "Hi", " chosen": "Hello", " rejected": "No"})
    assert problem.reason == "missing_column"
    assert problem.detail == (
        "column 'chosen' is missing (the row has: 'prompt', ' chosen', ' rejected'; ' chosen' is 'chosen' with"
        " spaces around it: remove them from the file's column name)"
    )


@pytest.mark.parametrize("bad", [None, 3, ["text"]])
def test_standard_non_string_value(bad):
    problem = drop_reason(from_standard, {"prompt": "Hi", "chosen": bad, "rejected": "No."})
    assert problem.reason == "non_string_value" and "'chosen'" in problem.detail


# --- conversational -------------------------------------------------------------------------


def test_conversational_explicit_prompt_keeps_messages_and_adds_system_column():
    row = {
        "prompt": [user("Hi"), assistant("Hello!"), user("Tell me a joke.")],
        "chosen": [assistant("Why did the chicken cross the road?")],
        "rejected": [assistant("No.")],
        "system": "Be funny.",
    }
    converted = from_conversational(row)
    assert converted["prompt"] == [system("Be funny."), *row["prompt"]]
    assert converted["chosen"] == row["chosen"] and converted["rejected"] == row["rejected"]


def test_conversational_blank_system_message_is_removed():
    row = {"prompt": [system("  "), user("Hi")], "chosen": [assistant("Hello")], "rejected": [assistant("Go away")]}
    assert from_conversational(row)["prompt"] == [user("Hi")]


def test_conversational_extra_message_keys_are_dropped_for_one_schema():
    row = {"prompt": [{"role": "user", "content": "Hi", "name": "bob"}], "chosen": [assistant("Hello")], "rejected": [assistant("Bye")]}
    assert from_conversational(row)["prompt"] == [user("Hi")]


def test_ultrafeedback_implicit_prompt_is_split_from_whole_conversations():
    # UltraFeedback-binarized: the prompt column is a plain string; chosen/rejected hold the whole conversation.
    row = {
        "prompt": "Name a prime number.",
        "prompt_id": "abc123",
        "chosen": [user("Name a prime number."), assistant("7 is prime.")],
        "rejected": [user("Name a prime number."), assistant("9 is prime.")],
        "messages": [user("Name a prime number."), assistant("7 is prime.")],
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    assert from_conversational(row) == {
        "prompt": [user("Name a prime number.")],
        "chosen": [assistant("7 is prime.")],
        "rejected": [assistant("9 is prime.")],
    }


def test_implicit_prompt_keeps_the_whole_shared_multi_turn_prefix():
    shared = [system("Be brief."), user("Hi"), assistant("Hello."), user("Capital of France?")]
    row = {"chosen": shared + [assistant("Paris.")], "rejected": shared + [assistant("Lyon.")]}
    converted = from_conversational(row)
    assert converted["prompt"] == shared and converted["chosen"] == [assistant("Paris.")]


def test_implicit_prompt_diverging_before_the_last_message_is_unsplittable():
    row = {
        "chosen": [user("Hi"), assistant("Hello."), user("Bye"), assistant("Bye!")],
        "rejected": [user("Hi"), assistant("What?"), user("Bye"), assistant("Whatever.")],
    }
    problem = drop_reason(from_conversational, row)
    assert problem.reason == "unsplittable_transcript" and "diverge at message 1" in problem.detail


def test_implicit_prompt_with_no_shared_messages_is_unsplittable():
    row = {"chosen": [user("A"), assistant("B")], "rejected": [user("C"), assistant("D")]}
    assert drop_reason(from_conversational, row).reason == "unsplittable_transcript"


def test_several_replies_after_an_explicit_prompt_name_the_prompt_and_the_roles():
    # Read as whole conversations, these were "chosen and rejected share no leading messages, so there is no prompt".
    row = {"prompt": [user("Hi")], "chosen": [assistant("Hello."), assistant("And more.")], "rejected": [assistant("No")]}
    problem = drop_reason(from_conversational, row)
    assert problem.reason == "roles_not_alternating"
    assert "with the prompt in 'prompt', 'chosen' and 'rejected' should each be one assistant message" in problem.detail
    assert "chosen: assistant, assistant; rejected: assistant" in problem.detail
    # UltraFeedback keeps the first user text in 'prompt' next to whole conversations: still the implicit prompt.
    ultra = {"prompt": "Hi", "chosen": [user("Hi"), assistant("Hello.")], "rejected": [user("Hi"), assistant("No")]}
    assert from_conversational(ultra)["prompt"] == [user("Hi")]


@pytest.mark.parametrize(
    "chosen, reason",
    [
        ("just a string", "malformed_messages"),
        ([], "malformed_messages"),
        ([{"role": "assistant"}], "malformed_messages"),
        ([{"role": "assistant", "content": None}], "non_string_value"),
    ],
)
def test_conversational_malformed_messages(chosen, reason):
    row = {"prompt": [user("Hi")], "chosen": chosen, "rejected": [assistant("No")]}
    problem = drop_reason(from_conversational, row)
    assert problem.reason == reason and "chosen" in problem.detail


# --- hh-rlhf --------------------------------------------------------------------------------

HH_SINGLE = {
    "chosen": "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for about 8 minutes.",
    "rejected": "\n\nHuman: How do I boil an egg?\n\nAssistant: Why would you want to do that?",
}
HH_MULTI = {
    "chosen": (
        "\n\nHuman: What are some good houseplants?\n\nAssistant: Pothos and snake plants are easy to keep."
        "\n\nHuman: Which needs less light?\n\nAssistant: The snake plant tolerates low light well."
    ),
    "rejected": (
        "\n\nHuman: What are some good houseplants?\n\nAssistant: Pothos and snake plants are easy to keep."
        "\n\nHuman: Which needs less light?\n\nAssistant: I don't know, look it up."
    ),
}
# Whitespace that must survive the round trip: two spaces after the colon, inner newlines, a trailing space.
HH_WHITESPACE = {
    "chosen": "\n\nHuman:  Indented question?\nSecond line.\n\nAssistant:  Answer with\n\nno marker inside. ",
    "rejected": "\n\nHuman:  Indented question?\nSecond line.\n\nAssistant: Short.\n",
}


def test_hh_rlhf_single_turn_splits_at_the_last_assistant_turn():
    assert from_hh_rlhf(HH_SINGLE) == {
        "prompt": [user("How do I boil an egg?")],
        "chosen": [assistant("Put it in boiling water for about 8 minutes.")],
        "rejected": [assistant("Why would you want to do that?")],
    }


def test_hh_rlhf_multi_turn_prompt_is_the_shared_conversation():
    converted = from_hh_rlhf(HH_MULTI)
    assert [m["role"] for m in converted["prompt"]] == ["user", "assistant", "user"]
    assert converted["prompt"][1]["content"] == "Pothos and snake plants are easy to keep."
    assert converted["rejected"] == [assistant("I don't know, look it up.")]


@pytest.mark.parametrize("row", [HH_SINGLE, HH_MULTI, HH_WHITESPACE], ids=["single", "multi", "whitespace"])
def test_hh_rlhf_round_trip_rebuilds_the_exact_transcripts(row):
    converted = from_hh_rlhf(row)
    assert rebuild_hh_transcript(converted, "chosen") == row["chosen"]
    assert rebuild_hh_transcript(converted, "rejected") == row["rejected"]


def test_hh_rlhf_keeps_extra_spaces_in_the_content():
    converted = from_hh_rlhf(HH_WHITESPACE)
    assert converted["prompt"][0]["content"] == " Indented question?\nSecond line."
    assert converted["chosen"][0]["content"] == " Answer with\n\nno marker inside. "


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Go"}, "does not start with"),
        ({"chosen": "\n\nHuman: Hi", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}, "does not end with an Assistant turn"),
        ({"chosen": "no turns at all", "rejected": "none here either"}, "does not start with"),
        (
            {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hey\n\nAssistant: Hello there"},
            "differ before their last Assistant turn",
        ),
        ({"chosen": "\n\nHuman: Hi\n\nAssistant:Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"}, "not followed by a space"),
    ],
    ids=["no-leading-blank-line", "ends-with-human", "no-markers", "diverge-early", "no-space-after-colon"],
)
def test_hh_rlhf_unsplittable_transcripts(row, expected):
    problem = drop_reason(from_hh_rlhf, row)
    assert problem.reason == "unsplittable_transcript" and expected in problem.detail


def test_hh_rlhf_empty_final_reply_parses_to_empty_content_for_the_audit():
    assert parse_hh_transcript("\n\nHuman: Hi\n\nAssistant:")[-1] == assistant("")


# --- orca / truthy / columns ----------------------------------------------------------------

ORCA_ROW = {
    "system": "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "question": "Summarise: The cat sat on the mat all afternoon.",
    "chosen": "A cat spent the afternoon sitting on a mat.",
    "rejected": " Sure! Here is a summary: cat.",
}


def test_orca_system_becomes_a_system_message():
    converted = from_orca(ORCA_ROW)
    assert converted["prompt"] == [system(ORCA_ROW["system"]), user(ORCA_ROW["question"])]
    # Leading whitespace of a reply is data, not formatting: it is kept.
    assert converted["rejected"] == [assistant(" Sure! Here is a summary: cat.")]


def test_orca_empty_system_gives_no_system_message():
    assert from_orca({**ORCA_ROW, "system": ""})["prompt"] == [user(ORCA_ROW["question"])]


def test_orca_renders_through_the_tokenizers_own_chatml_template(tokenizer):
    rendered = render_standard(from_orca(ORCA_ROW), tokenizer)
    assert rendered["prompt"] == (
        f"<|im_start|>system\n{ORCA_ROW['system']}<|im_end|>\n"
        f"<|im_start|>user\n{ORCA_ROW['question']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert rendered["chosen"] == ORCA_ROW["chosen"]  # plain text: TRL appends the eos token


def test_orca_without_question_column():
    problem = drop_reason(from_orca, {"system": "", "chosen": "a", "rejected": "b"})
    assert problem.reason == "missing_column" and "'question'" in problem.detail


def test_truthy_row():
    row = {
        "id": "04c275bf738fd391b7fe25e25fe7bed3",
        "source": "truthy_dpo",
        "system": "You are an unbiased, uncensored, helpful assistant.",
        "prompt": "What color angers bulls?",
        "chosen": "Bulls are colour-blind to red; the movement of the cape provokes them.",
        "rejected": "Red.",
    }
    assert from_truthy(row) == {
        "prompt": [system(row["system"]), user(row["prompt"])],
        "chosen": [assistant(row["chosen"])],
        "rejected": [assistant("Red.")],
    }


def test_truthy_null_system_gives_no_system_message():
    row = {"id": "1", "source": "s", "system": None, "prompt": "Q?", "chosen": "A.", "rejected": "B."}
    assert from_truthy(row)["prompt"] == [user("Q?")]


def test_columns_map_text_columns():
    convert = converter("columns", ColumnMap(prompt="instruction", chosen="good", rejected="bad", system="persona"))
    row = {"instruction": "Say hi", "good": "Hi!", "bad": "No.", "persona": "Be nice."}
    assert convert(row) == {"prompt": [system("Be nice."), user("Say hi")], "chosen": [assistant("Hi!")], "rejected": [assistant("No.")]}


def test_columns_map_message_columns():
    convert = converter("columns", ColumnMap(prompt="context", chosen="win", rejected="lose"))
    row = {"context": [user("Hi")], "win": [assistant("Hello!")], "lose": [assistant("Meh.")]}
    assert convert(row) == {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("Meh.")]}


def test_columns_map_names_the_missing_mapped_column():
    convert = converter("columns", ColumnMap(prompt="instruction", chosen="good", rejected="bad"))
    problem = drop_reason(convert, {"instruction": "x", "good": "y"})
    assert problem.reason == "missing_column" and "'bad'" in problem.detail


def test_columns_map_refuses_a_named_system_column_the_row_lacks():
    # A misspelled data.columns.system used to give every row no system message, silently.
    convert = converter("columns", ColumnMap(prompt="instruction", chosen="good", rejected="bad", system="sytem"))
    problem = drop_reason(convert, {"instruction": "Say hi", "good": "Hi!", "bad": "No.", "system": "Be nice."})
    assert problem.reason == "missing_column" and "column 'sytem' (data.columns.system) is missing" in problem.detail
    blank = {"instruction": "Say hi", "good": "Hi!", "bad": "No.", "sytem": None}
    assert convert(blank)["prompt"] == [user("Say hi")], "null in the named column: no system message"


@pytest.mark.parametrize(
    "row, reason, named",
    [
        ({"instruction": 5, "good": "y", "bad": "z"}, "non_string_value", "column 'instruction' should hold text"),
        ({"instruction": [user("Hi")], "good": "Hello!", "bad": [assistant("Meh.")]}, "malformed_messages",
         "column 'good' should be a non-empty list"),
        ({"instruction": [user("Hi")], "good": [assistant("Hello!")], "bad": [{"role": "assistant"}]},
         "malformed_messages", "bad[0] should be a {role, content} message"),
        ({"instruction": [{"role": "user", "content": None}], "good": [assistant("A")], "bad": [assistant("B")]},
         "non_string_value", "instruction[0].content should be text"),
    ],
)
def test_columns_map_drops_name_the_source_column_not_the_trl_one(row, reason, named):
    # A drop used to name the TRL column the mapped one was renamed to ("column 'prompt' should hold text"), a
    # column the user's file does not have.
    convert = converter("columns", ColumnMap(prompt="instruction", chosen="good", rejected="bad"))
    problem = drop_reason(convert, row)
    assert problem.reason == reason and named in problem.detail


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="valid formats: standard, conversational, hh-rlhf, orca, truthy, sharegpt, messages, columns"
    ):
        converter("alpaca")

"""The 'generate' data source: sampled pairs, ranking, drops with reasons, and determinism under a seed."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest

from dpo_kit.bundled import movie_review_prompts
from dpo_kit.data.drops import DropRow
from dpo_kit.data.on_policy import (
    cut_responses,
    judge_floor_pairs,
    judge_truncated_responses,
    prompt_rows,
    ranked_pair,
    sample_scored_rows,
)
from dpo_kit.data.sources import SourceError
from dpo_kit.params import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "params" / "tiny.yaml"


def generate_params(tiny_model_dir, prompts_file, *extra):
    return load_params(TINY, [
        f"model.name_or_path={tiny_model_dir}", "model.build_tiny_model=false", "data.source=generate",
        f"data.generate={{prompts: {prompts_file}, judge: rule, num_samples: 3, max_new_tokens: 12, batch_size: 4,"
        " min_score_gap: 0.0}", *extra,
    ])  # fmt: skip


@pytest.fixture
def prompts_file(tmp_path):
    rows = [
        {"prompt": "Can you give me a few tips on baking bread?"},
        {"prompt": [{"role": "user", "content": "What is the first step in learning Python?"}]},
        {"prompt": "   "},  # empty: dropped as empty_prompt
        {"question": "no prompt column"},  # dropped as missing_column
        {"prompt": "Explain composting at home to a complete beginner."},
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_an_unreadable_prompts_file_names_data_generate_prompts(tmp_path):
    # The prompts file is read by the same reader as data.source; its errors must name the setting that set it.
    bad = tmp_path / "prompts.csv"
    bad.write_text("prompt\nHi, how are you?\n")
    with pytest.raises(SourceError, match=r"^data.generate.prompts: .*prompts.csv, line 2: 2 fields, but the header has 1"):
        prompt_rows(generate_params(tmp_path / "model", bad), tmp_path)


def test_an_empty_prompt_in_a_one_column_csv_is_a_row_dropped_with_its_reason_not_skipped(tmp_path):
    # A quoted "" or a line of spaces was skipped as a blank line, so it vanished from the rows read, uncounted. In a
    # file of one column it is a row with an empty prompt; only an empty line holds no row.
    from dpo_kit.data.on_policy import as_messages, prompt_rows_and_lines

    prompts = tmp_path / "prompts.csv"
    prompts.write_text('prompt\nHello there\n""\n   \n\nWorld\n')
    rows, lines = prompt_rows_and_lines(generate_params(tmp_path / "model", prompts), tmp_path)
    assert rows == [{"prompt": "Hello there"}, {"prompt": ""}, {"prompt": "   "}, {"prompt": "World"}]
    assert lines == [2, 3, 4, 6]
    for row in rows[1:3]:
        with pytest.raises(DropRow, match="empty_prompt"):
            as_messages(row)
    # With several columns a line of spaces is still a blank line, not a row of one field.
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,chosen,rejected\nQ,a,b\n   \nR,c,d\n")
    assert prompt_rows(generate_params(tmp_path / "model", pairs), tmp_path) == [
        {"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": "R", "chosen": "c", "rejected": "d"}]


def test_bundled_movie_review_prompts_are_several_hundred_distinct_openings():
    prompts = movie_review_prompts()
    texts = [row["prompt"][0]["content"] for row in prompts]
    assert len(texts) == len(set(texts)) == 384
    assert all(text.startswith("Continue this review of a") for text in texts)
    assert movie_review_prompts(seed=0) == prompts and movie_review_prompts(seed=1) != prompts


def test_bundled_review_openings_are_the_same_openings_as_the_start_of_the_reply():
    openings = movie_review_prompts(prefill=True)
    assert len(openings) == 384
    assert [row["prompt"][-1]["role"] for row in openings] == ["assistant"] * 384
    quoted = {row["prompt"][0]["content"] for row in movie_review_prompts()}
    as_reply = {f"Continue this review of a {row['prompt'][1]['content'][len('Review a '):-1]}:"
                f" '{row['prompt'][-1]['content']}'" for row in openings}  # fmt: skip
    assert as_reply == quoted


def test_review_openings_need_the_standard_format():
    with pytest.raises(ParamsError, match="data.generate.prompts 'movie-review-openings'.*data.output_format: standard"):
        load_params(REPO / "params/smollm2-135m-sentiment.yaml", ["data.generate.prompts=movie-review-openings",
                                                                   "data.output_format=conversational"])  # fmt: skip


def test_ranked_pair_takes_the_best_as_chosen_and_the_worst_as_rejected():
    row = {"prompt": "Review it.", "samples": ["meh", "loved it", "hated it"], "scores": [0.1, 0.9, -0.8]}
    pair = ranked_pair(0.5)(row)
    assert pair == {
        "prompt": [{"role": "user", "content": "Review it."}],
        "chosen": [{"role": "assistant", "content": "loved it"}],
        "rejected": [{"role": "assistant", "content": "hated it"}],
    }


def test_ranked_pair_drops_a_prompt_whose_scores_are_too_close():
    row = {"prompt": "Review it.", "samples": ["fine", "okay"], "scores": [0.30, 0.25]}
    with pytest.raises(DropRow) as drop:
        ranked_pair(0.1)(row)
    assert drop.value.reason == "score_gap_too_small" and "0.050 < data.generate.min_score_gap 0.1" in drop.value.detail


def test_samples_the_judge_scores_alike_are_dropped_for_their_score_gap_even_with_no_minimum_gap():
    # All scores equal made the best and the worst sample the same one; with min_score_gap 0 that pair was then dropped
    # as identical_responses, "chosen and rejected have the same text", though the two samples differ.
    with pytest.raises(DropRow) as drop:
        ranked_pair(0.0)({"prompt": "Review it.", "samples": ["fine film", "good film"], "scores": [0.5, 0.5]})
    assert drop.value.reason == "score_gap_too_small" and drop.value.detail == "all 2 samples scored 0.500: the judge prefers none"
    # Samples that are all one text (a temperature near 0) say so, whatever the gap asked.
    for gap in (0.0, 0.3):
        with pytest.raises(DropRow) as drop:
            ranked_pair(gap)({"prompt": "Review it.", "samples": ["fine film"] * 3, "scores": [0.2] * 3})
        assert drop.value.reason == "score_gap_too_small" and "all 3 samples are the same text" in drop.value.detail
    tied_at_top = ranked_pair(0.0)({"prompt": "Review it.", "samples": ["a b", "c d", "e f"], "scores": [0.5, 0.5, 0.1]})
    assert tied_at_top["chosen"][0]["content"] == "a b" and tied_at_top["rejected"][0]["content"] == "e f"


@pytest.mark.parametrize("scores", [[float("nan"), 0.9, -0.8], [0.1, float("nan"), -0.8], [0.1, 0.9, float("inf")]])
def test_a_sample_the_judge_scored_nan_or_infinite_drops_its_prompt_naming_the_sample(scores):
    # A NaN first in the list was both best and worst (a tie); anywhere else it was silently left out of the ranking.
    row = {"prompt": "Review it.", "samples": ["meh", "loved it", "hated it"], "scores": scores}
    with pytest.raises(DropRow) as drop:
        ranked_pair(0.0)(row)
    bad = next(i for i, value in enumerate(scores) if not math.isfinite(value))
    assert drop.value.reason == "judge_score_not_finite"
    assert drop.value.detail.startswith(f"the judge scored sample {bad} (0-based) {scores[bad]!r}: check the judge")


@pytest.mark.parametrize("message", [{"role": "user", "content": None}, {"role": "user", "content": 5},
                                     {"role": None, "content": "Review it."}])
def test_a_prompt_message_that_is_not_text_is_dropped_with_its_position_not_a_crash(message):
    # A prompts file row like {"prompt": [{"role": "user", "content": null}]} used to be sampled from, then crash the
    # audit ('NoneType' object has no attribute 'strip'); it is dropped, naming the message, like any format's row.
    from dpo_kit.data.audit import audit_rows
    from dpo_kit.models.tiny import build_tiny_tokenizer

    bad = {"prompt": [message], "samples": ["loved it", "hated it"], "scores": [0.9, -0.8]}
    good = {"prompt": "Review it.", "samples": ["loved it", "hated it"], "scores": [0.9, -0.8]}
    result = audit_rows([bad, good], ranked_pair(0.1), build_tiny_tokenizer(), max_length=256)
    assert [index for index, _ in result.kept] == [1]
    assert [(d.index, d.reason) for d in result.dropped] == [(0, "non_string_value")]
    assert result.dropped[0].detail.startswith("prompt[0].")


def test_sampling_is_deterministic_under_a_seed(tiny_model_dir, prompts_file):
    from dpo_kit.models.loading import load_tokenizer

    params = generate_params(tiny_model_dir, prompts_file)
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    first = sample_scored_rows(params, tokenizer, REPO)
    again = sample_scored_rows(params, tokenizer, REPO)
    other_seed = sample_scored_rows(generate_params(tiny_model_dir, prompts_file, "run.seed=7"), tokenizer, REPO)
    assert first == again
    assert [row.get("samples") for row in first] != [row.get("samples") for row in other_seed]
    usable = [row for row in first if "samples" in row]
    assert len(usable) == 3 and all(len(row["samples"]) == len(row["scores"]) == 3 for row in usable)


def test_format_stage_keeps_or_drops_every_prompt_with_its_reason(tiny_model_dir, prompts_file, tmp_path):
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer

    params = generate_params(tiny_model_dir, prompts_file, "data.generate.min_score_gap=1000")
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    with pytest.raises(ValueError, match="score_gap_too_small"):  # nothing can clear a gap of 1000
        prepare_data(params, tokenizer, tmp_path / "run", REPO)
    dropped = [json.loads(line) for line in (tmp_path / "run" / "data" / "dropped.jsonl").read_text().splitlines()]
    assert [(d["index"], d["reason"]) for d in dropped] == [
        (0, "score_gap_too_small"), (1, "score_gap_too_small"), (2, "empty_prompt"), (3, "missing_column"),
        (4, "score_gap_too_small"),
    ]  # fmt: skip
    assert len(dropped[0]["row"]["samples"]) == 3, "a dropped prompt keeps its samples and scores"

    params = generate_params(tiny_model_dir, prompts_file, "data.eval_fraction=0.4")
    report = prepare_data(params, tokenizer, tmp_path / "run2", REPO)
    assert report.rows_read == 5 and report.rows_kept + report.rows_dropped == 5
    assert report.dropped_by_reason.get("empty_prompt") == 1 and report.dropped_by_reason.get("missing_column") == 1
    samples = (tmp_path / "run2" / "data" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 5, "every prompt's samples and scores are written, kept or not"


def test_a_repeated_prompt_is_sampled_once_so_it_is_never_both_trained_on_and_held_out(tiny_model_dir, tmp_path):
    # Every copy of a repeated prompt used to be sampled into a pair of its own. Their responses differ, so the audit's
    # de-duplication of whole pairs kept them all, and the seeded split held out one copy and trained on another.
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer

    texts = [f"Tell me about topic number {i}, with some detail." for i in range(6)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in texts + texts))
    params = generate_params(tiny_model_dir, prompts, "data.eval_fraction=0.3")
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    report = prepare_data(params, tokenizer, tmp_path / "run", REPO)
    data_dir = tmp_path / "run" / "data"
    train, eval_ = ({json.dumps(json.loads(line)["prompt"]) for line in (data_dir / f"{split}.jsonl").open()}
                    for split in ("train", "eval"))  # fmt: skip
    assert not train & eval_
    assert report.rows_read == 12 and report.dropped_by_reason["duplicate_prompt"] == 6
    dropped = [json.loads(line) for line in (data_dir / "dropped.jsonl").open()]
    dropped = [row for row in dropped if row["reason"] == "duplicate_prompt"]
    assert [row["index"] for row in dropped] == [6, 7, 8, 9, 10, 11]
    assert dropped[0]["detail"].startswith("the same prompt as row 0 (line 1), which was sampled instead")
    assert [row["line"] for row in dropped] == [7, 8, 9, 10, 11, 12]
    samples = [json.loads(line) for line in (data_dir / "samples.jsonl").open()]
    assert [len(row.get("samples", [])) for row in samples] == [3] * 6 + [0] * 6, "a repeat is not sampled again"

    kept = prepare_data(generate_params(tiny_model_dir, prompts, "data.deduplicate=false"), tokenizer, tmp_path / "all", REPO)
    assert "duplicate_prompt" not in kept.dropped_by_reason  # data.deduplicate: false samples every row


def test_a_prompt_the_template_refuses_or_too_long_alone_is_dropped_with_its_reason_before_sampling(tiny_model_dir, tmp_path):
    # A template that refuses a prompt (Gemma's raises "System role not supported") stopped the whole format stage with
    # its TemplateError from inside sampling; a prompt over max_length alone was sampled at full length, then dropped.
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer

    rows = [{"prompt": "Can you give me a few tips on baking bread?"},
            {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hello."}]},
            {"prompt": "Give me a word. " * 120},
            {"prompt": "Explain composting at home to a complete beginner."},
            {"prompt": "What is the first step in learning Python?"}]  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    params = generate_params(tiny_model_dir, prompts, "data.max_length=128", "data.eval_fraction=0.4")
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    prepare_data(params, tokenizer, tmp_path / "run", REPO)
    data_dir = tmp_path / "run" / "data"
    dropped = {row["index"]: row for row in map(json.loads, (data_dir / "dropped.jsonl").open())}
    assert (dropped[1]["reason"], dropped[1]["detail"]) == ("chat_template_error", "TemplateError: System role not supported")
    assert dropped[2]["reason"] == "too_long" and dropped[2]["detail"].endswith("over max_length 128, so no response can"
                                                                                " follow it: not sampled")  # fmt: skip
    samples = [json.loads(line) for line in (data_dir / "samples.jsonl").open()]
    assert ["samples" in row for row in samples] == [True, False, False, True, True]


@pytest.fixture
def stopping_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with every thirtieth token id an eos of its generation config, so that within 12 new tokens some
    samples end and others are cut (a random model almost never samples its one real eos)."""
    model_dir = tmp_path / "stopping-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config_path = model_dir / "generation_config.json"
    config = json.loads(config_path.read_text())
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    config["eos_token_id"] = sorted({config["eos_token_id"], *range(3, vocab, 30)})
    config_path.write_text(json.dumps(config))
    return model_dir, set(config["eos_token_id"])


def test_samples_record_which_responses_max_new_tokens_cut(stopping_model_dir, prompts_file, tmp_path):
    from dpo_kit.data.on_policy import as_messages
    from dpo_kit.data.pipeline import load_data_report, prepare_data
    from dpo_kit.models.loading import load_causal_lm, load_tokenizer
    from dpo_kit.models.sampling import prompt_token_ids, sample_continuations

    model_dir, eos_ids = stopping_model_dir
    params = generate_params(model_dir, prompts_file, "data.output_format=standard")
    tokenizer = load_tokenizer(str(model_dir), params)
    rows = sample_scored_rows(params, tokenizer, REPO)
    sampled = [row for row in rows if "samples" in row]
    # The same draw, by hand: cut means all 12 tokens were sampled and the last is no eos.
    prompts = [prompt_token_ids(tokenizer, as_messages(row)) for row in sampled]
    ids = sample_continuations(load_causal_lm(str(model_dir), params).eval(), tokenizer, prompts, max_new_tokens=12,
                               do_sample=True, num_samples=3, batch_size=4, seed=params.run.seed)  # fmt: skip
    expected = [[len(one) == 12 and one[-1] not in eos_ids for one in row] for row in ids]
    assert [row["cut"] for row in sampled] == expected
    flags = [flag for row in expected for flag in row]
    assert any(flags) and not all(flags), "the fixture gives both kinds"

    report = prepare_data(params, tokenizer, tmp_path / "run", REPO)
    written = [json.loads(line) for line in (tmp_path / "run" / "data" / "samples.jsonl").read_text().splitlines()]
    assert [row["cut"] for row in written if "samples" in row] == expected
    cut = report.responses_cut
    assert (cut["max_new_tokens"], cut["samples"], cut["samples_cut"]) == (12, len(flags), sum(flags))
    # Each kept pair's chosen and rejected response, found among its prompt's samples by text.
    by_text = {text: flag for row in written if "samples" in row for text, flag in zip(row["samples"], row["cut"], strict=True)}
    pairs = [json.loads(line) for split in ("train", "eval")
             for line in (tmp_path / "run" / "data" / f"{split}.jsonl").read_text().splitlines()]  # fmt: skip
    assert cut["pair_responses"] == 2 * len(pairs) == 2 * (report.n_train + report.n_eval)
    assert cut["pair_responses_cut"] == sum(by_text[pair[side]] for pair in pairs for side in ("chosen", "rejected"))
    line = report.responses_cut_line()
    assert f"{sum(flags)} of {len(flags)} samples" in line and "ends in eos in training" in line
    conversational = dataclasses.replace(report, output_format="conversational")
    assert "ends in the chat template's end of turn" in conversational.responses_cut_line()
    assert dataclasses.replace(report, responses_cut=None).responses_cut_line() is None  # other sources say nothing
    assert load_data_report(tmp_path / "run").responses_cut == cut


def test_a_prompt_repeated_in_a_batch_is_prefilled_once_and_draws_the_same_tokens(tiny_model_dir, monkeypatch):
    import torch
    from transformers import DynamicCache

    from dpo_kit.models import sampling
    from dpo_kit.models.loading import load_causal_lm, load_tokenizer

    params = load_params(TINY, [f"model.name_or_path={tiny_model_dir}", "model.build_tiny_model=false"])
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    model = load_causal_lm(str(tiny_model_dir), params).eval()
    texts = ["Bread", "Can you give me a few tips on baking bread?", "What is the first step?", "Compost your kitchen waste."]
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    assert len(set(map(len, prompts))) == len(prompts), "left padding differs from row to row"

    # The cache of the distinct prompts, copied out to the batch's rows, is the batch's own prefill.
    rows, owners = [prompts[1], prompts[1], prompts[0], prompts[2]], [1, 1, 0, 2]
    shared = sampling._prefill_shared_prompts(model, tokenizer, rows, owners)
    batch = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt")
    mask = batch["attention_mask"]
    direct = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=batch["input_ids"][:, :-1], attention_mask=mask[:, :-1], cache=direct, use_cache=True,
              position_ids=((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))[:, :-1])  # fmt: skip
    assert len(shared.layers) == len(direct.layers) > 0
    for mine, theirs in zip(shared.layers, direct.layers, strict=True):
        real = mask[:, None, :-1, None].bool()  # padded positions are masked out either way
        torch.testing.assert_close(mine.keys * real, theirs.keys * real, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(mine.values * real, theirs.values * real, rtol=1e-5, atol=1e-6)
    assert sampling._prefill_shared_prompts(model, tokenizer, rows[1:], owners[1:]) is None, "nothing repeats"

    made = []
    prefill = sampling._prefill_shared_prompts
    monkeypatch.setattr(sampling, "_prefill_shared_prompts", lambda *a: made.append(prefill(*a)) or made[-1])
    draw = dict(max_new_tokens=12, do_sample=True, num_samples=3, batch_size=4, seed=5)  # 4 is not a multiple of 3
    with_sharing = sampling.sample_continuations(model, tokenizer, prompts, **draw)
    without = sampling.sample_continuations(model, tokenizer, prompts, share_prompts=False, **draw)
    assert with_sharing == without
    assert len(made) == 3 and all(cache is not None for cache in made), "every batch of 4 repeats a prompt"
    assert len({tuple(one) for row in without for one in row}) > len(prompts), "the samples differ, not one draw"


def test_a_continuation_is_cut_when_it_ends_without_an_eos():
    from dpo_kit.models.sampling import was_cut

    eos = {2, 7}
    assert not was_cut([5, 6, 2], eos) and not was_cut([5, 6, 7], eos)  # ended by either eos, even at the limit
    assert was_cut([5, 6, 8], eos) and was_cut([], eos)


def test_a_character_max_new_tokens_cut_in_two_leaves_no_replacement_character():
    """max_new_tokens may stop inside a character of several bytes; the byte-level tokenizer decodes its first bytes as
    U+FFFD, and that stray character was judged and written to samples.jsonl and generations.jsonl. Only the cut's
    trailing run goes: one before an eos, or mid-text, was decoded from what the model ended or went on from."""
    from dpo_kit.models.sampling import response_text
    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    eos = {tokenizer.eos_token_id}
    whole = tokenizer(" great \u2615", add_special_tokens=False)["input_ids"]  # a hot beverage: three bytes
    cut = whole[:-1]
    assert tokenizer.decode(cut).endswith("\ufffd"), "the cup's bytes are tokens of their own, and the cut splits them"
    new_turn = [{"role": "user", "content": "Review it."}]
    prefill = [*new_turn, {"role": "assistant", "content": "It was"}]
    assert response_text(tokenizer, cut, new_turn, eos) == "great"
    assert response_text(tokenizer, cut, prefill, eos) == " great"
    assert response_text(tokenizer, cut, "a standard prompt", eos) == " great"
    assert response_text(tokenizer, whole, new_turn, eos) == "great \u2615", "a whole character stays"
    ended = response_text(tokenizer, [*cut, tokenizer.eos_token_id], new_turn, eos)
    assert ended == tokenizer.decode(cut).strip() and ended.endswith("\ufffd"), "the model ended it there"
    went_on = [*cut, *tokenizer(" fun", add_special_tokens=False)["input_ids"]]
    assert response_text(tokenizer, went_on, new_turn, eos) == tokenizer.decode(went_on).strip()
    assert "\ufffd" in tokenizer.decode(went_on), "mid-text, it stays"


def test_cut_responses_counts_the_samples_and_the_kept_pairs_responses():
    rows = [
        {"prompt": "a", "samples": ["x", "y", "z"], "scores": [0.1, 0.9, -0.5], "cut": [False, True, True]},
        {"prompt": "b", "samples": ["x", "y"], "scores": [0.2, 0.2], "cut": [True, False]},  # dropped: no gap
        {"prompt": "   "},  # unusable, never sampled
        {"prompt": "c", "samples": ["x", "y"], "scores": [-0.3, 0.4], "cut": [False, False]},
    ]
    # Prompt a's pair is samples 1 (chosen) and 2 (rejected), both cut; c's is 1 and 0, neither.
    assert cut_responses(rows, [0, 3], 16) == {
        "max_new_tokens": 16, "samples": 7, "samples_cut": 3, "pair_responses": 4, "pair_responses_cut": 2,
    }  # fmt: skip
    # Samples written before the kit recorded the flag: unknown, not zero.
    assert cut_responses([{key: value for key, value in row.items() if key != "cut"} for row in rows], [0, 3], 16) is None


def test_judge_floor_pairs_counts_the_floored_samples_and_the_pairs_the_floor_decided():
    rows = [
        # chosen 1 (not floored) against rejected 2 (floored): decided by the floor
        {"prompt": "a", "samples": ["x", "y", "z"], "scores": [0.1, 0.9, -1.0], "floored": [False, False, True]},
        {"prompt": "b", "samples": ["x", "y"], "scores": [-1.0, -1.0], "floored": [True, True]},  # dropped: no gap
        {"prompt": "   "},  # unusable, never sampled
        {"prompt": "c", "samples": ["x", "y"], "scores": [-0.3, 0.4], "floored": [False, False]},  # sentiment decided
    ]
    assert judge_floor_pairs(rows, [0, 3]) == {"samples": 7, "samples_floored": 3, "pairs": 2, "pairs_decided_by_floor": 1}
    # A judge without a floor (or samples written before the kit recorded it): unknown, not zero.
    assert judge_floor_pairs([{key: value for key, value in row.items() if key != "floored"} for row in rows], [0, 3]) is None


def test_a_judge_with_a_length_floor_records_what_it_floored_and_the_report_says_how_many_pairs_it_decided(
    tiny_model_dir, prompts_file, tmp_path
):
    from dpo_kit.data.pipeline import load_data_report, prepare_data
    from dpo_kit.judges import SentimentJudge
    from dpo_kit.models.loading import load_tokenizer

    # The tiny model's 12 random tokens decode to a varying number of words, so the floor of 8 is met only sometimes.
    # Three more prompts than the fixture: the format stage refuses a run that keeps fewer than 2 pairs (one to
    # train on, one held out), and with the fixture's three usable prompts this judge keeps only one.
    more = ["Describe a rainy afternoon in a small town.", "What makes a good cup of tea?", "Tell me about owls."]
    with prompts_file.open("a") as out:
        out.writelines(json.dumps({"prompt": prompt}) + "\n" for prompt in more)
    params = generate_params(tiny_model_dir, prompts_file, "data.generate.judge=sentiment", "evaluate.judge=sentiment")
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    rows = [row for row in sample_scored_rows(params, tokenizer, REPO) if "samples" in row]
    judge = SentimentJudge()
    assert all(row["floored"] == [judge.floored(text) for text in row["samples"]] for row in rows)
    assert all(score == -1.0 for row in rows for score, flag in zip(row["scores"], row["floored"], strict=True) if flag)

    report = prepare_data(params, tokenizer, tmp_path / "run", REPO)
    pairs = [json.loads(line) for split in ("train", "eval")
             for line in (tmp_path / "run" / "data" / f"{split}.jsonl").read_text().splitlines()]  # fmt: skip
    by_floor = sum(judge.floored(p["rejected"][0]["content"]) and not judge.floored(p["chosen"][0]["content"])
                   for p in pairs)  # fmt: skip
    floor = report.judge_floor
    assert 0 < floor["samples_floored"] < floor["samples"], "the fixture gives both kinds"
    assert floor["pairs"] == len(pairs) and floor["pairs_decided_by_floor"] == by_floor
    assert floor["samples_floored"] == sum(sum(row["floored"]) for row in rows)
    assert load_data_report(tmp_path / "run").judge_floor == floor
    line = report.judge_floor_line()
    assert f"it decided {by_floor} of the {len(pairs)} pairs kept" in line

    rule = prepare_data(generate_params(tiny_model_dir, prompts_file), tokenizer, tmp_path / "rule", REPO)
    assert rule.judge_floor is None and rule.judge_floor_line() is None  # the rule judge has no floor


def test_judge_truncated_responses_counts_the_samples_and_the_kept_pairs_responses_a_reward_model_cut():
    rows = [
        {"prompt": "a", "samples": ["x", "y", "z"], "scores": [0.1, 0.9, -0.5], "judge_truncated": [False, True, True]},
        {"prompt": "   "},  # unusable, never sampled
        {"prompt": "c", "samples": ["x", "y"], "scores": [-0.3, 0.4], "judge_truncated": [True, False]},
    ]
    # Prompt a's pair is samples 1 (chosen) and 2 (rejected), both cut; c's is 1 (not cut) and 0 (cut).
    assert judge_truncated_responses(rows, [0, 2]) == {
        "samples": 5, "samples_truncated": 3, "pair_responses": 4, "pair_responses_truncated": 3,
    }  # fmt: skip
    unrecorded = [{key: value for key, value in row.items() if key != "judge_truncated"} for row in rows]
    assert judge_truncated_responses(unrecorded, [0, 2]) is None  # a judge that reads every text whole


def test_a_reward_model_judge_records_which_samples_it_cut_and_the_report_counts_them(
    tiny_model_dir, prompts_file, tmp_path
):
    """Sampled pairs ranked by a reward model that reads 30 tokens: each sample says whether its prompt's start was
    cut to fit, and data/report.json counts them, as it counts the responses max_new_tokens cut."""
    from test_judges import build_reward_model, with_model_max_length
    from transformers import AutoTokenizer

    from dpo_kit.data.pipeline import load_data_report, prepare_data
    from dpo_kit.models.loading import load_tokenizer

    judge_dir = with_model_max_length(build_reward_model(tmp_path / "reward-model"), 30)
    params = generate_params(tiny_model_dir, prompts_file, f"data.generate.judge={judge_dir}",
                             f"evaluate.judge={judge_dir}")  # fmt: skip
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    judge_tokenizer = AutoTokenizer.from_pretrained(judge_dir)

    def longer(prompt, text):
        conversation = prompt + [{"role": "assistant", "content": text}]
        return len(judge_tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]) > 30

    with pytest.warns(UserWarning, match="longer than the 30 tokens the reward model reads"):
        rows = [row for row in sample_scored_rows(params, tokenizer, REPO) if "samples" in row]
    flags = [row["judge_truncated"] for row in rows]
    assert flags == [[longer(row["prompt"], text) for text in row["samples"]] for row in rows]
    assert any(map(any, flags))

    with pytest.warns(UserWarning, match="the reward model reads"):
        report = prepare_data(params, tokenizer, tmp_path / "run", REPO)
    assert report.judge_truncated["samples"] == sum(map(len, flags))
    assert report.judge_truncated["samples_truncated"] == sum(map(sum, flags))
    assert load_data_report(tmp_path / "run").judge_truncated == report.judge_truncated


def test_the_judge_floor_line_says_so_when_most_pairs_were_decided_by_length():
    from dpo_kit.data.pipeline import DataReport

    fields = {name: None for name in DataReport.__dataclass_fields__}
    most = DataReport(**{**fields, "judge_floor": {"samples": 40, "samples_floored": 30, "pairs": 10,
                                                   "pairs_decided_by_floor": 9}})  # fmt: skip
    assert "most pairs teach writing more words" in most.judge_floor_line()
    few = dataclasses.replace(most, judge_floor={**most.judge_floor, "pairs_decided_by_floor": 2})
    assert "decided 2 of the 10 pairs" in few.judge_floor_line() and "most pairs" not in few.judge_floor_line()


def test_generate_source_needs_its_section_and_a_matching_judge(tiny_model_dir):
    with pytest.raises(ParamsError, match="data.generate is required when data.source is 'generate'"):
        load_params(TINY, ["data.source=generate"])
    with pytest.raises(ParamsError, match="data.generate is only used with data.source 'generate'"):
        load_params(TINY, ["data.generate={judge: sentiment}"])
    with pytest.raises(ParamsError, match="data.generate.judge 'rule' only scores the bundled task"):
        load_params(REPO / "params/smollm2-135m-sentiment.yaml", ["data.generate.judge=rule"])
    with pytest.raises(ParamsError, match=r"data.generate.num_samples.*greater than or equal to 2"):
        load_params(REPO / "params/smollm2-135m-sentiment.yaml", ["data.generate.num_samples=1"])


def test_a_named_sampler_that_is_missing_is_an_error_not_a_substitute(tiny_model_dir, prompts_file):
    from dpo_kit.params import check_local_files

    params = generate_params(tiny_model_dir, prompts_file, "data.generate.sampler=./runs/round-1/merged")
    with pytest.raises(ParamsError, match="data.generate.sampler: directory not found"):
        check_local_files(params, REPO)


def test_a_missing_round_one_policy_named_as_readme_names_it_is_not_taken_for_a_hub_id(tiny_model_dir, prompts_file, tmp_path):
    """README's round 2 names 'runs/<round 1>/merged' without './'. Before round 1 was merged (or with a typo) that name
    passed the file check as a hub id, and sampling failed with 'model.name_or_path ... download it from the hub'."""
    from dpo_kit.data.on_policy import sampler_run_held_out_prompts, sampler_source
    from dpo_kit.params import check_local_files

    (tmp_path / "runs" / "round-1").mkdir(parents=True)
    (tmp_path / "runs" / "round-1" / "manifest.json").write_text("{}")  # round 1 ran, but its merge stage did not
    params = generate_params(tiny_model_dir, prompts_file, "data.generate.sampler=runs/round-1/merged")
    missing = r"data.generate.sampler: directory not found: .*runs/round-1/merged\. It is inside the run .*round-1"
    with pytest.raises(ParamsError, match=missing):
        check_local_files(params, tmp_path)
    with pytest.raises(FileNotFoundError, match=missing):
        sampler_run_held_out_prompts(params, tmp_path)
    with pytest.raises(FileNotFoundError, match=missing):
        sampler_source(params, tmp_path)
    # Three parts cannot be a hub id, inside run.output_dir or not; 'owner/name' still is one.
    deeper = generate_params(tiny_model_dir, prompts_file, "data.generate.sampler=elsewhere/round-1/merged")
    with pytest.raises(ParamsError, match="data.generate.sampler: directory not found"):
        check_local_files(deeper, tmp_path)
    hub = generate_params(tiny_model_dir, prompts_file, "data.generate.sampler=some-org/another-model")
    check_local_files(hub, tmp_path)
    assert sampler_source(hub, tmp_path) == "some-org/another-model"
    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "round-1" / "merged")
    assert sampler_source(params, tmp_path) == str(tmp_path / "runs" / "round-1" / "merged")


def test_a_sampler_with_another_tokenizer_is_refused_before_it_samples(tiny_model_dir, prompts_file, tmp_path):
    # The run's tokenizer encodes the prompts and decodes the samples; another model's ids used to be read as other
    # text ('rKqq?@ADBA' from SmolLM2 for the tiny model), which the judge then ranked into pairs without an error.
    from dpo_kit.models.loading import load_tokenizer
    from dpo_kit.models.tiny import build_tiny_tokenizer

    sampler = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, sampler)
    build_tiny_tokenizer(vocab_size=700).save_pretrained(sampler)  # ids the model can embed, meaning other text
    params = generate_params(tiny_model_dir, prompts_file, f"data.generate.sampler={sampler}")
    with pytest.raises(ValueError, match=r"data.generate.sampler '.*other-model' has another tokenizer than"
                                         r" model.name_or_path '.*' \(700 tokens, not 873\)"):  # fmt: skip
        sample_scored_rows(params, load_tokenizer(str(tiny_model_dir), params), REPO)


@pytest.mark.parametrize("local", [False, True])
def test_a_sampler_gets_neither_the_policy_repos_revision_nor_its_trust_unless_it_is_a_local_directory(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, local
):
    """model.revision and model.trust_remote_code are the policy repo's. A hub sampler of another repo was loaded at
    the policy's revision and ran its own code on the policy's yes. A local one (an earlier run's merged/) keeps it."""
    from dpo_kit.models import loading

    sampler = str(tmp_path / "round-1") if local else "some-org/another-model"
    if local:
        shutil.copytree(tiny_model_dir, sampler)
    params = generate_params(tiny_model_dir, prompts_file, f"data.generate.sampler={sampler}",
                             "model.trust_remote_code=true", "model.revision=policy-branch")  # fmt: skip
    tokenizer = loading.load_tokenizer(str(tiny_model_dir), params)
    seen = {}

    class Loaded(Exception):
        pass

    def fake_from_pretrained(cls, source, **kwargs):
        seen["tokenizer"] = (source, kwargs)
        return tokenizer  # the same vocabulary: the check passes

    def fake_load_causal_lm(source, params, *args, **kwargs):
        seen["model"] = (source, loading.hub_kwargs(params))
        raise Loaded

    monkeypatch.setattr(loading, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(loading, "load_causal_lm", fake_load_causal_lm)
    with pytest.raises(Loaded):
        sample_scored_rows(params, tokenizer, REPO)
    for source, kwargs in seen.values():
        assert source == sampler and "revision" not in kwargs and kwargs["trust_remote_code"] is local
    assert params.model.revision == "policy-branch" and params.model.trust_remote_code  # the run's own model keeps them


def test_round_two_samples_from_the_named_policy(tiny_model_dir, prompts_file, tmp_path):
    """Iterative DPO: a sampler directory other than the reference gives other samples from the same seed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_kit.models.loading import load_tokenizer

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for weight in policy.parameters():
            weight.mul_(1.5)
    policy.save_pretrained(tmp_path / "round-1")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "round-1")
    params = generate_params(tiny_model_dir, prompts_file)
    round_two = generate_params(tiny_model_dir, prompts_file, f"data.generate.sampler={tmp_path / 'round-1'}")
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    first = sample_scored_rows(params, tokenizer, REPO)
    second = sample_scored_rows(round_two, tokenizer, REPO)
    assert [row.get("samples") for row in first] != [row.get("samples") for row in second]


def test_a_prefilled_prompt_is_sampled_and_trained_as_one_continued_reply(tiny_model_dir, tmp_path):
    """A prompt ending with an assistant message (the opening of the reply) is continued, not answered:
    the sampler and TRL's standard format see the same context, and the responses keep their joining space."""
    from dpo_kit.chat_templates import render_prompt
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer
    from dpo_kit.models.sampling import prompt_token_ids

    opening = [{"role": "user", "content": "Review the film."}, {"role": "assistant", "content": "The pacing was"}]
    # Two prompts: pairs of one prompt stay in one split, and the run needs a pair on each side.
    other = [{"role": "user", "content": "Review the play."}, opening[1]]
    path = tmp_path / "prefills.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in (opening, other)))
    params = generate_params(tiny_model_dir, path, "data.output_format=standard", "data.deduplicate=false")
    tokenizer = load_tokenizer(str(tiny_model_dir), params)
    report = prepare_data(params, tokenizer, tmp_path / "run", REPO)
    assert report.rows_kept + report.rows_dropped == 2

    rendered = render_prompt(tokenizer, opening)
    assert rendered.endswith("assistant\nThe pacing was"), "the opening is continued, not closed"
    assert tokenizer(rendered)["input_ids"] == prompt_token_ids(tokenizer, opening), "sampled from this context"
    samples = [json.loads(line) for line in (tmp_path / "run" / "data" / "samples.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for split in ("train", "eval") for line in
             (tmp_path / "run" / "data" / f"{split}.jsonl").read_text().splitlines()]  # fmt: skip
    assert sorted(pair["prompt"] for pair in pairs) == [rendered, render_prompt(tokenizer, other)]
    for pair in pairs:
        assert pair["chosen"] in samples[0]["samples"] + samples[1]["samples"]
    # Whatever the tiny model sampled is kept as decoded: only trailing whitespace goes (and a cut character's U+FFFD).
    assert all(text == text.rstrip() for row in samples for text in row["samples"])


def test_a_continuation_keeps_its_leading_space_and_a_new_turn_is_stripped():
    from dpo_kit.models.sampling import response_text
    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(" great fun \n")["input_ids"]
    prefill = [{"role": "user", "content": "Review it."}, {"role": "assistant", "content": "It was"}]
    eos = {tokenizer.eos_token_id}
    assert response_text(tokenizer, ids, prefill, eos) == " great fun"
    assert response_text(tokenizer, ids, prefill[:1], eos) == "great fun"


def iterative_prompts_file(path: Path, *first: str) -> Path:
    prompts = [*first, *(f"Give me tip number {n} for baking bread at home." for n in range(16))]
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    return path


def user_prompts(split_file: Path) -> list[str]:
    return [json.loads(line)["prompt"][0]["content"] for line in split_file.read_text().splitlines()]


def format_round(tiny_model_dir, prompts: Path, run_dir: Path, *overrides: str):
    """One round's format stage, then the run finished as far as the next round needs: a manifest and a policy in
    merged/ (the tiny model itself: which policy samples does not matter to the split)."""
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer

    params = generate_params(tiny_model_dir, prompts, "data.eval_fraction=0.25", *overrides)
    report = prepare_data(params, load_tokenizer(str(tiny_model_dir), params), run_dir, REPO)
    (run_dir / "manifest.json").write_text("{}")
    shutil.copytree(tiny_model_dir, run_dir / "merged")
    return params, report


@pytest.fixture
def round_one(tiny_model_dir, tmp_path):
    """A finished round 1 as a run directory: its format stage's split, a manifest, and its policy in merged/."""
    run_dir = tmp_path / "runs" / "round-1"
    format_round(tiny_model_dir, iterative_prompts_file(tmp_path / "round-1.jsonl"), run_dir)
    return run_dir


def test_round_two_holds_out_the_prompts_that_round_one_held_out(tiny_model_dir, round_one, tmp_path):
    """Iterative DPO tests every round on the same prompts, none of them trained on by any round. A seeded split
    of round 2's own pairs would not: with one prompt more (or one dropped), it holds out other prompts."""
    from dpo_kit.data.pipeline import split_rows
    from dpo_kit.evaluation.generate import comparison_prompts

    new_prompt = "Which flour makes the softest sandwich loaf?"
    prompts = iterative_prompts_file(tmp_path / "round-2.jsonl", new_prompt)
    round_two = tmp_path / "runs" / "round-2"
    params, report = format_round(tiny_model_dir, prompts, round_two, f"data.generate.sampler={round_one / 'merged'}",
                                  "generate.num_prompts=3")  # of round 1's 4 held-out prompts

    held_out_by_round_one = user_prompts(round_one / "data" / "eval.jsonl")
    trained_by_round_one = user_prompts(round_one / "data" / "train.jsonl")
    train, eval_ = user_prompts(round_two / "data" / "train.jsonl"), user_prompts(round_two / "data" / "eval.jsonl")
    assert report.held_out_from == str(round_one.resolve() / "data" / "eval.jsonl")
    assert report.to_dict()["held_out_from"] == report.held_out_from
    assert report.eval_fraction is None, "round 2 holds out round 1's prompts, not a fraction of its own pairs"
    assert eval_ == held_out_by_round_one and len(eval_) == 4
    # Trained on: the new prompt, round 1's training prompts, and any that round 1 dropped (never trained on).
    assert set(train) >= {new_prompt, *trained_by_round_one} and not set(train) & set(held_out_by_round_one)
    # The generate stage compares the models on round 1's held-out prompts, whatever round 2's filter dropped.
    assert user_prompts(round_two / "data" / "held_out_prompts.jsonl") == held_out_by_round_one
    shown = comparison_prompts(params, round_two)
    assert [prompt[0]["content"] for prompt in shown] == held_out_by_round_one[: params.generate.num_prompts]
    assert not (round_one / "data" / "held_out_prompts.jsonl").exists(), "round 1 has its own eval.jsonl"

    # What the seeded split would have held out: some prompts that round 1, the sampler's run, trained on.
    kept = set(train + eval_)
    in_source_order = [json.loads(line)["prompt"] for line in prompts.read_text().splitlines()]
    in_source_order = [{"prompt": [{"role": "user", "content": text}]} for text in in_source_order if text in kept]
    _, seeded_eval = split_rows(list(enumerate(in_source_order)), 0.25, params.run.seed)
    assert {row["prompt"][0]["content"] for row in seeded_eval} & set(trained_by_round_one)

    # Round 3 samples from round 2's policy and still holds out round 1's prompts, all of them.
    round_three = tmp_path / "runs" / "round-3"
    _, report = format_round(tiny_model_dir, prompts, round_three, f"data.generate.sampler={round_two / 'merged'}")
    assert report.held_out_from == str(round_two.resolve() / "data" / "held_out_prompts.jsonl")
    assert user_prompts(round_three / "data" / "held_out_prompts.jsonl") == held_out_by_round_one
    assert set(user_prompts(round_three / "data" / "eval.jsonl")) <= set(held_out_by_round_one)


def test_a_held_out_prompt_that_round_two_lacks_stays_held_out_in_round_three(tiny_model_dir, round_one, tmp_path):
    """Round 2 without one of round 1's held-out prompts (dropped by its score-gap filter, or left out of its file)
    still compares the models on it, and a round 3 that has it again holds it out rather than training on it. A
    policy inside a run, not its merged/ (here a checkpoint), counts as that run's."""
    from dpo_kit.evaluation.generate import comparison_prompts

    held_out_by_round_one = user_prompts(round_one / "data" / "eval.jsonl")
    lacking = held_out_by_round_one[0]
    all_prompts = tmp_path / "round-1.jsonl"
    fewer = tmp_path / "round-2.jsonl"
    fewer.write_text("".join(line + "\n" for line in all_prompts.read_text().splitlines()
                             if json.loads(line)["prompt"] != lacking))  # fmt: skip
    round_two = tmp_path / "runs" / "round-2"
    params, _ = format_round(tiny_model_dir, fewer, round_two, f"data.generate.sampler={round_one / 'merged'}",
                             "generate.num_prompts=4")  # all of round 1's held-out prompts
    assert user_prompts(round_two / "data" / "eval.jsonl") == held_out_by_round_one[1:]
    assert user_prompts(round_two / "data" / "held_out_prompts.jsonl") == held_out_by_round_one
    assert [prompt[0]["content"] for prompt in comparison_prompts(params, round_two)] == held_out_by_round_one

    checkpoint = round_two / "checkpoints" / "checkpoint-2"
    shutil.copytree(tiny_model_dir, checkpoint)
    round_three = tmp_path / "runs" / "round-3"
    _, report = format_round(tiny_model_dir, all_prompts, round_three, f"data.generate.sampler={checkpoint}")
    assert report.held_out_from == str(round_two.resolve() / "data" / "held_out_prompts.jsonl")
    assert lacking in user_prompts(round_three / "data" / "eval.jsonl")
    assert lacking not in user_prompts(round_three / "data" / "train.jsonl")


def test_round_two_refuses_prompts_it_cannot_match_to_round_one(tiny_model_dir, round_one, tmp_path):
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer

    prompts = iterative_prompts_file(tmp_path / "round-2.jsonl")
    sampler = f"data.generate.sampler={round_one / 'merged'}"
    standard = generate_params(tiny_model_dir, prompts, sampler, "data.output_format=standard")
    tokenizer = load_tokenizer(str(tiny_model_dir), standard)
    with pytest.raises(ValueError, match=r"holds out the prompts of .*round-1/data/eval.jsonl \(4 of them\), but none"
                                         r" of its held-out prompts is among this run's \d+ kept pairs.*output_format"):
        prepare_data(standard, tokenizer, tmp_path / "runs" / "standard", REPO)

    # A model directory that no run wrote is a plain sampler: the seeded split, as in round 1.
    plain = generate_params(tiny_model_dir, prompts, f"data.generate.sampler={tiny_model_dir}")
    report = prepare_data(plain, tokenizer, tmp_path / "runs" / "plain", REPO)
    assert (report.held_out_from, report.eval_fraction) == (None, plain.data.eval_fraction)

    (round_one / "data" / "eval.jsonl").unlink()
    conversational = generate_params(tiny_model_dir, prompts, sampler)
    with pytest.raises(FileNotFoundError, match=r"is a policy of the run .*round-1, but no data/eval.jsonl was found"):
        prepare_data(conversational, tokenizer, tmp_path / "runs" / "missing", REPO)


@pytest.mark.parametrize("status", ["failed", "interrupted", "running"])
def test_round_two_refuses_a_policy_whose_merge_stage_did_not_complete(tiny_model_dir, round_one, tmp_path, status):
    """A merge that failed its logits check (or was interrupted, or still runs elsewhere) leaves merged/ on disk:
    round 2 sampled from it as if round 1 had finished."""
    from dpo_kit.data.on_policy import sampler_run_held_out_prompts

    prompts = iterative_prompts_file(tmp_path / "round-2.jsonl")
    params = generate_params(tiny_model_dir, prompts, f"data.generate.sampler={round_one / 'merged'}")
    manifest = {"status": "failed", "stages": {"format": {"status": "completed"}, "train": {"status": "completed"},
                                               "merge": {"status": status}}}  # fmt: skip
    (round_one / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"'{round_one / 'merged'}' is the merged/ of the run {round_one}, whose merge"
                                         rf" stage is {status}, not completed.*--resume"):
        sampler_run_held_out_prompts(params, REPO)
    manifest["stages"]["merge"]["status"] = "completed"
    (round_one / "manifest.json").write_text(json.dumps(manifest))
    assert sampler_run_held_out_prompts(params, REPO).source_file == round_one.resolve() / "data" / "eval.jsonl"


def test_round_twos_pairs_are_not_reused_once_round_one_wrote_another_policy(tiny_model_dir, round_one, tmp_path):
    """Round 2's pairs are samples of round 1's merged/. Round 1 run again (--overwrite, or its merge stage with
    other params) puts another policy there, under the same path and params: the pairs were still shown as current
    (notebook 01), copied by --reuse-format and shared by a sweep's trials, as if that policy had sampled them."""
    from dpo_kit.params import params_to_dict
    from dpo_kit.run.stage import format_input_files, format_stage_differences, params_fingerprint

    prompts = iterative_prompts_file(tmp_path / "round-2.jsonl")
    params = generate_params(tiny_model_dir, prompts, f"data.generate.sampler={round_one / 'merged'}")
    resolved = params_to_dict(params)
    round_two = tmp_path / "runs" / "round-2"
    round_two.mkdir(parents=True)
    entry = {"status": "completed", "params_fingerprint": params_fingerprint(resolved, "format"),
             "input_files": format_input_files(resolved["data"], REPO)}  # what open_stage records when the stage starts
    assert entry["input_files"]["data.generate.sampler"]["path"] == str((round_one / "merged").resolve())
    (round_two / "manifest.json").write_text(json.dumps({"stages": {"format": entry}}))
    assert format_stage_differences(round_two, resolved, REPO) == []

    weights = next((round_one / "merged").glob("*.safetensors"))
    shutil.copy2(weights, tmp_path / "weights")
    weights.unlink()
    shutil.copyfile(tmp_path / "weights", weights)  # round 1's merge stage run again: the same path, a new file
    assert format_stage_differences(round_two, resolved, REPO) == [
        f"data.generate.sampler {(round_one / 'merged').resolve()} was written again since the stage ran (its pairs"
        " were sampled from the model that was there before)"]
    shutil.rmtree(round_one / "merged")
    assert format_stage_differences(round_two, resolved, REPO) == [
        f"data.generate.sampler {(round_one / 'merged').resolve()} is gone"]

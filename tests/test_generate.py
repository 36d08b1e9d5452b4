"""Side-by-side generation on the tiny model: file contents, prompts, reproducibility, batching."""

from __future__ import annotations

import pytest
from run_dirs import make_run_dir as make_shared_run_dir

from dpo_kit.bundled import bundled_preference_rows
from dpo_kit.evaluation.generate import (
    GENERATIONS_FILE,
    REFERENCE_SAMPLES_FILE,
    comparisons_frame,
    generate_comparisons,
    read_jsonl,
    side_by_side_table,
)
from dpo_kit.models.tiny import build_tiny_model
from dpo_kit.params import parse_params

# Rows spread over topics; every fifth bundled row has a system message, so rows 0 and 50 exercise it.
EVAL_ROWS = bundled_preference_rows()[::50]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def make_run_dir(path, base_dir, noise: float):
    return make_shared_run_dir(path, base_dir, noise, EVAL_ROWS)


@pytest.fixture(scope="module")
def perturbed_run(tiny_model_dir, tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "perturbed", tiny_model_dir, noise=0.05)


def make_params(model_dir, seed: int = 7, **generate):
    settings = {"num_prompts": 4, "max_new_tokens": 12, "batch_size": 3, **generate}
    return parse_params(
        {"run": {"name": "gen", "seed": seed}, "model": {"name_or_path": str(model_dir)}, "generate": settings}
    )


def test_generations_file_holds_prompts_both_responses_and_token_counts(tiny_model_dir, perturbed_run):
    from transformers import AutoTokenizer

    params = make_params(tiny_model_dir)
    frame = generate_comparisons(params, perturbed_run)
    records = read_jsonl(perturbed_run / GENERATIONS_FILE)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    assert len(records) == len(frame) == 4  # num_prompts of the held-out prompts, in order
    assert [r["prompt"] for r in records] == [row["prompt"] for row in EVAL_ROWS[:4]]
    assert list(frame["user_prompt"]) == [row["prompt"][-1]["content"] for row in EVAL_ROWS[:4]]
    trimmed = []
    for record in records:
        text = tokenizer.apply_chat_template(record["prompt"], add_generation_prompt=True, tokenize=False)
        assert text.endswith("<|im_start|>assistant\n") and record["prompt_text"] == text
        assert record["prompt_token_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert record["prompt_tokens"] == len(record["prompt_token_ids"])
        for model in ("reference", "policy"):
            ids = record[f"{model}_token_ids"]
            assert record[f"{model}_tokens"] == len(ids)
            assert 1 <= len(ids) <= params.generate.max_new_tokens
            assert tokenizer.eos_token_id not in ids[:-1]  # cut at the first eos, no padding kept
            # The text is the ids decoded, less the U+FFFD of a character max_new_tokens cut in two; ids and count stay.
            decoded, cut = tokenizer.decode(ids, skip_special_tokens=True), ids[-1] != tokenizer.eos_token_id
            assert record[model] == (decoded.rstrip("\ufffd") if cut else decoded).strip()
            trimmed.append(record[model] != decoded.strip())
    assert any(trimmed), "the tiny model's random bytes meet a cut character: the check above is not idle"
    assert any(r["policy"] != r["reference"] for r in records)  # the perturbed policy is a different model
    assert "baking bread" in side_by_side_table(frame).to_html()
    # Every score names its judge (evaluate.judge, not an input of this stage, may change later), and so does the table.
    assert {record["judge"] for record in records} == {"rule"}
    assert list(side_by_side_table(frame).data.columns)[-1] == "judge (rule): policy"


def test_same_seed_reproduces_generations_and_another_seed_changes_them(tiny_model_dir, perturbed_run):
    generate_comparisons(make_params(tiny_model_dir, seed=3), perturbed_run)
    first = (perturbed_run / GENERATIONS_FILE).read_text()
    generate_comparisons(make_params(tiny_model_dir, seed=3), perturbed_run)
    assert (perturbed_run / GENERATIONS_FILE).read_text() == first
    generate_comparisons(make_params(tiny_model_dir, seed=4), perturbed_run)
    assert (perturbed_run / GENERATIONS_FILE).read_text() != first


def test_best_of_n_draws_judged_reference_responses_and_leaves_the_side_by_side_ones_alone(tiny_model_dir, tmp_path):
    from dpo_kit.judges import make_judge

    run_dir = make_run_dir(tmp_path / "best-of-n", tiny_model_dir, noise=0.05)
    generate_comparisons(make_params(tiny_model_dir), run_dir)
    without = (run_dir / GENERATIONS_FILE).read_text()
    assert not (run_dir / REFERENCE_SAMPLES_FILE).exists()

    params = make_params(tiny_model_dir, best_of_n=3)
    generate_comparisons(params, run_dir)
    assert (run_dir / GENERATIONS_FILE).read_text() == without  # drawn after, from their own seed
    rows = read_jsonl(run_dir / REFERENCE_SAMPLES_FILE)
    generations = read_jsonl(run_dir / GENERATIONS_FILE)
    assert [row["prompt"] for row in rows] == [g["prompt"] for g in generations]  # exactly the evaluated prompts
    judge = make_judge(params)
    for row in rows:
        assert row["judge"] == "rule" and len(row["samples"]) == len(row["scores"]) == len(row["tokens"]) == 3
        assert row["scores"] == pytest.approx(judge.score([row["prompt"]] * 3, row["samples"]))
        assert all(1 <= n <= params.generate.max_new_tokens for n in row["tokens"])
    assert len({text for row in rows for text in row["samples"]}) > len(rows)  # sampled, not one response repeated


def test_identical_policy_and_reference_sample_identical_responses(tiny_model_dir, tmp_path):
    run_dir = make_run_dir(tmp_path / "identical", tiny_model_dir, noise=0.0)
    generate_comparisons(make_params(tiny_model_dir), run_dir)
    for record in read_jsonl(run_dir / GENERATIONS_FILE):
        assert record["policy_token_ids"] == record["reference_token_ids"]


def test_left_padded_batches_generate_what_single_prompts_do(tiny_model_dir, perturbed_run):
    # Greedy decoding is deterministic, so any difference would come from padding leaking into attention.
    def greedy(batch_size):
        generate_comparisons(make_params(tiny_model_dir, do_sample=False, batch_size=batch_size), perturbed_run)
        return [r["policy_token_ids"] for r in read_jsonl(perturbed_run / GENERATIONS_FILE)]

    batched = greedy(batch_size=4)
    prompt_lengths = {len(r["prompt_token_ids"]) for r in read_jsonl(perturbed_run / GENERATIONS_FILE)}
    assert len(prompt_lengths) > 1  # the batch really is padded
    assert batched == greedy(batch_size=1)


def test_explicit_prompts_become_user_messages(tiny_model_dir, perturbed_run):
    params = make_params(tiny_model_dir, prompts=["How do I brew coffee?", "Tell me about meditation."])
    frame = generate_comparisons(params, perturbed_run)
    records = read_jsonl(perturbed_run / GENERATIONS_FILE)
    assert [r["prompt"] for r in records] == [
        [{"role": "user", "content": "How do I brew coffee?"}],
        [{"role": "user", "content": "Tell me about meditation."}],
    ]
    assert list(frame["user_prompt"]) == ["How do I brew coffee?", "Tell me about meditation."]


def test_more_prompts_than_held_out_or_none_held_out_is_refused_by_name(tiny_model_dir, tmp_path):
    """generate.num_prompts beyond the held-out prompts used to compare on fewer without a word, and an empty
    eval.jsonl failed in the side-by-side table with KeyError: 'prompt'."""
    import json
    import shutil

    from dpo_kit.evaluation.generate import comparison_prompts

    shutil.copytree(tiny_model_dir, tmp_path / "merged")
    (tmp_path / "data").mkdir()
    eval_file = tmp_path / "data" / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in EVAL_ROWS[:3]))
    assert len(comparison_prompts(make_params(tiny_model_dir, num_prompts=3), tmp_path)) == 3
    with pytest.raises(ValueError, match=r"generate.num_prompts is 4, but .*eval.jsonl holds 3 distinct held-out prompts: set"
                                         r" generate.num_prompts to at most 3"):
        comparison_prompts(make_params(tiny_model_dir, num_prompts=4), tmp_path)
    eval_file.write_text("")
    with pytest.raises(ValueError, match=r"eval.jsonl holds no held-out prompts to generate for"):
        generate_comparisons(make_params(tiny_model_dir), tmp_path)


def test_pairs_that_share_a_prompt_are_compared_on_that_prompt_once(tiny_model_dir, tmp_path):
    """The format stage holds out every pair of a prompt together (hh-rlhf, UltraFeedback and orca ask one question
    more than once), and eval.jsonl lists them in source order: taken row by row, the comparison generated for one
    prompt twice and the win-rate counted it twice."""
    import json

    from dpo_kit.evaluation.generate import comparison_prompts

    first, second, third = EVAL_ROWS[:3]
    rows = [first, {**first, "chosen": second["chosen"]}, second, {**first, "rejected": third["rejected"]}, third]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert comparison_prompts(make_params(tiny_model_dir, num_prompts=3), tmp_path) == [
        first["prompt"], second["prompt"], third["prompt"]]
    with pytest.raises(ValueError, match=r"eval.jsonl holds 3 distinct held-out prompts: set generate.num_prompts to"
                                         r" at most 3"):
        comparison_prompts(make_params(tiny_model_dir, num_prompts=4), tmp_path)


@pytest.mark.parametrize("model_config", [{}, {"top_k": 5, "repetition_penalty": 3.0, "min_p": 0.2}],
                         ids=["no-generation-config", "a-model-generation-config"])  # fmt: skip
def test_sampling_is_shaped_by_the_params_alone(tiny_model_dir, model_config):
    """transformers fills in top_k=50 where the model's generation config names none, and takes a model's own
    top_k, min_p or repetition penalty from generation_config.json. The kit names every knob: `top_k: 0` draws from
    the model's whole distribution, and the default 50 (transformers' own, and what the README's numbers were
    measured with) keeps the 50 likeliest tokens, whatever the model's generation config says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_kit.models.sampling import prompt_token_ids, sample_continuations

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for key, value in model_config.items():
        setattr(model.generation_config, key, value)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = prompt_token_ids(tokenizer, EVAL_ROWS[0]["prompt"])
    with torch.no_grad():
        probabilities = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
    top_50 = set(probabilities.argsort(descending=True)[:50].tolist())
    beyond = 1 - probabilities[list(top_50)].sum().item()
    assert beyond > 0.5  # the tiny model is near uniform over its vocabulary: most of its mass lies past rank 50

    def share_beyond_top_50(top_k: int) -> float:
        (drawn,) = sample_continuations(model, tokenizer, [ids], max_new_tokens=1, do_sample=True, temperature=1.0,
                                        top_p=1.0, top_k=top_k, batch_size=500, num_samples=500, seed=0,
                                        share_prompts=False)  # fmt: skip
        return sum(first not in top_50 for first, *_ in drawn) / len(drawn)

    assert share_beyond_top_50(0) == pytest.approx(beyond, abs=0.07)  # 5 standard errors of a share over 500 draws
    assert share_beyond_top_50(50) == 0.0


def test_a_standard_prompt_is_shown_in_the_table_without_its_chat_template_markup(tiny_model_dir, tmp_path):
    """The demo's prompts are rendered ChatML (standard format). Notebook 04's table showed them markup and all."""
    from transformers import AutoTokenizer

    from dpo_kit.chat_templates import render_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{**row, "prompt": render_prompt(tokenizer, [*row["prompt"], {"role": "assistant", "content": "I think"}])}
            for row in EVAL_ROWS[:4]]  # fmt: skip
    assert all("<|im_start|>" in row["prompt"] for row in rows)  # the markup this test is about
    run_dir = make_shared_run_dir(tmp_path / "standard", tiny_model_dir, 0.05, rows)
    frame = generate_comparisons(make_params(tiny_model_dir), run_dir)
    for shown, row in zip(frame["user_prompt"], EVAL_ROWS[:4], strict=True):
        assert "<|" not in shown and row["prompt"][-1]["content"] in shown and shown.endswith("assistant\nI think")
    records = read_jsonl(run_dir / GENERATIONS_FILE)
    assert list(comparisons_frame(records)["user_prompt"]) == list(frame["user_prompt"])  # a notebook re-run shows it
    # generations.jsonl of an earlier kit, without the field: shown as written.
    old = [{k: v for k, v in record.items() if k != "prompt_display"} for record in records]
    assert list(comparisons_frame(old)["user_prompt"]) == [row["prompt"] for row in rows]


def test_a_response_that_continues_a_standard_prompt_keeps_its_leading_space(tiny_model_dir, tmp_path):
    """A standard-format prompt (the sentiment recipe's, ending inside the reply) and its response are joined as text,
    by TRL and by a reward-model judge; the pairs keep the response's leading space. The generate stage stripped it,
    so "...I think" + " so" reached the judge as "...I thinkso"."""
    from transformers import AutoTokenizer

    from dpo_kit.chat_templates import render_prompt
    from dpo_kit.evaluation.generate import response_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{**row, "prompt": render_prompt(tokenizer, [*row["prompt"], {"role": "assistant", "content": "I think"}])}
            for row in EVAL_ROWS[:4]]  # fmt: skip
    run_dir = make_shared_run_dir(tmp_path / "standard", tiny_model_dir, 0.05, rows)
    generate_comparisons(make_params(tiny_model_dir), run_dir)
    records = read_jsonl(run_dir / GENERATIONS_FILE)
    texts = {}
    for record in records:
        assert record["prompt_text"] == record["prompt"] and record["prompt"].endswith("I think")
        for model in ("reference", "policy"):
            ids = record[f"{model}_token_ids"]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            # Less the U+FFFD of a character max_new_tokens cut in two (response_text).
            texts[record[model]] = text.rstrip("\ufffd") if ids[-1] != tokenizer.eos_token_id else text
    assert all(shown == text.rstrip() for shown, text in texts.items())
    assert any(shown[:1].isspace() for shown in texts)  # the check above meets a leading space
    # A new assistant turn is still stripped.
    ids, eos = tokenizer(" so", add_special_tokens=False)["input_ids"], {tokenizer.eos_token_id}
    assert response_text(tokenizer, ids, [{"role": "user", "content": "Hi"}], eos) == "so"
    assert response_text(tokenizer, ids, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I"}], eos) == " so"


def test_greedy_decoding_is_shaped_by_the_params_alone(tiny_model_dir):
    """With generate.do_sample false, a model's own repetition penalty (Qwen2.5-Instruct ships 1.05) or
    no_repeat_ngram_size still reshaped the 'greedy' responses: on the tiny model, other tokens than greedy's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_kit.models.sampling import prompt_token_ids, sample_continuations

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts_ids = [prompt_token_ids(tokenizer, row["prompt"]) for row in EVAL_ROWS[:4]]

    def greedy(**generation_config):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        for key, value in generation_config.items():
            setattr(model.generation_config, key, value)
        return sample_continuations(model, tokenizer, prompts_ids, max_new_tokens=20, do_sample=False, batch_size=4)

    plain = greedy()
    assert greedy(repetition_penalty=3.0) == plain
    assert greedy(no_repeat_ngram_size=2) == plain


def test_a_reward_model_judge_records_which_texts_it_cut_to_the_length_it_reads(tiny_model_dir, tmp_path):
    """A reward model that reads 40 tokens cuts the start of a longer prompt; each record says whether its score is
    of such a text, and the evaluate stage counts them, from the stored flags or when it scores again."""
    from test_judges import build_reward_model, with_model_max_length
    from transformers import AutoTokenizer

    from dpo_kit.evaluation.evaluate import evaluate_run, judge_scores

    judge_dir = with_model_max_length(build_reward_model(tmp_path / "reward-model"), 40)
    run_dir = make_run_dir(tmp_path / "run", tiny_model_dir, noise=0.05)
    params = parse_params({"run": {"name": "gen", "seed": 7}, "model": {"name_or_path": str(tiny_model_dir)},
                           "generate": {"num_prompts": 4, "max_new_tokens": 12, "batch_size": 3, "best_of_n": 2},
                           "evaluate": {"judge": str(judge_dir)}})  # fmt: skip
    with pytest.warns(UserWarning, match="longer than the 40 tokens the reward model reads"):
        generate_comparisons(params, run_dir)
    tokenizer = AutoTokenizer.from_pretrained(judge_dir)

    def longer(prompt, text):
        conversation = prompt + [{"role": "assistant", "content": text}]
        return len(tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]) > 40

    records = read_jsonl(run_dir / GENERATIONS_FILE)
    expected = [(longer(r["prompt"], r["reference"]), longer(r["prompt"], r["policy"])) for r in records]
    assert [(r["reference_judge_truncated"], r["policy_judge_truncated"]) for r in records] == expected
    assert any(map(any, expected))
    samples = read_jsonl(run_dir / REFERENCE_SAMPLES_FILE)
    assert [s["judge_truncated"] for s in samples] == [[longer(s["prompt"], t) for t in s["samples"]] for s in samples]

    count = sum(map(sum, expected))
    assert evaluate_run(params, run_dir, tmp_path)["judge/truncated"] == count
    assert judge_scores(params, records, tmp_path)[2] == count
    unrecorded = [{key: value for key, value in r.items() if key != "judge"} for r in records]  # scored again
    with pytest.warns(UserWarning, match=f"{sum(e[1] for e in expected)} of 4 prompts"):
        assert judge_scores(params, unrecorded, tmp_path)[2] == count

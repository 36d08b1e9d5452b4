"""The rule judge on the bundled task, the reward-model judge on a locally built tiny model, win-rate arithmetic."""

from __future__ import annotations

import json

import pytest
import torch

from dpo_kit.bundled import bundled_preference_rows
from dpo_kit.judges import (
    EMPTY_SCORE,
    RewardModelJudge,
    RuleJudge,
    SentimentJudge,
    _words,
    make_judge,
    prompt_text,
    topic_words,
    win_rate,
    win_rate_from_scores,
)
from dpo_kit.params import parse_params

PROMPT = [{"role": "user", "content": "Can you give me a few tips on baking bread?"}]


def make_params(judge: str = "rule", batch_size: int = 8):
    return parse_params(
        {
            "run": {"name": "judges"},
            "model": {"name_or_path": "unused-model"},
            "evaluate": {"judge": judge, "batch_size": batch_size},
        }
    )


class LengthJudge:
    """Scores a response by its length, so win/tie/loss outcomes are known in advance."""

    def score(self, prompts, responses):
        return [float(len(response)) for response in responses]


# ---------------------------------------------------------------------------------------------
# Rule judge


def test_rule_judge_prefers_chosen_over_rejected_on_every_bundled_row():
    rows = bundled_preference_rows()
    prompts = [row["prompt"] for row in rows]
    chosen = RuleJudge().score(prompts, [row["chosen"][0]["content"] for row in rows])
    rejected = RuleJudge().score(prompts, [row["rejected"][0]["content"] for row in rows])
    losing = [i for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if c <= r]
    assert not losing, f"rule judge does not prefer chosen on rows {losing[:5]}"


def test_rule_judge_rewards_politeness_topic_and_penalises_dismissal_and_empty():
    judge = RuleJudge()
    polite_on_topic = "Happy to help! For baking bread, start with a simple recipe. Good luck!"
    polite_off_topic = "Happy to help! For painting a room, start with a simple plan. Good luck!"
    plain_on_topic = "For baking bread, start with a simple recipe and bake a loaf."
    dismissive = "For baking bread, figure it out yourself, it is not my problem."
    scores = dict(
        zip(
            ["polite_on_topic", "polite_off_topic", "plain_on_topic", "dismissive", "curt", "empty"],
            judge.score([PROMPT] * 6, [polite_on_topic, polite_off_topic, plain_on_topic, dismissive, "No.", "  "]),
            strict=True,
        )
    )
    assert scores["polite_on_topic"] > scores["polite_off_topic"]
    assert scores["polite_on_topic"] > scores["plain_on_topic"] > scores["dismissive"]
    assert scores["empty"] == EMPTY_SCORE < scores["curt"] < 0


def test_rule_judge_does_not_reward_repeating_a_polite_phrase():
    once = "Happy to help with baking bread."
    looped = " ".join([once] * 10)
    assert RuleJudge().score_one(PROMPT, looped) - RuleJudge().score_one(PROMPT, once) <= 0.5  # the length term only


def test_rule_judge_reads_rendered_standard_prompts_without_markup():
    rendered = "<|im_start|>user\nCan you give me a few tips on baking bread?<|im_end|>\n<|im_start|>assistant\n"
    assert "im_start" not in prompt_text(rendered)
    reply = "Sure, for baking bread use good flour."
    assert RuleJudge().score_one(rendered, reply) == RuleJudge().score_one(PROMPT, reply)


def test_rule_judge_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        RuleJudge().score([PROMPT, PROMPT], ["Hello"])


# ---------------------------------------------------------------------------------------------
# Win-rate


def test_win_rate_counts_wins_ties_and_losses_with_ties_as_half():
    outcome = win_rate(LengthJudge(), [PROMPT] * 4, ["aa", "b", "cc", "d"], ["a", "b", "ccc", "d"])
    assert outcome == {"win_rate": 0.5, "wins": 1, "ties": 2, "losses": 1, "n": 4}
    outcome = win_rate(LengthJudge(), [PROMPT] * 4, ["aa", "bb", "cc", "d"], ["a", "b", "c", "d"])
    assert outcome == {"win_rate": 0.875, "wins": 3, "ties": 1, "losses": 0, "n": 4}


def test_win_rate_treats_scores_within_tolerance_as_ties():
    outcome = win_rate_from_scores([1.0, 2.0 + 1e-9, 3.0], [1.0 + 1e-9, 2.0, 2.0])
    assert (outcome["wins"], outcome["ties"], outcome["losses"]) == (1, 2, 0)
    assert outcome["win_rate"] == pytest.approx(2 / 3)


def test_win_rate_refuses_empty_or_mismatched_inputs():
    with pytest.raises(ValueError, match="no responses"):
        win_rate_from_scores([], [])
    with pytest.raises(ValueError, match="2 policy scores but 1"):
        win_rate_from_scores([1.0, 2.0], [1.0])


def test_a_score_that_is_not_a_finite_number_is_refused_naming_the_prompt_and_side():
    """A NaN compared as is loses to any score on either side: [nan, 1] against [0, 0] read as one win, one loss."""
    nan = float("nan")
    with pytest.raises(ValueError, match=r"policy's response to prompt 0 \(0-based\) is nan"):
        win_rate_from_scores([nan, 1.0], [0.0, 0.0])
    with pytest.raises(ValueError, match=r"reference's response to prompt 1 \(0-based\) is inf"):
        win_rate_from_scores([1.0, 1.0], [0.0, float("inf")])
    with pytest.raises(ValueError, match="prompt 0 .* is None"):  # a null score in generations.jsonl
        win_rate_from_scores([None], [0.0])
    assert win_rate_from_scores([1.0, 0.0], [0.0, 1.0])["win_rate"] == 0.5  # finite scores pass as before


def test_rule_judge_win_rate_of_chosen_over_rejected_is_one():
    rows = bundled_preference_rows()[:40]
    outcome = win_rate(
        make_judge(make_params("rule")),
        [row["prompt"] for row in rows],
        [row["chosen"][0]["content"] for row in rows],
        [row["rejected"][0]["content"] for row in rows],
    )
    assert outcome == {"win_rate": 1.0, "wins": 40, "ties": 0, "losses": 0, "n": 40}


# ---------------------------------------------------------------------------------------------
# Reward-model judge on a tiny locally built Qwen2ForSequenceClassification (no downloads)


def build_reward_model(path, num_labels: int = 1):
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    return build_reward_model(tmp_path_factory.mktemp("reward-model"))


def test_reward_model_judge_scores_the_chat_templated_conversation(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = make_judge(make_params(str(reward_model_dir), batch_size=3))
    assert isinstance(judge, RewardModelJudge)
    rows = bundled_preference_rows()[:5]
    prompts = [row["prompt"] for row in rows]
    responses = [row["chosen"][0]["content"] for row in rows[:4]] + ["No."]  # uneven lengths: padding in play
    scores = judge.score(prompts, responses)
    assert len(scores) == 5 and all(isinstance(s, float) for s in scores)
    assert len(set(scores)) == 5  # the model tells the responses apart

    # Each score is the single logit of the unpadded rendered conversation: padding and batching change nothing.
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    for prompt, response, score in zip(prompts, responses, scores, strict=True):
        ids = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": response}], tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            expected = model(**ids).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_reward_model_judge_scores_do_not_depend_on_the_batch_for_a_tokenizer_that_pads_left(tmp_path):
    """A reward model with absolute position embeddings (GPT-2) behind a tokenizer that pads on the left: padded, a
    short response's tokens sat at later positions than alone, so its score changed with the longest text in its
    batch (by up to 0.17 here), and a win-rate with the batch size."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "padding_side": "left"}))

    rows = bundled_preference_rows()[:5]
    prompts = [row["prompt"] for row in rows]
    responses = [row["chosen"][0]["content"] for row in rows[:4]] + ["No."]
    batched = RewardModelJudge(str(tmp_path), batch_size=5).score(prompts, responses)
    alone = RewardModelJudge(str(tmp_path), batch_size=1).score(prompts, responses)
    assert batched == pytest.approx(alone, abs=1e-5)


def test_reward_model_judge_pads_with_the_id_its_classifier_skips_for_a_tokenizer_without_a_pad_token(tmp_path):
    """The tokenizer has no pad token and the model's config names one: the judge padded with the eos, which the
    classifier does not skip, so it read a shorter text's logit off its padding (0.065 off for 4 of 5 texts)."""
    from dpo_kit.models.tiny import build_tiny_tokenizer

    path = build_reward_model(tmp_path / "reward-model")  # its config's pad_token_id is the tiny tokenizer's, 0
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    rows = bundled_preference_rows()[:5]
    prompts = [row["prompt"] for row in rows]
    responses = [row["chosen"][0]["content"] for row in rows[:4]] + ["No."]
    judge = RewardModelJudge(str(path), batch_size=5)
    batched = judge.score(prompts, responses)
    judge.batch_size = 1
    assert batched == pytest.approx(judge.score(prompts, responses), abs=1e-5)
    assert judge.tokenizer.pad_token_id == judge.model.config.pad_token_id == 0


def test_reward_model_judge_scores_a_rendered_string_prompt_followed_by_the_response(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rendered = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    score = RewardModelJudge(str(reward_model_dir)).score([rendered], ["Hello!"])[0]
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    with torch.no_grad():
        expected = model(**tokenizer(rendered + "Hello!", return_tensors="pt")).logits[0, 0].item()
    assert score == pytest.approx(expected, abs=1e-5)


def test_reward_model_judge_scores_a_prefill_and_its_continuation_as_one_reply(reward_model_dir):
    # The on-policy source hands the judge a prompt ending in the reply's opening and the sampled continuation of it.
    # The reward model must see the one reply the pair trains, not the opening as a finished turn and a second turn
    # after it (the chat template), nor the continuation without its opening (no template).
    from transformers import AutoTokenizer

    judge = RewardModelJudge(str(reward_model_dir))
    prefilled = [{"role": "user", "content": "Review a war drama."},
                 {"role": "assistant", "content": "The pacing of this movie was"}]  # fmt: skip
    whole = [{"role": "user", "content": "Review a war drama."},
             {"role": "assistant", "content": "The pacing of this movie was great and tense."}]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    expected = tokenizer.apply_chat_template(whole, tokenize=False)
    assert tokenizer.decode(judge._encode([prefilled], [" great and tense."])["input_ids"][0]) == expected
    assert judge.score([prefilled], [" great and tense."]) == pytest.approx(judge.score([whole[:1]], [whole[1]["content"]]))

    judge.tokenizer.chat_template = None  # a reward model that takes (prompt, response) as a text pair
    pair = tokenizer.decode(judge._encode([prefilled], [" great and tense."])["input_ids"][0])
    assert pair == tokenizer.decode(tokenizer("Review a war drama.", "The pacing of this movie was great and tense.")["input_ids"])


def with_model_max_length(path, limit):
    """The reward model at `path` behind a tokenizer saved with `limit` as its model_max_length (None: no limit)."""
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    tokenizer_config.pop("model_max_length", None)
    if limit is not None:
        tokenizer_config["model_max_length"] = limit
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return path


LONG_PROMPT = [{"role": "user", "content": " ".join(["word"] * 100)}]  # over 100 tokens with its template


def test_a_prompt_longer_than_the_reward_model_reads_is_cut_from_its_start_keeping_the_response(tmp_path):
    """Cut on the right, the tokenizer's default, a prompt as long as the reward model's limit left no room for the
    response: the classifier read the prompt's last token for every answer, and an empty answer tied a real one."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = with_model_max_length(build_reward_model(tmp_path / "reward-model"), 64)
    judge = RewardModelJudge(str(path))
    responses = ["", "Knead the dough for ten minutes, then let it rise."]
    with pytest.warns(UserWarning, match=r"2 of 3 prompts with their responses were longer than the 64 tokens"):
        scores = judge.score([LONG_PROMPT, LONG_PROMPT, PROMPT], [*responses, "Short."])
    assert scores[0] != pytest.approx(scores[1], abs=1e-4)
    assert judge.truncated([LONG_PROMPT, PROMPT], responses) == [True, False]

    # Each score is the model's on the conversation's last 64 tokens: the response whole, the prompt's end before it.
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for response, score in zip(responses, scores[:2], strict=True):
        conversation = LONG_PROMPT + [{"role": "assistant", "content": response}]
        ids = tokenizer.apply_chat_template(conversation, return_dict=True)["input_ids"]
        assert len(ids) > 64
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids[-64:]])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    assert tokenizer.truncation_side == "right"  # the judge cuts texts itself; how the directory loads is unchanged


def test_a_text_pair_reward_model_cuts_the_prompt_not_the_response(tmp_path):
    """Without a chat template the prompt and response are a text pair; the tokenizer's default cut the longer of the
    two, so a response longer than its prompt lost its end, the token the classifier reads."""
    path = with_model_max_length(build_reward_model(tmp_path / "reward-model"), 64)
    judge = RewardModelJudge(str(path))
    judge.tokenizer.chat_template = None
    reply = " ".join(["dough"] * 40) + " The end."
    for prompt in (PROMPT, LONG_PROMPT):
        ids = judge._encode([prompt], [reply])["input_ids"][0]
        assert len(ids) <= 64
        assert judge.tokenizer.decode(ids).endswith(judge.tokenizer.decode(judge.tokenizer(reply)["input_ids"]))
    assert judge.truncated([PROMPT, LONG_PROMPT], [reply, reply]) == [False, True]


def test_a_response_longer_than_the_reward_model_reads_is_refused_naming_it(tmp_path):
    path = with_model_max_length(build_reward_model(tmp_path / "reward-model"), 64)
    judge = RewardModelJudge(str(path), batch_size=2)
    with pytest.raises(ValueError, match=r"reads at most 64 tokens, and response 2 \(0-based\) of those it was given,"
                                         r" 'word word word.*\.\.\.', alone is 201.*Lower generate\.max_new_tokens"):  # fmt: skip
        judge.score([PROMPT] * 3, ["Fine.", "Fine.", " ".join(["word"] * 100)])


def test_a_reward_model_whose_tokenizer_has_no_limit_reads_up_to_its_position_embeddings(tmp_path):
    """A tokenizer saved without model_max_length (transformers' 1e30) cut nothing, and a text past GPT-2's
    n_positions crashed inside the model with an IndexError instead of being cut to fit."""
    build_gpt2_reward_model(tmp_path)
    judge = RewardModelJudge(str(with_model_max_length(tmp_path, None)))
    assert judge.tokenizer.model_max_length > 10**9 and judge.max_length == 64
    assert_long_prompt_read_by_its_last_tokens(judge, tmp_path, 64)


def test_a_roberta_reward_model_reads_two_fewer_tokens_than_its_position_embeddings(tmp_path):
    """RoBERTa (and XLM-RoBERTa, CamemBERT, ...) numbers positions from its padding id plus one: max_position_embeddings
    514 reads 512 tokens. Behind a tokenizer with no limit the judge took 514, and a long text failed inside the model
    with an index error instead of being cut. Here the padding id is 0, so 66 embeddings read 65 tokens."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=66, type_vocab_size=1, num_labels=1,
                           pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    RobertaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    judge = RewardModelJudge(str(with_model_max_length(tmp_path, None)))
    assert judge.max_length == 65
    assert_long_prompt_read_by_its_last_tokens(judge, tmp_path, 65)
    # A position table numbered from 0 (BERT's) reads as many tokens as it has embeddings.
    from dpo_kit.judges import positions_read

    assert positions_read(judge.model) == 65
    assert positions_read(AutoModelForSequenceClassification.from_pretrained(build_text_pair_reward_model(tmp_path / "bert"))) is None


def build_gpt2_reward_model(path) -> None:
    """A one-layer GPT-2 reward model of 64 position embeddings (n_positions) behind the tiny tokenizer, at `path`."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64, num_labels=1,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def assert_long_prompt_read_by_its_last_tokens(judge, path, limit: int) -> None:
    """The judge warns that it cut LONG_PROMPT's text, and scores each text as the model at `path` scores its last
    `limit` tokens (the whole text, for PROMPT's)."""
    from transformers import AutoModelForSequenceClassification

    response = "Knead the dough for ten minutes."
    with pytest.warns(UserWarning, match=f"1 of 2 prompts .* longer than the {limit} tokens"):
        long_score, short_score = judge.score([LONG_PROMPT, PROMPT], [response, response])
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for prompt, score in ((LONG_PROMPT, long_score), (PROMPT, short_score)):
        ids = judge.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                  return_dict=True)["input_ids"]  # fmt: skip
        with torch.no_grad():
            assert score == pytest.approx(model(input_ids=torch.tensor([ids[-limit:]])).logits[0, 0].item(), abs=1e-5)


def build_reward_model_with_bos(path, model_max_length=64):
    """The tiny reward model behind a tokenizer whose chat template starts every text with a BOS, as Llama's and
    Gemma's do."""
    from transformers import Qwen2Config, Qwen2ForSequenceClassification

    from dpo_kit.models.tiny import CHATML_TEMPLATE, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    tokenizer.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
    tokenizer.model_max_length = model_max_length
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_prompt_cut_to_fit_keeps_the_bos_its_template_starts_with(tmp_path):
    """Cut from the left, a long prompt lost the BOS the chat template starts every text with, so the reward model read
    a text that began mid-prompt without the token it always saw first in training."""
    from transformers import AutoModelForSequenceClassification

    path = build_reward_model_with_bos(tmp_path / "reward-model")
    judge = RewardModelJudge(str(path), batch_size=3)
    bos = judge.tokenizer.bos_token_id
    responses = ["Knead the dough for ten minutes.", "Let it rise.", "Bake it."]
    prompts = [LONG_PROMPT, PROMPT, LONG_PROMPT]
    with pytest.warns(UserWarning, match="2 of 3 prompts"):
        scores = judge.score(prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    for prompt, response, score in zip(prompts, responses, scores, strict=True):
        ids = judge.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}],
                                                  return_dict=True)["input_ids"]  # fmt: skip
        assert ids[0] == bos
        kept = ids if len(ids) <= 64 else [bos] + ids[-63:]  # the BOS, then the text's last 63 tokens
        encoded = judge._encode([prompt], [response])["input_ids"][0].tolist()
        assert encoded == kept
        with torch.no_grad():
            assert score == pytest.approx(model(input_ids=torch.tensor([kept])).logits[0, 0].item(), abs=1e-5)
    assert judge.truncated(prompts, responses) == [True, False, True]


def reply_of(tokenizer, count):
    """A reply of `count` tokens, as `tokenizer` encodes it alone."""
    for words in range(1, 4 * count):
        reply = " ".join(["dough"] * words)
        if len(tokenizer(reply, add_special_tokens=False)["input_ids"]) == count:
            return reply
    raise AssertionError(f"no reply of {count} tokens")


def test_a_response_that_fits_only_without_the_markup_after_it_is_refused_not_cut_at_its_start(tmp_path):
    """The fit check counted the response and the BOS before it but not the markup the chat template closes the reply
    with (<|im_end|> and a newline, 2 tokens): after a long prompt a response of 62 tokens passed it (1 + 62 <= 64),
    and the text cut to the BOS and its last 63 tokens lost the response's first token, which the kit promises never
    to cut. A response that fits with that markup is kept whole with it, the prompt cut before it."""
    path = build_reward_model_with_bos(tmp_path / "reward-model")
    judge = RewardModelJudge(str(path))
    tokenizer, bos = judge.tokenizer, judge.tokenizer.bos_token_id
    closing = tokenizer("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert len(closing) == 2
    with pytest.raises(ValueError, match=r"response 0 \(0-based\) .* alone is 62, 65 with the tokens a cut keeps around it"):
        judge.score([LONG_PROMPT], [reply_of(tokenizer, 62)])
    fits = reply_of(tokenizer, 61)  # the BOS, 61 tokens and the closing markup: 64, all the reward model reads
    with pytest.warns(UserWarning, match="1 of 1 prompts"):
        assert judge.truncated([LONG_PROMPT], [fits]) == [True] and len(judge.score([LONG_PROMPT], [fits])) == 1
    encoded = judge._encode([LONG_PROMPT], [fits])["input_ids"][0].tolist()
    assert encoded == [bos] + tokenizer(fits, add_special_tokens=False)["input_ids"] + closing
    # A string prompt (rendered by the policy) is followed by its reply alone, with no markup to keep after it.
    rendered = tokenizer.apply_chat_template(LONG_PROMPT, tokenize=False, add_generation_prompt=True)
    assert judge._encode([rendered], [reply_of(tokenizer, 63)])["input_ids"][0].tolist()[1:] == tokenizer(
        reply_of(tokenizer, 63), add_special_tokens=False)["input_ids"]  # fmt: skip


def build_text_pair_reward_model(path, model_max_length=64):
    """A BERT-shaped reward model without a chat template, whose tokenizer wraps a pair as [CLS] prompt [SEP] reply
    [SEP] with token types, as the DeBERTa reward models' do."""
    from tokenizers.processors import TemplateProcessing
    from transformers import BertConfig, BertForSequenceClassification

    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"cls_token": "[CLS]", "sep_token": "[SEP]"})
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tokenizer.cls_token_id), ("[SEP]", tokenizer.sep_token_id)],
    )  # fmt: skip
    tokenizer.chat_template = None
    tokenizer.model_max_length = model_max_length
    tokenizer.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=128, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_texts_that_fit_are_read_as_the_tokenizer_encodes_them_and_a_pair_keeps_its_cls_when_cut(tmp_path):
    """The judge cuts texts itself (to keep a BOS); texts that fit are encoded, padded and scored as the tokenizer
    encodes them, as before, with and without a chat template. A long pair is cut as the tokenizer cuts its first
    text from the left: [CLS], the prompt's end, [SEP], the reply, [SEP], with the token types alike."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = bundled_preference_rows()[:4]
    prompts = [row["prompt"] for row in rows]
    responses = [row["chosen"][0]["content"] for row in rows[:3]] + ["No."]
    for path in (build_reward_model_with_bos(tmp_path / "bos", 512), build_text_pair_reward_model(tmp_path / "pair", 512)):
        judge = RewardModelJudge(str(path), batch_size=4)
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "right"
        if tokenizer.chat_template is None:
            expected = tokenizer([prompt_text(p) for p in prompts], responses, padding=True, return_tensors="pt")
        else:
            texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False)
                     for p, r in zip(prompts, responses, strict=True)]  # fmt: skip
            expected = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        encoded = judge._encode(prompts, responses)
        assert sorted(encoded) == sorted(expected)
        assert all(torch.equal(encoded[key], expected[key]) for key in expected)
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        with torch.no_grad():
            assert judge.score(prompts, responses) == model(**expected).logits[:, 0].tolist()

    judge = RewardModelJudge(str(build_text_pair_reward_model(tmp_path / "pair-64")))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "pair-64")
    tokenizer.truncation_side, tokenizer.padding_side = "left", "right"
    reply = "Knead the dough for ten minutes."
    expected = tokenizer([prompt_text(LONG_PROMPT), prompt_text(PROMPT)], [reply, reply], truncation="only_first",
                         max_length=64, padding=True, return_tensors="pt")  # fmt: skip
    encoded = judge._encode([LONG_PROMPT, PROMPT], [reply, reply])
    assert all(torch.equal(encoded[key], expected[key]) for key in expected)
    assert encoded["input_ids"][0, 0] == tokenizer.cls_token_id and encoded["input_ids"].shape[1] == 64
    assert judge.truncated([LONG_PROMPT, PROMPT], [reply, reply]) == [True, False]


def test_a_reward_model_reads_no_more_than_its_position_embeddings_whatever_its_tokenizer_says(tmp_path):
    """A tokenizer whose model_max_length (512) is above the model's own n_positions (64) was trusted: a text of 100
    tokens was not cut, and GPT-2 failed with an index error past its 64 position embeddings."""
    build_gpt2_reward_model(tmp_path)
    judge = RewardModelJudge(str(with_model_max_length(tmp_path, 512)))
    assert judge.max_length == 64
    assert_long_prompt_read_by_its_last_tokens(judge, tmp_path, 64)
    # The smaller of the two, whichever it is: a tokenizer that reads fewer tokens than the model is kept.
    assert RewardModelJudge(str(with_model_max_length(tmp_path, 32))).max_length == 32


def test_a_reward_model_tokenizes_each_text_once_for_its_score_and_whether_it_cut_it(tmp_path, monkeypatch):
    """score tokenized each batch twice (once to count what it cut, once to read it), and the stages that record which
    texts it cut (judge_truncated) called truncated after it, a third time: one tokenization serves all three."""
    from dpo_kit.judges import score_with_cuts

    judge = RewardModelJudge(str(with_model_max_length(build_reward_model(tmp_path / "reward-model"), 64)), batch_size=2)
    tokenize, batches = judge._tokenize, []
    monkeypatch.setattr(judge, "_tokenize", lambda texts, **kwargs: batches.append(len(texts)) or tokenize(texts, **kwargs))
    prompts, responses = [LONG_PROMPT, PROMPT, LONG_PROMPT], ["Knead the dough.", "Let it rise.", ""]
    with pytest.warns(UserWarning, match="2 of 3 prompts"):
        scores, cut = score_with_cuts(judge, prompts, responses)
    assert batches == [2, 1] and cut == [True, False, True]
    with pytest.warns(UserWarning, match="2 of 3 prompts"):
        assert scores == judge.score(prompts, responses)
    assert judge.truncated(prompts, responses) == cut
    assert score_with_cuts(RuleJudge(), prompts, responses) == (RuleJudge().score(prompts, responses), None)


def test_reward_model_judge_refuses_a_classifier_with_several_labels(tmp_path):
    path = build_reward_model(tmp_path / "two-labels", num_labels=2)
    with pytest.raises(ValueError, match="evaluate.judge '.*two-labels' has 2 labels; a reward model has 1"):
        RewardModelJudge(str(path))
    # The judge that ranks sampled pairs is data.generate.judge: its errors named evaluate.judge, a key set otherwise.
    params = parse_params({"run": {"name": "judges"}, "model": {"name_or_path": "unused-model"},
                           "evaluate": {"judge": "sentiment"},
                           "data": {"source": "generate", "generate": {"judge": str(path)}}})  # fmt: skip
    with pytest.raises(ValueError, match="^data.generate.judge '.*two-labels' has 2 labels"):
        make_judge(params, settings=params.data.generate)


def test_a_model_without_a_trained_reward_head_is_refused_not_given_a_random_one(tmp_path):
    """A causal LM saved with num_labels 1 loaded as a sequence classifier with its score head drawn at random (only
    logged by transformers): the judge scored noise, one text 0.12 or -0.06 by the torch seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dpo_kit.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "language-model")
    tokenizer.save_pretrained(tmp_path / "language-model")
    with pytest.raises(ValueError, match=r"judge '.*language-model': its weights lack score\.weight.*at random"):
        RewardModelJudge(str(tmp_path / "language-model"))


def test_a_reward_model_with_pickled_weights_only_is_refused(reward_model_dir, tmp_path):
    """The judge loads a model the run did not write: safetensors only, never its pytorch_model.bin (a pickle)."""
    import shutil

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-reward-model"
    shutil.copytree(reward_model_dir, pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"judge '.*pickled-reward-model' holds no safetensors weights.*pytorch_model.bin"):
        RewardModelJudge(str(pickled))
    (pickled / "pytorch_model.bin").rename(pickled / "adapter_model.bin")  # named by config.json: loaded first
    config = json.loads((pickled / "config.json").read_text())
    (pickled / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(OSError, match=r"names 'adapter_model.bin' as the weights \(transformers_weights\)"):
        RewardModelJudge(str(pickled))
    (pickled / "adapter_model.bin").unlink()  # no weights at all: transformers says so, not "only pickled ones"
    (pickled / "config.json").write_text(json.dumps(config))
    with pytest.raises(OSError) as raised:
        RewardModelJudge(str(pickled))
    assert "only pickled" not in str(raised.value) and "model.safetensors" in str(raised.value)


# ---------------------------------------------------------------------------------------------
# Sentiment judge (VADER)

REVIEW = [{"role": "user", "content": "Continue this review of a war drama: 'The pacing of this movie was'"}]


def test_sentiment_judge_ranks_positive_over_negative_continuations():
    from dpo_kit.judges import SentimentJudge

    judge = SentimentJudge()
    positive = "superb, and the cast gave wonderful, moving performances that I loved from start to finish."
    negative = "painfully slow, and the dull, clumsy script made it a boring and awful two hours to sit through."
    neutral = "set over two days, and the story follows a unit of soldiers across a river in the north."
    scores = judge.score([REVIEW] * 3, [positive, neutral, negative])
    assert scores[0] > 0.5 > scores[1] > -0.2 > -0.5 > scores[2]
    assert all(-1.0 <= score <= 1.0 for score in scores)


def test_an_empty_or_one_word_answer_cannot_beat_a_real_continuation():
    from dpo_kit.judges import SentimentJudge

    judge = SentimentJudge()
    real = "slow in places, and the ending did not work for me, but the battle scenes were well staged."
    for degenerate in ["", "Great!", "Amazing amazing amazing", "Wonderful, superb, brilliant, loved it!"]:
        outcome = win_rate(judge, [REVIEW], [degenerate], [real])
        assert outcome["losses"] == 1, f"{degenerate!r} beat a real continuation"
    assert judge.score([REVIEW], ["Great!"]) == [-1.0]


def test_a_one_word_answer_repeated_or_padded_to_the_floor_cannot_beat_a_real_continuation():
    """The floor counted words, so one word said 8 times ("great" scored 0.99, "love" 2000 times 1.0), or padded with
    lone apostrophes (each a word to _words: 0.66, as "Great!" alone), beat a real continuation; so did 8 lone
    apostrophes (0.0), text without a letter. A response with two different words is scored as VADER scores it."""
    judge = SentimentJudge()
    real = "slow in places, and the ending did not work for me, but the battle scenes were well staged."
    assert -0.5 < judge.score_one(real) < 0
    for degenerate in ["great " * 8, "love " * 2000, "Great-great-great-great-great-great-great-great",
                       "Great! ' ' ' ' ' ' '", "' ' ' ' ' ' ' '", "Amazing ' amazing ' amazing ' amazing '"]:  # fmt: skip
        assert judge.floored(degenerate) and judge.score_one(degenerate) == -1.0, degenerate
        assert win_rate(judge, [REVIEW], [degenerate], [real])["losses"] == 1, f"{degenerate!r} beat a real continuation"
    low_floor = SentimentJudge(min_words=2)
    assert low_floor.floored("Great great") and low_floor.floored("Great '")
    assert not low_floor.floored("Great film") and low_floor.score_one("Perfect. 10/10") > 0.5  # a number is a word
    # Ordinary text keeps VADER's own score: repeated words, digits and quotes, as long as two different words are there.
    ordinary = [real, "great, great, great fun for 2 hours, and I would watch it again.", "was 'great.' ' I loved it",
                *(row[side][0]["content"] for row in bundled_preference_rows() for side in ("chosen", "rejected"))]  # fmt: skip
    for text in ordinary:
        assert judge.floored(text) == (len(_words(text)) < 8), text
        if not judge.floored(text):
            assert judge.score_one(text) == judge.analyzer.polarity_scores(text)["compound"]


def test_the_sentiment_floor_counts_accented_words_once():
    # An accent used to split a word ("très" -> "tr", "s"): 4 Spanish words counted 8 and escaped the 8-word floor, and
    # with a floor of 2 the one word "Magnífico" was no longer floored.
    assert _words("Magnífico, increíble, espléndido, fantástico") == ["magnífico", "increíble", "espléndido", "fantástico"]
    assert SentimentJudge().score_one("Magnífico, increíble, espléndido, fantástico") == -1.0
    assert SentimentJudge(min_words=2).floored("Magnífico!")
    assert _words("I don't think it's 2 good_ish 😍") == ["i", "don't", "think", "it's", "2", "good", "ish"]  # as before


def test_the_sentiment_judge_says_which_scores_its_length_floor_set():
    from dpo_kit.judges import SentimentJudge

    judge = SentimentJudge()
    short, long = "was wonderful and moving.", "was a wonderful and moving film about two brothers and their mother."
    assert judge.floored(short) and judge.score_one(short) == -1.0
    assert not judge.floored(long) and judge.score_one(long) > 0.5
    assert SentimentJudge(min_words=2).floored("one") and not SentimentJudge(min_words=2).floored("two words")


def test_make_judge_builds_the_sentiment_judge_by_name():
    from dpo_kit.judges import SentimentJudge

    assert isinstance(make_judge(make_params("sentiment")), SentimentJudge)
    on_policy = parse_params({"run": {"name": "judges"}, "model": {"name_or_path": "unused-model"},
                              "evaluate": {"judge": "sentiment"}, "data": {"source": "generate", "generate": {"judge": "sentiment"}}})
    assert isinstance(make_judge(on_policy, settings=on_policy.data.generate), SentimentJudge)


def sentiment_params(evaluate_floor: int | None = None, generate_floor: int | None = None, judge: str = "sentiment"):
    evaluate = {"judge": judge} | ({"sentiment_min_words": evaluate_floor} if evaluate_floor else {})
    generate = {"judge": "sentiment"} | ({"sentiment_min_words": generate_floor} if generate_floor else {})
    return parse_params({"run": {"name": "judges"}, "model": {"name_or_path": "unused-model"}, "evaluate": evaluate,
                         "data": {"source": "generate", "generate": generate}})  # fmt: skip


def test_each_sentiment_judge_takes_its_length_floor_from_params():
    from dpo_kit.judges import judge_name

    params = sentiment_params(evaluate_floor=3, generate_floor=5)
    for settings, floor in ((params.evaluate, 3), (params.data.generate, 5)):
        judge = make_judge(params, settings=settings)
        assert judge.min_words == floor
        floored = floor > 4  # four words: above a floor of 3, below one of 5
        assert judge.floored("was a wonderful film") == floored
        assert (judge.score_one("was a wonderful film") == -1.0) == floored
    # Another floor gives other scores, so runs record it with the judge's name; the default keeps the bare name.
    assert judge_name(params.evaluate) == "sentiment (min_words 3)"
    assert judge_name(sentiment_params().evaluate) == "sentiment" and make_judge(sentiment_params()).min_words == 8


def test_a_sentiment_floor_for_another_judge_or_below_two_words_is_refused():
    from dpo_kit.params import ParamsError

    with pytest.raises(ParamsError, match="evaluate.sentiment_min_words 3 would have no effect.*evaluate.judge is 'org/rm'"):
        sentiment_params(evaluate_floor=3, judge="org/rm")
    with pytest.raises(ParamsError, match="data.generate.sentiment_min_words"):
        sentiment_params(generate_floor=1)  # a one-word answer could then beat a real continuation


def test_win_outcomes_count_ties_as_half():
    from dpo_kit.judges import win_outcomes

    assert win_outcomes([1.0, 0.2, 0.5], [0.0, 0.2, 0.9]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="2 policy scores but 1 reference scores"):
        win_outcomes([1.0, 2.0], [1.0])


def test_a_reward_model_judge_trusts_remote_code_only_by_its_own_key(monkeypatch):
    """model.trust_remote_code trusts the policy's repo; the judge's repo needs its own yes."""
    import dpo_kit.judges as judges

    seen = []
    monkeypatch.setattr(judges, "RewardModelJudge", lambda source, **kwargs: seen.append(kwargs["trust_remote_code"]))
    base = {"run": {"name": "judges"}, "model": {"name_or_path": "unused-model", "trust_remote_code": True}}
    make_judge(parse_params({**base, "evaluate": {"judge": "org/reward-model"}}))
    make_judge(parse_params({**base, "evaluate": {"judge": "org/reward-model", "judge_trust_remote_code": True}}))
    assert seen == [False, True]
    from dpo_kit.params import ParamsError

    with pytest.raises(ParamsError, match="evaluate.judge_trust_remote_code is for a reward-model judge"):
        parse_params({**base, "evaluate": {"judge": "rule", "judge_trust_remote_code": True}})


def test_an_empty_one_word_or_curt_answer_cannot_beat_a_real_answer_under_the_rule_judge():
    """The curt penalty (-1) was smaller than what a prompt's only topic word earns (+2): "Meditate." scored 1.03 to
    a real answer's 0.4 on "How do I meditate?". A reply of at most 3 words now loses to any longer one that does not
    dismiss the user, whatever words it holds."""
    judge = RuleJudge()
    prompt = [{"role": "user", "content": "How do I meditate?"}]
    real = "Sit quietly for ten minutes each morning and follow your breath as it comes and goes."
    for degenerate in ["", "Meditate.", "Thanks!", "Thanks, meditate gladly.", "Happy to help"]:
        outcome = win_rate(judge, [prompt], [degenerate], [real])
        assert outcome["losses"] == 1, f"{degenerate!r} beat a real answer"
    # Every bundled prompt: its topic words, alone or three at a time, against a plain four-word reply.
    for row in bundled_preference_rows():
        words = sorted(topic_words(row["prompt"]))
        plain = judge.score_one(row["prompt"], "Start small, then practise.")
        assert max(judge.score_one(row["prompt"], reply) for reply in [*words, " ".join(words[:3])]) < plain


def test_a_one_word_answer_repeated_or_padded_past_three_words_is_still_curt_under_the_rule_judge():
    """Curt counted words, so the one topic word said four times, or padded with lone apostrophes, scored 2.1 to a
    real answer's 0.4 on "How do I meditate?"; a reply needs more than 3 different words to escape it."""
    judge = RuleJudge()
    prompt = [{"role": "user", "content": "How do I meditate?"}]
    real = "Sit quietly for ten minutes each morning and follow your breath as it comes and goes."
    for degenerate in ["Meditate meditate meditate meditate", "' ' ' Meditate", "Meditate " * 30,
                       "Thanks thanks, meditate meditate"]:  # fmt: skip
        assert judge.score_one(prompt, degenerate) <= -1.0, degenerate
        assert win_rate(judge, [prompt], [degenerate], [real])["losses"] == 1, f"{degenerate!r} beat a real answer"
    assert judge.score_one(prompt, "Meditate daily, breathe slowly.") > 0  # four different words: not curt
    assert judge.score_one(prompt, "Meditate 10 minutes daily.") > 0  # a number is a word, as before

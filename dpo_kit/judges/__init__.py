"""Judges that score responses, and the win-rate of the DPO policy's responses over the reference's.

Every judge has one method, `judge.score(prompts, responses) -> list[float]` (higher is better), so
`win_rate` and the evaluation never need to know which judge `evaluate.judge` picked:

- `RuleJudge` ('rule'): keyword rules written for the *bundled* task only, where the chosen reply is
  polite, on topic and helpful and the rejected one is a curt dismissal (see dpo_kit.bundled). It needs
  no model and no network, which the offline tiny run requires. Its scores mean nothing on other data.
- `SentimentJudge` ('sentiment'): the VADER compound score of the response, in [-1, 1], offline. It stands
  in for the sentiment classifier of the DPO paper's controlled-sentiment task (section 6.1).
- `RewardModelJudge` (a hub id or local path): a sequence-classification reward model with a single
  logit, scoring the prompt and response rendered with the reward model's own chat template. A response to a prompt
  that ends in an assistant prefill is scored as one reply: the prefill followed by the response.

A prompt is what a TRL row holds: a list of chat messages (conversational format) or a string
(standard format, already rendered with the policy's chat template).
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import re
import warnings
from pathlib import Path
from typing import Protocol, Sequence, Union

from dpo_kit.chat_templates import ends_with_prefill
from dpo_kit.params import SENTIMENT_MIN_WORDS
from dpo_kit.safe_weights import PickledWeightsRefused, from_pretrained_safetensors

Prompt = Union[str, list[dict]]
# Stands in for a reply in a chat template, to find where the template puts it (RewardModelJudge._reply_start): private
# use characters, which no template trims or escapes and no reply is expected to hold.
REPLY_MARK = "\ue000dpo-kit reply\ue001"


class Judge(Protocol):
    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]: ...


# ---------------------------------------------------------------------------------------------
# Rule judge for the bundled task

POLITE_PHRASES = (
    "happy to help", "thank", "great question", "good question", "of course", "certainly", "glad",
    "let me walk you", "hope this helps", "good luck", "let me know", "feel free", "right track", "keep going",
)
DISMISSIVE_PHRASES = (
    "figure it out", "not my problem", "why would i know", "look it up", "whatever", "does not matter",
    "boring question", "ask someone else", "don't care", "do not care", "go away", "no idea",
)
# Words that say nothing about the topic of a prompt; role names appear in rendered (string) prompts.
STOPWORDS = frozenset(
    "about after again also been before being could does doing done from have having into just more most "
    "much need only other should some such than that their them then there these they this those very "
    "what when where which while will with would your yours system user assistant".split()
)
EMPTY_SCORE = -5.0  # below anything a non-empty reply can score
CURT_WORDS = 3  # replies this short are curt whatever they say ("No.", "Look it up.")


def _words(text: str) -> list[str]:
    # Letters of any script: with ASCII letters only, an accent split a word in two ("très" -> "tr", "s"), so a reply
    # of 4 accented words counted 8 and passed the sentiment judge's 8-word floor. On ASCII text this is [a-z0-9']+.
    return re.findall(r"(?:[^\W_]|')+", text.lower())


def _distinct_words(words: Sequence[str]) -> set[str]:
    """The different words among `words` (from `_words`), lone apostrophes left out: how many things a reply says,
    which neither repeating a word nor padding it with apostrophes raises. Numbers count, so that "Perfect. 10/10"
    says two things, as it did before this count existed."""
    return {word for word in words if word.strip("'")}


def prompt_text(prompt: Prompt) -> str:
    """The user's words in a prompt: the user messages, or a rendered prompt with its markup removed."""
    if isinstance(prompt, str):
        return re.sub(r"<[^<>]*>", " ", prompt)  # drop special tokens such as <|im_start|>
    return "\n".join(message["content"] for message in prompt if message["role"] == "user")


def topic_words(prompt: Prompt) -> set[str]:
    return {word for word in _words(prompt_text(prompt)) if len(word) >= 4 and word not in STOPWORDS}


class RuleJudge:
    """Scores politeness and helpfulness with keyword rules; meaningful for the bundled task only.

    score = +1 per kind of polite phrase (at most 3)        openers and closers of the chosen replies
            +2 x fraction of the prompt's topic words used   on topic rather than generic
            +0.5 x min(words / 20, 1)                        some substance, capped so rambling gains nothing
            -2 per kind of dismissive phrase                 the rejected replies' dismissals
    A curt reply, of at most 3 different words ("No.", "Meditate.", "Meditate meditate meditate meditate"), scores
    min(score, 0) - 1: at most -1, below every longer reply without a dismissal (at least 0.1), whatever topic word or
    polite phrase its few words hold. An empty reply scores EMPTY_SCORE. Phrases count once however often they
    repeat, so a degenerate model that loops "Happy to help!" does not climb without bound.
    """

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.score_one(prompt, response) for prompt, response in zip(prompts, responses, strict=True)]

    def score_one(self, prompt: Prompt, response: str) -> float:
        words = _words(response)
        if not words:
            return EMPTY_SCORE
        text = " ".join(words)  # normalised so phrases match across punctuation and case
        polite = sum(phrase in text for phrase in POLITE_PHRASES)
        dismissive = sum(phrase in text for phrase in DISMISSIVE_PHRASES)
        topic = topic_words(prompt)
        on_topic = len(topic & set(words)) / len(topic) if topic else 0.0
        score = min(polite, 3) + 2.0 * on_topic + 0.5 * min(len(words) / 20, 1.0) - 2.0 * dismissive
        # Capped, not only penalised: a prompt with one topic word gave the one-word reply naming it 2 - 1 = 1, more
        # than a real answer in other words (0.5 at most), so an answer of one word could win. Counted in different
        # words, since "Meditate meditate meditate meditate" (2.1) is still that one word.
        return min(score, 0.0) - 1.0 if len(_distinct_words(words)) <= CURT_WORDS else score


# ---------------------------------------------------------------------------------------------
# Sentiment judge


class SentimentJudge:
    """Positive sentiment of the response, as VADER's compound score in [-1, 1] (vaderSentiment, offline).

    VADER is a lexicon and rule model: no weights, no network, and each score can be explained word by word.
    Its blind spot is the one a policy would exploit: "Great!" alone scores 0.66, more than most real reviews.
    So a response of fewer than `min_words` words scores -1, the bottom of the scale, and so does one word repeated
    or padded to that length: an empty or one-word answer can never beat a real continuation. Repetition
    ("particularly impressive" over and over) still scores high here; the evaluation reports distinct-2 and
    repeated n-grams beside the score for that reason.
    """

    def __init__(self, min_words: int = SENTIMENT_MIN_WORDS):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.min_words = min_words
        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [self.score_one(response) for response in responses]

    def score_one(self, response: str) -> float:
        if self.floored(response):
            return -1.0
        return self.analyzer.polarity_scores(response)["compound"]

    def floored(self, response: str) -> bool:
        """Whether the length floor, not the sentiment, gave this response its score: fewer than `min_words` words,
        or a one-word answer however long (at most one distinct word). The on-policy data source records it per
        sample, since a pair whose rejected response is floored teaches length (more words per token) rather than
        sentiment."""
        words = _words(response)
        # Counting words alone let a one-word answer through at any length: "great" 8 times scored 0.99, and "Great!"
        # with 7 lone apostrophes 0.66, as "Great!" alone would without the floor. A response of min_words words or
        # more that holds two different words (a number is one) is scored as before.
        return len(words) < self.min_words or len(_distinct_words(words)) < 2


# ---------------------------------------------------------------------------------------------
# Reward-model judge


def preview(text: str, length: int = 60) -> str:
    return repr(text if len(text) <= length else text[:length] + "...")


def positions_read(model) -> int | None:
    """How many tokens a model's learned position embeddings let it read, where that is fewer than their count: None
    for a model with no such embeddings or none of that kind.

    RoBERTa and the models built like it (XLM-RoBERTa, CamemBERT, Longformer, MPNet, ESM, Data2VecText, ...), after
    fairseq, number positions from the padding id plus one, with position `padding_idx` kept for padding: their
    max_position_embeddings (514) is two more than they read (512), and a text of 513 or 514 tokens failed inside the
    model with an index error. Their position table is the one that marks a padding_idx, which is how this finds them
    without a list of architectures: a table numbered from 0 (BERT, GPT-2) has none, and one that adds its offset to
    its size instead (OPT, BART) has none either and a config that gives the length it reads."""
    import torch

    limits = [module.num_embeddings - module.padding_idx - 1 for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] == "position_embeddings" and isinstance(module, torch.nn.Embedding)
              and module.padding_idx is not None]  # fmt: skip
    return min(limits, default=None)


class RewardModelJudge:
    """A reward model (AutoModelForSequenceClassification with one label) as a judge.

    With a chat template the prompt and response are rendered as a conversation; without one (e.g. the
    DeBERTa reward models) they are passed as a text pair, which is how those models were trained.
    A text longer than the reward model reads (`max_length`: the smaller of the tokenizer's model_max_length and the
    model config's max_position_embeddings or n_positions, whichever is set, less the positions a RoBERTa-like model
    keeps for padding, `positions_read`) loses the start of its prompt after its
    opening BOS or CLS, so that the response, and the chat template's markup after it, are scored whole;
    `score` warns how many were cut, `truncated` (or `score_truncated`, while scoring) says which. A response longer
    than that with what a cut keeps around it (that BOS or CLS, the markup after it) is refused.
    """

    def __init__(self, name_or_path: str, trust_remote_code: bool = False, batch_size: int = 8, dtype=None,
                 key: str = "evaluate.judge"):  # fmt: skip
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        # The token only ever comes from the environment; trust_remote_code only from params.
        kwargs = {"trust_remote_code": trust_remote_code}
        if os.environ.get("HF_TOKEN"):
            kwargs["token"] = os.environ["HF_TOKEN"]
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        # Padding on the left moves every token of a shorter text to later positions, which a model with absolute
        # position embeddings (GPT-2) reads as other input: a score then depended on the longest text in its batch.
        self.tokenizer.padding_side = "right"
        # safetensors only: the kit loads no pickle (pytorch_model.bin) that the run did not write.
        try:
            self.model, loading = from_pretrained_safetensors(AutoModelForSequenceClassification, name_or_path,
                                                              dtype=dtype, output_loading_info=True, **kwargs)  # fmt: skip
        except PickledWeightsRefused as error:
            raise PickledWeightsRefused(f"{key}: reward-model judge {error}") from error.__cause__
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"{key} '{name_or_path}' has {self.model.config.num_labels} labels; a reward model has 1"
            )
        # transformers fills weights missing from the checkpoint at random and only logs it: a causal LM, or a value
        # head saved under another name, became a judge whose scores were noise that changed with the torch seed.
        if loading["missing_keys"]:
            raise ValueError(
                f"{key} '{name_or_path}': its weights lack {', '.join(sorted(loading['missing_keys']))},"
                " which transformers would initialise at random, so the judge would score noise. Name a reward model"
                " saved with its head as AutoModelForSequenceClassification (TRL's RewardTrainer saves one), not a"
                " language model or a value-head checkpoint."
            )
        # A sequence classifier reads each text's logit at its last token that is not config.pad_token_id, so the
        # padding must be that id: padded with another (the eos, for a tokenizer without a pad token), a shorter
        # text's score was read off its padding and changed with the longest text in its batch.
        model_pad = self.model.config.pad_token_id
        if isinstance(model_pad, int) and 0 <= model_pad < len(self.tokenizer):
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(model_pad)
        else:
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.batch_size = batch_size
        self.name, self.key = name_or_path, key
        # The smaller of the tokenizer's limit and the model's own. A tokenizer saved without a limit (transformers'
        # sentinel, 1e30) cut nothing, and one that claims more than the model's position embeddings (GPT-2's
        # n_positions) was trusted: either way a longer text crashed inside the model with an index error, or, with
        # rotary positions, was read at positions it never saw in training. No model reads a billion tokens, so a
        # limit that large is the sentinel, not a limit.
        config = self.model.config
        limits = (self.tokenizer.model_max_length,
                  getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None),
                  positions_read(self.model))  # fmt: skip
        limits = [limit for limit in limits if isinstance(limit, int) and 0 < limit < 10**9]
        self.max_length = min(limits) if limits else None
        # The tokens that open a text rather than belong to its prompt: the BOS (which a chat template such as Llama's
        # or Gemma's writes itself), a text pair's CLS, and whatever the tokenizer puts before any text. A text cut to
        # fit keeps those it starts with: cut after the first token, it began mid-prompt without the token the reward
        # model saw first in every text it was trained on. Not the template's turn openers (<|im_start|>): kept before
        # the prompt's cut end, they would read as a turn whose role is whatever word the cut left first.
        special = set(self.tokenizer.all_special_ids)
        prefix = itertools.takewhile(special.__contains__, self.tokenizer("x", verbose=False)["input_ids"])
        self.start_ids = {self.tokenizer.bos_token_id, self.tokenizer.cls_token_id, *prefix} - {None}

    def _texts(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> tuple[list, list[str]]:
        """What the reward model reads, per response: the rendered conversation, or (prompt, reply) as a text pair
        without a chat template; and the reply on its own."""
        # A prompt ending in an assistant prefill ("The pacing of this movie was") is continued by the response, so
        # the reply the reward model judges is the two joined: as a turn of their own, the prefill was rendered as a
        # finished assistant turn and the continuation as a second one, and without a template the prefill was lost.
        replies = [prompt[-1]["content"] + response if ends_with_prefill(prompt) else response
                   for prompt, response in zip(prompts, responses, strict=True)]  # fmt: skip
        if self.tokenizer.chat_template is None:
            return [(prompt_text(p), reply) for p, reply in zip(prompts, replies, strict=True)], replies
        texts = []
        for prompt, reply in zip(prompts, replies, strict=True):
            if isinstance(prompt, str):  # rendered with the policy's template; the best we can do is append
                texts.append(prompt + reply)
            else:
                turns = prompt[:-1] if ends_with_prefill(prompt) else prompt
                conversation = turns + [{"role": "assistant", "content": reply}]
                texts.append(self.tokenizer.apply_chat_template(conversation, tokenize=False))
        return texts, replies

    def _tokenize(self, texts: list, **kwargs):
        if self.tokenizer.chat_template is None:
            return self.tokenizer([t[0] for t in texts], [t[1] for t in texts], **kwargs)
        # The template already wrote any BOS; adding special tokens again would double it.
        return self.tokenizer(texts, add_special_tokens=False, **kwargs)

    def _leading(self, ids: list[int]) -> int:
        """How many of the tokens `ids` starts with open a text (`start_ids`: BOS, CLS), which a cut keeps."""
        return sum(1 for _ in itertools.takewhile(self.start_ids.__contains__, ids))

    def _reply_start(self, prompt: Prompt, reply: str, text: str) -> int:
        """Where, in the rendered `text` (from `_texts`), the reply begins: all after it is the reply and the markup the
        chat template closes it with (<|im_end|>), which a cut must keep. The conversation is rendered once more with a
        marker for the reply, and the text before the marker is the part a cut may take from."""
        if isinstance(prompt, str):
            return len(prompt)  # prompt + reply: nothing follows the reply
        turns = prompt[:-1] if ends_with_prefill(prompt) else prompt
        marked = self.tokenizer.apply_chat_template(turns + [{"role": "assistant", "content": REPLY_MARK}], tokenize=False)
        before, _, after = marked.rpartition(REPLY_MARK)
        if len(before) + len(after) <= len(text) and text.startswith(before) and text.endswith(after):
            return len(before)
        # A template whose markup depends on the reply itself (none of the presets): the reply's last occurrence, as
        # the template may have trimmed it; failing that, the whole text, so that a text cut could not lose any of it
        # (the response is then refused rather than cut).
        return max(text.rfind(reply.strip()), 0)

    def _tail(self, encoding, index: int, start: int, text: str) -> int:
        """How many of the last tokens of text `index` of `encoding` (the unpadded tokenization of `texts`) are its
        reply and what follows it: the tokens from the one holding character `start` (`_reply_start`) to the end."""
        ids = encoding["input_ids"][index]
        if encoding.is_fast:
            # A token that joins the prompt's last characters to the reply's first is kept whole, with the reply.
            for char in range(start, len(text)):
                token = encoding.char_to_token(index, char)
                if token is not None:
                    return len(ids) - token
            return 0  # nothing from the reply on maps to a token (an empty reply with no markup after it)
        # A slow tokenizer gives no character offsets: the reply and its closing markup tokenized alone.
        return len(self.tokenizer(text[start:], add_special_tokens=False, verbose=False)["input_ids"])

    def _fit(self, encoding, cut: list[int]) -> None:
        """Cuts, in place, each text of `encoding` (the tokenizer's unpadded output) whose index is in `cut` to
        `max_length` tokens. The classifier reads the last token that is not padding, so a text cut at its end (the
        tokenizer's default) lost its response: after a prompt as long as the limit, an empty answer and a real one
        read the same tokens and tied. A cut text keeps its opening tokens (`_leading`), then as many of its last
        tokens as fit: the response whole, with the markup after it, and the end of the prompt (`_prepare` refuses a
        text whose response does not fit so). Cut here rather than by the tokenizer, whose left truncation drops the
        BOS a chat template wrote; a text pair's CLS, which the tokenizer adds after its cut, is kept the same way, and
        only its prompt is cut (the tokenizer's default cut the longer of the two)."""
        for index in cut:
            lead = self._leading(encoding["input_ids"][index])
            for key in encoding:  # input_ids, attention_mask and a pair's token_type_ids, cut alike
                values = encoding[key][index]
                encoding[key][index] = values[:lead] + values[len(values) - (self.max_length - lead) :]

    def truncated(self, prompts: Sequence[Prompt], responses: Sequence[str], first_index: int = 0) -> list[bool]:
        """Whether each prompt and response together are longer than the reward model reads (`max_length` tokens), so
        that the start of the prompt is cut away before scoring. A response that alone is longer is refused (see
        `_prepare`). `score_truncated` says the same while scoring, from the same tokenization."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts or self.max_length is None:
            return [False] * len(prompts)
        return self._prepare(prompts, responses, first_index)[1]

    def _prepare(self, prompts: Sequence[Prompt], responses: Sequence[str], first_index: int = 0) -> tuple[object, list[bool]]:
        """The texts the reward model reads, tokenized once and cut to fit (`_fit`; unpadded), and which were cut.

        A response longer than `max_length` with the tokens a cut keeps around it (the opening BOS or CLS, the chat
        template's markup after it, a pair's separators) is refused, naming its index (`first_index` is the index of
        the first in the caller's list) and its start: the index alone did not say which sample of which prompt the
        on-policy source, which scores one prompt's samples at a time, meant."""
        texts, replies = self._texts(prompts, responses)
        encoding = self._tokenize(texts, verbose=False)
        flags = [self.max_length is not None and len(ids) > self.max_length for ids in encoding["input_ids"]]
        cut = [index for index, flag in enumerate(flags) if flag]
        pair = self.tokenizer.chat_template is None
        for index in cut:
            if pair:
                # Around a pair the tokenizer adds its own tokens ([CLS] prompt [SEP] reply [SEP]), all kept by a cut.
                reply = len(self.tokenizer(replies[index], add_special_tokens=False, verbose=False)["input_ids"])
                needed = reply + self.tokenizer.num_special_tokens_to_add(pair=True)
            else:
                # A templated text keeps its opening tokens (BOS), and after the reply the template's closing markup
                # (<|im_end|>\n): counting the reply alone, a reply that fit only without that markup lost its start.
                start = self._reply_start(prompts[index], replies[index], texts[index])
                needed = self._leading(encoding["input_ids"][index]) + self._tail(encoding, index, start, texts[index])
            if needed > self.max_length:
                # No part of it could be cut without scoring another response than the one given. The responses the
                # evaluation judges come from generate, the sampled pairs' from data.generate.
                section = "data.generate" if self.key.startswith("data.") else "generate"
                alone = len(self.tokenizer(replies[index], add_special_tokens=False, verbose=False)["input_ids"])
                raise ValueError(
                    f"{self.key} '{self.name}' reads at most {self.max_length} tokens, and response"
                    f" {first_index + index} (0-based) of those it was given, {preview(responses[index])}, alone is"
                    f" {alone}, {needed} with the tokens a cut keeps around it: it cannot be scored whole."
                    f" Lower {section}.max_new_tokens, or name a reward model that reads"
                    " longer texts."
                )
        self._fit(encoding, cut)
        return encoding, flags

    def _encode(self, prompts: Sequence[Prompt], responses: Sequence[str]):
        return self.tokenizer.pad(self._prepare(prompts, responses)[0], return_tensors="pt", verbose=False)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return self.score_truncated(prompts, responses)[0]

    def score_truncated(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> tuple[list[float], list[bool]]:
        """The scores, and which texts were cut to fit (`truncated`), from one tokenization of each batch: counting the
        cut texts, reading them and recording which were cut (judge_truncated) tokenized every text three times."""
        import torch

        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        scores, truncated = [], []
        for start in range(0, len(prompts), self.batch_size):
            end = start + self.batch_size
            encoding, flags = self._prepare(prompts[start:end], responses[start:end], first_index=start)
            truncated.extend(flags)
            inputs = self.tokenizer.pad(encoding, return_tensors="pt", verbose=False).to(self.model.device)
            with torch.no_grad():
                scores.extend(self.model(**inputs).logits[:, 0].float().tolist())
        if any(truncated):
            warnings.warn(
                f"{self.key} '{self.name}': {sum(truncated)} of {len(prompts)} prompts with their responses were longer"
                f" than the {self.max_length} tokens the reward model reads; the start of each such prompt was cut away"
                " and its response scored whole",
                stacklevel=3,  # the caller of score or score_with_cuts, through which it is called
            )
        return scores, truncated


def score_with_cuts(judge: Judge, prompts: Sequence[Prompt], responses: Sequence[str]) -> tuple[list[float], list[bool] | None]:
    """The judge's scores, and which texts it cut to the length it reads (a reward model, `score_truncated`); None for
    a judge that reads every text whole and records nothing."""
    score_truncated = getattr(judge, "score_truncated", None)
    return score_truncated(prompts, responses) if score_truncated else (judge.score(prompts, responses), None)


def make_judge(params, project_dir: str | Path = ".", settings=None) -> Judge:
    """The judge that `settings` names (a section with `judge` and `sentiment_min_words`: `params.evaluate`, the
    default, or `params.data.generate`): 'rule', 'sentiment', a local reward-model directory or a hub id."""
    settings = settings if settings is not None else params.evaluate
    name = settings.judge
    if name == "rule":
        return RuleJudge()
    if name == "sentiment":
        return SentimentJudge(min_words=settings.sentiment_min_words)
    from dpo_kit.hardware import choose_hardware, resolve_dtype

    local = Path(project_dir) / name
    source = str(local) if local.exists() else name
    return RewardModelJudge(
        source,
        key="evaluate.judge" if settings is params.evaluate else "data.generate.judge",  # errors name the key to fix
        trust_remote_code=settings.judge_trust_remote_code,  # its own key: trusting the policy's repo is not this
        batch_size=params.evaluate.batch_size,
        dtype=resolve_dtype(params.model.dtype, choose_hardware()),
    )


def judge_name(settings) -> str:
    """What `settings` (params.evaluate or params.data.generate) judge by, as runs record it: the judge's name, and
    the sentiment judge's floor where it differs from the default, since another floor gives other scores."""
    return judge_label(settings.judge, settings.sentiment_min_words)


def judge_label(judge: str, sentiment_min_words: int | None = None) -> str:
    """judge_name from a params dict's values (a recorded run's params.yaml); a missing floor is the default."""
    if judge == "sentiment" and sentiment_min_words not in (None, SENTIMENT_MIN_WORDS):
        return f"sentiment (min_words {sentiment_min_words})"
    return judge


# ---------------------------------------------------------------------------------------------
# Win-rate


def win_rate_from_scores(
    policy_scores: Sequence[float], reference_scores: Sequence[float], tie_tolerance: float = 1e-6
) -> dict:
    """Wins, ties and losses of the policy; a tie counts half. Scores within tie_tolerance tie, because a
    reward model can score one text a few ulps apart in differently padded batches."""
    outcomes = win_outcomes(policy_scores, reference_scores, tie_tolerance)
    if not outcomes:
        raise ValueError("no responses to compare")
    wins, ties, n = outcomes.count(1.0), outcomes.count(0.5), len(outcomes)
    return {"win_rate": sum(outcomes) / n, "wins": wins, "ties": ties, "losses": n - wins - ties, "n": n}


def win_outcomes(
    policy_scores: Sequence[float], reference_scores: Sequence[float], tie_tolerance: float = 1e-6
) -> list[float]:
    """Per prompt: 1 when the policy wins, 0.5 for a tie, 0 when the reference wins; their mean is the win-rate.

    A score that is not a finite number (a reward model's NaN in half precision, a null in generations.jsonl) is
    refused, naming the prompt: compared as is, a NaN would lose to any score on either side."""
    if len(policy_scores) != len(reference_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(reference_scores)} reference scores")
    for side, scores in (("policy", policy_scores), ("reference", reference_scores)):
        for index, value in enumerate(scores):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(
                    f"the judge's score of the {side}'s response to prompt {index} (0-based) is {value!r}; a win-rate"
                    " needs a finite number for every response: check the judge (a reward model in float16 can"
                    " overflow to NaN: try model.dtype float32) or the scores stored in generations.jsonl"
                )
    return [0.5 if abs(p - r) <= tie_tolerance else float(p > r) for p, r in zip(policy_scores, reference_scores, strict=True)]


def win_rate(
    judge: Judge,
    prompts: Sequence[Prompt],
    policy_responses: Sequence[str],
    reference_responses: Sequence[str],
    tie_tolerance: float = 1e-6,
) -> dict:
    """Fraction of prompts where the judge prefers the policy's response (ties = 0.5), with the counts."""
    return win_rate_from_scores(
        judge.score(prompts, policy_responses), judge.score(prompts, reference_responses), tie_tolerance
    )

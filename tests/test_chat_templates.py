"""Chat-template correctness across model families, and the TRL traps (trl#1073, #2054, #4481, #5213, #6105).

The family tokenizers wrap the tiny BPE vocabulary with each family's special tokens, its published
chat template (written here by hand, no downloads) and, where the family's tokenizer adds BOS to plain
text (Llama, Mistral, Zephyr/TinyLlama), a post-processor that does so too.
"""

from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from dpo_kit.chat_templates import CHAT_TEMPLATE_PRESETS, resolve_chat_template
from dpo_kit.data.audit import audit_rows, measure_pairs, tokenizer_traits
from dpo_kit.data.formats import converter
from dpo_kit.models.tiny import CHATML_TEMPLATE, build_tiny_tokenizer

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ZEPHYR_TEMPLATE = (  # HuggingFaceH4/zephyr-7b-beta, also TinyLlama-1.1B-Chat-v1.0
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
MISTRAL_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.2: no system role, strict alternation
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN2_TEMPLATE = (  # Qwen/Qwen2-7B-Instruct: ChatML with a default system message
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A Vicuna-like template whose generation prompt ends in a space: "ASSISTANT: " tokenizes differently
# alone than followed by a reply, the classic cause of TRL's "not a prefix" warning.
TRAILING_SPACE_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
)

# teknium/OpenHermes-2.5-Mistral-7B (seed article 004): ChatML with no default system message and no BOS in the
# template, a Llama tokenizer that adds <s> to plain text, and <|im_end|> as its eos.
OPENHERMES_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = {
    # name: (chat template, bos, eos, extra special tokens, tokenizer adds BOS to plain text)
    "tiny-chatml": (CHATML_TEMPLATE, None, "<|im_end|>", [], False),
    "llama-3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], True),
    "zephyr": (ZEPHYR_TEMPLATE, "<s>", "</s>", [], True),
    "mistral": (MISTRAL_TEMPLATE, "<s>", "</s>", [], True),
    "qwen2": (QWEN2_TEMPLATE, None, "<|im_end|>", [], False),
    "openhermes": (OPENHERMES_TEMPLATE, "<s>", "<|im_end|>", [], True),
}

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
SYSTEM_PROMPT = [{"role": "system", "content": "You are terse."}, *PROMPT]
# The published formats, written out by hand for PROMPT with the generation prompt.
EXPECTED_PROMPTS = {
    "tiny-chatml": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "llama-3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "zephyr": "<|user|>\nWhat is the capital of France?</s>\n<|assistant|>\n",
    "mistral": "<s>[INST] What is the capital of France? [/INST]",
    "qwen2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ),
    "openhermes": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def family_tokenizer(tiny, name: str):
    template, bos, eos, extra, adds_bos = FAMILIES[name]
    core = Tokenizer.from_str(tiny.backend_tokenizer.to_str())
    core.add_special_tokens([token for token in (bos, eos, *extra) if token])
    if adds_bos:
        bos_id = core.token_to_id(bos)
        core.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>")
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture(scope="module")
def families(tiny):
    return {name: family_tokenizer(tiny, name) for name in FAMILIES}


def pair(prompt=PROMPT, chosen="Paris.", rejected="I have no idea, honestly."):
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def audit(rows, tokenizer, output_format="conversational", max_length=None):
    return audit_rows(rows, converter("conversational"), tokenizer, max_length=max_length, output_format=output_format)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_template_renders_its_published_format(families, name):
    tokenizer = families[name]
    assert tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False) == EXPECTED_PROMPTS[name]
    assert tokenizer_traits(tokenizer).adds_bos == FAMILIES[name][4]


@pytest.mark.parametrize("name", FAMILIES)
def test_standard_prompt_is_exactly_what_the_template_gives(families, name):
    tokenizer = families[name]
    [(_, row)] = audit([pair()], tokenizer, output_format="standard").kept
    rendered = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    template_writes_bos = bool(tokenizer.bos_token) and rendered.startswith(tokenizer.bos_token)
    if tokenizer_traits(tokenizer).adds_bos and template_writes_bos:
        # The tokenizer adds this BOS when TRL tokenizes the prompt, so the text must not carry it too.
        assert row["prompt"] == rendered.removeprefix(tokenizer.bos_token)
        assert tokenizer(row["prompt"])["input_ids"] == tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)["input_ids"]
    else:
        assert row["prompt"] == rendered
    assert (row["chosen"], row["rejected"]) == ("Paris.", "I have no idea, honestly.")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("output_format", ["conversational", "standard"])
def test_no_doubled_bos_or_eos_and_prompt_is_a_prefix(families, name, output_format):
    prompt = PROMPT if name == "mistral" else SYSTEM_PROMPT
    rows = [pair(prompt=prompt), pair(prompt=prompt, chosen="Paris, on the Seine.</s>")]
    result = audit(rows, families[name], output_format)
    assert len(result.kept) == 2
    checks = result.checks
    assert (checks["double_bos"], checks["double_eos"], checks["prompt_not_prefix"]) == (0, 0, 0)


@pytest.mark.parametrize("preset", CHAT_TEMPLATE_PRESETS)
def test_every_preset_ends_a_base_models_assistant_turn_in_its_eos(tiny, preset):
    # A base model (GPT-2, Pythia, StableLM 2) has eos <|endoftext|>, not ChatML's <|im_end|>: the chatml preset's turns
    # held no eos, and TRL's conversational path adds none, so the model never learned to stop.
    base = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny.backend_tokenizer.to_str()),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")  # fmt: skip
    base.chat_template = resolve_chat_template(preset)
    conversation = SYSTEM_PROMPT + pair()["chosen"]
    ids = base.apply_chat_template(conversation, return_dict=True)["input_ids"]
    assert ids.count(base.eos_token_id) == 1, base.decode(ids)
    turn, after = base.apply_chat_template(conversation, tokenize=False).split(base.eos_token)
    assert "Paris." in turn and not after.strip(), "the eos follows the response, ending the conversation"
    checks = audit([pair(prompt=SYSTEM_PROMPT)], base).checks
    assert (checks["double_bos"], checks["double_eos"], checks["prompt_not_prefix"]) == (0, 0, 0)


@pytest.mark.parametrize("preset", CHAT_TEMPLATE_PRESETS)
def test_a_standard_pair_is_the_text_the_preset_renders(tiny, preset):
    # The human-assistant and instruct-output generation prompts end at 'Assistant:' / 'Output:', and a reply renders
    # after a space; TRL joins a standard prompt and response as text, so the pairs trained "Assistant:Paris.".
    base = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tiny.backend_tokenizer.to_str()),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")  # fmt: skip
    base.chat_template = resolve_chat_template(preset)
    result = audit([pair(prompt=SYSTEM_PROMPT)], base, "standard")
    [(_, row)] = result.kept
    rendered = base.apply_chat_template(SYSTEM_PROMPT + pair()["chosen"], tokenize=False)
    assert rendered.startswith(row["prompt"] + row["chosen"]), (row, rendered)
    assert row["chosen"].strip() == "Paris." and row["rejected"].strip() == "I have no idea, honestly."
    assert result.checks["prompt_not_prefix"] == 0
    # A prefill is continued as written: nothing goes between it and the continuation.
    prefill = [*PROMPT, {"role": "assistant", "content": "The capital is"}]
    [(_, continued)] = audit([pair(prompt=prefill, chosen=" Paris.")], base, "standard").kept
    assert continued["chosen"] == " Paris." and continued["prompt"].endswith("The capital is")


def test_llama3_standard_prompt_would_start_with_two_bos_without_the_fix(families):
    tokenizer = families["llama-3"]
    rendered = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    bos = tokenizer.bos_token_id
    assert tokenizer(rendered)["input_ids"][:2] == [bos, bos]  # the trap, as TRL would tokenize it
    result = audit([pair(), pair(chosen="Lyon?")], tokenizer, "standard")
    assert result.checks["template_bos_text_removed"] == 2
    for _, row in result.kept:
        assert tokenizer(row["prompt"])["input_ids"][:2] == [bos, tokenizer.convert_tokens_to_ids("<|start_header_id|>")]


def test_eos_text_in_a_response_would_double_eos_without_the_fix(families):
    tokenizer = families["zephyr"]
    row = pair(chosen="Paris.</s>")
    [unfixed] = measure_pairs([row], tokenizer)
    assert unfixed.double_eos  # the template writes </s> after the reply that already ends in </s>
    result = audit([row], tokenizer)
    assert result.checks["response_eos_text_removed"] == 1 and result.checks["double_eos"] == 0
    assert result.kept[0][1]["chosen"][0]["content"] == "Paris."


def test_bos_text_at_the_start_of_a_prompt_is_removed(families):
    tokenizer = families["llama-3"]
    result = audit([pair(prompt=[{"role": "user", "content": "<|begin_of_text|>What is the capital of France?"}])], tokenizer)
    assert result.checks["prompt_bos_text_removed"] == 1 and result.checks["double_bos"] == 0


def test_prompt_not_a_prefix_is_counted_and_explained(tiny):
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TRAILING_SPACE_TEMPLATE
    result = audit([pair(), pair(chosen="Lyon, I think.")], tokenizer)
    assert len(result.kept) == 2  # kept, as TRL keeps them, but reported
    assert result.checks["prompt_not_prefix"] == 2
    assert result.checks["prompt_not_prefix_example"] == " "
    assert any("not a prefix" in warning for warning in result.checks["warnings"])


def test_zephyr_conversations_start_without_bos_and_that_is_reported(families):
    # TRL tokenizes conversations without adding special tokens, and Zephyr's template writes no BOS.
    result = audit([pair()], families["zephyr"])
    assert result.checks["missing_bos"] == 1
    assert any("start without BOS" in warning for warning in result.checks["warnings"])


@pytest.mark.parametrize("output_format", ["conversational", "standard"])
def test_mistral_template_refuses_a_system_message_and_the_row_is_dropped_with_its_words(families, output_format):
    result = audit([pair(prompt=SYSTEM_PROMPT), pair()], families["mistral"], output_format)
    assert [(d.index, d.reason) for d in result.dropped] == [(0, "chat_template_error")]
    assert "TemplateError: Conversation roles must alternate" in result.dropped[0].detail


def test_roles_that_do_not_alternate_are_caught_before_the_template(families):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"}]
    result = audit([pair(prompt=prompt)], families["mistral"])
    assert result.dropped[0].reason == "roles_not_alternating"


# --- parity with TRL itself -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_prepare():
    """TRL 1.x DPOTrainer._prepare_dataset, run without building a trainer (it only needs `_tokenizer`)."""
    from datasets import Dataset
    from trl import DPOConfig
    from trl.trainer.dpo_trainer import DPOTrainer

    def prepare(rows, tokenizer, max_length, tmp_dir):
        args = DPOConfig(output_dir=str(tmp_dir), max_length=max_length, report_to="none", use_cpu=True, bf16=False)
        trainer = SimpleNamespace(_tokenizer=tokenizer)
        return DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train")

    return prepare


@pytest.mark.filterwarnings("ignore::FutureWarning")  # DPOConfig's own deprecated defaults
@pytest.mark.parametrize("name", ["tiny-chatml", "llama-3", "zephyr"])
@pytest.mark.parametrize("output_format", ["conversational", "standard"])
def test_lengths_and_silent_drops_match_trl(families, trl_prepare, tmp_path, name, output_format):
    tokenizer = families[name]
    rows = [pair(prompt=[{"role": "user", "content": "Why? " * n}], chosen="Because. " * (4 - n % 4)) for n in range(1, 30, 3)]
    formatted = [row for _, row in audit(rows, tokenizer, output_format).kept]
    ours = measure_pairs(formatted, tokenizer)
    limit = sorted(pair.prompt for pair in ours)[len(ours) // 2]  # half of the prompts alone fill the limit
    prepared = trl_prepare(formatted, tokenizer, limit, tmp_path)

    # TRL keeps exactly the pairs whose prompt is shorter than max_length: the ones it drops silently are
    # the ones our too_long check drops with a reason (and it drops more: the ones TRL would truncate).
    survivors = [pair for pair in ours if pair.prompt < limit]
    assert len(prepared) == len(survivors)
    assert [len(p) for p in prepared["prompt_ids"]] == [pair.prompt for pair in survivors]
    assert [len(p) + len(c) for p, c in zip(prepared["prompt_ids"], prepared["chosen_ids"], strict=True)] == [
        pair.prompt_chosen for pair in survivors
    ]
    assert [len(p) + len(r) for p, r in zip(prepared["prompt_ids"], prepared["rejected_ids"], strict=True)] == [
        pair.prompt_rejected for pair in survivors
    ]
    kept_by_audit = audit(rows, tokenizer, output_format, max_length=limit).kept
    assert 0 < len(kept_by_audit) <= len(survivors)


def article_chatml_format(row, tokenizer):
    """Seed article 004's chatml_format: the system and the question through the model's template, the generation
    prompt after them, each answer closed by '<|im_end|>\\n'; TRL of the time put BOS before the prompt's tokens."""
    system = tokenizer.apply_chat_template([{"role": "system", "content": row["system"]}], tokenize=False) if row["system"] else ""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}], tokenize=False, add_generation_prompt=True)
    return system + prompt


def test_the_openhermes_recipe_trains_orca_pairs_as_the_article_rendered_them_with_bos(families):
    # In TRL's conversational format the OpenHermes recipe trained every orca pair without <s>: TRL tokenizes a
    # conversation without special tokens and the model's ChatML template writes none, while the article's prompt
    # (and Mistral's pre-training) starts with it. The recipe renders the prompt with the model's own template
    # (data.output_format: standard), which TRL tokenizes with BOS, as the article did.
    import json
    from pathlib import Path

    from dpo_kit.params import load_params

    repo = Path(__file__).resolve().parents[1]
    params = load_params(repo / "params/openhermes-2.5-mistral-7b-orca-dpo-qlora-4bit.yaml")
    tokenizer = families["openhermes"]
    lines = (repo / "tests/fixtures/orca_dpo_pairs_sample.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    result = audit_rows(rows, converter(params.data.format), tokenizer, max_length=params.max_length,
                        output_format=params.data.output_format)  # fmt: skip
    assert len(result.kept) == len(rows), result.dropped
    checks = result.checks
    assert (checks["missing_bos"], checks["double_bos"], checks["double_eos"], checks["prompt_not_prefix"]) == (0, 0, 0, 0), checks
    for (index, kept), lengths in zip(result.kept, result.lengths, strict=True):
        raw = rows[index]
        assert kept["prompt"] == article_chatml_format(raw, tokenizer)  # the system message only where the row has one
        assert (kept["chosen"], kept["rejected"]) == (raw["chosen"], raw["rejected"])
        ids = tokenizer(kept["prompt"] + kept["chosen"] + tokenizer.eos_token)["input_ids"]  # as TRL tokenizes it
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert ids[-1] == tokenizer.eos_token_id and len(ids) == lengths.prompt_chosen

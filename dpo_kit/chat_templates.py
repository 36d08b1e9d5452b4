"""Chat templates the kit can put on a tokenizer: ChatML for the tiny model, and presets for base models."""

from __future__ import annotations

# Templates for base models that ship none. Each assistant turn ends in eos, so generation stops there and
# TRL's conversational path (which adds no eos of its own) trains the model to stop.
CHAT_TEMPLATE_PRESETS = {
    # <|im_end|> is the eos of ChatML models (Qwen2, OpenHermes, the tiny model); a base model's eos is another
    # token (GPT-2, Pythia, StableLM 2: <|endoftext|>), which follows <|im_end|> in an assistant turn: without it
    # no trained turn held the eos, so the model never learned to stop and generation ran to max_new_tokens.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
        "{% if message['role'] == 'assistant' and eos_token and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}"
        "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Anthropic HH transcripts: the shape hh-rlhf is written in and base models were trained near.
    "human-assistant": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}{{ '\n\nHuman: ' + message['content'] }}"
        "{% else %}{{ '\n\nAssistant: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '\n\nAssistant:' }}{% endif %}"
    ),
    # phi-2's documented QA format.
    "instruct-output": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'Instruct: ' + message['content'] + '\n' }}"
        "{% else %}{{ 'Output: ' + message['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Output:' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    if value in CHAT_TEMPLATE_PRESETS:
        return CHAT_TEMPLATE_PRESETS[value]
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(
        f"model.chat_template: '{value}' is neither a preset ({', '.join(CHAT_TEMPLATE_PRESETS)}) nor a Jinja template"
    )


def ends_with_prefill(messages) -> bool:
    """True when a conversation ends with an assistant message: a prefill, which the response continues.

    Rendered with `continue_final_message=True` (no new assistant turn), as in the DPO paper's
    controlled-sentiment task, where the model continues the opening of a review.
    """
    return isinstance(messages, list) and bool(messages) and messages[-1].get("role") == "assistant"


def render_prompt(tokenizer, messages: list[dict], tokenize: bool = False):
    """A chat prompt rendered by the tokenizer's template, as the model will continue it: with the
    generation prompt, or continuing a final assistant prefill."""
    prefill = ends_with_prefill(messages)
    kwargs = {"return_dict": True} if tokenize else {}
    return tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        tokenize=tokenize,
        **kwargs,
    )

"""Sampling continuations from a causal LM, the same way for on-policy pairs and for the evaluation.

The format stage (`data.source: generate`) samples several responses per prompt from the reference model,
and the generate stage samples the reference and the DPO policy side by side; both go through
`sample_continuations`, seeded, from the prompt ids TRL's DPOTrainer would build (`prompt_token_ids`).
A prompt is a list of chat messages (conversational format) or an already rendered string (standard).
"""

from __future__ import annotations

from dpo_kit.chat_templates import ends_with_prefill, render_prompt
from dpo_kit.models.loading import device_of
from dpo_kit.params import DEFAULT_TOP_K

# Sampling shapers the params have no key for, at the values that leave the distribution as it is.
NEUTRAL_SAMPLING_KNOBS = {"min_p": None, "typical_p": 1.0}
# What a model's generation config may set that reshapes greedy decoding as well as sampling (Qwen2.5-Instruct ships
# repetition_penalty 1.05): neutral whether or not the params sample.
NEUTRAL_DECODING_KNOBS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1}


def prompt_token_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """A prompt's token ids as TRL's DPOTrainer makes them, so the models generate from the context they
    were trained on: the chat template with the generation prompt (or continuing an assistant prefill), or a
    rendered string tokenized as is."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return render_prompt(tokenizer, prompt, tokenize=True)["input_ids"]


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a generation: the model's generation config (one id or several), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


def was_cut(ids: list[int], eos_ids: set[int]) -> bool:
    """A continuation (as `sample_continuations` returns it) that ends without an eos: max_new_tokens stopped it
    before the model ended it."""
    return not ids or ids[-1] not in eos_ids


def response_text(tokenizer, ids: list[int], prompt: str | list[dict], eos_ids: set[int]) -> str:
    """A continuation (as `sample_continuations` returns it) as text, for the format stage's samples and the generate
    stage's responses alike. One that continues its prompt's text keeps its leading space: a standard-format prompt
    (TRL joins it and the response as text) or an assistant prefill, as the pairs keep it ("...this film, I" + " was").
    A new assistant turn is stripped.

    A continuation that max_new_tokens cut (`was_cut`) may stop inside a character several bytes long, and a byte-level
    tokenizer decodes the part it has as U+FFFD: the judge scored, and samples.jsonl and the tables showed, a stray
    replacement character the model never wrote in full. Its trailing run of them goes, as a streaming decoder
    (tokenizers' DecodeStream, vLLM) holds such a tail back until the character completes; one mid-text, or before
    an eos, stays, since the cut did not make it. The token ids and their counts are the ones generated, untouched.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if was_cut(ids, eos_ids):
        text = text.rstrip("\ufffd")
    return text.rstrip() if isinstance(prompt, str) or ends_with_prefill(prompt) else text.strip()


def _up_to_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids through the first eos; what follows is padding of finished rows in the batch."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[: position + 1]
    return ids


def _prefill_shared_prompts(model, tokenizer, rows: list[list[int]], owners: list[int]):
    """A cache holding each batch row's prompt minus its last token, computed once per distinct prompt.

    With num_samples > 1 a batch repeats each prompt, and the prompt's forward pass is about half the time of a
    16-token sample on the CPU. Running it once per prompt and copying the cache rows gives the same keys and
    values, so `generate` then draws the same tokens as without it (a test checks). None where it does not
    apply: no repeated prompt, one-token prompts, or a model whose cache is not transformers' DynamicCache.
    """
    import torch
    from transformers import DynamicCache

    distinct = list(dict.fromkeys(owners))
    supports = getattr(model, "_supports_default_dynamic_cache", None)
    if len(distinct) == len(owners) or max(map(len, rows)) < 2 or supports is None or not supports():
        return None
    by_owner = dict(zip(owners, rows, strict=True))
    # Left-padded to the batch's own length: the batch's longest prompt is among the distinct ones.
    prompts = tokenizer.pad(
        {"input_ids": [by_owner[owner] for owner in distinct]}, padding_side="left", return_tensors="pt"
    ).to(device_of(model))
    mask = prompts["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate numbers a left-padded row
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(
            input_ids=prompts["input_ids"][:, :-1],
            attention_mask=mask[:, :-1],
            position_ids=positions[:, :-1],
            cache=cache,
            use_cache=True,
        )
    # generate feeds the uncached last prompt token itself, and so computes its logits as it always does.
    cache.batch_select_indices(torch.tensor([distinct.index(owner) for owner in owners], device=mask.device))
    return cache


def sample_continuations(
    model,
    tokenizer,
    prompts_ids: list[list[int]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 8,
    num_samples: int = 1,
    seed: int = 0,
    description: str | None = None,
    share_prompts: bool = True,
) -> list[list[list[int]]]:
    """`num_samples` continuations (new token ids, through the first eos) per prompt, in left-padded batches.

    Seeded here, so two models given the same seed draw from the same random stream: reproducible, and a
    fair comparison. A progress bar over sequences is shown when `description` is given. With
    `share_prompts`, a prompt repeated in a batch is run through the model once (`_prefill_shared_prompts`);
    the tokens drawn are the same either way.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import set_seed

    # Sampling knobs only when sampling: transformers warns about temperature/top_p under greedy decoding. Every
    # knob is named, so the params say all of what shapes a draw: left out, transformers adds top_k=50 where the
    # model's generation config names none, and takes a model's own top_k, min_p, typical_p or repetition penalty.
    # Greedy decoding took a model's repetition penalty too, so its side-by-side responses were not greedy ones.
    sampling = {
        **({"temperature": temperature, "top_p": top_p, "top_k": top_k, **NEUTRAL_SAMPLING_KNOBS} if do_sample else {}),
        **NEUTRAL_DECODING_KNOBS,
    }
    eos_ids = eos_token_ids(model, tokenizer)
    # Each prompt repeated num_samples times, so a batch holds whole sequences, not whole prompts.
    owners = [index for index in range(len(prompts_ids)) for _ in range(num_samples)]
    set_seed(seed)
    continuations: list[list[int]] = []
    with tqdm(total=len(owners), desc=description, unit="seq", disable=description is None) as bar:
        for start in range(0, len(owners), batch_size):
            batch_owners = owners[start : start + batch_size]
            rows = [prompts_ids[owner] for owner in batch_owners]
            batch = tokenizer.pad({"input_ids": rows}, padding_side="left", return_tensors="pt").to(
                device_of(model)
            )
            cache = _prefill_shared_prompts(model, tokenizer, rows, batch_owners) if share_prompts else None
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    **({"cache": cache} if cache is not None else {}),
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    pad_token_id=tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = output[:, batch["input_ids"].shape[1] :].tolist()
            continuations.extend(_up_to_eos(ids, eos_ids) for ids in new_tokens)
            bar.update(len(new_tokens))
    return [continuations[i : i + num_samples] for i in range(0, len(continuations), num_samples)]

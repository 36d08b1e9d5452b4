"""DPO written from scratch, small enough to read in one sitting and checked against TRL 1.x.

Notation: x is a prompt, y_w the chosen and y_l the rejected response, pi the policy being trained,
pi_ref the frozen reference model, sigma the logistic function. log pi(y|x) is the *sum* of the
token log-probabilities of the response only; the prompt and the padding are masked out.

The derivation in one paragraph. Bradley-Terry models a preference as
    P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l)).
RLHF maximises E[r] - beta * KL(pi || pi_ref), whose optimum is pi*(y|x) ∝ pi_ref(y|x) exp(r(x,y)/beta).
Solving for r gives the *implicit reward*
    r(x, y) = beta * log pi(y|x) / pi_ref(y|x)   (+ a term in x alone, which cancels in differences),
and putting it into the Bradley-Terry likelihood gives the DPO loss
    L = -log sigma(beta * h),   h = [log pi(y_w|x) - log pi(y_l|x)] - [log pi_ref(y_w|x) - log pi_ref(y_l|x)].
At the start pi == pi_ref, so h = 0 and L = ln 2 ≈ 0.6931.

Where TRL (1.16) and the papers disagree, the docstrings say which is followed and why:
- sigmoid + label_smoothing: TRL's sigmoid ignores label_smoothing; here it is conservative DPO.
- ipo: the formula is the paper's; `train_step` feeds it per-token *averaged* log-probs as TRL does.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from dpo_kit.data.audit import common_prefix_length

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# TRL's DPOConfig default: notebook 00's TRL run truncates there, so the from-scratch loop does too. Untruncated, one
# long pair made the batch as wide as itself (memory) and the two runs trained on different tokens.
MAX_LENGTH = 1024
TRUNCATION_MODES = ("keep_start", "keep_end")  # as TRL's DataCollatorForPreference; TRL deprecates keep_end
# Only these losses have a noisy-label parameter; for ipo and hinge a non-zero value would be silently
# meaningless (TRL ignores it), so it is refused instead.
LOSS_TYPES_WITH_LABEL_SMOOTHING = ("sigmoid", "robust")


# --------------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probabilities of the response tokens of each sequence: log pi(y|x), shape (batch,).

        log pi(y|x) = sum_t  m_t * log softmax(logits_{t-1})[labels_t]      for t = 1..T-1

    The logits at position t-1 predict the token at position t (the usual causal shift), so
    `logits[:, :-1]` is scored against `labels[:, 1:]`. `loss_mask` is aligned with `labels`
    (1 on response tokens, 0 on prompt and padding), hence `loss_mask[:, 1:]` is the weight m_t.

    Args:
        logits: (batch, seq, vocab) from a causal LM over prompt+response.
        labels: (batch, seq) token ids, usually the model's input_ids.
        loss_mask: (batch, seq) 1 for response tokens, 0 elsewhere.
    """
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    shifted_mask = loss_mask[:, 1:].bool()
    # Masked positions may hold any id (e.g. -100 or a pad id); point them at token 0 so gather is safe.
    safe_labels = torch.where(shifted_mask, shifted_labels, torch.zeros_like(shifted_labels))
    # log_softmax + gather is the cross-entropy without reduction; fp32 keeps the sums accurate.
    token_logps = torch.log_softmax(shifted_logits.float(), dim=-1)
    token_logps = token_logps.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return torch.where(shifted_mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


# --------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------


def implicit_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), detached: it is a diagnostic, not a target."""
    return beta * (policy_logps - ref_logps).detach()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    preference_prob: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards, each of shape (batch,).

    With h = (log pi(y_w) - log pi(y_l)) - (log pi_ref(y_w) - log pi_ref(y_l)) and eps = label_smoothing:

    - "sigmoid" (DPO, Rafailov et al. 2023), with eps > 0 conservative DPO (Mitchell 2023):
          (1 - eps) * -log sigma(beta h)  +  eps * -log sigma(-beta h)
      i.e. the cross-entropy of the Bradley-Terry probability sigma(beta h) against a label that is
      right with probability 1 - eps. TRL's sigmoid ignores label_smoothing (only robust/exo_pair/aot
      read it); we follow the conservative-DPO definition because a silently ignored argument is a trap.
    - "ipo" (Azar et al. 2023, eq. 17):  (h - 1/(2 beta))^2.
      Applied here to whatever log-probs are passed in. The paper writes h with sequence log-probs;
      TRL first divides each log-prob by its response length (a per-token average), and its code says
      the IPO authors confirmed their reported results used that. `train_step` follows TRL: with
      summed log-probs h grows with length, so the fixed target 1/(2 beta) would mean something
      different for every pair.
    - "hinge" (SLiC, Zhao et al. 2023):  relu(1 - beta h).
    - "robust" (Chowdhury et al. 2024), unbiased under labels flipped with probability eps < 1/2:
          [(1 - eps) * -log sigma(beta h)  -  eps * -log sigma(-beta h)] / (1 - 2 eps)

    Soft preference labels ("probabilistic DPO"): a per-pair probability p that y_w really is better
    is the same thing as eps = 1 - p, so `preference_prob=p` is shorthand for `label_smoothing=1-p`.
    Both accept a float or a (batch,) tensor.

    Returns:
        (losses, chosen_rewards, rejected_rewards); rewards are beta * (policy - ref) log-probs, detached.
    """
    if preference_prob is not None:
        if isinstance(label_smoothing, torch.Tensor) or label_smoothing != 0:
            raise ValueError("pass preference_prob or label_smoothing, not both: they are the same knob")
        label_smoothing = 1 - preference_prob
    eps = torch.as_tensor(label_smoothing, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    if not beta > 0:  # 0 divides by zero in ipo and stops every loss learning; below 0 it prefers the rejected
        raise ValueError(f"beta must be above 0, got {beta!r}: it scales the log-ratios, r = beta * log(pi / pi_ref)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if loss_type not in LOSS_TYPES_WITH_LABEL_SMOOTHING and bool((eps != 0).any()):
        raise ValueError(f"label_smoothing / preference_prob has no meaning for the {loss_type!r} loss")
    if bool(((eps < 0) | (eps > 1)).any()):  # a probability; a negative one makes the sigmoid loss unbounded below
        raise ValueError("label_smoothing (and preference_prob) must lie in [0, 1]: eps is the probability that a"
                         " pair's label is flipped")
    if loss_type == "robust" and bool(((eps < 0) | (eps >= 0.5)).any()):
        raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5 (it divides by 1 - 2*eps)")

    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    # -log sigma(z) written with logsigmoid, which stays finite for large |z|.
    nll_chosen_wins = -F.logsigmoid(beta * h)
    nll_rejected_wins = -F.logsigmoid(-beta * h)

    if loss_type == "sigmoid":
        losses = (1 - eps) * nll_chosen_wins + eps * nll_rejected_wins
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # robust
        losses = ((1 - eps) * nll_chosen_wins - eps * nll_rejected_wins) / (1 - 2 * eps)

    chosen_rewards = implicit_rewards(policy_chosen_logps, ref_chosen_logps, beta)
    rejected_rewards = implicit_rewards(policy_rejected_logps, ref_rejected_logps, beta)
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, float]:
    """Batch means under TRL's metric names, so from-scratch and TRL runs plot on the same axes.

    rewards/accuracies is the share of pairs whose chosen reward beats the rejected one (strictly);
    rewards/margins is mean(r_w - r_l); logps/* are the policy's summed response log-probs.
    """
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen_logps.detach().mean().item(),
        "logps/rejected": policy_rejected_logps.detach().mean().item(),
    }


# --------------------------------------------------------------------------------------------------
# Batches: the same layout as TRL's DataCollatorForPreference
# --------------------------------------------------------------------------------------------------




def _chat_ids(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **template_kwargs)["input_ids"]


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text=text)["input_ids"]


def tokenize_pair(row: dict, tokenizer) -> dict[str, list[int]]:
    """Token ids of one preference row: {"prompt_ids", "chosen_ids", "rejected_ids"}, as TRL makes them.

    Conversational rows (message lists) go through the chat template: the prompt with the generation
    prompt, and prompt+response as one conversation, so the template closes the turn with its own end
    token (appending eos as well would double it). The response is whatever follows the prefix shared
    by the prompt and both full conversations, because some templates render a lone prompt
    differently. Plain-text rows are tokenized as text and get the eos appended.
    """
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list):
        prompt_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
        chosen_full = _chat_ids(tokenizer, prompt + chosen)
        rejected_full = _chat_ids(tokenizer, prompt + rejected)
    else:
        eos = tokenizer.eos_token
        prompt_ids = _text_ids(tokenizer, prompt)
        chosen_full = _text_ids(tokenizer, prompt + chosen + ("" if chosen.endswith(eos) else eos))
        rejected_full = _text_ids(tokenizer, prompt + rejected + ("" if rejected.endswith(eos) else eos))
    prompt_len = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return {
        "prompt_ids": prompt_ids[:prompt_len],
        "chosen_ids": chosen_full[prompt_len:],
        "rejected_ids": rejected_full[prompt_len:],
    }


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token or, where it has none (Llama 3, GPT-2), its eos, as TRL's
    DPOTrainer chooses. Padding sits right of every sequence and is masked out, so its id changes no log-prob."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with: set tokenizer.pad_token")
    return pad_id


def _kept(max_length: int | None, truncation_mode: str) -> slice:
    """The part of a sequence that max_length keeps, as TRL's collator slices it."""
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is None:
        return slice(None)
    return slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)


def collate_pairs(
    pairs: list[dict[str, list[int]]],
    pad_token_id: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> dict[str, torch.Tensor]:
    """Stack B tokenized pairs into one batch of 2B rows: all chosen first, then all rejected.

    Returns input_ids, attention_mask and completion_mask (1 on response tokens), right-padded.
    Putting both halves in one batch lets a single forward pass score chosen and rejected, which is
    what TRL does: one forward call instead of two, on one batch twice the size. It does not make the two
    halves share dropout noise (dropout draws a mask per row); both runs switch dropout off (`disable_dropout`).
    `pad_token_id(tokenizer)` gives the id to pad with, also for a tokenizer without a pad token.
    Each prompt+response longer than `max_length` is cut to it, its start kept ("keep_start") or its end
    ("keep_end"), before padding, as TRL's DataCollatorForPreference does; None keeps every token.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None (the tokenizer has no pad token): pass pad_token_id(tokenizer),"
                         " which pads with the eos as TRL does")
    kept = _kept(max_length, truncation_mode)
    sequences, masks = [], []
    for half in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            sequences.append((pair["prompt_ids"] + pair[half])[kept])
            masks.append(([0] * len(pair["prompt_ids"]) + [1] * len(pair[half]))[kept])
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (ids, mask) in enumerate(zip(sequences, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def concatenated_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen_logps, rejected_logps), summed over response tokens, from ONE forward pass over the
    2B rows of a `collate_pairs` (or TRL collator) batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, batch["input_ids"], batch["completion_mask"]).chunk(2)


def response_lengths(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) response token counts, at least 1: the divisors of TRL's IPO averaging."""
    return batch["completion_mask"].sum(dim=1).clamp(min=1).chunk(2)


def disable_dropout(model):
    """Set the probability of every `torch.nn.Dropout` in `model` to 0; returns it.

    TRL's DPOTrainer does exactly this to the policy and the reference (`disable_dropout=True`, its default), so
    a model with dropout layers (GPT-2, OPT, Pythia: 0.1) trains deterministically there. Without it the
    from-scratch loop would train the same model with dropout, and its curves would leave TRL's from the first
    step. Attention dropout that a model reads from its config as a number (`attention_dropout` in Llama or Qwen)
    is no module, and TRL leaves it alone too; the kit's tiny model has none.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def train_step(
    policy,
    reference,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float | torch.Tensor = 0.0,
    preference_prob: float | torch.Tensor | None = None,
    max_grad_norm: float | None = 1.0,
) -> dict[str, float]:
    """One DPO update of `policy` against the frozen `reference`; returns the step's metrics.

    The loss is the batch mean of `dpo_loss` (as in TRL). The policy's dropout layers are switched off first,
    as TRL's DPOTrainer does (`disable_dropout`). Gradients are clipped to `max_grad_norm`
    (the transformers Trainer's default is 1.0; None disables it). The gradients stay in `.grad`
    after the step, so a test can compare them.
    """
    disable_dropout(policy)
    policy.train()
    optimizer.zero_grad()
    policy_chosen, policy_rejected = concatenated_logps(policy, batch)
    with torch.no_grad():
        ref_chosen, ref_rejected = concatenated_logps(reference, batch)
    if loss_type == "ipo":  # TRL's per-token averaging, see dpo_loss
        chosen_len, rejected_len = response_lengths(batch)
        scored = (policy_chosen / chosen_len, policy_rejected / rejected_len,
                  ref_chosen / chosen_len, ref_rejected / rejected_len)
    else:
        scored = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses, _, _ = dpo_loss(*scored, beta=beta, loss_type=loss_type,
                            label_smoothing=label_smoothing, preference_prob=preference_prob)
    loss = losses.mean()
    loss.backward()
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm).item()
    optimizer.step()

    # Rewards are reported from summed log-probs for every loss type, as TRL logs them.
    chosen_rewards = implicit_rewards(policy_chosen, ref_chosen, beta)
    rejected_rewards = implicit_rewards(policy_rejected, ref_rejected, beta)
    metrics = {"loss": loss.item(), **dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    return metrics


def freeze(model):
    """Put a reference model in eval mode with no gradients; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model


def train_loop(
    policy,
    reference,
    rows: list[dict],
    tokenizer,
    steps: int,
    batch_size: int = 4,
    learning_rate: float = 5e-6,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    max_grad_norm: float | None = 1.0,
    max_length: int | None = MAX_LENGTH,
    truncation_mode: str = "keep_start",
) -> list[dict[str, float]]:
    """Train for `steps` updates with AdamW at a constant learning rate; returns one metrics dict per step.

    Rows are taken in order, `batch_size` at a time, wrapping around at the end: the same order as a
    TRL run with `train_sampling_strategy="sequential"`, so the two loss curves can be compared.
    AdamW uses the Trainer's defaults (betas 0.9/0.999, eps 1e-8, no weight decay). The default
    learning rate suits a pretrained model; the randomly initialised tiny model needs ~1e-4.
    `max_length` and `truncation_mode` are DPOConfig's and act as there: a pair longer than max_length is cut
    to it (see `collate_pairs`), and with "keep_start" a pair whose prompt alone fills it is dropped, since no
    response token would be left. How many pairs were cut and dropped is printed.
    """
    if not rows:
        raise ValueError("rows is empty: train_loop needs at least one preference pair")
    if max_length is not None and not (isinstance(max_length, int) and not isinstance(max_length, bool) and max_length >= 1):
        raise ValueError(f"max_length must be a whole number of at least 1 or None, got {max_length!r}")
    _kept(max_length, truncation_mode)  # an unknown mode is refused before anything trains
    freeze(reference)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=0.0)
    pairs = [tokenize_pair(row, tokenizer) for row in rows]
    pairs = _fit_to_max_length(pairs, max_length, truncation_mode)
    batches_per_epoch = math.ceil(len(pairs) / batch_size)
    history = []
    for step in range(steps):
        start = (step % batches_per_epoch) * batch_size
        batch = collate_pairs(pairs[start : start + batch_size], pad_token_id(tokenizer), max_length, truncation_mode)
        metrics = train_step(policy, reference, batch, optimizer, beta=beta, loss_type=loss_type,
                             label_smoothing=label_smoothing, max_grad_norm=max_grad_norm)
        history.append({"step": step + 1, **metrics})
    return history


def _fit_to_max_length(pairs: list[dict], max_length: int | None, truncation_mode: str) -> list[dict]:
    """The pairs TRL would train at max_length, with a line saying how many were dropped and how many cut."""
    if max_length is None:
        return pairs
    # As DPOTrainer's dataset filter: a prompt of max_length tokens or more leaves no response under keep_start.
    kept = [pair for pair in pairs if truncation_mode != "keep_start" or len(pair["prompt_ids"]) < max_length]
    dropped = len(pairs) - len(kept)
    cut = sum(len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) > max_length
              for pair in kept)  # fmt: skip
    if not kept:
        raise ValueError(f"every one of the {len(pairs)} pairs has a prompt of max_length {max_length} tokens or more,"
                         " so none has a response left to train on: raise max_length, or shorten the prompts")
    if dropped or cut:
        print(f"max_length {max_length} ({truncation_mode}, as TRL's DPOTrainer): {dropped} of {len(pairs)} pairs"
              f" dropped, their prompt alone filling it; {cut} of the {len(kept)} kept cut to fit")
    return kept


def check_comparable_with_trl(loss_type: str, label_smoothing: float) -> None:
    """Refuse settings under which a from-scratch run and a TRL run of the same values train different losses:
    TRL 1.x's sigmoid loss ignores label_smoothing, where `dpo_loss` applies conservative DPO."""
    if loss_type == "sigmoid" and label_smoothing != 0:
        raise ValueError(
            f"label_smoothing {label_smoothing} with loss_type 'sigmoid': TRL's sigmoid loss ignores label_smoothing,"
            " while dpo_loss applies conservative DPO, so the from-scratch and TRL runs would train different losses."
            " Set label_smoothing = 0.0, or loss_type = 'robust' (which both read)"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_notebook_settings(settings: dict, model_dir: str = "", project_dir: str | Path = ".") -> None:
    """Refuse a mistake in notebook 00's parameters cell before anything loads, naming the key and what is valid.

    `settings` holds scratch_steps, batch_size, seed, beta, learning_rate, loss_type, label_smoothing and
    betas_to_compare; `model_dir` ('' for the tiny model) is resolved from `project_dir` as the notebook does.
    """

    def refuse(key: str, valid: str):
        raise ValueError(f"{key} = {settings[key]!r}: {valid}")

    for key in ("scratch_steps", "batch_size"):
        if not (isinstance(settings[key], int) and not isinstance(settings[key], bool) and settings[key] >= 1):
            refuse(key, "expected a whole number of at least 1")
    if not (isinstance(settings["seed"], int) and not isinstance(settings["seed"], bool)):
        refuse("seed", "expected a whole number")
    for key in ("beta", "learning_rate"):
        if not (_is_number(settings[key]) and settings[key] > 0):
            refuse(key, "expected a number above 0")
    loss_type, eps = settings["loss_type"], settings["label_smoothing"]
    if loss_type not in LOSS_TYPES:
        refuse("loss_type", f"expected one of {', '.join(LOSS_TYPES)}")
    if not _is_number(eps):
        refuse("label_smoothing", "expected a number")
    if loss_type == "robust" and not 0 <= eps < 0.5:
        refuse("label_smoothing", "expected 0 <= label_smoothing < 0.5 with loss_type 'robust' (it divides by 1 - 2*eps)")
    if loss_type in ("ipo", "hinge") and eps != 0:
        refuse("label_smoothing", f"expected 0 with loss_type {loss_type!r}, which has no label noise; 'robust' reads it")
    check_comparable_with_trl(loss_type, eps)
    betas = settings["betas_to_compare"]
    if not (isinstance(betas, (list, tuple)) and betas and all(_is_number(b) and b > 0 for b in betas)):
        refuse("betas_to_compare", "expected a non-empty list of numbers above 0, e.g. [0.05, 0.1, 0.5]")
    if model_dir:
        path = Path(project_dir) / model_dir
        if not (path / "config.json").is_file():
            raise ValueError(f"model_dir = {model_dir!r}: {path} is no saved model (a folder holding config.json);"
                             " expected such a folder, relative to project_dir or absolute, or '' for the tiny model")


def history_from_trl(log_history: list[dict]) -> list[dict[str, float]]:
    """The per-step entries of a TRL `trainer.state.log_history` (run with logging_steps=1)."""
    return [entry for entry in log_history if "loss" in entry and "step" in entry]


def beta_sweep(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    betas: list[float],
) -> list[dict[str, float]]:
    """For fixed log-probs, the sigmoid loss and reward margin at each beta.

    The implicit reward is linear in beta (r = beta * log-ratio), so the same trained model shows a margin
    beta * h, in proportion to beta; the loss -log sigma(beta h) falls faster in h as beta grows.
    """
    sweep = []
    for beta in betas:
        losses, chosen, rejected = dpo_loss(policy_chosen_logps, policy_rejected_logps,
                                            ref_chosen_logps, ref_rejected_logps, beta=beta)
        sweep.append({"beta": beta, "loss": losses.mean().item(), "rewards/margins": (chosen - rejected).mean().item()})
    return sweep


def history_gaps(history: list[dict], other: list[dict], metrics=("loss", "rewards/margins")) -> dict[str, float]:
    """Largest per-step absolute difference between two runs, for each metric."""
    if len(history) != len(other):
        raise ValueError(f"the runs have {len(history)} and {len(other)} steps")
    return {metric: max(abs(a[metric] - b[metric]) for a, b in zip(history, other, strict=True)) for metric in metrics}

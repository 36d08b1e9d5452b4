"""The from-scratch DPO (dpo_kit.scratch.loss) against hand-computed numbers and against TRL 1.x itself.

TRL is driven through its real data path (DPOTrainer tokenization + collator) on the tiny offline
model, so "matches TRL" means: same batch, same log-probs, same losses, same gradients.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from dpo_kit.scratch import loss as scratch

# TRL 1.16 reads transformers' deprecated `is_gradient_checkpointing` inside the DPOTrainer calls these tests make
# directly (the kit's own calls hide that one message with models.loading.deprecated_checkpointing_alias_quiet);
# only that message is filtered, so any other warning still reaches the summary.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LN2 = math.log(2)
BATCH_SIZE = 4


# --------------------------------------------------------------------------------------------------
# Fixtures (tiny_model_dir is conftest's): a perturbed copy, so policy != reference, and TRL trainers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def perturbed_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with seeded noise on every weight: a policy that already differs from its
    reference, so that h != 0 and the loss variants actually disagree with one another."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    path = tmp_path_factory.mktemp("perturbed-model")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def rows():
    from dpo_kit.bundled import bundled_preference_rows

    return bundled_preference_rows(seed=0)[:8]


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.fixture(scope="session")
def make_trainer(tiny_model_dir, tokenizer, rows, tmp_path_factory):
    """DPOTrainer on a saved policy dir, with an explicit reference loaded from the tiny model dir."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    def make(policy_dir, loss_type="sigmoid", label_smoothing=0.0, beta=0.1, callbacks=None):
        args = DPOConfig(
            output_dir=str(tmp_path_factory.mktemp("trl-out")),
            bf16=False,
            activation_checkpointing=False,  # transformers 5's name; the old one warns
            dataloader_pin_memory=False,  # pinning only helps copies to a GPU; on a CPU torch warns it is unused
            report_to="none",
            max_steps=1,
            per_device_train_batch_size=BATCH_SIZE,
            train_sampling_strategy="sequential",  # the first batch is rows[:4], known in advance
            logging_steps=1,
            save_strategy="no",
            disable_tqdm=True,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            beta=beta,
            optim="adamw_torch",
            learning_rate=1e-3,
            lr_scheduler_type="constant",
        )
        return DPOTrainer(
            model=str(policy_dir),
            ref_model=load(tiny_model_dir),
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=callbacks,
        )

    return make


@pytest.fixture(scope="session")
def trl_batch(make_trainer, perturbed_dir):
    """The first training batch exactly as TRL's tokenizer + DataCollatorForPreference build it."""
    trainer = make_trainer(perturbed_dir)
    return next(iter(trainer.get_train_dataloader()))


@pytest.fixture(scope="session")
def dropout_model_dir(tokenizer, tmp_path_factory):
    """A tiny GPT-2 with the tiny chat tokenizer: GPT-2 keeps its dropout (0.1) in torch.nn.Dropout layers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    assert any(isinstance(module, torch.nn.Dropout) and module.p > 0 for module in model.modules())
    path = tmp_path_factory.mktemp("gpt2-with-dropout")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def trl_run(model_dir, tokenizer, rows, steps, output_dir, learning_rate=1e-3, bf16=False, **more_args):
    """TRL's per-step history for `steps` steps of 4 pairs from `model_dir`, configured as notebook 00 does."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=BATCH_SIZE,
        learning_rate=learning_rate, lr_scheduler_type="constant", optim="adamw_torch",
        train_sampling_strategy="sequential", use_cpu=True, bf16=bf16, activation_checkpointing=False,
        dataloader_pin_memory=False, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
        **more_args,
    )
    trainer = DPOTrainer(model=str(model_dir), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    trainer.train()
    return scratch.history_from_trl(trainer.state.log_history)


def trl_per_token_logps(model, batch):
    """TRL's own per-token log-probs: the fused LM head it patches onto its models."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        return model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False).log_probs


# --------------------------------------------------------------------------------------------------
# The formulas on hand-computed numbers
# --------------------------------------------------------------------------------------------------

# One pair with log pi(y_w)=-10, log pi(y_l)=-12, log pi_ref(y_w)=-11, log pi_ref(y_l)=-11:
# h = (-10 + 12) - (-11 + 11) = 2, and with beta = 0.5, beta*h = 1.
PAIR = [torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0)]
NLL_WIN = 0.31326168751822286  # -log sigma(1) = log(1 + e^-1)
NLL_LOSE = 1.3132616875182228  # -log sigma(-1) = log(1 + e)


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps", "expected"),
    [
        ("sigmoid", 0.5, 0.0, NLL_WIN),
        ("sigmoid", 0.5, 0.1, 0.9 * NLL_WIN + 0.1 * NLL_LOSE),  # conservative DPO: 0.41326...
        ("ipo", 0.5, 0.0, (2 - 1 / (2 * 0.5)) ** 2),  # (h - 1/(2 beta))^2 = 1
        ("ipo", 0.25, 0.0, 0.0),  # the target margin 1/(2 beta) = 2 is met exactly
        ("hinge", 0.5, 0.0, 0.0),  # relu(1 - 1)
        ("hinge", 0.1, 0.0, 0.8),  # relu(1 - 0.2)
        ("robust", 0.5, 0.0, NLL_WIN),
        ("robust", 0.5, 0.1, (0.9 * NLL_WIN - 0.1 * NLL_LOSE) / 0.8),  # 0.18826...
    ],
)
def test_dpo_loss_hand_computed(loss_type, beta, eps, expected):
    losses, chosen_rewards, rejected_rewards = scratch.dpo_loss(
        *PAIR, beta=beta, loss_type=loss_type, label_smoothing=eps
    )
    assert losses.shape == (1,)
    assert losses.item() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(beta * 1.0)  # beta * (-10 - -11)
    assert rejected_rewards.item() == pytest.approx(beta * -1.0)  # beta * (-12 - -11)


def test_loss_is_ln2_and_rewards_zero_when_policy_equals_reference():
    logps = torch.tensor([-30.0, -5.0, -12.5])
    losses, chosen, rejected = scratch.dpo_loss(logps, logps - 3, logps, logps - 3, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), LN2))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_soft_labels_are_label_smoothing_one_minus_p():
    generator = torch.Generator().manual_seed(0)
    logps = [torch.randn(5, generator=generator) * 10 for _ in range(4)]
    p = torch.tensor([1.0, 0.9, 0.75, 0.5, 0.2])

    soft, _, _ = scratch.dpo_loss(*logps, beta=0.3, preference_prob=p)
    smoothed, _, _ = scratch.dpo_loss(*logps, beta=0.3, label_smoothing=1 - p)
    plain, _, _ = scratch.dpo_loss(*logps, beta=0.3)
    assert torch.allclose(soft, smoothed)
    assert soft[0] == pytest.approx(plain[0].item())  # p = 1 is ordinary DPO
    assert not torch.allclose(soft[1:], plain[1:])

    # It is the cross-entropy of the Bradley-Terry probability sigma(beta h) against the soft label p.
    h = (logps[0] - logps[1]) - (logps[2] - logps[3])
    bt = torch.sigmoid(0.3 * h)
    assert torch.allclose(soft, -(p * bt.log() + (1 - p) * (1 - bt).log()), atol=1e-5)


def test_soft_label_loss_is_minimal_where_bradley_terry_equals_p():
    p, beta = 0.8, 0.5
    h = torch.linspace(-10, 10, 2001)  # step 0.01
    zeros = torch.zeros_like(h)
    losses, _, _ = scratch.dpo_loss(h, zeros, zeros, zeros, beta=beta, preference_prob=p)
    best_h = h[losses.argmin()].item()
    assert best_h == pytest.approx(math.log(p / (1 - p)) / beta, abs=0.01)  # sigma(beta h*) = p


def test_label_smoothing_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="no meaning"):
        scratch.dpo_loss(*PAIR, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="no meaning"):
        scratch.dpo_loss(*PAIR, loss_type="hinge", preference_prob=0.9)
    with pytest.raises(ValueError, match="0.5"):
        scratch.dpo_loss(*PAIR, loss_type="robust", label_smoothing=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="not both"):
        scratch.dpo_loss(*PAIR, label_smoothing=0.1, preference_prob=0.9)
    with pytest.raises(ValueError, match="loss_type"):
        scratch.dpo_loss(*PAIR, loss_type="kto_pair")
    # eps is a probability: outside [0, 1] the sigmoid loss means nothing (below 0 it is unbounded below).
    for outside in (-0.5, 1.5):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            scratch.dpo_loss(*PAIR, label_smoothing=outside)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        scratch.dpo_loss(*PAIR, preference_prob=1.3)


def test_the_comparison_with_trl_refuses_a_loss_that_trl_computes_otherwise():
    # TRL 1.x's sigmoid loss ignores label_smoothing; notebook 00 would lay two different losses on top of each other.
    with pytest.raises(ValueError, match="label_smoothing 0.2 with loss_type 'sigmoid': TRL's sigmoid loss ignores"):
        scratch.check_comparable_with_trl("sigmoid", 0.2)
    scratch.check_comparable_with_trl("sigmoid", 0.0)
    scratch.check_comparable_with_trl("robust", 0.2)


NOTEBOOK_DEFAULTS = {"scratch_steps": 30, "beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0,
                     "learning_rate": 2e-4, "batch_size": 4, "seed": 0, "betas_to_compare": [0.05, 0.1, 0.5]}


@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("scratch_steps", 0, "at least 1"),  # failed in the batch cell with "max() arg is an empty sequence"
        ("batch_size", 0, "at least 1"),
        ("batch_size", 2.5, "whole number"),
        ("seed", "0", "whole number"),
        ("beta", 0, "above 0"),  # ipo failed with ZeroDivisionError; sigmoid trained nothing without a word
        ("beta", -0.1, "above 0"),  # trained towards the rejected answers
        ("learning_rate", float("nan"), "above 0"),
        ("loss_type", "dpo", "sigmoid, ipo, hinge, robust"),
        ("label_smoothing", 0.5, "< 0.5 with loss_type 'robust'"),
        ("betas_to_compare", 0.1, "list of numbers above 0"),  # failed in the last cell: float is not iterable
        ("betas_to_compare", [0.1, 0], "list of numbers above 0"),
        ("betas_to_compare", [], "list of numbers above 0"),
    ],
)
def test_notebook_settings_name_the_key_and_what_is_valid(key, value, valid):
    scratch.check_notebook_settings(NOTEBOOK_DEFAULTS)
    settings = {**NOTEBOOK_DEFAULTS, "loss_type": "robust" if key == "label_smoothing" else "sigmoid", key: value}
    with pytest.raises(ValueError, match=rf"^{key} = .*{re.escape(valid)}"):
        scratch.check_notebook_settings(settings)


def test_notebook_settings_refuse_label_smoothing_where_trl_would_ignore_it_and_a_missing_model_dir(tmp_path):
    for loss_type in ("ipo", "hinge"):
        with pytest.raises(ValueError, match=rf"label_smoothing = 0.1: expected 0 with loss_type '{loss_type}'"):
            scratch.check_notebook_settings({**NOTEBOOK_DEFAULTS, "loss_type": loss_type, "label_smoothing": 0.1})
    with pytest.raises(ValueError, match="label_smoothing 0.1 with loss_type 'sigmoid'"):
        scratch.check_notebook_settings({**NOTEBOOK_DEFAULTS, "label_smoothing": 0.1})
    scratch.check_notebook_settings({**NOTEBOOK_DEFAULTS, "loss_type": "robust", "label_smoothing": 0.2})
    # A misspelled model_dir failed in AutoTokenizer with "Repo id must be in the form 'repo_name' ...".
    with pytest.raises(ValueError, match=r"model_dir = 'modle': .* is no saved model .*'' for the tiny model"):
        scratch.check_notebook_settings(NOTEBOOK_DEFAULTS, "modle", tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    scratch.check_notebook_settings(NOTEBOOK_DEFAULTS, "model", tmp_path)


def test_dpo_loss_refuses_a_beta_that_is_not_positive():
    for beta in (0, 0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="beta must be above 0"):
            scratch.dpo_loss(*PAIR, beta=beta, loss_type="ipo")


def test_dpo_metrics_names_and_values():
    chosen, rejected = torch.tensor([0.3, -0.1]), torch.tensor([0.1, 0.2])
    metrics = scratch.dpo_metrics(chosen, rejected, torch.tensor([-10.0, -20.0]), torch.tensor([-5.0, -7.0]))
    assert metrics == pytest.approx({
        "rewards/chosen": 0.1,
        "rewards/rejected": 0.15,
        "rewards/accuracies": 0.5,
        "rewards/margins": -0.05,
        "logps/chosen": -15.0,
        "logps/rejected": -6.0,
    })


# --------------------------------------------------------------------------------------------------
# sequence_logps: shift and masking
# --------------------------------------------------------------------------------------------------


def test_sequence_logps_by_hand():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    loss_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    log_probs = logits.log_softmax(-1)
    expected = [
        sum(log_probs[b, t - 1, labels[b, t]].item() for t in range(1, 5) if loss_mask[b, t])
        for b in range(2)
    ]
    assert scratch.sequence_logps(logits, labels, loss_mask).tolist() == pytest.approx(expected, abs=1e-5)


def test_prompt_and_padding_do_not_change_sequence_logps():
    generator = torch.Generator().manual_seed(1)
    # Row: 3 prompt tokens, 3 response tokens, 2 padding tokens.
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    logits = torch.randn(1, 8, 11, generator=generator)
    labels = torch.randint(0, 11, (1, 8), generator=generator)
    before = scratch.sequence_logps(logits, labels, loss_mask)

    # Logits at t-1 predict token t: positions 0-1 predict prompt tokens, 5-7 predict padding or nothing.
    scrambled = logits.clone()
    scrambled[:, [0, 1, 5, 6, 7]] = torch.randn(1, 5, 11, generator=generator) * 50
    relabelled = labels.clone()
    relabelled[:, [1, 2, 6, 7]] = -100  # masked labels may hold anything, even ids that do not exist
    assert torch.allclose(scratch.sequence_logps(scrambled, relabelled, loss_mask), before)

    # ...while the logits that predict a response token do matter.
    changed = logits.clone()
    changed[:, 2] += torch.randn(11, generator=generator)
    assert not torch.allclose(scratch.sequence_logps(changed, labels, loss_mask), before)


# --------------------------------------------------------------------------------------------------
# Against TRL
# --------------------------------------------------------------------------------------------------


def test_collate_pairs_builds_trls_batch(rows, tokenizer, trl_batch):
    pairs = [scratch.tokenize_pair(row, tokenizer) for row in rows[:BATCH_SIZE]]
    mine = scratch.collate_pairs(pairs, tokenizer.pad_token_id)
    assert set(mine) == {"input_ids", "attention_mask", "completion_mask"} <= set(trl_batch)
    for key, tensor in mine.items():
        assert torch.equal(tensor, trl_batch[key]), key
    # The ChatML turn already ends in eos: exactly one per response, i.e. no doubled eos.
    for pair in pairs:
        assert pair["chosen_ids"].count(tokenizer.eos_token_id) == 1
        assert pair["rejected_ids"].count(tokenizer.eos_token_id) == 1


def test_sequence_logps_equals_trls_logps(make_trainer, perturbed_dir, trl_batch):
    trainer = make_trainer(perturbed_dir)
    for model in (trainer.model, trainer.ref_model):
        trl_logps = trl_per_token_logps(model, trl_batch).sum(dim=1)
        with torch.no_grad():
            logits = model(input_ids=trl_batch["input_ids"], attention_mask=trl_batch["attention_mask"]).logits
        mine = scratch.sequence_logps(logits, trl_batch["input_ids"], trl_batch["completion_mask"])
        assert mine.shape == (2 * BATCH_SIZE,)
        assert torch.allclose(mine, trl_logps, rtol=1e-6, atol=1e-4)  # sums of ~50 fp32 terms of ~5 each

    # And the batch means TRL logs under logps/chosen and logps/rejected.
    trainer.model.train()
    trainer.compute_loss(trainer.model, trl_batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    with torch.no_grad():
        chosen, rejected = scratch.concatenated_logps(load(perturbed_dir), trl_batch)
    assert logged["logps/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-4)
    assert logged["logps/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-4)


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"),
    [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2), ("robust", 0.4)],
)
def test_losses_and_rewards_match_trl(make_trainer, perturbed_dir, trl_batch, loss_type, label_smoothing):
    """The loss formulas, fed the very log-probs TRL computes (sequence_logps is checked on its own above:
    sums of ~250 in fp32 carry ~1e-5 of rounding that would otherwise blur a formula check)."""
    beta = 0.1
    trainer = make_trainer(perturbed_dir, loss_type=loss_type, label_smoothing=label_smoothing, beta=beta)
    trainer.model.train()  # TRL files metrics under "train" only in training mode
    policy_chosen, policy_rejected = trl_per_token_logps(trainer.model, trl_batch).sum(dim=1).chunk(2)
    ref_chosen, ref_rejected = trl_per_token_logps(trainer.ref_model, trl_batch).sum(dim=1).chunk(2)
    summed = (policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    if loss_type == "ipo":  # like with like: TRL's IPO sees per-token averaged log-probs
        chosen_len, rejected_len = scratch.response_lengths(trl_batch)
        scored = (policy_chosen / chosen_len, policy_rejected / rejected_len,
                  ref_chosen / chosen_len, ref_rejected / rejected_len)
    else:
        scored = summed
    losses, _, _ = scratch.dpo_loss(*scored, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    _, chosen_rewards, rejected_rewards = scratch.dpo_loss(*summed, beta=beta)
    assert losses.std() > 1e-3  # the pairs differ, so a per-pair mix-up would show

    # Pair by pair: TRL's loss on a one-pair batch (rows i and B+i of the concatenated batch).
    for i in range(BATCH_SIZE):
        one_pair = {key: value[[i, BATCH_SIZE + i]] for key, value in trl_batch.items()}
        with torch.no_grad():
            trl_loss = trainer.compute_loss(trainer.model, one_pair)
        logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
        assert trl_loss.item() == pytest.approx(losses[i].item(), abs=1e-5)
        assert logged["rewards/chosen"] == pytest.approx(chosen_rewards[i].item(), abs=1e-5)
        assert logged["rewards/rejected"] == pytest.approx(rejected_rewards[i].item(), abs=1e-5)

    # The whole batch: mean loss and every reward metric under TRL's names.
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    assert trl_loss.item() == pytest.approx(losses.mean().item(), abs=1e-5)
    mine = scratch.dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen, policy_rejected)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert logged[name] == pytest.approx(mine[name], abs=1e-5), name


def test_trl_sigmoid_ignores_label_smoothing_but_ours_is_conservative_dpo(make_trainer, perturbed_dir, trl_batch):
    """Documents a disagreement: TRL 1.16 reads label_smoothing only in robust/exo_pair/aot."""
    smoothed = make_trainer(perturbed_dir, loss_type="sigmoid", label_smoothing=0.2)
    plain = make_trainer(perturbed_dir, loss_type="sigmoid")
    with torch.no_grad():
        trl_smoothed = smoothed.compute_loss(smoothed.model, trl_batch).item()
        trl_plain = plain.compute_loss(plain.model, trl_batch).item()
        logps = scratch.concatenated_logps(smoothed.model, trl_batch) + scratch.concatenated_logps(
            smoothed.ref_model, trl_batch
        )
    ours_smoothed = scratch.dpo_loss(*logps, label_smoothing=0.2)[0].mean().item()
    assert trl_smoothed == pytest.approx(trl_plain, abs=1e-7)
    assert abs(ours_smoothed - trl_smoothed) > 1e-3


@pytest.mark.parametrize(("loss_type", "start"), [("sigmoid", "reference"), ("ipo", "perturbed"), ("robust", "perturbed")])
def test_one_step_gradients_and_weights_match_trl(make_trainer, tiny_model_dir, perturbed_dir, trl_batch, loss_type, start):
    """Full fine-tuning, fp32 on CPU: TRL's first optimizer step vs `train_step` on the same batch."""
    from transformers import TrainerCallback

    class GrabGradients(TrainerCallback):
        # Called after clipping, right before optimizer.step(): the gradients TRL actually applies.
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    policy_dir = tiny_model_dir if start == "reference" else perturbed_dir
    label_smoothing = 0.2 if loss_type == "robust" else 0.0
    grab = GrabGradients()
    trainer = make_trainer(policy_dir, loss_type=loss_type, label_smoothing=label_smoothing, callbacks=[grab])
    trainer.train()
    trl_log = scratch.history_from_trl(trainer.state.log_history)[0]

    policy, reference = load(policy_dir), scratch.freeze(load(tiny_model_dir))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=trainer.args.learning_rate, weight_decay=0.0)
    metrics = scratch.train_step(policy, reference, trl_batch, optimizer, beta=trainer.args.beta,
                                 loss_type=loss_type, label_smoothing=label_smoothing,
                                 max_grad_norm=trainer.args.max_grad_norm)

    assert metrics["loss"] == pytest.approx(trl_log["loss"], abs=1e-5)
    assert metrics["grad_norm"] == pytest.approx(trl_log["grad_norm"], rel=1e-5)
    trl_params = dict(trainer.model.named_parameters())
    for name, param in policy.named_parameters():
        assert param.grad.abs().max() > 0, name  # every weight is trained: a frozen one would be a bug
        # Each tensor to its own scale: q/k projections' largest gradients are ~1e-4, where one absolute 1e-5 for all
        # let a 2% error in them pass (sigmoid). fp32 summation order leaves ~1e-6 of a tensor's largest gradient; 1e-4 is allowed.
        scale = grab.grads[name].abs().max()
        assert (param.grad - grab.grads[name]).abs().max() <= 1e-4 * scale, name
        # Adam's first step is lr * g / (|g| + 1e-8): where |g| is itself ~1e-8, fp32 noise in g moves the
        # update by a sizeable fraction of lr, so weights are compared where the step is well-conditioned.
        well_conditioned = param.grad.abs() > 1e-6
        assert well_conditioned.float().mean() > 0.5, name
        weight_gap = (param.detach() - trl_params[name].detach()).abs()
        assert weight_gap[well_conditioned].max() < 1e-5, name


def test_loss_at_initialisation_is_ln2(tiny_model_dir, trl_batch):
    policy, reference = load(tiny_model_dir), scratch.freeze(load(tiny_model_dir))
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.0)
    metrics = scratch.train_step(policy, reference, trl_batch, optimizer)
    assert metrics["loss"] == pytest.approx(LN2, abs=1e-6)
    assert metrics["rewards/margins"] == 0.0
    assert metrics["grad_norm"] > 0  # ln 2 here is the starting point, not a stuck run (trl#1627)


def test_train_loop_learns_the_preferences(tiny_model_dir, tokenizer, rows):
    policy, reference = load(tiny_model_dir), load(tiny_model_dir)
    history = scratch.train_loop(policy, reference, rows, tokenizer, steps=8, batch_size=4, learning_rate=3e-3)
    assert [entry["step"] for entry in history] == list(range(1, 9))
    assert history[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["rewards/margins"] > 0
    assert all(not p.requires_grad for p in reference.parameters())


def test_train_loop_switches_dropout_off_as_trl_does(dropout_model_dir, tokenizer, rows, tmp_path):
    """TRL's DPOTrainer sets every nn.Dropout to 0 (disable_dropout=True): a GPT-2 trained from scratch with its
    dropout of 0.1 left on started off ln 2 and drifted from TRL's curve."""
    policy, reference = load(dropout_model_dir), load(dropout_model_dir)
    history = scratch.train_loop(policy, reference, rows, tokenizer, steps=2, batch_size=BATCH_SIZE, learning_rate=1e-3)
    assert all(module.p == 0 for module in policy.modules() if isinstance(module, torch.nn.Dropout))
    assert history[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    trl_history = trl_run(dropout_model_dir, tokenizer, rows, steps=2, output_dir=tmp_path)
    gaps = scratch.history_gaps(history, trl_history, metrics=("loss", "rewards/margins", "grad_norm"))
    assert max(gaps.values()) < 1e-5, gaps


def test_a_tokenizer_without_pad_token_pads_with_eos_as_trl_does(tiny_model_dir, rows, tmp_path):
    """A model_dir whose tokenizer has no pad token (Llama 3 Instruct) failed in collate_pairs with
    "full(): argument 'fill_value' must be Number, not NoneType"; TRL pads with the eos."""
    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(tiny_model_dir)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    history = scratch.train_loop(load(tiny_model_dir), load(tiny_model_dir), rows, no_pad, steps=2,
                                 batch_size=BATCH_SIZE, learning_rate=1e-3)
    assert scratch.pad_token_id(no_pad) == no_pad.eos_token_id  # what notebook 00 pads its batch with
    with pytest.raises(ValueError, match="pad_token_id is None"):
        scratch.collate_pairs([scratch.tokenize_pair(rows[0], no_pad)], no_pad.pad_token_id)
    trl_history = trl_run(tiny_model_dir, no_pad, rows, steps=2, output_dir=tmp_path)  # TRL sets its pad to eos
    gaps = scratch.history_gaps(history, trl_history, metrics=("loss", "rewards/margins", "grad_norm"))
    assert history[-1]["rewards/margins"] != 0 and max(gaps.values()) < 1e-5, gaps


def test_long_pairs_are_cut_and_dropped_at_max_length_as_trl_does(tiny_model_dir, tokenizer, rows, tmp_path, capsys):
    """The loop trained every pair in full, where TRL's DPOTrainer cuts each sequence to max_length (1024 by
    default) and drops a pair whose prompt alone fills it: a long pair blew up the batch, and the curves parted."""
    from trl import DPOConfig

    assert scratch.MAX_LENGTH == DPOConfig.__dataclass_fields__["max_length"].default  # notebook 00's TRL run's
    pairs = [scratch.tokenize_pair(row, tokenizer) for row in rows]
    prompts = [len(pair["prompt_ids"]) for pair in pairs]
    max_length = 30  # two of the 8 prompts are 32 tokens; every chosen response is longer than 30 - 20
    assert sorted(prompts)[-2:] == [32, 32] and max(sorted(prompts)[:-2]) < 30
    batch = scratch.collate_pairs(pairs[1:3], tokenizer.pad_token_id, max_length=max_length)
    assert batch["input_ids"].shape[1] == max_length and batch["completion_mask"].sum() > 0
    ends = scratch.collate_pairs(pairs[1:3], tokenizer.pad_token_id, max_length=max_length, truncation_mode="keep_end")
    assert torch.equal(ends["input_ids"][0], torch.tensor((pairs[1]["prompt_ids"] + pairs[1]["chosen_ids"])[-30:]))

    history = scratch.train_loop(load(tiny_model_dir), load(tiny_model_dir), rows, tokenizer, steps=2,
                                 batch_size=BATCH_SIZE, learning_rate=1e-3, max_length=max_length)
    assert "max_length 30 (keep_start, as TRL's DPOTrainer): 2 of 8 pairs dropped, their prompt alone filling it;" \
           " 6 of the 6 kept cut to fit" in capsys.readouterr().out
    trl_history = trl_run(tiny_model_dir, tokenizer, rows, steps=2, output_dir=tmp_path, max_length=max_length)
    gaps = scratch.history_gaps(history, trl_history, metrics=("loss", "rewards/margins", "grad_norm", "logps/chosen"))
    assert history[-1]["rewards/margins"] != 0 and max(gaps.values()) < 1e-5, gaps
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        scratch.train_loop(load(tiny_model_dir), load(tiny_model_dir), rows, tokenizer, steps=1, truncation_mode="end")
    with pytest.raises(ValueError, match="every one of the 8 pairs has a prompt of max_length 10 tokens or more"):
        scratch.train_loop(load(tiny_model_dir), load(tiny_model_dir), rows, tokenizer, steps=1, max_length=10)
    with pytest.raises(ValueError, match="rows is empty"):
        scratch.train_loop(load(tiny_model_dir), load(tiny_model_dir), [], tokenizer, steps=1)


def test_beta_sweep_margin_is_linear_in_beta():
    logps = [torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -19.0]), torch.tensor([-11.0, -21.0]),
             torch.tensor([-11.0, -20.0])]  # h = [2, 0]
    sweep = scratch.beta_sweep(*logps, betas=[0.05, 0.1, 0.5])
    assert [row["rewards/margins"] for row in sweep] == pytest.approx([0.05, 0.1, 0.5])  # beta * mean(h)
    losses = [row["loss"] for row in sweep]
    assert losses == sorted(losses, reverse=True)  # a larger beta rewards the same margin more


def test_the_ln2_line_is_drawn_only_where_the_runs_start_at_ln2():
    import matplotlib

    matplotlib.use("Agg")
    from dpo_kit.scratch.plots import plot_training_curves

    def labels(first_loss):
        history = [{"step": 1, "loss": first_loss, "rewards/margins": 0.0}, {"step": 2, "loss": 0.5, "rewards/margins": 0.1}]
        figure = plot_training_curves({"from scratch": history})
        return [line.get_label() for line in figure.axes[0].lines]

    assert "ln 2" in labels(LN2)  # sigmoid and robust start there
    assert "ln 2" not in labels(1.0)  # hinge starts at relu(1 - 0) = 1
    assert "ln 2" not in labels(25.0)  # ipo at (1 / (2 * 0.1))^2


def test_every_run_gets_a_line_however_many_there_are():
    """The line styles were zipped against the runs, so a fifth run (there are four styles) was left out unsaid."""
    import matplotlib

    matplotlib.use("Agg")
    from dpo_kit.scratch.plots import plot_training_curves

    history = [{"step": 1, "loss": 0.5, "rewards/margins": 0.1}, {"step": 2, "loss": 0.4, "rewards/margins": 0.2}]
    runs = {f"run {i}": history for i in range(6)}
    figure = plot_training_curves(runs)
    for ax in figure.axes:
        assert [line.get_label() for line in ax.lines] == list(runs)


def test_trl_in_its_default_bf16_parts_from_the_fp32_loop(tiny_model_dir, tokenizer, rows, tmp_path):
    """Why notebook 00 runs TRL with bf16=False: TRL's default bf16 is another precision, not only a slower CPU step
    (the notebook said so), so its curve leaves the fp32 from-scratch loop's by far more than fp32 rounding."""
    history = scratch.train_loop(load(tiny_model_dir), load(tiny_model_dir), rows, tokenizer, steps=2,
                                 batch_size=BATCH_SIZE, learning_rate=2e-4)
    fp32 = scratch.history_gaps(history, trl_run(tiny_model_dir, tokenizer, rows, 2, tmp_path / "fp32", 2e-4))
    bf16 = scratch.history_gaps(history, trl_run(tiny_model_dir, tokenizer, rows, 2, tmp_path / "bf16", 2e-4, bf16=True))
    assert max(fp32.values()) < 1e-5 < min(bf16.values()), (fp32, bf16)

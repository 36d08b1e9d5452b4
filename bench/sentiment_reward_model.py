"""Do the sentiment recipe's pairs support 0.9 held-out pair accuracy at all? An explicit reward model, trained on
the same pairs, says.

    .venv/bin/python bench/sentiment_reward_model.py [RUN_DIR] [--learning-rates 1e-4 5e-4] [--seeds 0 1 2]

DPO's implicit reward, beta * log(pi / pi_ref) of a response, reaches 0.72-0.80 on the recipe's held-out pairs
(docs/implicit-reward-accuracy.md). Lin et al. (2024, "On the limited generalization capability of the implicit reward model
induced by DPO") found that an explicit Bradley-Terry reward model trained on the same pairs ranks held-out pairs
better than DPO's implicit one. This script trains that explicit reward model: the same SmolLM2-135M-Instruct with a
one-output score head, LoRA as in the recipe (r 16, alpha 32, every linear layer; the head trained in full), with
TRL's RewardTrainer on RUN_DIR's training pairs (standard format, the prompt's chat template included, eos
appended as TRL does), batch 8, constant learning rate, for two epochs, and scores RUN_DIR's held-out pairs every 17
steps (half an epoch). If it also stays near 0.8, the pairs (261 of them, ranked by VADER) cap what a 135M model
learns from them; if it reaches 0.9, the cap is DPO's parametrization of the reward.

RUN_DIR is a run of params/smollm2-135m-sentiment.yaml whose format stage has run (default
runs/smollm2-135m-sentiment, what `bash scripts/demo.sh` writes). One result per learning rate and seed (the seed
of the score head's init, the LoRA init and the data order; the pairs stay RUN_DIR's) goes to
runs/sentiment-reward-model/<RUN_DIR's name>/lr<lr>-seed<seed>/result.json; an existing one is never overwritten
(that configuration is skipped). The table printed at the end covers every result in that folder. 4-5 minutes
per configuration on 2 CPU cores. The answer, over three seeds' pairs, is in docs/implicit-reward-accuracy.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from dpo_kit.evaluation.generate import read_jsonl

REPO = Path(__file__).resolve().parent.parent
EVAL_EVERY = 17  # steps; an epoch of the recipe's 261 pairs is 33 steps of 8 (the last one short)
EPOCHS = 2


def held_out_scores(model, tokenizer, rows: list[dict], batch_size: int = 16) -> list[tuple[float, float]]:
    """(reward of chosen, reward of rejected) for each pair, each text tokenized as RewardTrainer does: prompt +
    response + eos, padded on the right. The score head reads the last token that is not padding: for SmolLM2, whose
    pad token is its eos, that is the response's last token, in training as here."""
    import torch

    model.eval()
    texts = [row["prompt"] + row[side] + tokenizer.eos_token for row in rows for side in ("chosen", "rejected")]
    rewards: list[float] = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False, padding_side="right")  # fmt: skip
            rewards.extend(model(**batch.to(model.device)).logits.squeeze(-1).float().tolist())
    model.train()
    return list(zip(rewards[0::2], rewards[1::2], strict=True))


def accuracy_callback(tokenizer, eval_rows: list[dict], curve: list[dict]):
    """Scores the held-out pairs every EVAL_EVERY steps and at the end, appending {step, accuracy, margin} to
    `curve`. Direct scoring rather than Trainer.evaluate, whose accuracy is a mean of per-batch means."""
    from transformers import TrainerCallback

    class HeldOutAccuracy(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % EVAL_EVERY == 0 or state.global_step == state.max_steps:
                if curve and curve[-1]["step"] == state.global_step:
                    return
                scores = held_out_scores(model, tokenizer, eval_rows)
                curve.append({
                    "step": state.global_step,
                    "accuracy": sum(chosen > rejected for chosen, rejected in scores) / len(scores),
                    "margin": sum(chosen - rejected for chosen, rejected in scores) / len(scores),
                })  # fmt: skip
                print(f"  step {state.global_step}: held-out accuracy {curve[-1]['accuracy']:.3f}", flush=True)

    return HeldOutAccuracy()


def train_reward_model(params, source: str, tokenizer, train_rows, eval_rows, learning_rate: float, seed: int,
                       out: Path) -> dict:  # fmt: skip
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PrinterCallback, set_seed
    from trl import RewardConfig, RewardTrainer

    from dpo_kit.hardware import choose_hardware
    from dpo_kit.models.loading import deprecated_checkpointing_alias_quiet, from_pretrained, hub_kwargs, lora_config
    from dpo_kit.training.train import dpo_config_kwargs

    hardware = choose_hardware()
    # Precision, checkpointing and the CPU flag as the kit's train stage chooses them for this hardware.
    kit = dpo_config_kwargs(params, out, hardware)
    precision_keys = ("bf16", "fp16", "activation_checkpointing", "gradient_checkpointing", "use_cpu",
                      "dataloader_num_workers", "dataloader_pin_memory")  # fmt: skip
    config = RewardConfig(
        output_dir=str(out / "checkpoints"),
        **{key: kit[key] for key in precision_keys if key in kit},
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        num_train_epochs=EPOCHS,
        per_device_train_batch_size=params.dpo["per_device_train_batch_size"],
        max_length=params.dpo["max_length"],
        logging_steps=params.dpo["logging_steps"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    # RewardTrainer seeds before it builds the score head; loading the model here, seed first for the same reason.
    set_seed(seed)
    model = from_pretrained(AutoModelForSequenceClassification, source, num_labels=1, **hub_kwargs(params))
    model.config.pad_token_id = tokenizer.pad_token_id
    # The train stage's LoRA, on a score head instead of the LM head: the head is new, so it is trained in full.
    lora = dataclasses.replace(lora_config(params), task_type="SEQ_CLS", modules_to_save=["score"])
    curve: list[dict] = []
    columns = ("prompt", "chosen", "rejected")
    with deprecated_checkpointing_alias_quiet():  # peft reads the old name when it wraps the model
        trainer = RewardTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list([{key: row[key] for key in columns} for row in train_rows]),
            processing_class=tokenizer,
            peft_config=lora,
            callbacks=[accuracy_callback(tokenizer, eval_rows, curve)],
        )
    trainer.remove_callback(PrinterCallback)  # without tqdm the Trainer prints every log dict; train_log keeps them
    start = time.perf_counter()
    trainer.train()
    return {
        "learning_rate": learning_rate,
        "seed": seed,
        "epochs": EPOCHS,
        "steps": trainer.state.global_step,
        "held_out": curve,
        "train_log": trainer.state.log_history,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    from dpo_kit.models.loading import load_tokenizer, model_source
    from dpo_kit.params import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", type=Path, default=REPO / "runs" / "smollm2-135m-sentiment")
    parser.add_argument("--learning-rates", nargs="+", type=float, default=[1e-4, 5e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    args = parser.parse_args()
    data = args.run_dir / "data"
    if not (data / "train.jsonl").is_file() or not (data / "eval.jsonl").is_file():
        print(
            f"{data} has no train.jsonl and eval.jsonl: run the sentiment recipe's format stage first", file=sys.stderr
        )
        return 2
    params = load_params(args.run_dir / "params.yaml")
    source = model_source(params, REPO)
    tokenizer = load_tokenizer(source, params)
    train_rows, eval_rows = read_jsonl(data / "train.jsonl"), read_jsonl(data / "eval.jsonl")
    results_dir = REPO / "runs" / "sentiment-reward-model" / args.run_dir.resolve().name
    for learning_rate in args.learning_rates:
        for seed in args.seeds:
            out = results_dir / f"lr{learning_rate:g}-seed{seed}"
            if out.exists():
                print(f"{out} holds an earlier result: kept, not run again (move it aside to rerun)")
                continue
            out.mkdir(parents=True)
            print(f"reward model, lr {learning_rate:g}, seed {seed}: {len(train_rows)} training pairs,"
                  f" {len(eval_rows)} held out", flush=True)  # fmt: skip
            result = train_reward_model(params, source, tokenizer, train_rows, eval_rows, learning_rate, seed, out)
            result.update(run=str(args.run_dir.resolve()), pairs={"train": len(train_rows), "eval": len(eval_rows)})
            (out / "result.json").write_text(json.dumps(result, indent=1))

    results = sorted((json.loads(path.read_text()) for path in results_dir.glob("*/result.json")),
                     key=lambda result: (result["learning_rate"], result["seed"]))  # fmt: skip
    steps = sorted({point["step"] for result in results for point in result["held_out"]})
    print(f"\nheld-out pair accuracy of the explicit reward model on {args.run_dir.name}'s pairs:\n")
    print("| learning rate | seed | " + " | ".join(f"after {step} steps" for step in steps) + " | time |")
    print("| --- | --- | " + " | ".join("---" for _ in steps) + " | --- |")
    for result in results:
        by_step = {point["step"]: point["accuracy"] for point in result["held_out"]}
        cells = " | ".join(f"{by_step[step]:.2f}" if step in by_step else "" for step in steps)
        print(f"| {result['learning_rate']:g} | {result['seed']} | {cells} | {result['seconds'] / 60:.1f} min |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The merge stage: fold the LoRA adapter into a full- or half-precision reload of the base.

Merging into quantized weights is lossy or fails (trl#1324, peft#2321), so the base is always
reloaded unquantized, whatever the training used. The merge is checked, not assumed: the merged
model's logits must equal the adapter model's on a probe batch, and again after a save/reload.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dpo_kit.params import Params

HALF_PRECISION_ATOL = 5e-2  # fp16/bf16 rounding alone moves logits by ~1e-2


@dataclass
class MergeResult:
    merged_dir: str
    dtype: str
    max_abs_logit_diff: float  # adapter model vs merged model, same probe batch
    max_abs_reload_diff: float  # merged model vs its saved-and-reloaded copy
    tolerance: float
    pushed_to: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def probe_batch(tokenizer, prompts: list[str]):
    """Chat-templated prompts, padded into one batch."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return tokenizer(texts, return_tensors="pt", padding=True)


def probe_prompts(run_dir: Path, count: int = 4) -> list[str]:
    """The first held-out user prompts, falling back to fixed ones."""
    import json

    prompts = []
    eval_path = run_dir / "data" / "eval.jsonl"
    if eval_path.exists():
        for line in eval_path.read_text().splitlines()[:count]:
            prompt = json.loads(line)["prompt"]
            prompts.append(prompt if isinstance(prompt, str) else prompt[-1]["content"])
    return prompts or ["How do I bake bread?", "What is DPO?"]


def max_logit_diff(model_a, model_b, batch) -> float:
    import torch

    with torch.no_grad():
        a = model_a(**batch).logits.float()
        b = model_b(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    return float((a - b).abs()[mask].max())


def merge_adapter(stage) -> MergeResult:
    """Merge run_dir/adapter into the base, verify, save to run_dir/merged (safetensors), optionally push."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_kit.models import load_causal_lm, load_tokenizer, model_source

    params: Params = stage.params
    run_dir = stage.run_dir
    merged_dir = run_dir / "merged"
    if not params.lora.enabled:
        return verify_full_model(stage)
    adapter_dir = run_dir / "adapter"
    if not adapter_dir.exists():
        raise FileNotFoundError(f"no adapter at {adapter_dir}: run the train stage first (with lora.enabled)")
    source = model_source(params, stage.project_dir)
    tokenizer = load_tokenizer(str(adapter_dir), params)  # saved by train; carries the chat template
    tokenizer.padding_side = "left"
    dtype = params.merge.dtype
    base = load_causal_lm(source, params, dtype=dtype, quantized=False, hardware=stage.hardware)
    adapter_model = PeftModel.from_pretrained(base, str(adapter_dir))
    adapter_model.eval()
    batch = probe_batch(tokenizer, probe_prompts(run_dir)).to(adapter_model.device)
    mask = batch["attention_mask"].bool()
    # Adapter logits are taken before merging: merge_and_unload rewrites the base weights in place.
    with torch.no_grad():
        adapter_logits = adapter_model(**batch).logits.float()
    merged = adapter_model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(**batch).logits.float()
    merge_diff = float((adapter_logits - merged_logits).abs()[mask].max())
    tolerance = params.merge.verify_atol if merged.dtype == torch.float32 else max(params.merge.verify_atol, HALF_PRECISION_ATOL)
    if merge_diff > tolerance:
        raise RuntimeError(f"merged logits differ from the adapter model's by {merge_diff:.2e} > {tolerance:.0e}")

    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(merged_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=merged.dtype)
    reload_diff = max_logit_diff(merged, reloaded.to(merged.device), batch)
    if reload_diff > tolerance:
        raise RuntimeError(f"reloaded merged model differs by {reload_diff:.2e} > {tolerance:.0e}")

    pushed_to = push_merged(params, merged, tokenizer) if params.merge.push_to_hub else None
    return MergeResult(
        merged_dir=str(merged_dir),
        dtype=str(merged.dtype).removeprefix("torch."),
        max_abs_logit_diff=merge_diff,
        max_abs_reload_diff=reload_diff,
        tolerance=tolerance,
        pushed_to=pushed_to,
    )


def verify_full_model(stage) -> MergeResult:
    """Full fine-tuning saved a standalone model to merged/ already: check it reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from dpo_kit.models import load_tokenizer

    params, merged_dir = stage.params, stage.run_dir / "merged"
    if not (merged_dir / "config.json").exists():
        raise FileNotFoundError(f"no trained model at {merged_dir}: run the train stage first")
    tokenizer = load_tokenizer(str(merged_dir), params)
    tokenizer.padding_side = "left"
    batch = probe_batch(tokenizer, probe_prompts(stage.run_dir))
    model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    again = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reload_diff = max_logit_diff(model, again, batch)
    pushed_to = push_merged(params, model, tokenizer) if params.merge.push_to_hub else None
    return MergeResult(str(merged_dir), str(model.dtype).removeprefix("torch."), 0.0, reload_diff,
                       params.merge.verify_atol, pushed_to)


def push_merged(params: Params, model, tokenizer) -> str:
    """Push to params.merge.hub_model_id with the token from HF_TOKEN (never from params)."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RuntimeError("merge.push_to_hub is true but HF_TOKEN is not set in the environment")
    repo = params.merge.hub_model_id
    model.push_to_hub(repo, token=token, private=params.merge.private, safe_serialization=True)
    tokenizer.push_to_hub(repo, token=token, private=params.merge.private)
    return repo

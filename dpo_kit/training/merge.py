"""The merge stage: fold the LoRA adapter into a full- or half-precision reload of the base.

Merging into quantized weights is lossy or fails (trl#1324, peft#2321), so the base is always
reloaded unquantized, whatever the training used. The merge is checked, not assumed: the merged
model's logits must equal the adapter model's on a probe batch, and again after a save/reload.
With full fine-tuning there is no adapter: trained/ is exported in merge.dtype, with the same checks
against the fp32 trained weights.
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dpo_kit.params import Params

FP32_RTOL = 2e-5  # of the largest |logit|: fp32 rounding of merged weights, summed over the layers
HALF_PRECISION_RTOL = 2e-2  # of the largest |logit|: fp16/bf16 rounding of merged weights alone moves logits


@dataclass
class MergeResult:
    merged_dir: str
    dtype: str
    max_abs_logit_diff: float  # trained model (adapter on base, or full fp32) vs merged model, same probe batch
    max_abs_reload_diff: float  # merged model vs its saved-and-reloaded copy
    tolerance: float
    pushed_to: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self):
        """The merge check as notebook 03 shows it: one column, each difference to three significant digits.

        Among the strings of this record pandas prints a float with six decimals, so a logit difference of 4.9e-07
        read 0.0, as if the merge were exact, while manifest.json held the real value. Every cell is text (pushed_to
        None reads None, not NaN)."""
        import pandas as pd

        shown = {key: f"{value:.3g}" if isinstance(value, float) else str(value) for key, value in self.to_dict().items()}
        return pd.Series(shown, name="merge check").to_frame()


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


def logits_of(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch.to(model.device)).logits.float()


def tolerance_for(logits, dtype, params: Params) -> float:
    """verify_atol, or a bound relative to the logits' scale where that is larger.

    Merging rounds every merged weight to the saved dtype, and across 30 layers that moves large logits by
    more than a fixed absolute bound allows while still being a correct merge: in fp32 by ~1e-5 of their
    scale (1.7e-4 on SmolLM2-135M's logits of ~20), in fp16/bf16 by ~1e-2 on a 7B model.
    """
    import torch

    relative = FP32_RTOL if dtype == torch.float32 else HALF_PRECISION_RTOL
    return max(params.merge.verify_atol, relative * float(logits.abs().max()))


def max_masked_diff(a, b, batch) -> float:
    return float((a - b).abs()[batch["attention_mask"].bool()].max())


def require_finite(logits, batch, whose: str) -> None:
    """A NaN passes every `diff > tolerance` test (a comparison with NaN is False): refuse it by name instead."""
    import torch

    if not torch.isfinite(logits[batch["attention_mask"].bool()]).all():
        raise RuntimeError(f"{whose} logits are not finite (NaN or inf): training diverged, or merge.dtype overflowed"
                           " (float16 has a narrow range: try bfloat16 or float32)")


def merge_adapter(stage) -> MergeResult:
    """Write run_dir/merged: the adapter merged into an unquantized base (LoRA), or the fully fine-tuned
    model in merge.dtype. Either way the saved model's logits are checked against the trained model's."""
    from dpo_kit.models.loading import (
        deprecated_checkpointing_alias_quiet,
        load_causal_lm,
        load_tokenizer,
        model_source,
    )

    params: Params = stage.params
    hub_token_for_push(params.merge.push_to_hub)  # before any model is loaded, not after the merge and its checks
    trained_dir = stage.run_dir / ("adapter" if params.lora.enabled else "trained")
    if not trained_dir.exists():
        raise FileNotFoundError(f"no trained model at {trained_dir}: run the train stage first")
    tokenizer = load_tokenizer(str(trained_dir), params)  # saved by train; carries the chat template
    # The probe pads on the left, on a copy: padding a batch switches padding on inside the fast tokenizer, and the
    # saved merged/ tokenizer would then pad every batch on the left where the trained one did not.
    probe_tokenizer = copy.deepcopy(tokenizer)
    probe_tokenizer.padding_side = "left"
    batch = probe_batch(probe_tokenizer, probe_prompts(stage.run_dir))
    if params.lora.enabled:
        from peft import PeftModel

        base = load_causal_lm(model_source(params, stage.project_dir), params, dtype=params.merge.dtype,
                              hardware=stage.hardware)  # never quantized, whatever training used
        untie_adapted_embeddings(base, trained_dir)
        with deprecated_checkpointing_alias_quiet():
            trained = PeftModel.from_pretrained(base, str(trained_dir)).eval()
        # Taken before merging: merge_and_unload rewrites the base weights in place.
        trained_logits = logits_of(trained, batch)
        exported = trained.merge_and_unload().eval()
    else:
        trained_logits = logits_of(load_causal_lm(str(trained_dir), params, dtype="float32", hardware=stage.hardware), batch)
        exported = load_causal_lm(str(trained_dir), params, dtype=params.merge.dtype, hardware=stage.hardware).eval()
    return save_verified(stage, exported, tokenizer, trained_logits, batch)


def untie_adapted_embeddings(base, adapter_dir: Path) -> bool:
    """Give the output layer its own copy of the embedding weights where the adapter adapts the input embeddings
    of a model that ties the two (SmolLM2, Qwen2.5-0.5B, Llama 3.2 1B, the tiny model). True where it did.

    LoRA on a tied embedding adapts only the lookup: the output layer's weight stays the base one, in training
    and in the adapter model. Merging wrote the delta into the shared tensor, so the output layer moved with it
    and the merge check refused the merged model (logits 4.4 apart on the tiny model, peft#2777). Untied first,
    the merged model computes what the adapter model does; merged/ then holds both matrices, and its config says
    they are not tied."""
    import torch
    from peft import PeftConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    inputs, outputs = base.get_input_embeddings(), base.get_output_embeddings()
    if inputs is None or outputs is None or outputs.weight is not inputs.weight:
        return False
    name = next(name for name, module in base.named_modules() if module is inputs)
    if not check_target_module_exists(PeftConfig.from_pretrained(str(adapter_dir)), name):
        return False
    outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone(), requires_grad=False)
    for config in {id(c): c for c in (base.config, base.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True


def save_verified(stage, model, tokenizer, trained_logits, batch) -> MergeResult:
    """Compare, save as safetensors, reload and compare again; optionally push."""
    from transformers import AutoModelForCausalLM

    params, merged_dir = stage.params, stage.run_dir / "merged"
    logits = logits_of(model, batch)
    require_finite(trained_logits, batch, "the trained model's")
    require_finite(logits, batch, "the merged model's")
    tolerance = tolerance_for(trained_logits, model.dtype, params)
    merge_diff = max_masked_diff(trained_logits, logits, batch)
    if merge_diff > tolerance:
        raise RuntimeError(f"merged logits differ from the trained model's by {merge_diff:.2e} > {tolerance:.1e}")
    # Training turns the cache off (a fully fine-tuned model's config keeps that); the merged model is for inference.
    model.config.use_cache = True
    model.save_pretrained(merged_dir)  # safetensors: transformers 5 writes nothing else
    tokenizer.save_pretrained(merged_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(
        merged_dir, dtype=model.dtype, trust_remote_code=params.model.trust_remote_code
    ).to(model.device)
    reloaded_logits = logits_of(reloaded, batch)
    require_finite(reloaded_logits, batch, "the reloaded merged model's")
    reload_diff = max_masked_diff(logits, reloaded_logits, batch)
    if reload_diff > tolerance:
        raise RuntimeError(f"the reloaded merged model differs by {reload_diff:.2e} > {tolerance:.1e}")
    pushed_to = push_merged(params, model, tokenizer) if params.merge.push_to_hub else None
    return MergeResult(
        merged_dir=str(merged_dir),
        dtype=str(model.dtype).removeprefix("torch."),
        max_abs_logit_diff=merge_diff,
        max_abs_reload_diff=reload_diff,
        tolerance=tolerance,
        pushed_to=pushed_to,
    )


def hub_token_for_push(push_to_hub: bool) -> str | None:
    """The token merge.push_to_hub pushes with (HF_TOKEN, never params), None when it is off. `dpo-kit run` asks
    before its first stage and the merge stage before it loads a model: found missing only by the push, at the end
    of the merge stage, it failed a run after its training (hours on a 7B model)."""
    if not push_to_hub:
        return None
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise RuntimeError("merge.push_to_hub is true but HF_TOKEN is not set in the environment: set HF_TOKEN to a"
                           " token that may write to merge.hub_model_id, or set merge.push_to_hub: false")
    return token


def push_merged(params: Params, model, tokenizer) -> str:
    """Push to params.merge.hub_model_id with the token from HF_TOKEN (never from params)."""
    token = hub_token_for_push(params.merge.push_to_hub)
    repo = params.merge.hub_model_id
    model.push_to_hub(repo, token=token, private=params.merge.private)  # safetensors, as transformers 5 always saves
    tokenizer.push_to_hub(repo, token=token, private=params.merge.private)
    return repo

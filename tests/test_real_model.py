"""The real-model tier: SmolLM2-135M-Instruct from its offline GGUF, and the controlled-sentiment recipe end to end.

This is the kit's claim that DPO *works*, checked in CI: `params/smollm2-135m-sentiment.yaml`, exactly as
the README's demo runs it (same seed, same steps), must move a real pretrained model far beyond noise on
prompts it never trained on. About 10 minutes on 2 CPU cores; `-m "not real_model"` skips the tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_kit.params import load_params

pytestmark = pytest.mark.real_model
REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "params" / "smollm2-135m-sentiment.yaml"


@pytest.fixture(scope="module")
def converted():
    """The converted SmolLM2 checkpoint, in the kit's shared cache: the demo and this tier convert it once."""
    from dpo_kit.models.loading import converted_gguf_model

    return converted_gguf_model(load_params(RECIPE), REPO)


def test_the_converted_checkpoint_is_the_gguf_model(converted):
    """Same logits as transformers' own GGUF loading, saved as safetensors with the GGUF's chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(converted.gguf_path)
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    copy = AutoModelForCausalLM.from_pretrained(converted.directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted.directory)
    assert list(converted.directory.glob("*.safetensors")) and not list(converted.directory.glob("*.bin"))
    assert "<|im_start|>" in tokenizer.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.allclose(direct(**inputs).logits, copy(**inputs).logits, atol=1e-5)
        answer = copy.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, inputs["input_ids"].shape[1] :])


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory):
    from dpo_kit.run.runner import run_pipeline

    runs = tmp_path_factory.mktemp("runs")
    run_dir = run_pipeline(RECIPE, [f"run.output_dir={runs}"], project_dir=REPO, progress=False)
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def test_dpo_makes_the_real_model_prefer_positive_reviews_on_held_out_prompts(sentiment_run):
    _, metrics = sentiment_run
    assert metrics["win_rate/n"] >= 32, "the judged win-rate needs at least 32 held-out prompts"
    assert metrics["win_rate"] >= 0.75, metrics["win_rate"]
    assert metrics["num_pairs"] >= 32
    # Far better than chance, not the 0.9 once hoped for: the implicit reward generalises worse than the
    # policy (0.72-0.80 over three seeds, 0.80 for this seed; docs/implicit-reward-accuracy.md).
    assert metrics["num_pairs"] >= 80
    assert metrics["rewards/accuracies"] >= 0.7, metrics["rewards/accuracies"]
    assert metrics["judge/policy_score"] > metrics["judge/reference_score"] + 0.3
    assert metrics["kl"] > 0.0


def test_held_out_prompts_were_never_trained_on(sentiment_run):
    run_dir, _ = sentiment_run

    def prompts(split):
        lines = (run_dir / "data" / f"{split}.jsonl").read_text().splitlines()
        return {json.dumps(json.loads(line)["prompt"]) for line in lines}

    generated = {json.dumps(json.loads(line)["prompt"]) for line in (run_dir / "generations.jsonl").read_text().splitlines()}
    assert generated <= prompts("eval") and not prompts("eval") & prompts("train")


def test_the_manifest_records_the_gguf_and_every_prompt_is_accounted_for(sentiment_run, converted):
    run_dir, _ = sentiment_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["model"]["gguf_sha256"] == converted.gguf_sha256
    assert manifest["model"]["name_or_path"] == "smollm2-135m-instruct"
    data = manifest["data"]
    assert data["rows_read"] == load_params(RECIPE).data.max_rows == data["rows_kept"] + data["rows_dropped"]
    dropped = (run_dir / "data" / "dropped.jsonl").read_text().splitlines()
    assert len(dropped) == data["rows_dropped"]
    assert all(json.loads(line)["reason"] == "score_gap_too_small" for line in dropped)


def test_the_judges_length_floor_decided_few_of_the_recipes_pairs(sentiment_run):
    """Pairs whose rejected response is floored (fewer than 8 words) teach length, not sentiment: at 8 tokens the floor
    decided 212 of 215 pairs and the held-out accuracy passed 0.9 without the policy turning positive (README). The
    recipe's pairs must be ranked by sentiment: 12 of 348 were decided by the floor for seed 0."""
    run_dir, _ = sentiment_run
    floor = json.loads((run_dir / "data" / "report.json").read_text())["judge_floor"]
    assert floor["pairs"] > 0 and floor["pairs_decided_by_floor"] <= 0.1 * floor["pairs"], floor

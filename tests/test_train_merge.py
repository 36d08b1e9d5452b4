"""Train and merge through the library (no kernels): LoRA, QLoRA 4-bit on CPU, and full fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpo_kit.run.stage import StageError, open_stage

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "params" / "tiny.yaml")


def formatted_run(tmp_path, tiny_model_dir, *extra):
    """A run directory whose format stage is done; returns the overrides that name it."""
    from dpo_kit.data.pipeline import prepare_data
    from dpo_kit.models.loading import load_tokenizer

    overrides = [f"run.output_dir={tmp_path}", f"model.name_or_path={tiny_model_dir}", "dpo.max_steps=3",
                 "dpo.logging_steps=1", "dpo.save_steps=3", *extra]
    stage = open_stage("format", TINY, overrides, str(REPO))
    prepare_data(stage.params, load_tokenizer(str(tiny_model_dir), stage.params), stage.run_dir, stage.project_dir)
    stage.complete()
    return overrides


def test_build_dpo_config_follows_hardware_unless_params_say_otherwise(tmp_path):
    from dpo_kit.hardware import HardwareChoice, choose_hardware
    from dpo_kit.params import load_params
    from dpo_kit.training.train import build_dpo_config, dpo_config_kwargs, precision_record

    # A GPU choice is checked on its kwargs: transformers refuses bf16 configs on a machine without bf16.
    gpu = HardwareChoice("cuda", "A100", 1, True, True, False, True, "bfloat16", "test")
    assert precision_record(dpo_config_kwargs(load_params(TINY), tmp_path, gpu)) == {
        "bf16": True, "fp16": False, "gradient_checkpointing": True}
    explicit = load_params(TINY, ["dpo.gradient_checkpointing=false", "dpo.fp16=true"])
    assert precision_record(dpo_config_kwargs(explicit, tmp_path, gpu)) == {  # fp16 replaces the GPU's bf16
        "bf16": False, "fp16": True, "gradient_checkpointing": False}
    config = build_dpo_config(load_params(TINY), tmp_path, choose_hardware())
    assert precision_record(config) == {"bf16": False, "fp16": False, "gradient_checkpointing": False}
    assert config.output_dir == str(tmp_path / "checkpoints") and config.seed == 42
    # Pinned memory only where a GPU reads the batches: on a CPU torch would warn that it is unused.
    assert config.dataloader_pin_memory is False
    assert dpo_config_kwargs(load_params(TINY), tmp_path, gpu)["dataloader_pin_memory"] is True
    # bf16 asked for on a CPU (one with native bf16 trains a real model faster so): transformers refuses it without
    # use_cpu, so the kit sets that on a CPU.
    cpu = HardwareChoice("cpu", "x86_64", 2, True, False, False, False, "float32", "test")
    asked = build_dpo_config(load_params(TINY, ["dpo.bf16=true"]), tmp_path, cpu)
    assert precision_record(asked)["bf16"] is True and asked.use_cpu is True
    assert "use_cpu" not in dpo_config_kwargs(load_params(TINY), tmp_path, gpu)


def test_lora_train_then_merge_gives_equal_logits(tmp_path, tiny_model_dir):
    from dpo_kit.training.merge import merge_adapter
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir)
    stage = open_stage("train", TINY, overrides, str(REPO))
    result = train_dpo(stage)
    stage.complete(**result.summary())
    assert 0 < result.trainable_parameters < result.total_parameters
    assert (stage.run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (stage.run_dir / "checkpoints" / "checkpoint-3").is_dir()
    logged = [row for row in result.log_history if "loss" in row]
    assert len(logged) == 3 and all(k in logged[0] for k in ("rewards/margins", "rewards/accuracies", "logps/chosen"))
    # The manifest's final_metrics are the last step's (each step's row carries a train_runtime too, with the tokens
    # counted: that row is no summary row), and the summary row's runtime.
    final = json.loads((stage.run_dir / "manifest.json").read_text())["stages"]["train"]["final_metrics"]
    assert {key: final[key] for key in ("loss", "rewards/margins", "rewards/accuracies")} == {
        key: logged[-1][key] for key in ("loss", "rewards/margins", "rewards/accuracies")}
    assert final["train_runtime"] == result.log_history[-1]["train_runtime"] and "train_loss" not in final

    stage = open_stage("merge", TINY, overrides, str(REPO))
    merged = merge_adapter(stage)
    assert merged.max_abs_logit_diff <= merged.tolerance and merged.max_abs_reload_diff <= merged.tolerance
    assert (stage.run_dir / "merged" / "model.safetensors").exists()
    assert (stage.run_dir / "merged" / "chat_template.jinja").exists()
    config = json.loads((stage.run_dir / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    # The logits probe pads on the left; the saved tokenizer pads as the trained one did (no padding baked in).
    tokenizers = [json.loads((stage.run_dir / d / "tokenizer.json").read_text()) for d in ("adapter", "merged")]
    assert tokenizers[0]["padding"] == tokenizers[1]["padding"]

    with pytest.raises(StageError, match="already completed"):
        open_stage("train", TINY, overrides, str(REPO))


def test_qlora_4bit_trains_on_cpu_and_merges_into_an_unquantized_base(tmp_path, tiny_model_dir):
    from dpo_kit.training.merge import merge_adapter
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir, "quantization.bits=4", "lora.target_modules=[q_proj,v_proj]")
    stage = open_stage("train", TINY, overrides, str(REPO))
    result = train_dpo(stage)
    stage.complete(**result.summary())
    from safetensors.torch import load_file

    # LoRA's B matrices start at zero: non-zero after 3 steps means gradients flowed through the 4-bit layers.
    adapter = load_file(stage.run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in adapter.items() if "lora_B" in name]
    assert lora_b and all(tensor.abs().max() > 0 for tensor in lora_b)
    adapter_config = json.loads((stage.run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "v_proj"}
    merged = merge_adapter(open_stage("merge", TINY, overrides, str(REPO)))
    assert merged.dtype == "float32" and merged.max_abs_logit_diff <= merged.tolerance


def test_full_fine_tuning_trains_every_weight_and_exports_in_the_merge_dtype(tmp_path, tiny_model_dir):
    from dpo_kit.training.merge import merge_adapter
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir, "lora.enabled=false", "merge.dtype=bfloat16")
    stage = open_stage("train", TINY, overrides, str(REPO))
    result = train_dpo(stage)
    stage.complete(**result.summary())
    assert result.trainable_parameters == result.total_parameters
    assert (stage.run_dir / "trained" / "model.safetensors").exists() and not (stage.run_dir / "adapter").exists()
    merged = merge_adapter(open_stage("merge", TINY, overrides, str(REPO)))
    assert merged.dtype == "bfloat16" and 0 < merged.max_abs_logit_diff <= merged.tolerance
    config = json.loads((stage.run_dir / "merged" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    # Training turned the cache off in trained/config.json; the merged model is for inference, as LoRA's is.
    assert json.loads((stage.run_dir / "trained" / "config.json").read_text())["use_cache"] is False
    assert config["use_cache"] is True


def test_a_merge_whose_logits_are_not_finite_is_refused(tmp_path, tiny_model_dir):
    """NaN passes every `difference > tolerance` test, so the check looks for it by name."""
    import torch
    from safetensors.torch import load_file, save_file

    from dpo_kit.training.merge import merge_adapter
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir)
    stage = open_stage("train", TINY, overrides, str(REPO))
    stage.complete(**train_dpo(stage).summary())
    weights = stage.run_dir / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(name for name in tensors if "lora_B" in name)
    tensors[name][0, 0] = torch.nan  # a diverged training
    save_file(tensors, weights)
    with pytest.raises(RuntimeError, match="the trained model's logits are not finite"):
        merge_adapter(open_stage("merge", TINY, overrides, str(REPO)))


def test_the_merge_check_table_shows_a_small_logit_difference_as_it_is():
    """Notebook 03's table: pandas printed 4.9e-07 among the record's strings as 0.0, an exact merge it was not."""
    from dpo_kit.training.merge import MergeResult

    result = MergeResult(merged_dir="runs/x/merged", dtype="float32", max_abs_logit_diff=4.880130290985107e-07,
                         max_abs_reload_diff=0.0, tolerance=1e-4, pushed_to=None)
    shown = result.table()["merge check"]
    assert shown["max_abs_logit_diff"] == "4.88e-07"
    assert shown["tolerance"] == "0.0001"
    assert shown["merged_dir"] == "runs/x/merged" and shown["pushed_to"] == "None"
    assert "4.88e-07" in result.table().to_string()


def test_push_to_hub_reaches_the_hub_call(monkeypatch, tiny_model_dir):
    """Offline, the push fails at the hub, not at its own arguments (transformers 5 took safe_serialization away)."""
    from huggingface_hub.errors import OfflineModeIsEnabled
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_kit.params import load_params
    from dpo_kit.training.merge import push_merged

    monkeypatch.setenv("HF_TOKEN", "hf-token-for-the-test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    params = load_params(TINY, ["merge.push_to_hub=true", "merge.hub_model_id=someone/tiny-dpo"])
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(OfflineModeIsEnabled):
        push_merged(params, model, tokenizer)


def test_a_push_without_a_token_is_refused_before_the_first_stage_not_after_the_merge(monkeypatch, tmp_path):
    """merge.push_to_hub without HF_TOKEN was found only by the push, at the end of the merge stage: `dpo-kit run`
    formatted and trained first, then failed."""
    from types import SimpleNamespace

    import papermill

    from dpo_kit import manifest as mf
    from dpo_kit.params import load_params
    from dpo_kit.run.runner import RunError, run_pipeline
    from dpo_kit.training.merge import merge_adapter

    started = []
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: started.append(args[0]))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    pushing = [f"run.output_dir={tmp_path}", "run.name=pushed", "merge.push_to_hub=true",
               "merge.hub_model_id=someone/tiny-dpo"]  # fmt: skip

    def run(stages=None, **kwargs):
        return run_pipeline(TINY, pushing, stages, project_dir=REPO, progress=False, isolate_stages=True, **kwargs)

    with pytest.raises(RunError, match="merge.push_to_hub is true but HF_TOKEN is not set.*Nothing was run"):
        run()
    assert started == [] and not (tmp_path / "pushed").exists()
    # The merge stage itself asks before it loads a model: here there is none to load.
    stage = SimpleNamespace(params=load_params(TINY, pushing), run_dir=tmp_path, project_dir=REPO)
    with pytest.raises(RuntimeError, match="HF_TOKEN is not set in the environment: set HF_TOKEN"):
        merge_adapter(stage)
    # Without the merge stage, or resuming a run whose merge stage completed (and pushed), no token is needed.
    run(["format"])
    run_dir = tmp_path / "pushed"
    for stage_name in ("format", "train", "merge"):
        mf.update_stage(run_dir, stage_name, status="completed")
    run(resume=True)
    assert [Path(notebook).name for notebook in started] == ["01_format_data.ipynb", "04_generate.ipynb",
                                                               "05_evaluate.ipynb"]  # fmt: skip


def test_params_that_differ_from_the_runs_first_stage_are_refused(tmp_path, tiny_model_dir):
    from dpo_kit.params import ParamsError

    overrides = formatted_run(tmp_path, tiny_model_dir)
    with pytest.raises(ParamsError, match="dpo.beta: 0.1 -> 0.5"):
        open_stage("train", TINY, [*overrides, "dpo.beta=0.5"], str(REPO))


def test_lora_on_tied_input_embeddings_merges_into_an_untied_output_layer(tmp_path, tiny_model_dir):
    """The tiny model ties its output layer to the embeddings, as SmolLM2 does. LoRA on embed_tokens adapts the
    lookup alone; merged into the shared tensor it moved the output layer too, and the merge check refused the
    merged model ("merged logits differ from the trained model's by 4.43e+00")."""
    from safetensors.torch import load_file

    from dpo_kit.training.merge import merge_adapter
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir, "lora.target_modules=[q_proj,embed_tokens]")
    stage = open_stage("train", TINY, overrides, str(REPO))
    stage.complete(**train_dpo(stage).summary())
    merged = merge_adapter(open_stage("merge", TINY, overrides, str(REPO)))
    assert merged.max_abs_logit_diff <= merged.tolerance and merged.max_abs_reload_diff <= merged.tolerance
    config = json.loads((stage.run_dir / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    base, weights = load_file(Path(tiny_model_dir) / "model.safetensors"), load_file(Path(merged.merged_dir) / "model.safetensors")
    embedding = next(name for name in base if "embed_tokens" in name)
    assert (weights["lm_head.weight"] == base[embedding]).all()  # the output layer as trained: the base's
    assert not (weights[embedding] == base[embedding]).all()  # the lookup, with the adapter merged in


@pytest.mark.parametrize("logging_steps", [1, 3], ids=["logged-at-the-checkpoint", "not-logged-at-the-checkpoint"])
def test_a_resumed_training_logs_trls_num_tokens_from_the_checkpoints_count(tmp_path, tiny_model_dir, monkeypatch,
                                                                            logging_steps):
    """TRL keeps num_tokens in the trainer, not in the checkpoint: a resumed run logged it from 0 again. It goes on
    from the checkpoint's count, as the Trainer's num_input_tokens_seen (the same attention masks) does."""
    import dpo_kit.training.checkpoints as checkpoints
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir, "dpo.max_steps=6", "dpo.save_steps=2",
                              f"dpo.logging_steps={logging_steps}")  # fmt: skip
    record = checkpoints.record_checkpoint

    def interrupted_after_checkpoint_4(run_dir, checkpoint, identity, step):
        digest = record(run_dir, checkpoint, identity, step)
        if step == 4:
            raise KeyboardInterrupt
        return digest

    monkeypatch.setattr(checkpoints, "record_checkpoint", interrupted_after_checkpoint_4)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(open_stage("train", TINY, overrides, str(REPO)))
    monkeypatch.setattr(checkpoints, "record_checkpoint", record)
    stage = open_stage("train", TINY, overrides, str(REPO), on_rerun="resume")
    assert stage.resume_from.name == "checkpoint-4"
    result = train_dpo(stage)
    stage.complete(**result.summary())
    rows = [row for row in result.log_history if "loss" in row]
    assert [row["step"] for row in rows] == list(range(logging_steps, 7, logging_steps))
    assert all(row["num_tokens"] == row["num_input_tokens_seen"] for row in rows), [
        (row["step"], row["num_tokens"], row["num_input_tokens_seen"]) for row in rows]
    assert result.final_metrics["num_tokens"] == result.log_history[-1]["num_input_tokens_seen"]


def test_the_training_curves_mark_ln_2_only_for_a_loss_that_starts_there():
    """The ln 2 line says 'a loss parked here learnt nothing'. It was drawn for every loss type, where IPO starts at
    (1/(2 beta))^2 and hinge at 1, so a reader of an IPO run saw a curve far from it and took that for learning."""
    from dpo_kit.params import load_params
    from dpo_kit.training.train import plot_training_curves

    history = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.5}]

    def marked(overrides):
        figure = plot_training_curves(history, None, load_params(TINY, overrides))
        return [line.get_label() for line in figure.axes[0].get_lines() if "ln 2" in line.get_label()]

    assert marked([]) == ["ln 2 (no learning)"]  # sigmoid, TRL's default
    assert marked(["dpo.loss_type=robust", "dpo.label_smoothing=0.1"]) == ["ln 2 (no learning)"]
    assert marked(["dpo.loss_type=ipo"]) == []
    assert marked(["dpo.loss_type=hinge"]) == []
    assert marked(["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0,1.0]"]) == []


def test_the_model_cards_a_run_writes_link_no_missing_hub_model_and_name_no_local_path(tmp_path, tiny_model_dir):
    """TRL's card in checkpoints/ linked huggingface.co/None for a local base model and loaded model="None" in its
    quick start, and peft's cards (each checkpoint, adapter/) gave the base model's absolute path as base_model."""
    from dpo_kit.training.train import train_dpo

    overrides = formatted_run(tmp_path, tiny_model_dir)
    stage = open_stage("train", TINY, overrides, str(REPO))
    stage.complete(**train_dpo(stage).summary())
    cards = sorted(stage.run_dir.rglob("README.md"))
    assert {card.parent.name for card in cards} == {"checkpoints", "checkpoint-3", "adapter"}
    for card in cards:
        text = card.read_text()
        assert "huggingface.co/None" not in text and 'model="None"' not in text, card
        assert str(tiny_model_dir) not in text and str(tmp_path) not in text and "base_model" not in text, card
    assert "a fine-tuned version of a local model" in (stage.run_dir / "checkpoints" / "README.md").read_text()

    # A hub id is the base model's name on the hub: kept, and linked.
    from dpo_kit.training.train import keep_model_card_links_true

    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "README.md").write_text("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\ntags:\n- base_model:adapter:"
                                   "HuggingFaceTB/SmolLM2-135M-Instruct\n---\n\nA fine-tuned version of [HuggingFaceTB/"
                                   "SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct).\n")
    before = (hub / "README.md").read_text()
    keep_model_card_links_true(hub)
    assert (hub / "README.md").read_text() == before

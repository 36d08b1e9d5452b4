"""The tiny offline model: deterministic bytes, a working chat template, loaded like a hub model."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_kit.models.tiny import build_tiny_model
from dpo_kit.run.cli import main


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path, tiny_model_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    files = sorted(p.name for p in tiny_model_dir.iterdir())
    assert "model.safetensors" in files and not any(name.endswith(".bin") for name in files)
    for name in files:
        assert (tiny_model_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert (tiny_model_dir / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()


def test_loads_through_auto_classes_with_chatml_eos_and_pad(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips, special tokens included


def test_cli_builds_the_model(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "config.json").exists()
    assert "tiny model written" in capsys.readouterr().out


def test_cli_refuses_a_directory_that_holds_files_unless_asked_to_overwrite(tmp_path, capsys):
    merged = tmp_path / "run" / "merged"  # a run's trained, merged model
    merged.mkdir(parents=True)
    (merged / "model.safetensors").write_bytes(b"trained weights")
    (merged / "config.json").write_text("{}")
    assert main(["tiny-model", str(merged)]) == 1
    err = capsys.readouterr().err
    assert f"{merged} exists and is not empty (it holds config.json, model.safetensors)" in err, err
    assert "--overwrite" in err and "Traceback" not in err
    assert (merged / "model.safetensors").read_bytes() == b"trained weights", "nothing was overwritten"
    (tmp_path / "a-file").write_text("mine")
    assert main(["tiny-model", str(tmp_path / "a-file"), "--overwrite"]) == 1
    assert "is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_text() == "mine"

    assert main(["tiny-model", str(merged), "--overwrite"]) == 0
    assert (merged / "model.safetensors").read_bytes() != b"trained weights"
    (tmp_path / "empty").mkdir()
    assert main(["tiny-model", str(tmp_path / "empty")]) == 0, "an empty directory holds nothing to overwrite"


def test_ensure_builds_over_what_a_build_cut_short_left_at_the_kits_path(tmp_path):
    from dpo_kit.models.tiny import ensure_tiny_model

    path = tmp_path / "_tiny-chat-model"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"half-written")  # no config.json: the build did not finish
    assert (ensure_tiny_model(path) / "config.json").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_model(path)
    # save_pretrained writes config.json first: a build killed in the weights left it beside half the weights.
    (path / "model.safetensors").write_bytes(b"half-written")
    (path / "tokenizer.json").unlink()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ensure_tiny_model(path))  # loads: built over, not reused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_tiny-chat-model"], "no staging copy left"


def test_a_build_that_dies_leaves_nothing_at_the_kits_path(tmp_path, monkeypatch):
    """A build killed half-way must not leave a directory that later runs take for a model (they load it and fail)."""
    from transformers import PreTrainedTokenizerFast

    from dpo_kit.models.tiny import ensure_tiny_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as Ctrl-C between the weights and the tokenizer

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", killed)
    path = tmp_path / "_tiny-chat-model"
    with pytest.raises(KeyboardInterrupt):
        ensure_tiny_model(path)
    assert list(tmp_path.iterdir()) == [], "neither the model's path nor a staging copy"
    monkeypatch.undo()
    assert (ensure_tiny_model(path) / "tokenizer.json").is_file()


# Real models' shapes, built at random for the GPU checks (bench/gpu_train.py): the parameter counts of the real
# models, counted on the meta device (no memory), and a clear refusal of an unknown shape or a used directory.
@pytest.mark.parametrize("shape, parameters", [("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768)])
def test_random_model_shapes_have_the_real_models_parameter_counts(shape, parameters):
    import torch

    from dpo_kit.models.tiny import build_tiny_tokenizer, random_model_config

    tokenizer = build_tiny_tokenizer(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(random_model_config(shape, tokenizer))
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert model.config.eos_token_id == tokenizer.eos_token_id and len(tokenizer) <= model.config.vocab_size


def test_an_unknown_shape_or_a_directory_holding_a_model_is_refused(tmp_path, tiny_model_dir):
    from dpo_kit.models.tiny import build_random_model

    with pytest.raises(ValueError, match="unknown model shape 'llama-7b'; known shapes: smollm2-135m, qwen2.5-0.5b"):
        build_random_model(tmp_path / "m", "llama-7b")
    with pytest.raises(FileExistsError, match="already holds a model"):
        build_random_model(tiny_model_dir, "smollm2-135m")
